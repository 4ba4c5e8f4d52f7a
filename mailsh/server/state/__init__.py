"""The server's durable state: one SQLite file, ``state.db``, in the server home.

It holds what must survive a crash or a restart:

- ``messages``: every spooled message and the one state it is in (P9). A message moves
  ``received`` -> (``executing`` ->) exactly one final state and never leaves it.
- ``requests``: the replay record (P5). A request is claimed, durably, before its command
  starts; a claim never finished is reported "outcome unknown" after a crash, never re-run.
- ``outbound``: replies waiting to be sent, with retry bookkeeping. A reply is queued in
  the same transaction that gives its message a final state, so a reported state always
  has its report queued.
- ``audit``: reserved for an append-only log of events (UPDATE and DELETE are refused by
  triggers); nothing writes it yet.

:class:`StateDB` is the open file (:class:`Store`) and one small part per job:
``messages`` (:mod:`.messages`), ``requests`` (the replay record, :mod:`.requests`),
``outbox`` (:mod:`.outbox`), ``report`` (for ``mailsh status``, :mod:`.report`) and
``prune`` (retention, :mod:`.prune`).

Concurrency: several ``mailsh serve`` processes, each with ``--workers N`` threads, may
share the file. The database runs in WAL mode with ``synchronous=FULL`` (a commit is on
disk when it returns), every write is one ``BEGIN IMMEDIATE`` transaction (so two writers
never both read-then-write the same row), a busy timeout makes writers queue instead of
failing, and each thread gets its own connection. Do not share a :class:`StateDB` across
``fork()``; open a new one in the child.

Timestamps are stored as fixed-width UTC text (``2024-01-02T03:04:05.000006Z``), so text
order is time order. The schema version is ``PRAGMA user_version``; :data:`MIGRATIONS`
brings an older file up to :data:`SCHEMA_VERSION` in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from mailsh.resources import Closing
from mailsh.server.state.messages import Messages
from mailsh.server.state.model import (
    ClaimedRequest,
    MailToQueue,
    MessageRecord,
    MessageState,
    QueuedReply,
    StatusError,
    next_backoff,
    utcnow,
)
from mailsh.server.state.outbox import Outbox
from mailsh.server.state.prune import Prune
from mailsh.server.state.report import Report
from mailsh.server.state.requests import Requests
from mailsh.server.state.schema import MIGRATIONS, SCHEMA_VERSION
from mailsh.server.state.store import Store


class StateDB(Closing):
    """The state database, composed of its parts. Thread-safe; one per process is enough.

    ``clock`` returns the current aware time (injectable for tests).
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = Store(path, clock=clock)
        self.messages = Messages(self.store)
        self.requests = Requests(self.store)
        self.outbox = Outbox(self.store)
        self.report = Report(self.store, self.messages)
        self.prune = Prune(self.store)

    def close(self) -> None:
        """Close the file; the object is unusable afterwards."""
        self.store.close()


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ClaimedRequest",
    "MailToQueue",
    "MessageRecord",
    "MessageState",
    "QueuedReply",
    "StateDB",
    "StatusError",
    "Store",
    "next_backoff",
]
