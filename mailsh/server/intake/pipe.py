"""Intake from a pipe: ``mailsh deliver`` takes one message on stdin into the spool.

The MTA that runs ``mailsh deliver`` (Postfix ``mailbox_command``, a pipe transport, an
alias) reads only its exit status (sysexits), so every failure here is one of two
errors, which the CLI's one error funnel turns into that status:
:class:`~mailsh.errors.DeliveryRefusedError` (73, EX_CANTCREAT) for a message larger
than ``max_message_bytes``, which the MTA bounces; :class:`~mailsh.errors.DeliveryTempFailError`
(75, EX_TEMPFAIL) for anything else, a broken configuration and too little free space
included, so the MTA keeps the message and retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from mailsh.errors import DeliveryRefusedError, DeliveryTempFailError, MailshError

if TYPE_CHECKING:
    from mailsh.server.spool import SpooledMessage
    from mailsh.settings import Settings


def deliver(load_settings: Callable[[], Settings], stream: BinaryIO) -> SpooledMessage:
    """Store the one message on ``stream`` durably in the spool and return it.

    ``load_settings`` is called here, so that a failure to load them is a temporary
    failure too (the MTA keeps the message while the configuration is fixed).
    """
    from mailsh.server.spool import Spool

    try:
        settings = load_settings()
        _check_free_space(settings)
        data = stream.read(settings.max_message_bytes + 1)
        if len(data) > settings.max_message_bytes:
            raise DeliveryRefusedError(
                f"message larger than {settings.max_message_bytes} bytes; the MTA bounces it",
                hint="raise MAILSH_MAX_MESSAGE_BYTES on this server if such mail is wanted",
            )
        return Spool(settings.spool_dir).put(data, source="pipe")
    except DeliveryRefusedError:
        raise
    except MailshError as exc:
        raise DeliveryTempFailError(
            f"could not store the message: {exc.message}", hint=exc.hint
        ) from exc
    except OSError as exc:
        raise DeliveryTempFailError(f"could not store the message: {exc}") from exc


def _check_free_space(settings: Settings) -> None:
    """Below the free-space floor: a temporary failure, the MTA keeps the mail."""
    from mailsh.server.diskspace import free_bytes
    from mailsh.units import format_size

    if settings.min_free_space <= 0:
        return
    free = free_bytes(settings.home)
    if free < settings.min_free_space:
        raise DeliveryTempFailError(
            f"only {format_size(free)} free on {settings.home}, below --min-free-space "
            f"{format_size(settings.min_free_space)}; the MTA keeps the message and retries",
            hint="free some disk space (mailsh serve prunes spool/done/ by --retention) or "
            "lower MAILSH_MIN_FREE_SPACE",
        )
