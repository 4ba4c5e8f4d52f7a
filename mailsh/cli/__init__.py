"""The ``mailsh`` command: a typer app and nothing else.

Each command parses its options, builds :class:`~mailsh.settings.Settings`, calls the
library, and renders the result. Errors are caught in exactly one place, :func:`main`,
which maps them to :class:`~mailsh.errors.ExitCode`. Heavy modules (pydantic, gnupg,
asyncio) are imported inside commands so ``mailsh --help`` stays fast.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional, TypeVar

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from mailsh.errors import ExitCode, MailshError

if TYPE_CHECKING:
    from rich.console import Console
    from typer._click import Command, Context, HelpFormatter, Parameter

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


class GlobalOpts:
    home: Path | None = None
    debug: bool = False
    # The MAILSH_* variables typer read for the running command's options (see
    # MailshCommand.invoke): settings_from leaves those to the settings' own env level.
    from_env: frozenset[str] = frozenset()


# -- global options, accepted before or after any subcommand ----------------------------
#
# They are declared once, as the parameters of `_global_options`, and every command and
# group of the app adds them to its own parameters (see MailshCommand.get_params). The
# top-level command always applies them (value, MAILSH_* variable or default); a
# subcommand applies only what was given on its own command line, so
# `mailsh trust list --home B` beats both `mailsh --home A` and MAILSH_HOME.


def _source(ctx: Context, param: Parameter) -> str | None:
    """Where the parameter's value came from: COMMANDLINE, ENVIRONMENT, DEFAULT ..."""
    source = ctx.get_parameter_source(param.name or "")
    return None if source is None else source.name


def _given_here(ctx: typer.Context, param: typer.CallbackParam) -> bool:
    return ctx.parent is None or _source(ctx, param) == "COMMANDLINE"


def _set_home(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> None:
    if _given_here(ctx, param):
        GlobalOpts.home = value


def _set_debug(ctx: typer.Context, param: typer.CallbackParam, value: bool) -> None:
    if _given_here(ctx, param):
        GlobalOpts.debug = value


def _print_version(value: bool) -> None:
    if value:
        from mailsh import __version__

        typer.echo(f"mailsh {__version__}")
        raise typer.Exit(0)


def _global_options(
    home: Annotated[
        Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.11
        typer.Option(
            "--home",
            metavar="DIR",
            envvar="MAILSH_HOME",
            help="State directory of this identity (keys, trust store, state).",
            show_default="$XDG_DATA_HOME/mailsh, i.e. ~/.local/share/mailsh",
            callback=_set_home,
            expose_value=False,
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="MAILSH_DEBUG",
            help="On failure also show the details: the traceback and, for gpg failures, "
            "gpg's own output.",
            callback=_set_debug,
            expose_value=False,
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version.",
            is_eager=True,
            callback=_print_version,
            expose_value=False,
        ),
    ] = False,
) -> None:
    """Holds the global options' declarations (never called)."""


_global_params: list[Parameter] = []


def global_params() -> list[Parameter]:
    """The global options as parameter objects, built once and shared by every command."""
    if not _global_params:
        holder = typer.Typer(add_completion=False)
        holder.command()(_global_options)
        _global_params.extend(typer.main.get_command(holder).params)
    return _global_params


def _argument_name(param: Parameter) -> str:
    name = param.metavar or (param.name or "").upper()
    return name if param.metavar or param.nargs == 1 else f"{name}..."


def _usage_pieces(command: Command, ctx: Context) -> list[str]:
    """``[OPTIONS] ID`` rather than typer's ``[OPTIONS] {ID}``."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = _argument_name(param)
            pieces.append(name if param.required else f"[{name}]")
    return pieces


# What an option without a metavar of its own shows for its value, instead of typer's
# type label (`<int>`, `list[str]`): every option of mailsh should declare its own.
_METAVARS = {"str": "TEXT", "text": "TEXT", "path": "PATH", "int": "N", "float": "NUMBER"}
_TYPE_LABEL = re.compile(r"<(\w+)>|<?list\[(\w+)\]>?")


def _readable_metavar(record: tuple[str, str]) -> tuple[str, str]:
    def readable(match: re.Match[str]) -> str:
        return _METAVARS.get((match.group(1) or match.group(2)).lower(), "VALUE")

    return _TYPE_LABEL.sub(readable, record[0]), record[1]


def _format_params(command: Command, ctx: Context, formatter: HelpFormatter) -> None:
    """Arguments, the command's own options, then the global options, each a section.

    Arguments are shown by their metavar alone (typer would add ``<str>``)."""
    shared = {id(p) for p in global_params()}
    sections: dict[str, list[tuple[str, str]]] = {
        "Arguments": [],
        "Options": [],
        "Global options": [],
    }
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        if id(param) in shared:
            sections["Global options"].append(record)
        elif param.param_type_name == "argument":
            sections["Arguments"].append((_argument_name(param), record[1]))
        else:
            sections["Options"].append(_readable_metavar(record))
    for title, rows in sections.items():
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class MailshCommand(TyperCommand):
    """A command that also takes the global options (see :func:`global_params`)."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return [*super().get_params(ctx), *global_params()]

    def invoke(self, ctx: Context) -> Any:
        GlobalOpts.from_env = frozenset(
            param.envvar
            for param in self.params
            if isinstance(param.envvar, str) and _source(ctx, param) == "ENVIRONMENT"
        )
        return super().invoke(ctx)

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return _usage_pieces(self, ctx)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _format_params(self, ctx, formatter)


class MailshGroup(TyperGroup):
    """A group that also takes the global options, and lists its commands by their
    whole first sentence (typer cuts them at 45 characters)."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return [*super().get_params(ctx), *global_params()]

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return [*_usage_pieces(self, ctx), self.subcommand_metavar]

    def _main_shell_completion(
        self, ctx_args: MutableMapping[str, Any], prog_name: str, complete_var: str | None = None
    ) -> None:
        from mailsh.cli.completion import prepare

        prepare(prog_name, complete_var)
        super()._main_shell_completion(ctx_args, prog_name, complete_var)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _format_params(self, ctx, formatter)
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


_F = TypeVar("_F", bound=Callable[..., Any])


class MailshTyper(typer.Typer):
    """typer.Typer whose commands are :class:`MailshCommand` and whose groups are
    :class:`MailshGroup`, and where ``-h`` works like ``--help``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", MailshGroup)
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[_F], _F]:
        kwargs.setdefault("cls", MailshCommand)
        return super().command(*args, **kwargs)


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
    from mailsh.settings import ensure_home, load_settings

    given = {
        name: value
        for name, value in flags.items()
        if f"MAILSH_{name.upper()}" not in GlobalOpts.from_env
    }
    settings = load_settings(home=GlobalOpts.home, **given)
    ensure_home(settings)
    return settings


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


def gpg_for(settings: Settings) -> Gpg:
    from mailsh.keys.gpg import Gpg

    return Gpg(settings.gnupg_home, binary=settings.gpg_binary, max_output=settings.max_gpg_output)


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

__all__ = ["GlobalOpts", "app", "gpg_for", "main", "say", "settings_from", "usage_error"]
_ = (_keys, _server, _client, _completion, _demo)
