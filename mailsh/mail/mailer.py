"""How this process sends mail: one SMTP server or one local sendmail program.

Shared by the client (``mailsh send``) and the server (replies): both pick the way out
from the same settings (``smtp``/``sendmail`` and the TLS options) with the same errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailsh.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from mailsh.mail.transport import SmtpOptions, SmtpTarget
    from mailsh.settings import Settings

TRANSPORT_HINT = "--smtp smtp://host:587 or --sendmail /usr/sbin/sendmail"


class Submit(Protocol):
    """Hand one message over; returns once it was accepted (raises otherwise)."""

    def __call__(self, *, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> None: ...


@dataclass(frozen=True)
class Outbound:
    """How mail leaves this machine: one SMTP server, or one local sendmail program."""

    smtp: SmtpTarget | None = None
    smtp_options: SmtpOptions | None = None
    sendmail: Path | None = None

    def __post_init__(self) -> None:
        if (self.smtp is None) == (self.sendmail is None):
            raise UsageError(
                "give exactly one way to send mail: --smtp URL or --sendmail PATH",
                hint=TRANSPORT_HINT,
            )

    def submit(self, *, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> None:
        """Hand ``message`` over; returns once the SMTP server or sendmail accepted it."""
        from mailsh.mail.transport import SmtpOptions, send_sendmail, send_smtp

        if self.smtp is not None:
            options = self.smtp_options or SmtpOptions()
            send_smtp(self.smtp, options, mail_from=mail_from, rcpt_to=rcpt_to, message=message)
        elif self.sendmail is not None:
            send_sendmail(self.sendmail, mail_from=mail_from, rcpt_to=rcpt_to, message=message)

    @contextlib.contextmanager
    def session(self) -> Iterator[Submit]:
        """Submit several messages in a row (a burst of replies): over SMTP on one
        connection (:class:`~mailsh.mail.transport.SmtpSession`); sendmail runs once each."""
        from mailsh.mail.transport import SmtpOptions, SmtpSession

        if self.smtp is None:
            yield self.submit
            return
        with SmtpSession(self.smtp, self.smtp_options or SmtpOptions()) as smtp:
            yield smtp.send

    def __str__(self) -> str:
        return str(self.smtp) if self.smtp is not None else f"sendmail {self.sendmail}"


def outbound_from_settings(settings: Settings) -> Outbound:
    """The :class:`Outbound` that ``smtp``/``sendmail`` and the TLS settings describe."""
    from mailsh.mail.transport import SmtpOptions, parse_smtp_url

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
        return Outbound(sendmail=settings.sendmail)
    assert settings.smtp is not None  # noqa: S101 - narrowed by the checks above
    return Outbound(
        smtp=parse_smtp_url(settings.smtp),
        smtp_options=SmtpOptions(
            require_tls=settings.require_tls,
            ca_file=settings.smtp_ca_file,
            password=settings.smtp_password,
        ),
    )
