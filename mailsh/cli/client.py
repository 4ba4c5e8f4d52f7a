"""``mailsh send`` and ``mailsh wait-reply``: the ssh-like client commands.

Data goes to stdout: the request id (``send``), or exactly the remote command's stdout
(``wait-reply``, ``send --wait``), while the remote stderr goes to stderr byte for byte.
mailsh's own diagnostics go to stderr too, so with ``--wait`` the request id is shown
there only when stderr is a terminal. The exit status is the remote command's (128+N
for signal N); mailsh's own failures exit 255 (see ``mailsh --help``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from mailsh.cli import REMOTE_EXIT_CODES_HELP, app, err_console, gpg_for, say, settings_from
from mailsh.cli.command import GlobalOpts
from mailsh.cli.options import (
    ImapCaOpt,
    ImapOpt,
    JsonOpt,
    MaildirOpt,
    MboxOpt,
    OptFloat,
    OptStr,
    PassphraseOpt,
    SendmailOpt,
    SmtpCaOpt,
    SmtpOpt,
    option,
    setting,
)

if TYPE_CHECKING:
    from pathlib import Path

    from mailsh.client.pending import PendingRequest
    from mailsh.client.sources import ReplySource
    from mailsh.protocol import Notice, Reply
    from mailsh.settings import Settings


def _reply_settings(
    mbox: Path | None,
    maildir: Path | None,
    imap: str | None,
    imap_ca_file: Path | None,
    wait_timeout: float | None,
) -> dict[str, Any]:
    """The options of the reply mailbox and the wait (send and wait-reply) as settings."""
    return {
        "reply_mbox": mbox,
        "reply_maildir": maildir,
        "reply_imap": imap,
        "imap_ca_file": imap_ca_file,
        "wait_timeout": wait_timeout,
    }


def _flag(value: bool) -> bool | None:
    """A boolean flag as a settings override: only when given (so config files count)."""
    return True if value else None


@app.command(epilog=REMOTE_EXIT_CODES_HELP)
def send(
    command: Annotated[
        list[str],
        typer.Argument(
            metavar="COMMAND",
            help="The shell command to run on the server. Several words are joined with "
            "spaces, like ssh; quote it, or put it after -- when it has options.",
            show_default=False,
        ),
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to", metavar="ADDR", help="The server's address (its key must be trusted here)."
        ),
    ],
    from_addr: Annotated[
        OptStr,
        setting(
            "--from",
            "ADDR",
            "Sender address [the configured from_address, else this key's email].",
            envvar="MAILSH_FROM_ADDRESS",
        ),
    ] = None,
    smtp: SmtpOpt = None,
    sendmail: SendmailOpt = None,
    stdin: Annotated[
        OptStr,
        option(
            "--stdin",
            metavar="FILE|-",
            help="Give the remote command this file as its stdin (- for this shell's stdin; "
            "at most 8 MiB). Default: no stdin.",
        ),
    ] = None,
    timeout: Annotated[
        OptFloat,
        option(
            "--timeout",
            metavar="S",
            min=0.001,
            max=86_400,
            help="Ask the server to stop the remote command after S seconds [server default].",
        ),
    ] = None,
    no_encrypt: Annotated[
        bool,
        typer.Option(
            "--no-encrypt",
            help="Sign only, do not encrypt (anyone who sees the mail reads the command).",
        ),
    ] = False,
    require_tls: Annotated[
        bool,
        typer.Option(
            "--require-tls",
            envvar="MAILSH_REQUIRE_TLS",
            help="Refuse to send over smtp:// when the server offers no STARTTLS.",
        ),
    ] = False,
    ca_file: SmtpCaOpt = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Then wait for the reply, like wait-reply (ssh-like)."),
    ] = False,
    mbox: MboxOpt = None,
    maildir: MaildirOpt = None,
    imap: ImapOpt = None,
    imap_ca_file: ImapCaOpt = None,
    wait_timeout: Annotated[
        OptFloat,
        setting("--wait-timeout", "S", "With --wait: give up after S seconds [600].", min=0),
    ] = None,
    json_out: JsonOpt = False,
    passphrase_file: PassphraseOpt = None,
) -> None:
    """Send COMMAND to a mailsh server as a signed (and encrypted) request.

    Prints the request id (one line on stdout) for `mailsh wait-reply ID`. With --wait,
    waits for the reply instead and behaves like `ssh host COMMAND`: the remote stdout
    and stderr, byte for byte, and the remote exit status.

    Everything is checked before the request leaves (key, trust, transport, reply
    mailbox): a failure then means nothing was sent. If the request may have left (the
    connection broke during the hand-off), mailsh says so and prints the request id
    with the `mailsh wait-reply ID` to run: never just send it again.
    """
    from mailsh.client.send import prepare_request, read_stdin_arg, submit_request

    if json_out and not wait:
        raise _usage("--json only applies with --wait (send alone prints just the id)")
    # --mbox etc. also count without --wait (and come from MAILSH_REPLY_* then): send
    # notes where the reply mbox ends now, so wait-reply scans only what arrives later.
    settings = settings_from(
        smtp=smtp,
        sendmail=sendmail,
        from_address=from_addr,
        require_tls=_flag(require_tls),
        smtp_ca_file=ca_file,
        **_reply_settings(mbox, maildir, imap, imap_ca_file, wait_timeout),
        passphrase_file=passphrase_file,
    )
    data = read_stdin_arg(stdin) if stdin is not None else None
    gpg = gpg_for(settings)
    # Everything is checked before the request leaves: once sent it cannot be recalled.
    prepared = prepare_request(
        settings,
        gpg,
        command=" ".join(command),
        to=to,
        stdin=data,
        timeout=timeout,
        encrypt=not no_encrypt,
        require_server_key=wait,
        require_mailbox=wait,
        on_warning=lambda text: say(f"mailsh: warning: {text}"),
        on_note=_note,
    )
    if not wait:
        sent = submit_request(settings, prepared)
        typer.echo(sent.request_id)
        return
    from mailsh.client.sources import open_source
    from mailsh.client.wait import resumable_wait  # imported before the request leaves

    # Watch the reply mailbox before sending, so nothing can arrive unseen (and an IMAP
    # login failure stops us while nothing has been sent).
    source = open_source(settings, prepared.pending, mailbox=prepared.mailbox)
    try:
        sent = submit_request(settings, prepared)
    except BaseException:
        source.close()
        raise
    with resumable_wait(sent.pending, sent=True):  # from here on, every failure names the id
        if sys.stderr.isatty():
            say(f"mailsh: sent request {sent.request_id} to {sent.pending.to}")
    _wait_and_render(settings, sent.pending, json_out=json_out, source=source, sent=True)


@app.command("wait-reply", epilog=REMOTE_EXIT_CODES_HELP)
def wait_reply(
    request_id: Annotated[
        str, typer.Argument(metavar="ID", help="The request id that mailsh send printed.")
    ],
    mbox: MboxOpt = None,
    maildir: MaildirOpt = None,
    imap: ImapOpt = None,
    imap_ca_file: ImapCaOpt = None,
    wait_timeout: Annotated[
        OptFloat,
        setting(
            "--wait-timeout",
            "S",
            "Give up after S seconds [600] (exit 255; the request may still run).",
            min=0,
        ),
    ] = None,
    old_timeout: Annotated[
        OptFloat,
        typer.Option(
            "--timeout",
            min=0,
            hidden=True,
            help="The old name of --wait-timeout (--timeout is the remote command's limit).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    passphrase_file: PassphraseOpt = None,
) -> None:
    """Wait for the verified reply to request ID; print its output, exit with its status.

    Reads the mailbox without changing it and ignores anything that is not a reply
    signed by the trusted server key to exactly this request. The remote stdout goes to
    stdout and the remote stderr to stderr, byte for byte.
    """
    from mailsh.client.pending import PendingStore

    if old_timeout is not None and "MAILSH_WAIT_TIMEOUT" in GlobalOpts.from_env:
        # --timeout on the command line beats the variable typer read for --wait-timeout.
        GlobalOpts.from_env -= {"MAILSH_WAIT_TIMEOUT"}
        wait_timeout = old_timeout
    elif wait_timeout is None:
        wait_timeout = old_timeout
    settings = settings_from(
        **_reply_settings(mbox, maildir, imap, imap_ca_file, wait_timeout),
        passphrase_file=passphrase_file,
    )
    record = PendingStore(settings.home).load(request_id)
    _wait_and_render(settings, record, json_out=json_out)


def _usage(message: str) -> Exception:
    from mailsh.errors import UsageError

    return UsageError(message, hint="see mailsh send --help")


def _wait_and_render(
    settings: Settings,
    record: PendingRequest,
    *,
    json_out: bool,
    source: ReplySource | None = None,
    sent: bool = False,
) -> NoReturn:
    """Wait for the reply to ``record`` and render it; ``sent``: see
    :func:`~mailsh.client.wait.resumable_wait`."""
    from mailsh.client.wait import await_reply, resumable_wait

    with resumable_wait(record, sent=sent), _spinner(record.request_id):
        reply = await_reply(
            settings,
            gpg_for(settings),
            record,
            on_warning=_note,
            on_notice=_notice,
            source=source,
        )
    render_reply(reply, json_out=json_out)


def _notice(notice: Notice) -> None:
    """A notice about the request is news, never the outcome: note it on a terminal."""
    from mailsh.client.wait import notice_text

    _note(notice_text(notice))


def _note(text: str) -> None:
    """Informational lines while waiting: only on a terminal, so that a script's stderr
    carries nothing but the remote stderr and real errors."""
    if sys.stderr.isatty():
        say(f"mailsh: {text}")


@contextlib.contextmanager
def _spinner(request_id: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.text import Text

    started = time.monotonic()

    class _Elapsed:
        def __rich__(self) -> Text:
            seconds = int(time.monotonic() - started)
            return Text(f"waiting for the reply to {request_id} ({seconds}s)")

    with err_console().status(_Elapsed()):
        yield


def render_reply(reply: Reply, *, json_out: bool) -> NoReturn:
    """Print the reply (raw bytes, never interpreted) and exit with its status."""
    from mailsh.client.wait import exit_status, failure, notes, reply_json

    sys.stdout.flush()
    if json_out:
        sys.stdout.write(reply_json(reply) + "\n")
        sys.stdout.flush()
    else:
        sys.stdout.buffer.write(reply.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.flush()
        sys.stderr.buffer.write(reply.stderr)
        sys.stderr.buffer.flush()
    error = failure(reply)
    if error is not None:
        raise error
    for note in notes(reply):
        say(f"mailsh: {note}")
    raise typer.Exit(exit_status(reply))
