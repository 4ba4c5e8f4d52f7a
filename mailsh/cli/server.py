"""``mailsh serve``, ``mailsh status`` and ``mailsh deliver``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from mailsh.cli import app, say, settings_from, usage_error
from mailsh.cli.command import GlobalOpts
from mailsh.cli.options import (
    OptFloat,
    OptInt,
    OptPath,
    OptStr,
    SendmailOpt,
    SmtpCaOpt,
    SmtpOpt,
    option,
    setting,
)

if TYPE_CHECKING:
    from mailsh.settings import Settings


STATUS_PIPE_WIDTH = 160
"""Columns `mailsh status` fills when its output is not a terminal."""


def _listen(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise usage_error(
            f"bad --smtp-listen {value!r}",
            "use HOST:PORT with a port up to 65535, e.g. 127.0.0.1:2525",
        )
    return host.strip("[]"), int(port)


def _running_mark(
    settings: Settings,
    mbox: list[Path] | None,
    maildir: list[Path] | None,
    smtp_listen: str | None,
    spool_only: bool,
) -> contextlib.AbstractContextManager[Path]:
    """Let `mailsh status` see this serve (pid and sources) while it runs."""
    from mailsh.server.running import serving

    sources = [f"mbox {p}" for p in mbox or []] + [f"maildir {p}" for p in maildir or []]
    if smtp_listen:
        sources.append(f"smtp {smtp_listen}")
    if spool_only or not sources:
        sources.append("spool (mailsh deliver)")
    return serving(settings.home, sources=sources)


def _setup_logging(fmt: str) -> None:
    from mailsh.server.logs import setup_logging

    setup_logging(fmt, debug=GlobalOpts.debug)


@app.command()
def serve(
    mbox: Annotated[
        Optional[list[Path]],  # noqa: UP045
        option(
            "--mbox",
            metavar="PATH",
            help="An mbox to take mail from (e.g. /var/mail/root). Repeatable.",
        ),
    ] = None,
    maildir: Annotated[
        Optional[list[Path]],  # noqa: UP045
        option("--maildir", metavar="DIR", help="A Maildir to take mail from. Repeatable."),
    ] = None,
    spool_only: Annotated[
        bool,
        typer.Option(
            "--spool-only",
            help="Take mail only from the spool, as `mailsh deliver` fills it (pipe "
            "delivery): no --mbox, --maildir or --smtp-listen.",
        ),
    ] = False,
    smtp_listen: Annotated[
        OptStr,
        setting(
            "--smtp-listen",
            "HOST:PORT",
            "Also accept mail over SMTP on HOST:PORT (embedded listener).",
        ),
    ] = None,
    address: Annotated[
        Optional[list[str]],  # noqa: UP045
        setting(
            "--address",
            "ADDR",
            "An address this server answers to [the server key's email]. Repeatable.",
        ),
    ] = None,
    smtp: SmtpOpt = None,
    sendmail: SendmailOpt = None,
    smtp_ca_file: SmtpCaOpt = None,
    once: Annotated[
        bool, typer.Option("--once", help="Process everything pending, then exit 0.")
    ] = False,
    workers: Annotated[OptInt, setting("--workers", "N", "Concurrent commands [1].")] = None,
    run_as: Annotated[
        OptStr, setting("--run-as", "USER", "Run commands as this user [the user running serve].")
    ] = None,
    workdir: Annotated[OptPath, setting("--workdir", "DIR", "Commands' working dir [/].")] = None,
    command_timeout: Annotated[
        OptFloat,
        setting("--command-timeout", "S", "Default wall-clock limit per command, seconds [60]."),
    ] = None,
    max_command_timeout: Annotated[
        OptFloat,
        setting("--max-command-timeout", "S", "Cap on what a request may ask for, seconds [3600]."),
    ] = None,
    max_output_bytes: Annotated[
        OptInt,
        setting("--max-output-bytes", "BYTES", "Output kept per stream (stdout, stderr) [1 MiB]."),
    ] = None,
    max_processes: Annotated[
        OptInt,
        setting(
            "--max-processes",
            "N",
            "RLIMIT_NPROC for commands: processes their user may have; 0 = no limit "
            "[256 with --run-as, else none]. Root ignores it (docs/server.md).",
        ),
    ] = None,
    smtp_max_sessions: Annotated[
        OptInt,
        setting(
            "--smtp-max-sessions", "N", "Concurrent SMTP sessions in total; more get 421 [100]."
        ),
    ] = None,
    smtp_max_sessions_per_peer: Annotated[
        OptInt,
        setting(
            "--smtp-max-sessions-per-peer",
            "N",
            "Concurrent SMTP sessions per client address (IPv6: per /64) [10].",
        ),
    ] = None,
    smtp_idle_timeout: Annotated[
        OptFloat,
        setting(
            "--smtp-idle-timeout",
            "SECONDS",
            "Close (421) an SMTP client that sends nothing this long [60].",
        ),
    ] = None,
    smtp_command_timeout: Annotated[
        OptFloat,
        setting(
            "--smtp-command-timeout",
            "SECONDS",
            "Close (421) an SMTP client that takes longer from one command to the "
            "next, a whole DATA included [300].",
        ),
    ] = None,
    smtp_max_messages: Annotated[
        OptInt,
        setting("--smtp-max-messages", "N", "Mail transactions per SMTP session; then 421 [50]."),
    ] = None,
    require_encryption: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--require-encryption/--allow-signed-only",
            envvar="MAILSH_REQUIRE_ENCRYPTION",
            help="Refuse requests that were signed but not encrypted [allow].",
        ),
    ] = None,
    retention: Annotated[
        OptStr,
        setting(
            "--retention",
            "DURATION",
            "Keep processed mail in spool/done/ (and finished records) this long, "
            "e.g. 7d, 36h, 90m [7d].",
        ),
    ] = None,
    discard_retention: Annotated[
        OptStr,
        setting(
            "--discard-retention",
            "DURATION",
            "Keep the bytes of discarded (unauthenticated) mail this long; its "
            "metadata row stays for --retention [1h].",
        ),
    ] = None,
    min_free_space: Annotated[
        OptStr,
        setting(
            "--min-free-space",
            "SIZE",
            "Pause intake while the home's file system has less free, e.g. 100M, "
            "2G; 0 turns the floor off [100M].",
        ),
    ] = None,
    reply_summary: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--reply-summary/--private-replies",
            envvar="MAILSH_REPLY_SUMMARY",
            help="Show status and exit code in the reply's Subject and clear-text "
            "preamble, readable by every relay [private].",
        ),
    ] = None,
    poll_interval: Annotated[
        OptFloat,
        setting(
            "--poll-interval", "S", "Seconds between mailbox checks when inotify is absent [2]."
        ),
    ] = None,
    shutdown_grace: Annotated[
        OptFloat,
        setting(
            "--shutdown-grace",
            "S",
            "On SIGTERM, let running commands finish this long, seconds [30].",
        ),
    ] = None,
    log_format: Annotated[OptStr, setting("--log-format", "FORMAT", "text or json [text].")] = None,
) -> None:
    """Run commands that arrive as signed mail, and mail back signed, encrypted results.

    Mail comes from --mbox, --maildir and/or --smtp-listen, or with --spool-only from
    `mailsh deliver` alone; replies leave through --smtp or --sendmail. Only keys pinned
    with `mailsh trust add` may run commands. See docs/server.md and docs/deploy.md.
    """
    from mailsh.server.daemon import ServeOptions, Server

    settings = settings_from(
        address=address,
        smtp=smtp,
        sendmail=sendmail,
        smtp_ca_file=smtp_ca_file,
        workers=workers,
        run_as=run_as,
        workdir=workdir,
        command_timeout=command_timeout,
        max_command_timeout=max_command_timeout,
        max_output_bytes=max_output_bytes,
        max_processes=max_processes,
        smtp_max_sessions=smtp_max_sessions,
        smtp_max_sessions_per_peer=smtp_max_sessions_per_peer,
        smtp_idle_timeout=smtp_idle_timeout,
        smtp_command_timeout=smtp_command_timeout,
        smtp_max_messages=smtp_max_messages,
        require_encryption=require_encryption,
        log_format=log_format,
        retention=retention,
        discard_retention=discard_retention,
        min_free_space=min_free_space,
        reply_summary=reply_summary,
        poll_interval=poll_interval,
        shutdown_grace=shutdown_grace,
    )
    # What `mailsh deliver` spools is always served; --spool-only says it is the only
    # source, so a serve with no source at all is still a mistake caught here.
    if spool_only and (mbox or maildir or smtp_listen):
        raise usage_error(
            "--spool-only excludes --mbox, --maildir and --smtp-listen",
            "drop --spool-only: mail delivered by `mailsh deliver` is served in any case",
        )
    if not (spool_only or mbox or maildir or smtp_listen):
        raise usage_error(
            "no mail source given",
            "mailsh serve --mbox /var/mail/root   (or --maildir DIR / --smtp-listen HOST:PORT"
            " / --spool-only for `mailsh deliver`)",
        )
    listen = _listen(smtp_listen)  # checked before anything starts
    _setup_logging(settings.log_format)
    server = Server(
        settings,
        ServeOptions(
            mboxes=list(mbox or []),
            maildirs=list(maildir or []),
            smtp_listen=listen,
            once=once,
        ),
    )
    server.install_signal_handlers()
    with _running_mark(settings, mbox, maildir, smtp_listen, spool_only):
        server.run()
    if server.abandoned:
        import logging
        import os

        logging.shutdown()
        os._exit(0)  # worker threads still run commands that were reported outcome-unknown


@app.command()
def status(
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Machine-readable output (schema: docs/server.md)."),
    ] = False,
) -> None:
    """Show what this home is doing.

    On a server home: its identity, whether serve is running (pid), the queue (spool,
    executing, outbound with the next retry), the spool's size, problem messages per
    state and reason code, the last errors and the latest decisions. On a client
    home: the requests sent from it and whether their reply was read.
    """
    import json

    from mailsh.cli.render import render
    from mailsh.status import build_report, report_json

    settings = settings_from()
    if not _has_anything(settings):
        from mailsh.errors import StateError

        raise StateError(
            f"nothing in {settings.home} yet: no key, no server state, no request sent",
            hint="check --home / MAILSH_HOME; a new home starts with: mailsh keygen --email ADDR",
        )
    sections = build_report(settings)
    if json_out:
        typer.echo(json.dumps(report_json(settings, sections), indent=2))
        return
    from rich.console import Console

    if sys.stdout.isatty():
        render(Console(highlight=False), sections)
        return
    # Piped output is not cut to 80 columns, and carries no padding at line ends.
    console = Console(highlight=False, width=STATUS_PIPE_WIDTH)
    with console.capture() as captured:
        render(console, sections)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _has_anything(settings: Settings) -> bool:
    """Whether the home holds a key, a server state or sent requests (else: wrong home?)."""
    from mailsh.client.pending import PENDING_DIR

    home = settings.home
    return (
        settings.state_db.exists()
        or (home / PENDING_DIR).is_dir()
        or any(settings.gnupg_home.glob("private-keys-v1.d/*.key"))
    )


@app.command(
    epilog="Exit codes: 0 the message is stored; 75 temporary failure, the MTA keeps the "
    "message and retries; 73 the message is larger than max_message_bytes, the MTA bounces it."
)
def deliver() -> None:
    """Take one message on stdin into the server's spool (Postfix mailbox_command / pipe).

    Exits 0 only once the message is durable; 73 (EX_CANTCREAT) for a message larger than
    MAILSH_MAX_MESSAGE_BYTES, so the MTA bounces it; on any other failure 75 (EX_TEMPFAIL), so
    the MTA keeps the message and retries, also while free space is below
    MAILSH_MIN_FREE_SPACE (serve's --min-free-space). Run `mailsh serve` on the same --home to
    process what was delivered.
    """
    from mailsh.server.intake.pipe import deliver as deliver_message

    stored = deliver_message(settings_from, sys.stdin.buffer)
    say(f"stored as {stored.id}")
