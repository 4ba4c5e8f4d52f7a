"""``mailsh demo``: the whole round trip on this machine."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mailsh.cli import REMOTE_EXIT_CODES_HELP, app, say


@app.command(epilog=REMOTE_EXIT_CODES_HELP)
def demo(
    command: Annotated[
        str, typer.Argument(help="The command to run on the demo server.")
    ] = "uname -a",
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary homes to look at afterwards.")
    ] = False,
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout", metavar="S", help="Give up waiting for the reply after S seconds."
        ),
    ] = 120.0,
    old_timeout: Annotated[
        Optional[float],  # noqa: UP045 - typer needs Optional at runtime on 3.11
        typer.Option("--timeout", hidden=True, help="The old name of --wait-timeout."),
    ] = None,
) -> None:
    """Run COMMAND through a real round trip: keys, serve, SMTP, reply — all local.

    Creates a client and a server identity in a temporary directory, cross-trusts them,
    starts `mailsh serve` with its embedded SMTP listener on 127.0.0.1, sends COMMAND,
    waits for the signed, encrypted reply, prints the output and the time each step
    took, and cleans up. Needs no mail server and no root. Exits with the remote status.
    """
    from mailsh.cli.client import render_reply
    from mailsh.demo import run_demo

    timeout = wait_timeout if old_timeout is None else old_timeout
    result = run_demo(command, keep=keep, timeout=timeout, progress=lambda m: say(f"demo: {m}"))
    say(f"demo: reply to request {result.request_id} verified; remote output follows")
    say("demo: step timings:")
    for name, seconds in result.steps:
        say(f"  {name:<28} {seconds * 1000:8.0f} ms")
    if result.directory is not None:
        say(f"demo: homes kept in {result.directory}")
    render_reply(result.reply, json_out=False)
