"""What ``mailsh status`` reads from the state file: counts, problems, recent decisions."""

from __future__ import annotations

from mailsh.server.state.messages import Messages
from mailsh.server.state.model import (
    MessageRecord,
    MessageState,
    ReasonCount,
    StatusError,
    parse_timestamp,
)
from mailsh.server.state.store import Store

#: Final states that need a look: what ``mailsh status`` lists as problems.
PROBLEM_STATES = (
    MessageState.REJECTED,
    MessageState.DISCARDED,
    MessageState.QUARANTINED,
    MessageState.DUPLICATE,
    MessageState.UNREPORTED,
)


class Report:
    """Read-only summaries of the whole file (each one read snapshot)."""

    def __init__(self, store: Store, messages: Messages) -> None:
        self.store = store
        self.messages = messages

    def counts(self) -> dict[str, int]:
        """Messages per state (every state, zeros included), plus ``outbound_pending``,
        ``outbound_failing`` (pending after at least one failure), ``outbound_abandoned``
        (given up) and ``requests_unfinished``."""
        result = {state.value: 0 for state in MessageState}
        with self.store.read() as conn:
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
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT last_error_at, 'outbound', 'reply ' || id, last_error FROM outbound"
                " WHERE last_error IS NOT NULL"
                " UNION ALL SELECT updated_at, state, spool_id, coalesce(reason, state)"
                " FROM messages WHERE state IN (?, ?, ?, ?, ?)"
                " ORDER BY 1 DESC LIMIT ?",
                (*PROBLEM_STATES, limit),
            ).fetchall()
        return [StatusError(parse_timestamp(r[0]), r[1], r[2], r[3]) for r in rows]

    def problem_counts(self, limit: int = 20) -> list[ReasonCount]:
        """Messages in a problem state (see :meth:`last_errors`) counted per state and
        reason, the most recently seen first (at most ``limit`` rows)."""
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT state, coalesce(reason, state), count(*), max(updated_at)"
                " FROM messages WHERE state IN (?, ?, ?, ?, ?) GROUP BY 1, 2"
                " ORDER BY 4 DESC LIMIT ?",
                (*PROBLEM_STATES, limit),
            ).fetchall()
        return [ReasonCount(MessageState(r[0]), r[1], r[2], parse_timestamp(r[3])) for r in rows]

    def recent_decisions(self, limit: int = 10) -> list[MessageRecord]:
        """The messages that most recently reached a final state, newest first."""
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT spool_id FROM messages WHERE state NOT IN (?, ?)"
                " ORDER BY updated_at DESC, spool_id DESC LIMIT ?",
                (MessageState.RECEIVED, MessageState.EXECUTING, limit),
            ).fetchall()
        return [m for m in (self.messages.get(r[0]) for r in rows) if m is not None]
