"""The state file: one SQLite connection per thread, WAL, fsynced write transactions."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from mailsh.errors import StateError
from mailsh.resources import Closing
from mailsh.server import claimant
from mailsh.server.state.model import BUSY_TIMEOUT, timestamp, utcnow
from mailsh.server.state.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("mailsh.server.state")


class Store(Closing):
    """The open state file that the parts of :class:`~mailsh.server.state.StateDB` share.

    Thread-safe: each thread gets its own connection. ``clock`` returns the current
    aware time (injectable for tests); ``owner`` names this process in the claims it
    takes (:mod:`mailsh.server.claimant`).
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.path = path
        self.clock = clock
        self.owner = claimant.this_process()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        if not path.exists():
            # Private from the first byte; SQLite gives the -wal/-shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self.write() as conn:
            self._migrate(conn)

    def now(self) -> str:
        """The clock's current time, as stored."""
        return timestamp(self.clock())

    def close(self) -> None:
        """Close every thread's connection; the store is unusable afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction: BEGIN IMMEDIATE ... COMMIT (fsynced) or ROLLBACK."""
        hint = "check disk space and permissions; `mailsh status` shows the state"
        with self._errors(hint) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read snapshot (several SELECTs see one consistent state)."""
        with self._errors(None) as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def read_one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first row of one SELECT (None if there is none)."""
        with self.read() as conn:
            return conn.execute(sql, params).fetchone()

    @contextlib.contextmanager
    def _errors(self, hint: str | None) -> Iterator[sqlite3.Connection]:
        """This thread's connection; a database error inside becomes a StateError."""
        conn = self._conn()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StateError(f"state database {self.path}: {exc}", hint=hint) from exc

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StateError(f"state database {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._connect()
        with self._lock:
            if self._closed:  # closed while we connected
                conn.close()
                raise StateError(f"state database {self.path} is closed")
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = None
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            if conn is not None:
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
        return conn

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
