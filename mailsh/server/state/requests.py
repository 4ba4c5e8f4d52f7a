"""The replay record (P5): each request taken once, and ended with exactly one outcome.

Every change here is one transaction over the ``requests`` row, the message's state
(:mod:`~mailsh.server.state.messages`) and the reply it queues
(:mod:`~mailsh.server.state.outbox`), so a reported state always has its report queued.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime
from typing import Any

from mailsh.protocol import ReplyStatus
from mailsh.server.state.messages import move_message
from mailsh.server.state.model import (
    FINAL_STATES,
    ClaimedRequest,
    MailToQueue,
    MessageState,
    from_row,
    timestamp,
)
from mailsh.server.state.outbox import queue_mail
from mailsh.server.state.store import Store

log = logging.getLogger("mailsh.server.state")

#: How ``requests.status`` marks an outcome no reply could be sealed for (schema v2).
_UNREPORTED = " (unreported)"

_SELECT = (
    "SELECT signer, request_id, signature_id, issued_at, request_sha256, spool_id,"
    " claimed_at, claimed_by, finished_at, status, notice_sent_at FROM requests"
)


def _claim(row: Any) -> ClaimedRequest:
    text: str | None = row[9]
    reported = text is None or not text.endswith(_UNREPORTED)
    status = None if text is None else ReplyStatus(text.removesuffix(_UNREPORTED))
    return from_row(ClaimedRequest, (*row[:9], status, row[10], reported))


class Requests:
    """The ``requests`` table: requests this server has taken, run or not."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def claim(
        self,
        *,
        signer: str,
        request_id: str,
        signature_id: str | None,
        issued_at: datetime,
        request_sha256: str,
        spool_id: str,
    ) -> bool:
        """Claim a request before running it (P5). False means a replay: do not run.

        A replay is a (signer, request_id) pair or a signature id seen before, whatever
        became of it. On True the claim is committed and fsynced, and the message (if
        recorded and still ``received``) is ``executing`` in the same transaction, so a
        crash from here on is reported "outcome unknown" and the request never re-runs.
        """
        now = self.store.now()
        with self.store.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO requests (signer, request_id, signature_id, issued_at,"
                    " request_sha256, spool_id, claimed_at, claimed_by)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        signer,
                        request_id,
                        signature_id,
                        timestamp(issued_at),
                        request_sha256,
                        spool_id,
                        now,
                        self.store.owner,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname not in (
                    "SQLITE_CONSTRAINT_PRIMARYKEY",
                    "SQLITE_CONSTRAINT_UNIQUE",
                ):
                    raise
                log.info("replay refused: signer %s request %s", signer, request_id)
                return False
            conn.execute(
                "UPDATE messages SET state = ?, signer = ?, request_id = ?, updated_at = ?"
                " WHERE spool_id = ? AND state = ?",
                (MessageState.EXECUTING, signer, request_id, now, spool_id, MessageState.RECEIVED),
            )
        return True

    def unfinished(self) -> list[ClaimedRequest]:
        """Claimed requests never finished, oldest first.

        After a crash these are reported "outcome unknown", never re-run. With several
        serve processes on one file a live process's running requests are listed too:
        check ``claimed_by`` (:func:`mailsh.server.claimant.is_gone`) and only settle
        those of dead processes.
        """
        with self.store.read() as conn:
            rows = conn.execute(
                _SELECT + " WHERE finished_at IS NULL ORDER BY claimed_at, signer, request_id"
            ).fetchall()
        return [_claim(r) for r in rows]

    def find(self, signer: str, request_id: str) -> ClaimedRequest | None:
        """The replay record of (``signer``, ``request_id``), finished or not."""
        row = self.store.read_one(
            _SELECT + " WHERE signer = ? AND request_id = ?", (signer, request_id)
        )
        return None if row is None else _claim(row)

    def record_rejection(
        self,
        *,
        spool_id: str,
        signer: str,
        request_id: str,
        issued_at: datetime,
        request_sha256: str,
        reason: str,
        reply: MailToQueue | None,
    ) -> bool:
        """Record an authenticated request's one outcome, ``rejected``, in one transaction.

        The replay record is written already finished (so a later copy is a duplicate and
        never runs, not a second verdict), the message becomes ``rejected`` (or
        ``unreported`` without ``reply``) and ``reply`` is queued. False, and nothing
        written, when the request was already taken: the caller treats it as a copy.
        """
        now = self.store.now()
        with self.store.write() as conn:
            inserted = conn.execute(
                "INSERT INTO requests (signer, request_id, signature_id, issued_at,"
                " request_sha256, spool_id, claimed_at, claimed_by, finished_at, status)"
                " VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (
                    signer,
                    request_id,
                    timestamp(issued_at),
                    request_sha256,
                    spool_id,
                    now,
                    self.store.owner,
                    now,
                    ReplyStatus.REJECTED,
                ),
            ).fetchone()
            if inserted is None:
                return False
            state = MessageState.REJECTED if reply is not None else MessageState.UNREPORTED
            self._end(conn, now, spool_id, state, reason, signer, request_id, reply)
        return True

    def finish_duplicate(
        self,
        *,
        spool_id: str,
        signer: str,
        request_id: str,
        reason: str,
        notice: MailToQueue | None,
    ) -> bool:
        """Give a copy of an already-taken request its final state, ``duplicate``.

        ``notice`` is queued only if no notice about this request was queued before (at
        most one per request, whatever the number of copies). Returns whether it was.
        """
        now = self.store.now()
        with self.store.write() as conn:
            if (
                notice is not None
                and not conn.execute(
                    "UPDATE requests SET notice_sent_at = ? WHERE signer = ?"
                    " AND request_id = ? AND notice_sent_at IS NULL RETURNING 1",
                    (now, signer, request_id),
                ).fetchone()
            ):
                notice = None  # one was queued before
            state = MessageState.DUPLICATE
            self._end(conn, now, spool_id, state, reason, signer, request_id, notice)
        return notice is not None

    def settle(
        self,
        *,
        signer: str,
        request_id: str,
        status: ReplyStatus,
        message_state: MessageState,
        reason: str | None,
        reply: MailToQueue | None,
    ) -> bool:
        """Finish an open claim with ``status`` and queue ``reply``, in one transaction.

        ``status`` is the status of ``reply``; without a ``reply`` (none could be sealed)
        the record notes the outcome as not reported.

        The claim's message gets ``message_state`` unless it already has a final state (a
        final state is never changed; the claim is finished all the same, so no message
        state can keep a claim open). False, and nothing written, when the claim is
        already finished: of several processes settling one claim, exactly one reports.
        """
        now = self.store.now()
        with self.store.write() as conn:
            row = conn.execute(
                "UPDATE requests SET finished_at = ?, status = ? WHERE signer = ?"
                " AND request_id = ? AND finished_at IS NULL RETURNING spool_id",
                (
                    now,
                    status.value + ("" if reply is not None else _UNREPORTED),
                    signer,
                    request_id,
                ),
            ).fetchone()
            if row is None:
                return False
            spool_id: str = row[0]
            current = conn.execute(
                "SELECT state FROM messages WHERE spool_id = ?", (spool_id,)
            ).fetchone()
            final = current is None or MessageState(current[0]) in FINAL_STATES
            state = None if final else message_state
            self._end(conn, now, spool_id, state, reason, signer, request_id, reply)
        return True

    @staticmethod
    def _end(
        conn: sqlite3.Connection,
        now: str,
        spool_id: str,
        state: MessageState | None,
        reason: str | None,
        signer: str,
        request_id: str,
        mail: MailToQueue | None,
    ) -> None:
        """Give the message ``state`` (None: leave it) and queue ``mail`` (if any)."""
        if state is not None:
            move_message(conn, now, spool_id, state, reason, signer, request_id)
        if mail is not None:
            queue_mail(conn, now, mail, spool_id, request_id)
