"""The outbox: replies waiting to be sent, leased while a sender has them, retried, abandoned."""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timedelta

from mailsh.errors import StateError
from mailsh.server.state.model import (
    MAX_ERROR_CHARS,
    MailToQueue,
    QueuedReply,
    from_row,
    parse_timestamp,
    timestamp,
)
from mailsh.server.state.store import Store

log = logging.getLogger("mailsh.server.state")

_DUE = (
    "SELECT id, to_addr, from_addr, message, spool_id, request_id, attempts,"
    " next_attempt_at, last_error, created_at FROM outbound"
    " WHERE sent_at IS NULL AND abandoned_at IS NULL AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT ?"
)


def queue_mail(
    conn: sqlite3.Connection, now: str, mail: MailToQueue, spool_id: str, request_id: str | None
) -> int:
    """Queue ``mail`` for sending now, inside ``conn``'s transaction; returns its id.

    Only together with a message's final state (:class:`~mailsh.server.state.Requests`),
    so a reported state always has its report queued.
    """
    row = conn.execute(
        "INSERT INTO outbound (to_addr, from_addr, message, spool_id, request_id,"
        " created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (mail.to_addr, mail.from_addr, mail.message, spool_id, request_id, now, now),
    ).fetchone()
    outbound_id: int = row[0]
    return outbound_id


class Outbox:
    """The ``outbound`` table: queued replies and their retry bookkeeping."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def lease(self, now: datetime, *, lease: timedelta, limit: int = 100) -> list[QueuedReply]:
        """Take the replies due at ``now`` for sending, earliest due first, then by id.

        In the same transaction their next attempt moves to ``now + lease``, so another
        serve process sharing this file does not send them too. A process that dies
        mid-send leaves them to be retried when the lease runs out (a reply may then go
        twice, never zero times).
        """
        with self.store.write() as conn:
            rows = conn.execute(_DUE, (timestamp(now), limit)).fetchall()
            conn.executemany(
                "UPDATE outbound SET next_attempt_at = ? WHERE id = ?",
                [(timestamp(now + lease), r[0]) for r in rows],
            )
        return [from_row(QueuedReply, r) for r in rows]

    def mark_sent(self, outbound_id: int) -> None:
        with self.store.write() as conn:
            sent_at = conn.execute(
                "SELECT sent_at FROM outbound WHERE id = ?", (outbound_id,)
            ).fetchone()
            if sent_at is None:
                raise StateError(f"no outbound message {outbound_id}")
            if sent_at[0] is not None:
                log.warning("outbound %d was already marked sent (sent twice?)", outbound_id)
                return
            conn.execute(
                "UPDATE outbound SET sent_at = ? WHERE id = ?", (self.store.now(), outbound_id)
            )

    def mark_failed(self, outbound_id: int, error: str, next_attempt: datetime | None) -> int:
        """Count a failed send and keep the error; returns the attempts so far.

        Retry at ``next_attempt`` (use :func:`~mailsh.server.state.next_backoff`), or never
        when it is None (a permanent failure: the reply is abandoned and counted).
        """
        now = self.store.now()
        retry_at = now if next_attempt is None else timestamp(next_attempt)
        abandoned_at = now if next_attempt is None else None
        with self.store.write() as conn:
            row = conn.execute(
                "UPDATE outbound SET attempts = attempts + 1, last_error = ?, last_error_at = ?,"
                " next_attempt_at = ?, abandoned_at = ?"
                " WHERE id = ? AND sent_at IS NULL AND abandoned_at IS NULL RETURNING attempts",
                (error[:MAX_ERROR_CHARS], now, retry_at, abandoned_at, outbound_id),
            ).fetchone()
        if row is None:
            raise StateError(f"no unsent outbound message {outbound_id}")
        if next_attempt is None:
            log.error("outbound %d abandoned after %d attempts: %s", outbound_id, row[0], error)
        attempts: int = row[0]
        return attempts

    def next_due(self) -> datetime | None:
        """When the earliest unsent reply is due (maybe in the past), or None if none is."""
        row = self.store.read_one(
            "SELECT min(next_attempt_at) FROM outbound"
            " WHERE sent_at IS NULL AND abandoned_at IS NULL"
        )
        return None if row[0] is None else parse_timestamp(row[0])
