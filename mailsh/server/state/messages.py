"""Spooled messages and the one state each is in (P9), and the poison counter (P11)."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection

from mailsh.errors import StateError
from mailsh.server.state.model import (
    FINAL_STATES,
    MessageRecord,
    MessageState,
    check_transition,
    from_row,
)
from mailsh.server.state.store import Store

#: Ids per ``IN (...)`` list, and rows deleted per pruning transaction (short write locks).
ID_BATCH = 500


def current_state(conn: sqlite3.Connection, spool_id: str) -> MessageState:
    """The message's state inside ``conn``'s transaction (it must be recorded)."""
    row = conn.execute("SELECT state FROM messages WHERE spool_id = ?", (spool_id,)).fetchone()
    if row is None:
        raise StateError(f"message {spool_id} was never recorded")
    return MessageState(row[0])


def move_message(
    conn: sqlite3.Connection,
    now: str,
    spool_id: str,
    state: MessageState,
    reason: str | None,
    signer: str | None,
    request_id: str | None,
) -> None:
    """Move a message to ``state`` inside ``conn``'s transaction (transition checked);
    ``reason``, ``signer`` and ``request_id`` are noted unless None."""
    check_transition(spool_id, current_state(conn, spool_id), state)
    conn.execute(
        "UPDATE messages SET state = ?, reason = coalesce(?, reason),"
        " signer = coalesce(?, signer), request_id = coalesce(?, request_id),"
        " updated_at = ? WHERE spool_id = ?",
        (state, reason, signer, request_id, now, spool_id),
    )


class Messages:
    """The ``messages`` table: every spooled message, ``received`` -> exactly one final state."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, spool_id: str, source: str, size: int, sha256: str) -> None:
        """Note a spooled message as ``received``, or fill in its size and hash if
        :meth:`begin_processing` created the row first. Recording again changes nothing."""
        now = self.store.now()
        with self.store.write() as conn:
            conn.execute(
                "INSERT INTO messages (spool_id, source, size, sha256, state, received_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (spool_id) DO UPDATE"
                " SET size = excluded.size, sha256 = excluded.sha256 WHERE sha256 IS NULL",
                (spool_id, source, size, sha256, MessageState.RECEIVED, now, now),
            )

    def set_state(
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
        with self.store.write() as conn:
            if current_state(conn, spool_id) == state and state in FINAL_STATES:
                return
            move_message(conn, self.store.now(), spool_id, state, reason, signer, request_id)

    def state(self, spool_id: str) -> MessageState | None:
        """The message's state, or None if it was never recorded."""
        row = self.store.read_one("SELECT state FROM messages WHERE spool_id = ?", (spool_id,))
        return None if row is None else MessageState(row[0])

    def get(self, spool_id: str) -> MessageRecord | None:
        """The message's row, or None if it was never recorded."""
        row = self.store.read_one(
            "SELECT spool_id, source, size, sha256, state, reason, signer, request_id,"
            " attempts, received_at, updated_at FROM messages WHERE spool_id = ?",
            (spool_id,),
        )
        return None if row is None else from_row(MessageRecord, row)

    def states(self, spool_ids: Collection[str]) -> dict[str, MessageState]:
        """The state of each recorded message among ``spool_ids`` (unrecorded are absent)."""
        ids = list(spool_ids)
        found: dict[str, MessageState] = {}
        with self.store.read() as conn:
            for start in range(0, len(ids), ID_BATCH):
                chunk = ids[start : start + ID_BATCH]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT spool_id, state FROM messages WHERE spool_id IN ({marks})",  # noqa: S608 - only ?s
                    chunk,
                ).fetchall()
                found.update((row[0], MessageState(row[1])) for row in rows)
        return found

    def begin_processing(
        self, spool_id: str, *, source: str | None = None, size: int | None = None
    ) -> int:
        """Durably count one more processing attempt and return the count (1 the first time).

        Call before touching a message's bytes. If the processor crashes, the next start
        sees a higher count; a caller quarantines a message at 3 (it crashed us twice,
        P11). With ``source`` and ``size`` an unrecorded message is recorded first (hash
        unknown until :meth:`record`); without them it must already be recorded.
        """
        now = self.store.now()
        with self.store.write() as conn:
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
