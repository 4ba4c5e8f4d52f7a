"""One error hierarchy and one exit-code enum for all of mailsh.

Every expected failure is a :class:`MailshError` carrying a one-line ``message``, a
``hint`` (the exact next command or step for the user) and an ``exit_code``. The CLI
catches them in exactly one place (``mailsh.cli.main``) and renders them; a traceback is
only shown with ``--debug``. Subclasses live here so that every module can raise them
without importing heavy code.

Exit codes follow ssh: the remote command's status passes through unchanged
(0-254, 128+N for a signal), and mailsh's own failures use 255.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ExitCode(enum.IntEnum):
    """Exit codes of the ``mailsh`` command.

    OK: success. USAGE: bad command line (typer/click's code). CANTCREAT: ``mailsh deliver``
    refused a message larger than ``max_message_bytes``; the MTA bounces it (sysexits
    EX_CANTCREAT). TEMPFAIL: ``mailsh deliver`` could not store a message; the MTA keeps
    it and retries (sysexits EX_TEMPFAIL).
    FAILURE: mailsh itself failed (like ssh's 255). Any other status of ``wait-reply`` is
    the remote command's own exit status.
    """

    OK = 0
    USAGE = 2
    CANTCREAT = 73
    TEMPFAIL = 75
    FAILURE = 255


class MailshError(Exception):
    """Base of every expected mailsh failure.

    ``message`` says what went wrong in one line; ``hint`` says what to do next.
    """

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(MailshError):
    """The user asked for something that cannot work as given."""

    exit_code = ExitCode.USAGE


class ConfigError(MailshError):
    """Settings, home directory or configuration file problems."""


class DependencyError(MailshError):
    """A required system program is missing or too old (docs/security.md P12)."""


class GpgError(MailshError):
    """GnuPG failed to do something it should have done.

    ``gpg_output`` is gpg's own stderr when there is one: ``--debug`` shows it.
    """

    def __init__(self, message: str, *, hint: str | None = None, gpg_output: str = "") -> None:
        super().__init__(message, hint=hint)
        self.gpg_output = gpg_output


class IdentityError(MailshError):
    """Identity / key problems: no identity yet, identity exists, bad key file."""


class TrustError(MailshError):
    """Trust store problems: unknown fingerprint, unreadable store."""


class ProtocolError(MailshError):
    """A message could not be decoded or was rejected by verification.

    ``reason`` is a short machine-readable code (e.g. ``signer-not-pinned``) used in
    logs, state records and rejection replies; ``message`` is for humans.
    """

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class TransportError(MailshError):
    """Sending or receiving mail failed (SMTP, sendmail, IMAP, mailbox files)."""


class TransportTempError(TransportError):
    """A sending failure where trying again later may succeed."""


class HandoffUnknownError(TransportTempError):
    """The mail may or may not have been accepted: the connection failed after the message
    itself started to go out (SMTP DATA), or sendmail was killed or timed out. A caller
    must treat the message as possibly sent (a request may run)."""


class WaitTimeoutError(MailshError):
    """Waiting for something (a reply) took longer than allowed."""


class StateError(MailshError):
    """A durable store is unusable: the state database, the server's spool
    (``mailsh.server.spool.SpoolError``) or the client's pending requests."""


class DeliveryTempFailError(MailshError):
    """``mailsh deliver`` could not make a message durable; the MTA must retry."""

    exit_code = ExitCode.TEMPFAIL


class DeliveryRefusedError(MailshError):
    """``mailsh deliver`` will never store this message (too large); the MTA bounces it."""

    exit_code = ExitCode.CANTCREAT


def first_validation_error(exc: ValidationError) -> tuple[str, str]:
    """Where and what of the first error pydantic found, to make one line of: the dotted
    location (``audience.address``; ``""`` for a rule across fields) and pydantic's message."""
    first = exc.errors()[0]
    return ".".join(str(p) for p in first["loc"]), str(first["msg"])
