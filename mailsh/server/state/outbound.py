"""The outbound queue: replies waiting to be sent, leased while a sender has them."""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timedelta
from typing import Any

from mailsh.errors import StateError
from mailsh.server.state.base import _Connection
from mailsh.server.state.model import (
    _MAX_ERROR_CHARS,
    REPORTED_STATES,
    MessageState,
    Outbound,
    _dt,
    _ts,
)

log = logging.getLogger("mailsh.server.state")

_DUE_OUTBOUND = (
    "SELECT id, to_addr, from_addr, message, spool_id, request_id, attempts,"
    " next_attempt_at, last_error, created_at FROM outbound"
    " WHERE sent_at IS NULL AND abandoned_at IS NULL AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT ?"
)


def _outbound(r: Any) -> Outbound:
    return Outbound(
        id=r[0],
        to_addr=r[1],
        from_addr=r[2],
        message=r[3],
        spool_id=r[4],
        request_id=r[5],
        attempts=r[6],
        next_attempt_at=_dt(r[7]),
        last_error=r[8],
        created_at=_dt(r[9]),
    )


class _OutboundQueue(_Connection):
    """Replies: queued with a message's final state, leased, sent, retried, abandoned."""

    def enqueue_reply(
        self,
        *,
        to_addr: str,
        from_addr: str,
        message: bytes,
        spool_id: str,
        request_id: str | None,
    ) -> int:
        """Queue a finished reply for sending now; returns its id."""
        with self._write() as conn:
            return self._enqueue(conn, to_addr, from_addr, message, spool_id, request_id)

    def finish_with_reply(
        self,
        *,
        spool_id: str,
        state: MessageState,
        to_addr: str,
        from_addr: str,
        message: bytes,
        reason: str | None = None,
        signer: str | None = None,
        request_id: str | None = None,
        request_status: str | None = None,
    ) -> int:
        """Give a message its final reported state and queue its reply, atomically.

        ``state`` is replied, rejected or outcome_unknown. ``signer``/``request_id`` are
        noted on the message (and the reply) if given. The request *this message* claimed,
        if any, is finished with ``request_status`` (default: the state) in the same
        transaction; a replayed message never finishes the original's claim. Raises
        :class:`StateError` if the message is already final, so a message is reported at
        most once even when two workers race. Returns the outbound id.
        """
        if state not in REPORTED_STATES:
            raise ValueError(f"{state} is not a reported state")
        now = _ts(self._clock())
        with self._write() as conn:
            self._set_state(conn, spool_id, state, reason, signer, request_id)
            (request_id,) = conn.execute(
                "SELECT request_id FROM messages WHERE spool_id = ?", (spool_id,)
            ).fetchone()
            outbound_id = self._enqueue(conn, to_addr, from_addr, message, spool_id, request_id)
            conn.execute(
                "UPDATE requests SET finished_at = ?, status = ?"
                " WHERE spool_id = ? AND finished_at IS NULL",
                (now, request_status or str(state), spool_id),
            )
        return outbound_id

    def due_outbound(self, now: datetime, *, limit: int = 100) -> list[Outbound]:
        """Unsent replies whose next attempt is due at ``now``: earliest due first, then id."""
        with self._read() as conn:
            rows = conn.execute(_DUE_OUTBOUND, (_ts(now), limit)).fetchall()
        return [_outbound(r) for r in rows]

    def lease_outbound(
        self, now: datetime, *, lease: timedelta = timedelta(minutes=5), limit: int = 100
    ) -> list[Outbound]:
        """Take the due replies for sending: like :meth:`due_outbound`, but in the same
        transaction their next attempt moves to ``now + lease``, so another serve process
        sharing this file does not send them too. A process that dies mid-send leaves
        them to be retried when the lease runs out (a reply may then go twice, never
        zero times).
        """
        with self._write() as conn:
            rows = conn.execute(_DUE_OUTBOUND, (_ts(now), limit)).fetchall()
            conn.executemany(
                "UPDATE outbound SET next_attempt_at = ? WHERE id = ?",
                [(_ts(now + lease), r[0]) for r in rows],
            )
        return [_outbound(r) for r in rows]

    def mark_sent(self, outbound_id: int) -> None:
        with self._write() as conn:
            sent_at = conn.execute(
                "SELECT sent_at FROM outbound WHERE id = ?", (outbound_id,)
            ).fetchone()
            if sent_at is None:
                raise StateError(f"no outbound message {outbound_id}")
            if sent_at[0] is not None:
                log.warning("outbound %d was already marked sent (sent twice?)", outbound_id)
                return
            conn.execute(
                "UPDATE outbound SET sent_at = ? WHERE id = ?",
                (_ts(self._clock()), outbound_id),
            )

    def mark_failed(self, outbound_id: int, error: str, next_attempt: datetime | None) -> int:
        """Count a failed send and keep the error; returns the attempts so far.

        Retry at ``next_attempt`` (use :func:`next_backoff`), or never when it is None
        (a permanent failure: the reply is abandoned and shows in :meth:`counts`).
        """
        now = _ts(self._clock())
        retry_at, abandoned_at = (now, now) if next_attempt is None else (_ts(next_attempt), None)
        with self._write() as conn:
            row = conn.execute(
                "UPDATE outbound SET attempts = attempts + 1, last_error = ?, last_error_at = ?,"
                " next_attempt_at = ?, abandoned_at = ?"
                " WHERE id = ? AND sent_at IS NULL AND abandoned_at IS NULL RETURNING attempts",
                (error[:_MAX_ERROR_CHARS], now, retry_at, abandoned_at, outbound_id),
            ).fetchone()
        if row is None:
            raise StateError(f"no unsent outbound message {outbound_id}")
        if next_attempt is None:
            log.error("outbound %d abandoned after %d attempts: %s", outbound_id, row[0], error)
        attempts: int = row[0]
        return attempts

    def next_outbound_due(self) -> datetime | None:
        """When the earliest unsent reply is due (maybe in the past), or None if none is."""
        row = self._conn_read_one(
            "SELECT min(next_attempt_at) FROM outbound"
            " WHERE sent_at IS NULL AND abandoned_at IS NULL",
            (),
        )
        return None if row[0] is None else _dt(row[0])

    def _enqueue(
        self,
        conn: sqlite3.Connection,
        to_addr: str,
        from_addr: str,
        message: bytes,
        spool_id: str,
        request_id: str | None,
    ) -> int:
        now = _ts(self._clock())
        row = conn.execute(
            "INSERT INTO outbound (to_addr, from_addr, message, spool_id, request_id,"
            " created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (to_addr, from_addr, message, spool_id, request_id, now, now),
        ).fetchone()
        outbound_id: int = row[0]
        return outbound_id
