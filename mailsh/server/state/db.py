"""The state database: messages and their states, the replay record, audit, status."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path
from typing import Any

from mailsh.errors import StateError
from mailsh.server.state.model import (
    FINAL_STATES,
    STATE_FILE,
    AuditEntry,
    ClaimedRequest,
    MailToQueue,
    MessageRecord,
    MessageState,
    ReasonCount,
    StatusError,
    _dt,
    _ts,
    _utcnow,
)
from mailsh.server.state.outbound import _OutboundQueue

log = logging.getLogger("mailsh.server.state")
#: Rows deleted per transaction when pruning (keeps the write lock short).
_PRUNE_BATCH = 500

#: Final states that need a look: what ``mailsh status`` lists as problems.
_PROBLEM_STATES = (
    MessageState.REJECTED,
    MessageState.DISCARDED,
    MessageState.QUARANTINED,
    MessageState.DUPLICATE,
    MessageState.UNREPORTED,
)
_CLAIM_SELECT = (
    "SELECT signer, request_id, signature_id, issued_at, request_sha256, spool_id,"
    " claimed_at, claimed_by, finished_at, status, notice_sent_at FROM requests"
)


def _claim(r: Any) -> ClaimedRequest:
    return ClaimedRequest(
        signer=r[0],
        request_id=r[1],
        signature_id=r[2],
        issued_at=_dt(r[3]),
        request_sha256=r[4],
        spool_id=r[5],
        claimed_at=_dt(r[6]),
        claimed_by=r[7],
        finished_at=None if r[8] is None else _dt(r[8]),
        status=r[9],
        notice_sent_at=None if r[10] is None else _dt(r[10]),
    )


class StateDB(_OutboundQueue):
    """The state database. Thread-safe; one instance per process is enough.

    ``clock`` returns the current aware time (injectable for tests).
    """

    @classmethod
    def open(cls, home: Path, *, clock: Callable[[], datetime] = _utcnow) -> StateDB:
        """Open (creating if needed) ``state.db`` in the server home directory."""
        return cls(home / STATE_FILE, clock=clock)

    def record_message(self, spool_id: str, source: str, size: int, sha256: str) -> None:
        """Note a spooled message as ``received``, or fill in its size and hash if
        :meth:`begin_processing` created the row first. Recording again changes nothing."""
        now = _ts(self._clock())
        with self._write() as conn:
            conn.execute(
                "INSERT INTO messages (spool_id, source, size, sha256, state, received_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (spool_id) DO UPDATE"
                " SET size = excluded.size, sha256 = excluded.sha256 WHERE sha256 IS NULL",
                (spool_id, source, size, sha256, MessageState.RECEIVED, now, now),
            )

    def set_message_state(
        self,
        spool_id: str,
        state: MessageState,
        *,
        reason: str | None = None,
        signer: str | None = None,
        request_id: str | None = None,
    ) -> None:
        """Move a message to ``state``.

        A final state is final: setting the same final state again is a no-op, any other
        change raises :class:`StateError` (P9: exactly one final state per message).
        """
        with self._write() as conn:
            current = self._current_state(conn, spool_id)
            if current == state and state in FINAL_STATES:
                return
            self._set_state(conn, spool_id, state, reason, signer, request_id)

    def message_state(self, spool_id: str) -> MessageState | None:
        """The message's state, or None if it was never recorded."""
        row = self._conn_read_one("SELECT state FROM messages WHERE spool_id = ?", (spool_id,))
        return None if row is None else MessageState(row[0])

    def message(self, spool_id: str) -> MessageRecord | None:
        row = self._conn_read_one(
            "SELECT spool_id, source, size, sha256, state, reason, signer, request_id,"
            " attempts, received_at, updated_at FROM messages WHERE spool_id = ?",
            (spool_id,),
        )
        if row is None:
            return None
        return MessageRecord(
            spool_id=row[0],
            source=row[1],
            size=row[2],
            sha256=row[3],
            state=MessageState(row[4]),
            reason=row[5],
            signer=row[6],
            request_id=row[7],
            attempts=row[8],
            received_at=_dt(row[9]),
            updated_at=_dt(row[10]),
        )

    def messages_in_state(self, *states: MessageState) -> list[str]:
        """Spool ids in any of ``states``, oldest first (e.g. unfinished work at start-up)."""
        marks = ",".join("?" * len(states))
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT spool_id FROM messages WHERE state IN ({marks})"  # noqa: S608 - only ?s
                " ORDER BY received_at, spool_id",
                tuple(states),
            ).fetchall()
        return [row[0] for row in rows]

    def begin_processing(
        self, spool_id: str, *, source: str | None = None, size: int | None = None
    ) -> int:
        """Durably count one more processing attempt and return the count (1 the first time).

        Call before touching a message's bytes. If the processor crashes, the next start
        sees a higher count; a caller quarantines a message at 3 (it crashed us twice,
        P11). With ``source`` and ``size`` an unrecorded message is recorded first (hash
        unknown until :meth:`record_message`); without them it must already be recorded.
        """
        now = _ts(self._clock())
        with self._write() as conn:
            if source is not None and size is not None:
                conn.execute(
                    "INSERT INTO messages (spool_id, source, size, state, received_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (spool_id) DO NOTHING",
                    (spool_id, source, size, MessageState.RECEIVED, now, now),
                )
            row = conn.execute(
                "UPDATE messages SET attempts = attempts + 1, updated_at = ?"
                " WHERE spool_id = ? RETURNING attempts",
                (now, spool_id),
            ).fetchone()
        if row is None:
            raise StateError(f"message {spool_id} was never recorded")
        attempts: int = row[0]
        return attempts

    def claim_request(
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
        now = _ts(self._clock())
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO requests (signer, request_id, signature_id, issued_at,"
                    " request_sha256, spool_id, claimed_at, claimed_by)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        signer,
                        request_id,
                        signature_id,
                        _ts(issued_at),
                        request_sha256,
                        spool_id,
                        now,
                        self._owner,
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

    def finish_request(self, signer: str, request_id: str, status: str) -> None:
        """Mark a claimed request finished with ``status`` (e.g. ``exit 0``, ``timeout``)."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE requests SET finished_at = ?, status = ?"
                " WHERE signer = ? AND request_id = ? AND finished_at IS NULL RETURNING 1",
                (_ts(self._clock()), status, signer, request_id),
            ).fetchone()
        if row is None:
            raise StateError(f"request {request_id} of {signer} is not claimed or already finished")

    def unfinished_requests(self) -> list[ClaimedRequest]:
        """Claimed requests never finished, oldest first.

        After a crash these are reported "outcome unknown", never re-run. With several
        serve processes on one file a live process's running requests are listed too:
        check ``claimed_by`` (:func:`mailsh.server.claimant.is_gone`) and only settle
        those of dead processes.
        """
        with self._read() as conn:
            rows = conn.execute(
                _CLAIM_SELECT + " WHERE finished_at IS NULL ORDER BY claimed_at, signer, request_id"
            ).fetchall()
        return [_claim(r) for r in rows]

    def find_claim(self, signer: str, request_id: str) -> ClaimedRequest | None:
        """The replay record of (``signer``, ``request_id``), finished or not."""
        row = self._conn_read_one(
            _CLAIM_SELECT + " WHERE signer = ? AND request_id = ?", (signer, request_id)
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
        now = _ts(self._clock())
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT INTO requests (signer, request_id, signature_id, issued_at,"
                " request_sha256, spool_id, claimed_at, claimed_by, finished_at, status)"
                " VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, 'rejected')"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (
                    signer,
                    request_id,
                    _ts(issued_at),
                    request_sha256,
                    spool_id,
                    now,
                    self._owner,
                    now,
                ),
            ).fetchone()
            if inserted is None:
                return False
            state = MessageState.REJECTED if reply is not None else MessageState.UNREPORTED
            self._set_state(conn, spool_id, state, reason, signer, request_id)
            if reply is not None:
                self._enqueue(
                    conn, reply.to_addr, reply.from_addr, reply.message, spool_id, request_id
                )
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
        now = _ts(self._clock())
        with self._write() as conn:
            queued = False
            if notice is not None:
                queued = (
                    conn.execute(
                        "UPDATE requests SET notice_sent_at = ? WHERE signer = ?"
                        " AND request_id = ? AND notice_sent_at IS NULL RETURNING 1",
                        (now, signer, request_id),
                    ).fetchone()
                    is not None
                )
            self._set_state(conn, spool_id, MessageState.DUPLICATE, reason, signer, request_id)
            if queued and notice is not None:
                self._enqueue(
                    conn, notice.to_addr, notice.from_addr, notice.message, spool_id, request_id
                )
        return queued

    def settle_claim(
        self,
        *,
        signer: str,
        request_id: str,
        status: str,
        message_state: MessageState,
        reason: str | None,
        reply: MailToQueue | None,
    ) -> bool:
        """Finish an open claim with ``status`` and queue ``reply``, in one transaction.

        The claim's message gets ``message_state`` unless it already has a final state (a
        final state is never changed; the claim is finished all the same, so no message
        state can keep a claim open). False, and nothing written, when the claim is
        already finished: of several processes settling one claim, exactly one reports.
        """
        now = _ts(self._clock())
        with self._write() as conn:
            row = conn.execute(
                "UPDATE requests SET finished_at = ?, status = ? WHERE signer = ?"
                " AND request_id = ? AND finished_at IS NULL RETURNING spool_id",
                (now, status, signer, request_id),
            ).fetchone()
            if row is None:
                return False
            spool_id: str = row[0]
            current = conn.execute(
                "SELECT state FROM messages WHERE spool_id = ?", (spool_id,)
            ).fetchone()
            if current is not None and MessageState(current[0]) not in FINAL_STATES:
                self._set_state(conn, spool_id, message_state, reason, signer, request_id)
            if reply is not None:
                self._enqueue(
                    conn, reply.to_addr, reply.from_addr, reply.message, spool_id, request_id
                )
        return True

    def audit(self, event: str, **fields: str | int | None) -> None:
        """Append one event to the audit log (never message bodies or secrets)."""
        for key, value in fields.items():
            if value is not None and not isinstance(value, str | int):
                raise TypeError(f"audit field {key} must be str, int or None")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO audit (at, event, fields) VALUES (?, ?, ?)",
                (_ts(self._clock()), event, json.dumps(fields, sort_keys=True)),
            )

    def recent_audit(self, limit: int = 50) -> list[AuditEntry]:
        """The newest ``limit`` audit entries, newest first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, at, event, fields FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [AuditEntry(r[0], _dt(r[1]), r[2], json.loads(r[3])) for r in rows]

    def counts(self) -> dict[str, int]:
        """Messages per state (every state, zeros included), plus ``outbound_pending``,
        ``outbound_failing`` (pending after at least one failure), ``outbound_abandoned``
        (given up) and ``requests_unfinished``."""
        result = {state.value: 0 for state in MessageState}
        with self._read() as conn:
            for state, count in conn.execute("SELECT state, count(*) FROM messages GROUP BY state"):
                result[state] = count
            pending, failing, abandoned = conn.execute(
                "SELECT count(*) FILTER (WHERE abandoned_at IS NULL),"
                " count(*) FILTER (WHERE abandoned_at IS NULL AND attempts > 0),"
                " count(*) FILTER (WHERE abandoned_at IS NOT NULL)"
                " FROM outbound WHERE sent_at IS NULL"
            ).fetchone()
            (unfinished,) = conn.execute(
                "SELECT count(*) FROM requests WHERE finished_at IS NULL"
            ).fetchone()
        result.update(
            outbound_pending=pending,
            outbound_failing=failing,
            outbound_abandoned=abandoned,
            requests_unfinished=unfinished,
        )
        return result

    def last_errors(self, limit: int = 5) -> list[StatusError]:
        """Newest problems first: failed sends, and rejected, discarded, quarantined,
        duplicate and unreported messages (``kind`` is ``outbound`` or the state, ``ref``
        the reply or spool id)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT last_error_at, 'outbound', 'reply ' || id, last_error FROM outbound"
                " WHERE last_error IS NOT NULL"
                " UNION ALL SELECT updated_at, state, spool_id, coalesce(reason, state)"
                " FROM messages WHERE state IN (?, ?, ?, ?, ?)"
                " ORDER BY 1 DESC LIMIT ?",
                (*_PROBLEM_STATES, limit),
            ).fetchall()
        return [StatusError(_dt(r[0]), r[1], r[2], r[3]) for r in rows]

    def problem_counts(self, limit: int = 20) -> list[ReasonCount]:
        """Messages in a problem state (see :meth:`last_errors`) counted per state and
        reason, the most recently seen first (at most ``limit`` rows)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT state, coalesce(reason, state), count(*), max(updated_at)"
                " FROM messages WHERE state IN (?, ?, ?, ?, ?) GROUP BY 1, 2"
                " ORDER BY 4 DESC LIMIT ?",
                (*_PROBLEM_STATES, limit),
            ).fetchall()
        return [ReasonCount(MessageState(r[0]), r[1], r[2], _dt(r[3])) for r in rows]

    def recent_decisions(self, limit: int = 10) -> list[MessageRecord]:
        """The messages that most recently reached a final state, newest first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT spool_id FROM messages WHERE state NOT IN (?, ?)"
                " ORDER BY updated_at DESC, spool_id DESC LIMIT ?",
                (MessageState.RECEIVED, MessageState.EXECUTING, limit),
            ).fetchall()
        return [m for m in (self.message(r[0]) for r in rows) if m is not None]

    def next_outbound_attempt(self) -> datetime | None:
        """When the queue next tries to send a reply (None: nothing waiting)."""
        row = self._conn_read_one(
            "SELECT min(next_attempt_at) FROM outbound"
            " WHERE sent_at IS NULL AND abandoned_at IS NULL",
            (),
        )
        return None if row is None or row[0] is None else _dt(row[0])

    def status_report(self, errors: int = 5) -> dict[str, int | list[str]]:
        """:meth:`counts` plus ``last_errors`` as one-line strings, for ``mailsh status``."""
        report: dict[str, int | list[str]] = dict(self.counts())
        report["last_errors"] = [
            f"{e.at.isoformat(timespec='seconds')} {e.kind} {e.ref}: {e.error}"
            for e in self.last_errors(errors)
        ]
        return report

    # -- retention (mailsh.server.retention decides the cut-offs) ---------------------
    # Plain DELETEs in short batches, each its own transaction, so intake and workers
    # never wait long for the write lock. The audit log is append-only and never pruned.

    def message_states(self, spool_ids: Collection[str]) -> dict[str, MessageState]:
        """The state of each recorded message among ``spool_ids`` (unrecorded are absent)."""
        ids = list(spool_ids)
        found: dict[str, MessageState] = {}
        with self._read() as conn:
            for start in range(0, len(ids), _PRUNE_BATCH):
                chunk = ids[start : start + _PRUNE_BATCH]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT spool_id, state FROM messages WHERE spool_id IN ({marks})",  # noqa: S608 - only ?s
                    chunk,
                ).fetchall()
                found.update((row[0], MessageState(row[1])) for row in rows)
        return found

    def prune_messages(self, before: datetime, *, keep: Collection[str] = ()) -> int:
        """Delete rows of messages final since before ``before``; returns how many.

        Kept whatever their age: unfinished messages, quarantined ones (their file stays
        for a human), messages with an unsent (or abandoned) reply or an unfinished
        claim, and the ids in ``keep`` (e.g. still in the spool's ``new/``).
        """
        final = tuple(s for s in FINAL_STATES if s != MessageState.QUARANTINED)
        states = ",".join("?" * len(final))
        old = f"state IN ({states}) AND updated_at < ?"
        with self._read() as conn:  # no write lock while looking
            rows = conn.execute(
                f"SELECT spool_id FROM messages WHERE {old}",  # noqa: S608 - only ?s
                (*final, _ts(before)),
            ).fetchall()
        ids = [row[0] for row in rows if row[0] not in keep]
        removed = 0
        for start in range(0, len(ids), _PRUNE_BATCH):
            chunk = ids[start : start + _PRUNE_BATCH]
            marks = ",".join("?" * len(chunk))
            with self._write() as conn:  # re-checked here; each subquery runs once
                removed += conn.execute(
                    f"DELETE FROM messages WHERE spool_id IN ({marks}) AND {old}"  # noqa: S608
                    " AND spool_id NOT IN (SELECT spool_id FROM outbound WHERE sent_at IS NULL)"
                    " AND spool_id NOT IN"
                    " (SELECT spool_id FROM requests WHERE finished_at IS NULL)",
                    (*chunk, *final, _ts(before)),
                ).rowcount
        return removed

    def prune_requests(self, before: datetime) -> int:
        """Delete finished replay records claimed and issued before ``before``.

        Unfinished claims are never deleted. The caller must choose ``before`` so that no
        request issued then could still be accepted (see mailsh.server.retention).
        """
        return self._delete_batches(
            "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests"
            " WHERE finished_at IS NOT NULL AND claimed_at < ? AND issued_at < ? LIMIT ?)",
            (_ts(before), _ts(before)),
        )

    def prune_outbound(self, before: datetime) -> int:
        """Delete replies sent before ``before``. Unsent and abandoned ones stay."""
        return self._delete_batches(
            "DELETE FROM outbound WHERE id IN (SELECT id FROM outbound"
            " WHERE sent_at IS NOT NULL AND sent_at < ? LIMIT ?)",
            (_ts(before),),
        )

    def _delete_batches(self, sql: str, params: tuple[str, ...]) -> int:
        removed = 0
        while True:
            with self._write() as conn:
                count = conn.execute(sql, (*params, _PRUNE_BATCH)).rowcount
            removed += count
            if count < _PRUNE_BATCH:
                return removed
