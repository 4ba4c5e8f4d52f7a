"""Connections and transactions: one SQLite connection per thread, WAL, fsynced commits."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from mailsh.errors import StateError
from mailsh.server import claimant
from mailsh.server.state.model import (
    BUSY_TIMEOUT,
    MessageState,
    _check_transition,
    _ts,
    _utcnow,
)
from mailsh.server.state.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("mailsh.server.state")


class _Connection:
    """Connection handling shared by the parts of :class:`~mailsh.server.state.StateDB`."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.path = path
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self._owner = claimant.this_process()
        if not path.exists():
            # Private from the first byte; SQLite gives the -wal/-shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        with self._write() as conn:
            self._migrate(conn)

    def close(self) -> None:
        """Close every thread's connection; the object is unusable afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _conn_read_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        with self._read() as conn:
            return conn.execute(sql, params).fetchone()

    @staticmethod
    def _current_state(conn: sqlite3.Connection, spool_id: str) -> MessageState:
        row = conn.execute("SELECT state FROM messages WHERE spool_id = ?", (spool_id,)).fetchone()
        if row is None:
            raise StateError(f"message {spool_id} was never recorded")
        return MessageState(row[0])

    def _set_state(
        self,
        conn: sqlite3.Connection,
        spool_id: str,
        state: MessageState,
        reason: str | None,
        signer: str | None,
        request_id: str | None,
    ) -> None:
        """Move a message to ``state`` inside ``conn``'s transaction (transition checked)."""
        _check_transition(spool_id, self._current_state(conn, spool_id), state)
        conn.execute(
            "UPDATE messages SET state = ?, reason = coalesce(?, reason),"
            " signer = coalesce(?, signer), request_id = coalesce(?, request_id),"
            " updated_at = ? WHERE spool_id = ?",
            (state, reason, signer, request_id, _ts(self._clock()), spool_id),
        )
