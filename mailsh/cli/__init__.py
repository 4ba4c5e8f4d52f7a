"""The ``mailsh`` command: the typer app, and the one error funnel.

Each command parses its options, builds :class:`~mailsh.settings.Settings`, calls the
library, and renders the result. Errors are caught in exactly one place, :func:`main`,
which maps them to :class:`~mailsh.errors.ExitCode`. Heavy modules (pydantic, gnupg,
asyncio) are imported inside commands so ``mailsh --help`` stays fast. The command
classes (global options, help layout) are in ``command.py``, options several commands
share in ``options.py``, the commands in ``client.py``, ``server.py``, ``keys.py``,
``demo.py`` and ``completion.py``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from mailsh.cli.command import GlobalOpts, MailshTyper
from mailsh.errors import ExitCode, MailshError

if TYPE_CHECKING:
    from rich.console import Console

    from mailsh.keys.gpg import Gpg
    from mailsh.settings import Settings

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 usage error; 73 (deliver) message too large, the MTA bounces "
    "it; 75 (deliver) temporary failure, the MTA retries; "
    "255 mailsh itself failed; wait-reply and send --wait pass the remote command's status "
    "through (128+N when killed by signal N), like ssh."
)
REMOTE_EXIT_CODES_HELP = (
    "Exit codes: the remote command's status (128+N when it was killed by signal N), like "
    "ssh; 255 mailsh itself failed; 2 usage error."
)


app = MailshTyper(
    name="mailsh",
    help="Remote shell by email: signed commands in, signed and encrypted results out.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # main() renders every failure as one line
    add_completion=False,  # mailsh.cli.completion declares its own options
    rich_markup_mode=None,
)
keys_app = MailshTyper(help="Show or export this home's own key.", no_args_is_help=True)
trust_app = MailshTyper(
    help="Pin the keys allowed to talk to this home (the only source of authorization).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
app.add_typer(trust_app, name="trust")


def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def say(text: str) -> None:
    """A diagnostic line on stderr (never stdout: stdout carries data)."""
    err_console().print(text, markup=False)


def settings_from(**flags: Any) -> Settings:
    """Settings from the options of the running command.

    An option's value that typer took from its ``MAILSH_*`` variable is not a flag: it
    is dropped here, and the settings read the variable themselves, at the environment's
    place in the precedence (flag > env > mailsh.toml; see mailsh.settings).
    """
    from mailsh.home import ensure_home
    from mailsh.settings import load_settings

    given = {
        name: value
        for name, value in flags.items()
        if f"MAILSH_{name.upper()}" not in GlobalOpts.from_env
    }
    settings = load_settings(home=GlobalOpts.home, **given)
    ensure_home(settings)
    return settings


def gpg_for(settings: Settings) -> Gpg:
    from mailsh.keys.gpg import Gpg

    return Gpg.for_settings(settings)


def usage_error(message: str, hint: str) -> MailshError:
    from mailsh.errors import UsageError

    return UsageError(message, hint=hint)


# -- error funnel ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map every failure to one line, a next step and one
    exit code, here and only here: usage errors (exit 2), MailshError (its code, mostly
    255) and any other exception (255, "run again with --debug").
    """
    try:
        status = app(args=argv, prog_name="mailsh", standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors: a bad command line
        _command_line_error(exc)
    except typer.Abort:
        say("mailsh: aborted")
        sys.exit(int(ExitCode.FAILURE))
    except MailshError as exc:
        if GlobalOpts.debug:
            _print_details(exc)
        say(f"mailsh: {exc.message}")
        if exc.hint:
            say(f"  next: {exc.hint}")
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        say("mailsh: interrupted")
        sys.exit(int(ExitCode.FAILURE))
    except Exception as exc:  # the one place where a bug becomes one clear line
        if GlobalOpts.debug:
            _print_details(exc)
        say(f"mailsh: unexpected error: {type(exc).__name__}: {exc}")
        say(
            "  next: run again with --debug to see where it happened, and report it"
            if not GlobalOpts.debug
            else "  next: please report this, with the traceback above"
        )
        sys.exit(int(ExitCode.FAILURE))

    sys.exit(status if isinstance(status, int) else int(ExitCode.OK))


def _command_line_error(exc: typer.TyperException) -> NoReturn:
    """A usage error as one line and a next step, like every other failure (exit 2)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # `mailsh` or `mailsh trust` alone
        typer.echo(exc.format_message())
        sys.exit(int(ExitCode.USAGE))
    say(f"mailsh: {exc.format_message()}")
    say(f"  next: see {ctx.command_path if ctx is not None else 'mailsh'} --help")
    sys.exit(int(ExitCode.USAGE) if exc.exit_code == ExitCode.USAGE else int(ExitCode.FAILURE))


def _print_details(exc: BaseException) -> None:
    """What --debug promises: the traceback, and gpg's own output for gpg failures."""
    import traceback

    traceback.print_exception(exc)
    gpg_output = getattr(exc, "gpg_output", "")
    if gpg_output:
        say("gpg's output:")
        for line in gpg_output.rstrip().splitlines():
            say(f"  {line}")


# Register the commands (each module only imports typer at import time).
from mailsh.cli import client as _client  # noqa: E402
from mailsh.cli import completion as _completion  # noqa: E402
from mailsh.cli import demo as _demo  # noqa: E402
from mailsh.cli import keys as _keys  # noqa: E402
from mailsh.cli import server as _server  # noqa: E402

__all__ = [
    "GlobalOpts",
    "MailshTyper",
    "app",
    "gpg_for",
    "main",
    "say",
    "settings_from",
    "usage_error",
]
_ = (_keys, _server, _client, _completion, _demo)
