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

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from mailsh.errors import StateError

__all__ = [
    "FINAL_STATES",
    "SCHEMA_VERSION",
    "STATE_FILE",
    "AuditEntry",
    "ClaimedRequest",
    "MessageRecord",
    "MessageState",
    "Outbound",
    "StateDB",
    "StatusError",
    "next_backoff",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.db"
SCHEMA_VERSION = 1
#: Seconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT = 30.0
#: Retry delays for outbound mail: BACKOFF_BASE * 2**(attempts-1), at most BACKOFF_CAP.
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_CAP = timedelta(hours=1)
_MAX_ERROR_CHARS = 2000
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class MessageState(StrEnum):
    """Where a spooled message is. Every state but the first two is final (P9)."""

    RECEIVED = "received"
    EXECUTING = "executing"
    REPLIED = "replied"  # executed and reported
    REJECTED = "rejected"  # rejected and reported to the signer
    OUTCOME_UNKNOWN = "outcome_unknown"  # interrupted by a crash, reported, never re-run
    DISCARDED = "discarded"  # unauthenticated: discarded and logged, no reply (P7)
    QUARANTINED = "quarantined"  # unparseable or crashed the processor repeatedly (P11)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        MessageState.REPLIED,
        MessageState.REJECTED,
        MessageState.OUTCOME_UNKNOWN,
        MessageState.DISCARDED,
        MessageState.QUARANTINED,
    }
)
#: Final states that come with a reply to the signer (see :meth:`StateDB.finish_with_reply`).
REPORTED_STATES = frozenset(
    {MessageState.REPLIED, MessageState.REJECTED, MessageState.OUTCOME_UNKNOWN}
)


def next_backoff(attempts: int) -> timedelta:
    """Delay before retrying a reply that failed ``attempts`` times: 1, 2, 4 ... 60 min."""
    exponent = min(max(attempts, 1) - 1, 16)  # 2**16 minutes is far past the cap
    delay: timedelta = BACKOFF_BASE * (1 << exponent)
    return min(delay, BACKOFF_CAP)


@dataclass(frozen=True)
class MessageRecord:
    spool_id: str
    source: str
    size: int
    sha256: str | None  # None until record_message (begin_processing may come first)
    state: MessageState
    reason: str | None
    signer: str | None
    request_id: str | None
    attempts: int
    received_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ClaimedRequest:
    """A replay-record row. ``claimed_by`` is ``host:pid`` of the claiming process."""

    signer: str
    request_id: str
    signature_id: str | None
    issued_at: datetime
    request_sha256: str
    spool_id: str
    claimed_at: datetime
    claimed_by: str


@dataclass(frozen=True)
class Outbound:
    """A queued reply (``message`` is the complete, already signed and encrypted mail)."""

    id: int
    to_addr: str
    from_addr: str
    message: bytes
    spool_id: str
    request_id: str | None
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    event: str
    fields: dict[str, str | int | None]


@dataclass(frozen=True)
class StatusError:
    """A recent problem for ``mailsh status``: ``kind`` is outbound/rejected/quarantined."""

    at: datetime
    kind: str
    ref: str
    error: str


# Version N-1 -> N. Statements run one by one inside the migration transaction
# (executescript would commit first). Never edit a released entry; append a new one.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE messages (
            spool_id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT,
            state TEXT NOT NULL,
            reason TEXT,
            signer TEXT,
            request_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            received_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX messages_by_state ON messages (state, updated_at)",
        """CREATE TABLE requests (
            signer TEXT NOT NULL,
            request_id TEXT NOT NULL,
            signature_id TEXT UNIQUE,
            issued_at TEXT NOT NULL,
            request_sha256 TEXT NOT NULL,
            spool_id TEXT NOT NULL,
            claimed_at TEXT NOT NULL,
            claimed_by TEXT NOT NULL,
            finished_at TEXT,
            status TEXT,
            PRIMARY KEY (signer, request_id)
        ) STRICT""",
        "CREATE INDEX requests_unfinished ON requests (claimed_at) WHERE finished_at IS NULL",
        """CREATE TABLE outbound (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            to_addr TEXT NOT NULL,
            from_addr TEXT NOT NULL,
            message BLOB NOT NULL,
            spool_id TEXT NOT NULL,
            request_id TEXT,
            created_at TEXT NOT NULL,
            next_attempt_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            last_error_at TEXT,
            sent_at TEXT,
            abandoned_at TEXT
        ) STRICT""",
        "CREATE INDEX outbound_due ON outbound (next_attempt_at, id)"
        " WHERE sent_at IS NULL AND abandoned_at IS NULL",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            event TEXT NOT NULL,
            fields TEXT NOT NULL
        ) STRICT""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
    ),
}


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


