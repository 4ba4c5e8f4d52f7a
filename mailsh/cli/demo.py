"""``mailsh demo``: the whole round trip on this machine."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mailsh.cli import REMOTE_EXIT_CODES_HELP, app, say
from mailsh.cli.options import OptFloat, OptPath

if TYPE_CHECKING:
    from mailsh.demo import Playground


@app.command(epilog=REMOTE_EXIT_CODES_HELP)
def demo(
    command: Annotated[
        str, typer.Argument(help="The command to run on the demo server.")
    ] = "uname -a",
    keep: Annotated[
        OptPath,
        typer.Option(
            "--keep",
            metavar="DIR",
            help="Make the two homes in DIR (new or empty) and leave them there, wired to "
            "each other, as a playground for the ordinary commands (see docs/tutorial.md).",
        ),
    ] = None,
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout", metavar="S", help="Give up waiting for the reply after S seconds."
        ),
    ] = 120.0,
    old_timeout: Annotated[
        OptFloat,
        typer.Option("--timeout", hidden=True, help="The old name of --wait-timeout."),
    ] = None,
) -> None:
    """Run COMMAND through a real round trip: keys, serve, SMTP, reply — all local.

    Creates a client and a server identity in a temporary directory, cross-trusts them,
    starts `mailsh serve` with its embedded SMTP listener on 127.0.0.1, sends COMMAND,
    waits for the signed, encrypted reply, prints the output and the time each step
    took, and cleans up. Needs no mail server and no root. Exits with the remote status.
    With --keep DIR it then prints the commands that start the server and send more
    requests from the client home.
    """
    from mailsh.cli.client import render_reply
    from mailsh.demo import check_keep_dir, run_demo

    timeout = wait_timeout if old_timeout is None else old_timeout
    if keep is not None:
        check_keep_dir(keep)  # before two keys are generated for nothing
    result = run_demo(command, keep=keep, timeout=timeout, progress=lambda m: say(f"demo: {m}"))
    say(f"demo: reply to request {result.request_id} verified; remote output follows")
    say("demo: step timings:")
    for name, seconds in result.steps:
        say(f"  {name:<28} {seconds * 1000:8.0f} ms")
    if result.playground is not None:
        _explain(result.playground)
    render_reply(result.reply, json_out=False)


def program() -> str:
    """How to run this mailsh again from a shell: ``mailsh`` if that is on PATH."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "mailsh" and argv0.is_file():
        found = shutil.which("mailsh")
        if found is not None and Path(found).resolve() == argv0.resolve():
            return "mailsh"
        return shlex.quote(str(argv0.absolute()))
    return f"{shlex.quote(sys.executable)} -m mailsh"


def playground_commands(playground: Playground) -> tuple[str, list[str]]:
    """The shell lines that start the playground's server and use its client home."""
    prog = program()
    start = shlex.join(playground.start_server)
    return f"{prog} {start}", [f"{prog} {shlex.join(argv)}" for argv in playground.try_client]


def _explain(playground: Playground) -> None:
    start, client = playground_commands(playground)
    say(f"demo: playground kept in {playground.root}:")
    say(f"  server home {playground.server_home}, client home {playground.client_home},")
    say("  each with a mailsh.toml; no mail server: the client sends to the server's")
    say(f"  SMTP listener on {playground.listen}, replies land in the client's Maildir.")
    say("demo: start the server (it stays in the foreground; Ctrl-C stops it):")
    say(f"  {start}")
    say("demo: then, in another terminal, use the client home:")
    for line in client:
        say(f"  {line}")
    say("demo: what next, up to a real deployment: docs/tutorial.md")
