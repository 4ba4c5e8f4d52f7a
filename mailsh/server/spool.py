"""mailsh's own durable spool: the one place where accepted mail waits to be processed.

Layout under ``root`` (mode 0700), like Maildir::

    tmp/         being written; never read; stale files may be removed
    new/         accepted, waiting to be processed (``pending()``)
    done/        processed (``finish()``)
    quarantine/  refused by the daemon, kept for a human, with a ``NAME.reason`` file
    refused.json mailboxes intake refuses, for ``mailsh status`` (``intake_files``)

Only regular files count: a symlink or FIFO in ``new/`` is ignored (warned), and
``read`` opens with ``O_NOFOLLOW | O_NONBLOCK`` (P13).

A file name is ``ID.SOURCE`` where ``ID`` is ``TIME_NS(20 digits).PID.RANDOM(16 hex)``:
sortable by arrival, unique across processes, and the name carries which intake
(``SOURCE``) delivered it, so no sidecar has to be kept consistent with it.

Crash safety (docs/security.md P9: duplicate at worst, never lose):

* ``put`` writes ``tmp/NAME``, fsyncs the file, renames it to ``new/NAME`` and fsyncs
  ``new/``. Only then does it return, and only then may a caller answer SMTP 250 or
  remove the message from its mailbox. A crash before the directory fsync leaves at
  worst a file in ``tmp/`` (never reported as accepted, so the sender still has it).
* ``finish`` and ``quarantine`` are single renames out of ``new/`` followed by a fsync
  of both directories. A crash before that leaves the message in ``new/``: it is
  processed again, and the replay record (P5) stops it from running twice.
* ``rename(2)`` is atomic, so a message is in exactly one directory at any moment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailsh.errors import StateError
from mailsh.fsio import fsync_dir
from mailsh.text import escape

log = logging.getLogger(__name__)

_SUBDIRS = ("tmp", "new", "done", "quarantine")
_SOURCE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_NAME_RE = re.compile(r"(?P<id>\d{20}\.\d+\.[0-9a-f]{16})\.(?P<source>[a-z0-9][a-z0-9_-]{0,31})")
_MAX_REASON_CHARS = 2000
#: Files in ``tmp/`` older than this are leftovers of a crashed ``put`` (seconds).
TMP_MAX_AGE = 36 * 3600.0


class SpoolError(StateError):
    """The spool could not store, move or read a message."""


class MessageTooLarge(SpoolError):  # noqa: N818 - reads better than MessageTooLargeError
    """``Spool.read`` refused a message bigger than its ``max_bytes``."""

    def __init__(self, msg: SpooledMessage, max_bytes: int) -> None:
        super().__init__(f"spooled message {msg.id} has {msg.size} bytes, limit {max_bytes}")
        self.spooled = msg
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class SpooledMessage:
    """One message in ``new/`` (or, after ``finish``/``quarantine``, where it was)."""

    id: str
    path: Path
    source: str
    size: int

    @property
    def name(self) -> str:
        """File name in every spool directory: ``ID.SOURCE``."""
        return self.path.name


def _new_id() -> str:
    return f"{time.time_ns():020d}.{os.getpid()}.{secrets.token_hex(8)}"


class Spool:
    """A durable, crash-safe message spool rooted at ``root`` (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if stat.S_IMODE(self.root.stat().st_mode) != 0o700:
                log.warning("spool %s was not mode 0700; fixing", self.root)
                self.root.chmod(0o700)
            for sub in _SUBDIRS:
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
                if not stat.S_ISDIR((self.root / sub).lstat().st_mode):
                    raise SpoolError(
                        f"spool directory {self.root / sub} is a symbolic link",
                        hint=f"replace {self.root / sub} by a directory (mode 0700)",
                    )
            fsync_dir(self.root)
        except OSError as exc:
            raise SpoolError(
                f"cannot create spool {self.root}: {exc.strerror}",
                hint="check that the mailsh home directory is writable by this user",
            ) from exc
        self.tmp = self.root / "tmp"
        self.new = self.root / "new"
        self.done = self.root / "done"
        self.quarantine_dir = self.root / "quarantine"

    # -- accepting -------------------------------------------------------------------

    def put(self, data: bytes, *, source: str) -> SpooledMessage:
        """Store ``data`` durably; when this returns the message survives a crash."""
        return self.put_stream((data,), source=source)

    def put_stream(self, chunks: Iterable[bytes], *, source: str) -> SpooledMessage:
        """Like ``put`` for a message given as chunks, so it never has to fit in memory.

        If ``chunks`` raises, nothing is stored and the exception propagates.
        """
        if not _SOURCE_RE.fullmatch(source):
            raise ValueError(f"bad spool source name {source!r}")
        name = f"{_new_id()}.{source}"
        tmp_path = self.tmp / name
        new_path = self.new / name
        size = 0
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot create {tmp_path}: {exc.strerror}") from exc
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                        size += written
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, new_path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            if isinstance(exc, OSError):
                raise SpoolError(f"cannot store message in {self.root}: {exc}") from exc
            raise
        try:
            fsync_dir(self.new)
        except OSError as exc:
            # The rename happened but is not known durable: report failure so the caller
            # keeps its copy. At worst the message is then spooled twice.
            raise SpoolError(f"cannot fsync {self.new}: {exc.strerror}") from exc
        log.debug("spooled %s (%d bytes)", name, size)
        return SpooledMessage(id=name.rsplit(".", 1)[0], path=new_path, source=source, size=size)

    # -- consuming -------------------------------------------------------------------

    def _scan(self, directory: Path) -> Iterator[SpooledMessage]:
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise SpoolError(f"cannot list {directory}: {exc.strerror}") from exc
        for entry in entries:
            match = _NAME_RE.fullmatch(entry.name)
            if match is None:
                if directory == self.new:
                    log.warning("ignoring unexpected file %s in spool", entry.path)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # finished by a concurrent consumer
            if not stat.S_ISREG(st.st_mode):  # a FIFO here would block whoever opens it
                log.warning("ignoring %s in spool: not a regular file", entry.path)
                continue
            size = st.st_size
            yield SpooledMessage(
                id=match["id"], path=Path(entry.path), source=match["source"], size=size
            )

    def pending(self) -> list[SpooledMessage]:
        """Messages in ``new/``, oldest first."""
        return sorted(self._scan(self.new), key=lambda m: m.id)

    def read(self, msg: SpooledMessage, max_bytes: int) -> bytes:
        """The message's bytes; raises ``MessageTooLarge`` beyond ``max_bytes`` (P10)."""
        try:
            fd = os.open(msg.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolError(f"cannot read {msg.path}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SpoolError(f"cannot read {msg.path}: not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise SpoolError(f"cannot read {msg.path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise MessageTooLarge(msg, max_bytes)
        return data

    def _move_out(self, msg: SpooledMessage, target_dir: Path) -> Path:
        src = self.new / msg.name
        dst = target_dir / msg.name
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            if dst.exists():
                log.info("spool message %s already in %s/", msg.id, target_dir.name)
                return dst
            raise SpoolError(f"spool message {msg.id} vanished from {self.new}") from None
        except OSError as exc:
            raise SpoolError(f"cannot move {src} to {target_dir}: {exc.strerror}") from exc
        try:
            fsync_dir(target_dir)
            fsync_dir(self.new)
        except OSError as exc:
            raise SpoolError(f"cannot fsync spool directories: {exc.strerror}") from exc
        return dst

    def finish(self, msg: SpooledMessage) -> Path:
        """Move a processed message to ``done/`` durably; returns its new path."""
        return self._move_out(msg, self.done)

    def quarantine(self, msg: SpooledMessage, reason: str) -> Path:
        """Move a refused message to ``quarantine/`` with a ``NAME.reason`` file beside it.

        The reason is written (and fsynced) first, so a quarantined message always has
        one. ``reason`` is escaped to one printable line (``mailsh.text.escape``): it may
        quote input.
        """
        clean = escape(reason)[:_MAX_REASON_CHARS]
        reason_path = self.quarantine_dir / f"{msg.name}.reason"
        try:
            fd = os.open(reason_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, clean.encode("utf-8", "replace") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SpoolError(f"cannot write {reason_path}: {exc.strerror}") from exc
        log.warning("quarantined spool message %s: %s", msg.id, clean)
        return self._move_out(msg, self.quarantine_dir)

    def clean_tmp(self, max_age: float = TMP_MAX_AGE) -> int:
        """Remove leftovers of crashed ``put`` calls older than ``max_age`` seconds.

        Safe: nothing in ``tmp/`` was ever reported as accepted. Young files are kept
        because another process may be writing them right now.
        """
        removed = 0
        cutoff = time.time() - max_age
        for entry in os.scandir(self.tmp):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- retention (mailsh.server.retention decides what goes and when) ---------------

    def done_messages(self) -> list[SpooledMessage]:
        """Processed messages in ``done/``, oldest first (files with other names are left)."""
        return sorted(self._scan(self.done), key=lambda m: m.id)

    def remove_done(self, msg: SpooledMessage) -> bool:
        """Delete a processed message from ``done/``; False if it was already gone."""
        try:
            os.unlink(self.done / msg.name)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SpoolError(f"cannot remove {self.done / msg.name}: {exc.strerror}") from exc
        return True
