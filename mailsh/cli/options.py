"""Option declarations: the ones several commands share, and the helpers that declare one.

An option of a setting is declared with :func:`setting`: its ``MAILSH_*`` variable is
the flag's name (``--smtp-max-sessions``: ``MAILSH_SMTP_MAX_SESSIONS``) unless given.
Other options with a value use :func:`option`. Both show no default: where a setting's
default matters, its help says it in brackets, e.g. ``[600]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# typer needs Optional at runtime on 3.11 (it reads the annotations).
OptStr = Optional[str]  # noqa: UP045
OptPath = Optional[Path]  # noqa: UP045
OptInt = Optional[int]  # noqa: UP045
OptFloat = Optional[float]  # noqa: UP045


def option(*flags: str, metavar: str, help: str, **more: Any) -> Any:
    """A ``typer.Option`` with a value, shown as ``FLAG METAVAR``, without a default."""
    return typer.Option(*flags, metavar=metavar, help=help, show_default=False, **more)


def setting(flag: str, metavar: str, help: str, *, envvar: str | None = None, **more: Any) -> Any:
    """:func:`option` for a setting, read from ``MAILSH_<FLAG>`` too (or ``envvar``)."""
    if envvar is None:
        envvar = "MAILSH_" + flag.removeprefix("--").upper().replace("-", "_")
    return option(flag, metavar=metavar, help=help, envvar=envvar, **more)


# -- the way mail leaves this machine: the same settings for `send` and `serve` ---------
SmtpOpt = Annotated[
    OptStr,
    setting(
        "--smtp",
        "URL",
        "Send via smtp://[user@]host[:port] (STARTTLS when offered) or "
        "smtps://[user@]host[:port]; password from MAILSH_SMTP_PASSWORD.",
    ),
]
SendmailOpt = Annotated[
    OptPath,
    setting(
        "--sendmail",
        "PATH",
        "Hand the mail to this local sendmail program instead (e.g. /usr/sbin/sendmail).",
    ),
]
SmtpCaOpt = Annotated[
    OptPath,
    setting(
        "--ca-file",
        "FILE",
        "PEM file of the CA(s) to trust for the SMTP server (private CAs).",
        envvar="MAILSH_SMTP_CA_FILE",
    ),
]

# -- where replies are read: `send` and `wait-reply` ------------------------------------
MboxOpt = Annotated[
    OptPath,
    setting(
        "--mbox",
        "PATH",
        "Read replies from this mbox file (read-only; e.g. /var/mail/$USER).",
        envvar="MAILSH_REPLY_MBOX",
    ),
]
MaildirOpt = Annotated[
    OptPath,
    setting(
        "--maildir",
        "PATH",
        "Read replies from this Maildir (read-only; e.g. ~/Maildir).",
        envvar="MAILSH_REPLY_MAILDIR",
    ),
]
ImapOpt = Annotated[
    OptStr,
    setting(
        "--imap",
        "URL",
        "Read replies over IMAP (read-only, IDLE): imaps://user@host[:port] or "
        "imap://user@host[:port] (STARTTLS); password from MAILSH_IMAP_PASSWORD.",
        envvar="MAILSH_REPLY_IMAP",
    ),
]
ImapCaOpt = Annotated[
    OptPath,
    setting(
        "--imap-ca-file",
        "FILE",
        "PEM file of the CA(s) to trust for the IMAP server (private CAs).",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the whole reply as one JSON object (stdout/stderr base64) instead of "
        "the output; the exit status is still the remote one.",
    ),
]
PassphraseOpt = Annotated[
    OptPath,
    setting(
        "--passphrase-file",
        "FILE",
        "File holding the passphrase of this home's key, if it has one.",
    ),
]
