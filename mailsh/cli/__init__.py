"""The ``mailsh`` command: a typer app and nothing else.

Each command parses its options, builds :class:`~mailsh.settings.Settings`, calls the
library, and renders the result. Errors are caught in exactly one place, :func:`main`,
which maps them to :class:`~mailsh.errors.ExitCode`. Heavy modules (pydantic, gnupg,
asyncio) are imported inside commands so ``mailsh --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mailsh.errors import ExitCode, MailshError

if TYPE_CHECKING:
    from rich.console import Console

    from mailsh.keys.gpg import Gpg
    from mailsh.settings import Settings

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 usage error; 75 (deliver) temporary failure, the MTA retries; "
    "255 mailsh itself failed; wait-reply and send --wait pass the remote command's status "
    "through (128+N when killed by signal N), like ssh."
)

app = typer.Typer(
    name="mailsh",
    help="Remote shell by email: signed commands in, signed and encrypted results out.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,
)
keys_app = typer.Typer(help="Show or export this home's own key.", no_args_is_help=True)
trust_app = typer.Typer(
    help="Pin the keys allowed to talk to this home (the only source of authorization).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
app.add_typer(trust_app, name="trust")


class GlobalOpts:
    home: Path | None = None
    debug: bool = False


def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def say(text: str) -> None:
    """A diagnostic line on stderr (never stdout: stdout carries data)."""
    err_console().print(text, markup=False)


def settings_from(**flags: Any) -> Settings:
    from mailsh.settings import ensure_home, load_settings

    settings = load_settings(home=GlobalOpts.home, **flags)
    ensure_home(settings)
    return settings


HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.11
    typer.Option(
        "--home",
        envvar="MAILSH_HOME",
        help="State directory of this identity (keys, trust store, state).",
        show_default="~/.local/share/mailsh",
    ),
]


def _print_version(value: bool) -> None:
    if value:
        from mailsh import __version__

        typer.echo(f"mailsh {__version__}")
        raise typer.Exit(0)


# Options for the way mail leaves this machine: the same settings for `send` and `serve`.
SmtpOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--smtp",
        metavar="URL",
        envvar="MAILSH_SMTP",
        help="Send via smtp://[user@]host[:port] (STARTTLS when offered) or "
        "smtps://[user@]host[:port]; password from MAILSH_SMTP_PASSWORD.",
        show_default=False,
    ),
]
SendmailOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--sendmail",
        metavar="PATH",
        envvar="MAILSH_SENDMAIL",
        help="Hand the mail to this local sendmail program instead (e.g. /usr/sbin/sendmail).",
        show_default=False,
    ),
]
SmtpCaOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--ca-file",
        metavar="FILE",
        envvar="MAILSH_SMTP_CA_FILE",
        help="PEM file of the CA(s) to trust for the SMTP server (private CAs).",
        show_default=False,
    ),
]


@app.callback()
def _main(
    home: HomeOpt = None,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MAILSH_DEBUG", help="Show tracebacks.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    GlobalOpts.home = home
    GlobalOpts.debug = debug


def gpg_for(settings: Settings) -> Gpg:
    from mailsh.keys.gpg import Gpg

    return Gpg(settings.gnupg_home, binary=settings.gpg_binary, max_output=settings.max_gpg_output)


def usage_error(message: str, hint: str) -> MailshError:
    from mailsh.errors import UsageError

    return UsageError(message, hint=hint)


# -- error funnel ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map every expected failure to one exit code.

    typer/click handle usage errors themselves (exit 2) and exit via SystemExit;
    MailshError propagates out of the app and is rendered here, and only here.
    """
    try:
        app(args=argv, prog_name="mailsh")
    except MailshError as exc:
        if GlobalOpts.debug:
            import traceback

            traceback.print_exc()
        say(f"mailsh: {exc.message}")
        if exc.hint:
            say(f"  next: {exc.hint}")
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        say("mailsh: interrupted")
        sys.exit(int(ExitCode.FAILURE))


# Register the commands (each module only imports typer at import time).
from mailsh.cli import client as _client  # noqa: E402
from mailsh.cli import demo as _demo  # noqa: E402
from mailsh.cli import keys as _keys  # noqa: E402
from mailsh.cli import server as _server  # noqa: E402

__all__ = ["GlobalOpts", "app", "gpg_for", "main", "say", "settings_from", "usage_error"]
_ = (_keys, _server, _client, _demo)
