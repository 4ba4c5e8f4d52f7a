"""Deleting old rows (:mod:`mailsh.server.retention` decides the cut-offs).

Plain DELETEs in short batches, each its own transaction, so intake and workers never
wait long for the write lock. The audit table is append-only and never pruned.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from mailsh.server.state.messages import ID_BATCH
from mailsh.server.state.model import FINAL_STATES, MessageState, timestamp
from mailsh.server.state.store import Store


class Prune:
    """What a retention sweep may delete, and only that."""

    def __init__(self, store: Store, *, batch: int = ID_BATCH) -> None:
        self.store = store
        self.batch = batch  # rows deleted per transaction

    def messages(self, before: datetime, *, keep: Collection[str] = ()) -> int:
        """Delete rows of messages final since before ``before``; returns how many.

        Kept whatever their age: unfinished messages, quarantined ones (their file stays
        for a human), messages with an unsent (or abandoned) reply or an unfinished
        claim, and the ids in ``keep`` (e.g. still in the spool's ``new/``).
        """
        final = tuple(s for s in FINAL_STATES if s != MessageState.QUARANTINED)
        states = ",".join("?" * len(final))
        old = f"state IN ({states}) AND updated_at < ?"
        with self.store.read() as conn:  # no write lock while looking
            rows = conn.execute(
                f"SELECT spool_id FROM messages WHERE {old}",  # noqa: S608 - only ?s
                (*final, timestamp(before)),
            ).fetchall()
        ids = [row[0] for row in rows if row[0] not in keep]
        removed = 0
        for start in range(0, len(ids), self.batch):
            chunk = ids[start : start + self.batch]
            marks = ",".join("?" * len(chunk))
            with self.store.write() as conn:  # re-checked here; each subquery runs once
                removed += conn.execute(
                    f"DELETE FROM messages WHERE spool_id IN ({marks}) AND {old}"  # noqa: S608
                    " AND spool_id NOT IN (SELECT spool_id FROM outbound WHERE sent_at IS NULL)"
                    " AND spool_id NOT IN"
                    " (SELECT spool_id FROM requests WHERE finished_at IS NULL)",
                    (*chunk, *final, timestamp(before)),
                ).rowcount
        return removed

    def requests(self, before: datetime) -> int:
        """Delete finished replay records claimed and issued before ``before``.

        Unfinished claims are never deleted. The caller must choose ``before`` so that no
        request issued then could still be accepted (see mailsh.server.retention).
        """
        return self._batches(
            "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests"
            " WHERE finished_at IS NOT NULL AND claimed_at < ? AND issued_at < ? LIMIT ?)",
            (timestamp(before), timestamp(before)),
        )

    def outbox(self, before: datetime) -> int:
        """Delete replies sent before ``before``. Unsent and abandoned ones stay."""
        return self._batches(
            "DELETE FROM outbound WHERE id IN (SELECT id FROM outbound"
            " WHERE sent_at IS NOT NULL AND sent_at < ? LIMIT ?)",
            (timestamp(before),),
        )

    def _batches(self, sql: str, params: tuple[str, ...]) -> int:
        removed = 0
        while True:
            with self.store.write() as conn:
                count = conn.execute(sql, (*params, self.batch)).rowcount
            removed += count
            if count < self.batch:
                return removed