def _ts(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: state timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime(_TS_FORMAT)


def _dt(text: str) -> datetime:
    return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class StateDB:
    """The state database. Thread-safe; one instance per process is enough.

    ``clock`` returns the current aware time (injectable for tests).
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.path = path
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        if not path.exists():
            # Private from the first byte; SQLite gives the -wal/-shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self._write() as conn:
            self._migrate(conn)

    @classmethod
    def open(cls, home: Path, *, clock: Callable[[], datetime] = _utcnow) -> StateDB:
        """Open (creating if needed) ``state.db`` in the server home directory."""
        return cls(home / STATE_FILE, clock=clock)

    def close(self) -> None:
        """Close every thread's connection; the object is unusable afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StateError(f"state database {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StateError(
                f"cannot open state database {self.path}: {exc}",
                hint=f"check that {self.path.parent} is a writable local directory",
            ) from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise StateError(
                f"cannot open state database {self.path}: {exc}",
                hint=f"check that {self.path.parent} is a writable local directory",
            ) from exc
        if mode != "wal":
            conn.close()
            raise StateError(
                f"state database {self.path} cannot use WAL mode (got {mode!r})",
                hint="keep the mailsh home on a local file system (not NFS)",
            )
        with self._lock:
            if self._closed:  # closed while we connected
                conn.close()
                raise StateError(f"state database {self.path} is closed")
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction: BEGIN IMMEDIATE ... COMMIT (fsynced) or ROLLBACK."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateError(
                f"state database {self.path}: {exc}",
                hint="check disk space and permissions; `mailsh status` shows the state",
            ) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read snapshot (several SELECTs see one consistent state)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateError(f"state database {self.path}: {exc}") from exc

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema version {version}, newer than "
                f"this mailsh understands ({SCHEMA_VERSION})",
                hint="upgrade mailsh on this server (pip install -U mailsh)",
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target:d}")
            log.info("state database %s migrated to schema version %d", self.path, target)

    # -- messages -----------------------------------------------------------------

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
            _check_transition(spool_id, current, state)
            conn.execute(
                "UPDATE messages SET state = ?, reason = coalesce(?, reason),"
                " signer = coalesce(?, signer), request_id = coalesce(?, request_id),"
                " updated_at = ? WHERE spool_id = ?",
                (state, reason, signer, request_id, _ts(self._clock()), spool_id),
            )

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

    # -- replay record ------------------------------------------------------------

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
        filter on ``claimed_by`` (``host:pid``) and only recover those of dead processes.
        """
        with self._read() as conn:
            rows = conn.execute(
                "SELECT signer, request_id, signature_id, issued_at, request_sha256, spool_id,"
                " claimed_at, claimed_by FROM requests WHERE finished_at IS NULL"
                " ORDER BY claimed_at, signer, request_id"
            ).fetchall()
        return [
            ClaimedRequest(r[0], r[1], r[2], _dt(r[3]), r[4], r[5], _dt(r[6]), r[7]) for r in rows
        ]

    # -- outbound queue -------------------------------------------------------------

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
            _check_transition(spool_id, self._current_state(conn, spool_id), state)
            (request_id,) = conn.execute(
                "UPDATE messages SET state = ?, reason = coalesce(?, reason),"
                " signer = coalesce(?, signer), request_id = coalesce(?, request_id),"
                " updated_at = ? WHERE spool_id = ? RETURNING request_id",
                (state, reason, signer, request_id, now, spool_id),
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

    # -- audit and status -------------------------------------------------------------

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
        """Newest problems first: failed sends, rejected and quarantined messages."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT last_error_at, 'outbound', 'outbound ' || id, last_error FROM outbound"
                " WHERE last_error IS NOT NULL"
                " UNION ALL SELECT updated_at, state, spool_id, coalesce(reason, state)"
                " FROM messages WHERE state IN (?, ?)"
                " ORDER BY 1 DESC LIMIT ?",
                (MessageState.REJECTED, MessageState.QUARANTINED, limit),
            ).fetchall()
        return [StatusError(_dt(r[0]), r[1], r[2], r[3]) for r in rows]

    def status_report(self, errors: int = 5) -> dict[str, int | list[str]]:
        """:meth:`counts` plus ``last_errors`` as one-line strings, for ``mailsh status``."""
        report: dict[str, int | list[str]] = dict(self.counts())
        report["last_errors"] = [
            f"{e.at.isoformat(timespec='seconds')} {e.kind} {e.ref}: {e.error}"
            for e in self.last_errors(errors)
        ]
        return report

    # -- helpers ------------------------------------------------------------------------

    def _conn_read_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        with self._read() as conn:
            return conn.execute(sql, params).fetchone()

    @staticmethod
    def _current_state(conn: sqlite3.Connection, spool_id: str) -> MessageState:
        row = conn.execute("SELECT state FROM messages WHERE spool_id = ?", (spool_id,)).fetchone()
        if row is None:
            raise StateError(f"message {spool_id} was never recorded")
        return MessageState(row[0])

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


def _check_transition(spool_id: str, current: MessageState, new: MessageState) -> None:
    """received -> executing -> final, or received -> final; nothing leaves a final state."""
    if current in FINAL_STATES:
        raise StateError(f"message {spool_id} is already {current}; it cannot become {new}")
    if new == MessageState.RECEIVED and current != MessageState.RECEIVED:
        raise StateError(f"message {spool_id} is {current}; it cannot go back to received")
