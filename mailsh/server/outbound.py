"""The outbound queue worker: replies leave the server here, and are never dropped.

Replies are queued durably in the state database by the processor. This worker sends
what is due through ``--smtp URL`` or ``--sendmail PATH``; a failed send stays queued
and is retried with exponential backoff, across restarts (P9). Permanent failures are
retried too, but fewer times, since an operator can often fix them (wrong password,
missing CA file); after ``reply_permanent_attempts`` (a setting) the reply is parked as
failed and shown by ``mailsh status``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from mailsh.errors import TransportError
from mailsh.mail.transport import is_temporary, transport_from_settings
from mailsh.server.state import QueuedReply, StateDB, next_backoff
from mailsh.settings import Settings

log = logging.getLogger("mailsh.server")

SendMail = Callable[[str, str, bytes], None]  # (mail_from, rcpt_to, message)

STOP_TIMEOUT = 10.0
"""Seconds serve waits on shutdown for the sender to finish the reply it is sending.
Not a setting: a reply not sent by then stays queued, and the next serve sends it once
its lease (``reply_lease``) ends."""
MIN_WAIT = 0.05
"""Shortest sleep between two looks at the reply queue, so that a reply due now (or a
clock step) cannot make the sender spin. Internal tuning, not a setting."""


class SettingsSendMail:
    """Replies leave the way the settings say (``--smtp`` or ``--sendmail``); a burst
    of replies shares one SMTP connection (:meth:`session`)."""

    def __init__(self, settings: Settings) -> None:
        self.transport = transport_from_settings(settings)

    def __call__(self, mail_from: str, rcpt_to: str, message: bytes) -> None:
        self.transport.submit(mail_from=mail_from, rcpt_to=[rcpt_to], message=message)

    @contextlib.contextmanager
    def session(self) -> Iterator[SendMail]:
        with self.transport.session() as submit:

            def send(mail_from: str, rcpt_to: str, message: bytes) -> None:
                submit(mail_from=mail_from, rcpt_to=[rcpt_to], message=message)

            yield send


def send_mail_from_settings(settings: Settings) -> SendMail:
    """Replies leave the way the settings say (``--smtp`` or ``--sendmail``)."""
    return SettingsSendMail(settings)


@contextlib.contextmanager
def _burst(send_mail: SendMail) -> Iterator[SendMail]:
    """``send_mail`` for several replies in a row: its session when it has one."""
    session = getattr(send_mail, "session", None)
    if session is None:
        yield send_mail
        return
    with session() as send:
        yield send


class ReplySender:
    """Sends the due replies of the outbox; ``kick()`` wakes it when one was queued.

    ``reply_lease``, ``reply_check_interval`` and ``reply_permanent_attempts`` of
    ``settings`` bound it (docs/server.md "Settings").
    """

    def __init__(self, state: StateDB, send_mail: SendMail, settings: Settings) -> None:
        self.state = state
        self.send_mail = send_mail
        self.lease = timedelta(seconds=settings.reply_lease)
        self.check_interval = settings.reply_check_interval
        self.permanent_attempts = settings.reply_permanent_attempts
        self._wake = threading.Event()
        self._flushing = threading.Lock()  # one sender at a time: never send a reply twice
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        self._wake.set()

    def flush(self) -> int:
        """Send everything due now; returns how many were sent.

        One lease holds at most 100 replies, so lease again until a round sends nothing
        (``serve --once`` after a burst of more than 100 requests must not exit with
        replies still queued). Failed sends are rescheduled for later, so this ends.
        """
        with self._flushing:
            total = 0
            while sent := self._flush():
                total += sent
            return total

    def _flush(self) -> int:
        items = self.state.outbox.lease(datetime.now(UTC), lease=self.lease)
        if not items:
            return 0
        with _burst(self.send_mail) as send:
            return self._send(items, send)

    def _send(self, items: list[QueuedReply], send: SendMail) -> int:
        sent = 0
        for item in items:
            try:
                send(item.from_addr, item.to_addr, item.message)
            except TransportError as exc:
                attempts = item.attempts + 1
                temporary = is_temporary(exc)
                if not temporary and attempts >= self.permanent_attempts:
                    self.state.outbox.mark_failed(item.id, exc.message, None)
                    log.error("giving up on reply %s to %s: %s", item.id, item.to_addr, exc)
                    continue
                when = datetime.now(UTC) + next_backoff(attempts)
                self.state.outbox.mark_failed(item.id, exc.message, when)
                log.warning(
                    "reply %s to %s not sent (%s); retry at %s",
                    item.id,
                    item.to_addr,
                    exc.message,
                    when.isoformat(timespec="seconds"),
                )
                continue
            except Exception:  # never let one reply kill the worker
                log.exception("sending reply %s failed unexpectedly", item.id)
                self.state.outbox.mark_failed(
                    item.id, "internal error", datetime.now(UTC) + next_backoff(item.attempts + 1)
                )
                continue
            self.state.outbox.mark_sent(item.id)
            log.info("reply %s sent to %s", item.id, item.to_addr)
            sent += 1
        return sent

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mailsh-outbound", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.flush()
            except Exception:
                log.exception("outbound queue error")
            self._wake.wait(timeout=self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        due = self.state.outbox.next_due()
        if due is None:
            return self.check_interval
        return max(MIN_WAIT, min(self.check_interval, (due - datetime.now(UTC)).total_seconds()))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
