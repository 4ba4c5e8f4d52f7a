"""The server's durable state: one SQLite file, ``state.db``, in the server home.

It holds what must survive a crash or a restart:

- ``messages``: every spooled message and the one state it is in (P9). A message moves
  ``received`` -> (``executing`` ->) exactly one final state and never leaves it.
- ``requests``: the replay record (P5). A request is claimed, durably, before its command
  starts; a claim never finished is reported "outcome unknown" after a crash, never re-run.
- ``outbound``: replies waiting to be sent, with retry bookkeeping. A reply is queued in
  the same transaction that gives its message a final state, so a reported state always
  has its report queued.
- ``audit``: an append-only log of events (UPDATE and DELETE are refused by triggers).

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

from mailsh.server.state.db import StateDB
from mailsh.server.state.model import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    BUSY_TIMEOUT,
    FINAL_STATES,
    REPORTED_STATES,
    STATE_FILE,
    AuditEntry,
    ClaimedRequest,
    MailToQueue,
    MessageRecord,
    MessageState,
    Outbound,
    StatusError,
    next_backoff,
)
from mailsh.server.state.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "BUSY_TIMEOUT",
    "FINAL_STATES",
    "MIGRATIONS",
    "REPORTED_STATES",
    "SCHEMA_VERSION",
    "STATE_FILE",
    "AuditEntry",
    "ClaimedRequest",
    "MailToQueue",
    "MessageRecord",
    "MessageState",
    "Outbound",
    "StateDB",
    "StatusError",
    "next_backoff",
]
