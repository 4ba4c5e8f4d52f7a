"""The one way this process sends mail, and what every way out shares.

Used by the client (``mailsh send``) and by the server (replies): both pick the way out
from the same settings (``smtp``/``sendmail`` and the TLS options) with
:func:`transport_from_settings`, and hand one finished RFC 5322 message (bytes) over with
:meth:`Transport.submit`. Two ways out:

- :mod:`mailsh.mail.smtp` speaks SMTP to ``smtp://[user@]host[:port]`` (STARTTLS whenever
  the server offers it) or ``smtps://[user@]host[:port]`` (implicit TLS), URLs parsed by
  :mod:`mailsh.mail.smtp_url`. Certificates are always verified, against the system store
  or ``ca_file``. A password is never sent in clear text to a host other than loopback.
- :mod:`mailsh.mail.sendmail` pipes the message into a local ``sendmail`` program.

The message bytes are sent as given apart from line endings: SMTP gets CRLF
(:func:`to_crlf`), sendmail gets LF (:func:`to_lf`). Nothing re-serializes the message,
so body lines starting with ``From `` and signed bytes survive (``smtplib.send_message``
would mangle them).

Every failure is a :class:`~mailsh.errors.TransportError` with a one-line message and a
hint. Failures where trying again later may succeed (4xx replies, connection refused,
timeouts, DNS "try again", sendmail exit 75) are
:class:`~mailsh.errors.TransportTempError`; use :func:`is_temporary` to ask. A failure
after the message may already have been accepted is
:class:`~mailsh.errors.HandoffUnknownError` (a temporary one).

Retry policy for the server's outbound queue (documented here because this module
decides what "temporary" means):

- :class:`~mailsh.errors.TransportTempError`: retry with exponential backoff, as an MTA
  would.
- any other :class:`~mailsh.errors.TransportError`: retry too, but only a few times
  and far apart. "Permanent" here includes failures an operator fixes without touching
  the message (wrong SMTP password, missing CA file, a relay refusing the sender), and a
  reply is the only report the requester gets (docs/security.md P9). A message refused for
  itself (552 too large) will keep failing; the queue should log that and give up.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailsh.addresses import validate_address
from mailsh.errors import ConfigError, TransportTempError, UsageError
from mailsh.mail.smtp_url import SmtpOptions, SmtpTarget, parse_smtp_url
from mailsh.text import printable_line

if TYPE_CHECKING:
    from mailsh.settings import Settings

TRANSPORT_HINT = "--smtp smtp://host:587 or --sendmail /usr/sbin/sendmail"
MAX_SERVER_TEXT = 200
"""Characters of a server reply or sendmail stderr quoted in an error message."""


def is_temporary(exc: BaseException) -> bool:
    """Whether retrying the failed send later might help."""
    return isinstance(exc, TransportTempError)


class Submit(Protocol):
    """Hand one message over; returns once it was accepted (raises otherwise)."""

    def __call__(self, *, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> None: ...


@dataclass(frozen=True)
class Transport:
    """How mail leaves this machine: one SMTP server, or one local sendmail program."""

    smtp: SmtpTarget | None = None
    smtp_options: SmtpOptions | None = None
    sendmail: Path | None = None
    sendmail_timeout: float = 60.0  # the sendmail_timeout setting

    def __post_init__(self) -> None:
        if (self.smtp is None) == (self.sendmail is None):
            raise UsageError(
                "give exactly one way to send mail: --smtp URL or --sendmail PATH",
                hint=TRANSPORT_HINT,
            )

    # The way out is imported when it is used: sending by sendmail loads no smtplib or
    # ssl, and mailsh.mail.smtp / sendmail import this module's helpers at their top.

    def submit(self, *, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> None:
        """Hand ``message`` over; returns once the SMTP server or sendmail accepted it."""
        if self.smtp is not None:
            from mailsh.mail.smtp import send_smtp

            options = self.smtp_options or SmtpOptions()
            send_smtp(self.smtp, options, mail_from=mail_from, rcpt_to=rcpt_to, message=message)
        elif self.sendmail is not None:
            from mailsh.mail.sendmail import send_sendmail

            send_sendmail(
                self.sendmail,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                message=message,
                timeout=self.sendmail_timeout,
            )

    @contextlib.contextmanager
    def session(self) -> Iterator[Submit]:
        """Submit several messages in a row (a burst of replies): over SMTP on one
        connection (:class:`~mailsh.mail.smtp.SmtpSession`); sendmail runs once each."""
        if self.smtp is None:
            yield self.submit
            return
        from mailsh.mail.smtp import SmtpSession

        with SmtpSession(self.smtp, self.smtp_options or SmtpOptions()) as smtp:
            yield smtp.send

    def __str__(self) -> str:
        return str(self.smtp) if self.smtp is not None else f"sendmail {self.sendmail}"


def transport_from_settings(settings: Settings) -> Transport:
    """The :class:`Transport` that ``smtp``/``sendmail`` and the TLS settings describe."""
    if settings.smtp is None and settings.sendmail is None:
        raise ConfigError(
            "no way to send mail is configured",
            hint=f"{TRANSPORT_HINT} (or MAILSH_SMTP / MAILSH_SENDMAIL)",
        )
    if settings.smtp is not None and settings.sendmail is not None:
        raise UsageError(
            "both an SMTP server and a sendmail program are configured; choose one",
            hint="drop --smtp/MAILSH_SMTP or --sendmail/MAILSH_SENDMAIL",
        )
    if settings.sendmail is not None:
        return Transport(sendmail=settings.sendmail, sendmail_timeout=settings.sendmail_timeout)
    assert settings.smtp is not None  # noqa: S101 - narrowed by the checks above
    return Transport(
        smtp=parse_smtp_url(settings.smtp),
        smtp_options=SmtpOptions(
            require_tls=settings.require_tls,
            ca_file=settings.smtp_ca_file,
            password=settings.smtp_password,
            timeout=settings.smtp_timeout,
        ),
    )


# --------------------------------------------------------------------------- what both ways share

_EOL_RE = re.compile(rb"\r\n|\r|\n")


def to_crlf(data: bytes) -> bytes:
    """Turn every line ending (CRLF, bare LF, bare CR) into CRLF, as SMTP requires.

    aiosmtpd 1.4.6 refuses bare-LF messages (``500 Line too long``); Postfix accepts them
    but other servers may not.
    """
    return _EOL_RE.sub(b"\r\n", data)


def to_lf(data: bytes) -> bytes:
    """Turn every line ending into LF, as a local ``sendmail`` expects."""
    return _EOL_RE.sub(b"\n", data)


def server_text(text: bytes | str) -> str:
    """Untrusted text from a server or program, made one short printable line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return printable_line(text, MAX_SERVER_TEXT)


def check_envelope(mail_from: str, rcpt_to: Sequence[str]) -> tuple[str, list[str]]:
    """The validated sender (``""``: the null reverse-path) and recipients."""
    if isinstance(rcpt_to, str):
        raise UsageError("rcpt_to must be a sequence of addresses, not one string")
    if not rcpt_to:
        raise UsageError("no recipients given", hint="give at least one recipient address")
    sender = "" if mail_from == "" else validate_address(mail_from)
    return sender, [validate_address(rcpt) for rcpt in rcpt_to]
