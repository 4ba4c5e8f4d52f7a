"""The typer classes of the ``mailsh`` command: global options everywhere, readable help.

Every command and group takes the global options (``--home``, ``--debug``,
``--version``), before or after the subcommand; ``--help`` lists arguments, the
command's own options and the global options as sections, with readable metavars and
whole first sentences; ``-h`` is ``--help``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from mailsh.errors import MailshError

if TYPE_CHECKING:
    from typer._click import Command, Context, HelpFormatter, Parameter


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
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Here, not in main(): typer would turn it into a silent exit 130. Where an
            # interruption leaves something to say (a request that may run), the command
            # has already said it as a MailshError.
            raise MailshError("interrupted") from None

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
