"""``python -m bench``: what ``./dev bench`` runs."""

from bench.run import main

main()
