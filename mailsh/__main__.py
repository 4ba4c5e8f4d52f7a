from mailsh.cli import main

main()
