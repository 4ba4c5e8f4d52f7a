"""Shell completion for bash, zsh and fish.

``mailsh --install-completion`` installs it for the shell it runs in;
``mailsh --show-completion SHELL`` prints the script to install by hand. The scripts and
the completion protocol (``_MAILSH_COMPLETE=complete_SHELL``) are typer's; the options
are declared here so that ``--show-completion`` takes the shell as its value.
"""

from __future__ import annotations

import enum
import os
from typing import Annotated, Optional

import typer

from mailsh.cli import app, usage_error


class Shell(enum.StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def complete_var(prog_name: str) -> str:
    """The environment variable that asks ``prog_name`` for completions."""
    return "_{}_COMPLETE".format(prog_name.replace("-", "_").upper())


def prepare(prog_name: str, var: str | None) -> None:
    """Before a completion request is answered: register typer's bash/zsh/fish classes
    (only then, so that a normal run does not import them)."""
    if os.environ.get(var or complete_var(prog_name)):
        from typer._completion_classes import completion_init

        completion_init()


def _prog_name(ctx: typer.Context) -> str:
    return ctx.find_root().info_name or "mailsh"


def _script(ctx: typer.Context, shell: Shell) -> str:
    from typer._completion_shared import get_completion_script

    name = _prog_name(ctx)
    return get_completion_script(prog_name=name, complete_var=complete_var(name), shell=shell)


def _detected_shell() -> Shell:
    import shellingham  # type: ignore[import-untyped]  # typer depends on it for this

    try:
        name = shellingham.detect_shell()[0]
    except shellingham.ShellDetectionFailure:
        name = os.path.basename(os.environ.get("SHELL", ""))
    try:
        return Shell(name)
    except ValueError:
        raise usage_error(
            f"cannot install completion for the shell {name or '(unknown)'}",
            "mailsh completes in bash, zsh and fish: mailsh --show-completion bash "
            "prints the script to install by hand",
        ) from None


def _show(ctx: typer.Context, value: Optional[Shell]) -> None:  # noqa: UP045
    if value is None or ctx.resilient_parsing:
        return
    typer.echo(_script(ctx, value))
    raise typer.Exit(0)


def _install(ctx: typer.Context, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from typer._completion_shared import install

    shell = _detected_shell()
    name = _prog_name(ctx)
    _, path = install(shell=shell.value, prog_name=name, complete_var=complete_var(name))
    typer.echo(f"{shell.value} completion installed in {path}; it works in new shells")
    raise typer.Exit(0)


@app.callback()
def _root(
    install_completion: Annotated[
        bool,
        typer.Option(
            "--install-completion",
            help="Install completion for the shell this runs in (bash, zsh or fish).",
            callback=_install,
            is_eager=True,
            expose_value=False,
        ),
    ] = False,
    show_completion: Annotated[
        Optional[Shell],  # noqa: UP045 - typer needs Optional at runtime on 3.11
        typer.Option(
            "--show-completion",
            metavar="SHELL",
            help="Print the completion script for SHELL (bash, zsh or fish) to install it "
            "yourself.",
            callback=_show,
            is_eager=True,
            expose_value=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """The top-level options of mailsh (the global ones are on every command)."""
