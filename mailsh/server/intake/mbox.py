"""Server intake from an mbox that Postfix local(8) appends to: spool, then empty it.

The format, the message splitting and the fcntl lock helper are in
:mod:`mailsh.mail.mbox`, which the client's read-only ``scan_mbox`` shares.

Server intake, ``MboxIntake.collect`` (docs/security.md P9, P13):

1. Take the dotlock ``PATH.lock`` (O_CREAT|O_EXCL, retried; stale after 500 s like
   Postfix, or at once if it names a dead mailsh process on this host). If the directory
   is not writable, warn and rely on fcntl alone.
2. ``fcntl.lockf`` LOCK_EX on the one descriptor we open (never flock; never open and
   close the file again while locked, since that would drop the lock).
3. Copy every message into the spool with ``Spool.put_stream``, which is durable when it
   returns. If the file grew meanwhile (a writer that ignores locks), copy that too.
4. ``ftruncate(0)`` and fsync the mbox (same inode, owner and mode), then unlock.

A crash or error anywhere before step 4 leaves the mbox intact, so messages already
spooled are spooled again next time: duplicated, never lost (the replay record, P5,
drops the duplicate). Postfix cannot append while we hold the locks, so nothing it
writes can fall between the copy and the truncate. Locks are held only while copying;
Postfix defers a delivery after ~18 s of waiting and retries later, so a long hold
delays mail but loses none. The mbox is emptied each time, so each collect costs what
the new mail costs.

Every name the intake opens in the mailbox's directory (the mbox, ``PATH.lock``) is
opened relative to a descriptor of that directory, without following a symlink and
without blocking; an mbox or dotlock that is a symlink, a FIFO or any other non-regular
file, or an mbox with a second hard link, is refused and left untouched (P13, see
``intake_files``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import stat
import time
from pathlib import Path

from mailsh.errors import TransportError
from mailsh.mail.mbox import Span, lockf, read_span, spans
from mailsh.server.claimant import pid_exists
from mailsh.server.intake.files import (
    MailboxRefusedError,
    RefusalRecord,
    kind,
    open_below,
)
from mailsh.server.spool import Spool, SpooledMessage

log = logging.getLogger(__name__)

#: A dotlock older than this is stale (Postfix's ``stale_lock_time`` default), seconds.
#: Not a setting: it must agree with the MTA writing the mbox, whose default it is.
STALE_LOCK_SECONDS = 500.0
#: Tries to take the dotlock and the ``fcntl`` lock, ``LOCK_INTERVAL`` seconds apart,
#: before a collect gives up for now (the next wake-up tries again). Internal, not a
#: setting: a busy lock only delays intake, it loses nothing.
LOCK_ATTEMPTS = 20
LOCK_INTERVAL = 0.5
_LOCK_TAG_RE = re.compile(rb"mailsh (\d+) (\S+)\n")
_LOCK_TAG_MAX = 256  # bytes of a dotlock read for the tag; a longer one is not mailsh's


def _names_dead_mailsh(content: bytes) -> bool:
    """True if a dotlock's content names a mailsh process on this host that is gone."""
    match = _LOCK_TAG_RE.fullmatch(content)
    if match is None or match[2].decode(errors="replace") != socket.gethostname():
        return False
    pid = int(match[1])
    if pid == os.getpid():
        return False
    return not pid_exists(pid)


def _check_mbox(st: os.stat_result, path: Path) -> None:
    """Refuse an mbox that is not one regular file with one name (P13)."""
    if not stat.S_ISREG(st.st_mode):
        raise MailboxRefusedError(
            f"{path} is {kind(st.st_mode)}, not a regular file; it is not touched",
            hint=f"replace {path} by a regular file (nothing follows links there)",
        )
    if st.st_nlink != 1:
        raise MailboxRefusedError(
            f"{path} has {st.st_nlink} hard links; it is not touched",
            hint=f"a mailbox must have one name: remove the other links to {path}",
        )


def _dotlock_state(dir_fd: int, name: str, shown: Path) -> str:
    """``gone``; ``stale`` if older than ``STALE_LOCK_SECONDS`` or naming a dead mailsh
    process on this host (so a crashed collect does not block mail for 500 s); else
    ``held``. Opened without following a link or blocking (a FIFO planted there must
    not hang serve); anything but a regular file is refused (P13)."""
    try:
        fd = open_below(dir_fd, name, shown, flags=os.O_RDONLY, want=stat.S_IFREG)
    except MailboxRefusedError:
        raise
    except TransportError:
        return "held"
    if fd is None:
        return "gone"
    try:
        age = time.time() - os.fstat(fd).st_mtime
        content = os.read(fd, _LOCK_TAG_MAX)
    except OSError:
        return "held"
    finally:
        os.close(fd)
    return "stale" if age > STALE_LOCK_SECONDS or _names_dead_mailsh(content) else "held"


class MboxIntake:
    """Moves mail from an mbox that Postfix appends to into the spool (module docstring)."""

    source = "mbox"

    def __init__(
        self,
        path: Path,
        spool: Spool,
        *,
        lock_attempts: int = LOCK_ATTEMPTS,
        lock_interval: float = LOCK_INTERVAL,
        max_message_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.spool = spool
        self.lock_attempts = lock_attempts
        self.lock_interval = lock_interval
        self.max_message_bytes = max_message_bytes
        self.refusals = RefusalRecord(spool.root, self.path)

    def collect(self) -> list[SpooledMessage]:
        """Spool every message in the mbox, then empty it. Returns what was spooled.

        Raises ``TransportError`` if a lock stays busy or the mbox cannot be read or
        emptied; the mbox is then left as it was (already spooled messages will be
        spooled again next time). A mailbox refused for what it is (a symlink, a FIFO,
        a second hard link; the same for ``PATH.lock``) is logged, recorded for
        ``mailsh status`` and left untouched (``intake_files``); that returns ``[]``.
        """
        return self.refusals.collect(lambda fds: self._collect_in(fds[0]))

    def _collect_in(self, dir_fd: int) -> list[SpooledMessage]:
        try:
            st = os.stat(self.path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TransportError(f"cannot stat {self.path}: {exc.strerror}") from exc
        _check_mbox(st, self.path)
        if st.st_size == 0:
            # Nothing to do; and not opening it for writing means our own truncate
            # does not wake a watcher in a loop (close_write).
            return []
        have_dotlock = self._take_dotlock(dir_fd)
        try:
            return self._collect_locked(dir_fd)
        finally:
            if have_dotlock:
                try:
                    os.unlink(self.lock_path.name, dir_fd=dir_fd)
                except OSError as exc:
                    log.warning("cannot remove dotlock %s: %s", self.lock_path, exc.strerror)

    def _take_dotlock(self, dir_fd: int) -> bool:
        """Create ``PATH.lock``; False if the directory does not let us (warned)."""
        tag = f"mailsh {os.getpid()} {socket.gethostname()}\n".encode()
        name = self.lock_path.name
        for attempt in range(max(1, self.lock_attempts)):
            try:
                fd = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
            except FileExistsError:
                state = _dotlock_state(dir_fd, name, self.lock_path)
                if state == "gone":  # released meanwhile: try again at once
                    continue
                if state == "stale":
                    log.warning("removing stale dotlock %s", self.lock_path)
                    try:
                        os.unlink(name, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        log.warning("cannot remove stale dotlock: %s", exc.strerror)
                    else:
                        continue
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    log.warning(
                        "cannot create dotlock %s (%s); relying on the fcntl lock only",
                        self.lock_path,
                        exc.strerror,
                    )
                    return False
                raise TransportError(
                    f"cannot create dotlock {self.lock_path}: {exc.strerror}"
                ) from exc
            else:
                try:
                    os.write(fd, tag)
                finally:
                    os.close(fd)
                return True
            if attempt + 1 < self.lock_attempts:
                time.sleep(self.lock_interval)
        raise TransportError(
            f"mailbox {self.path} stayed locked by {self.lock_path}",
            hint=f"another program holds {self.lock_path}; remove it if no program is running",
        )

    def _collect_locked(self, dir_fd: int) -> list[SpooledMessage]:
        # O_NONBLOCK (inside open_below) only matters until fstat proves a regular file.
        fd = open_below(dir_fd, self.path.name, self.path, flags=os.O_RDWR, want=stat.S_IFREG)
        if fd is None:
            return []
        try:  # closing fd (the only descriptor we opened) is what releases the lockf lock
            _check_mbox(os.fstat(fd), self.path)
            if not lockf(fd, fcntl.LOCK_EX, self.lock_attempts, self.lock_interval):
                raise TransportError(
                    f"mailbox {self.path} stayed locked (fcntl)",
                    hint="another program keeps the mailbox locked; it will be retried",
                )
            return self._drain(fd)
        finally:
            os.close(fd)

    def _drain(self, fd: int) -> list[SpooledMessage]:
        spooled: list[SpooledMessage] = []
        done = 0
        try:
            while (size := os.fstat(fd).st_size) != done:
                if size < done:
                    raise TransportError(f"mailbox {self.path} shrank while locked")
                for span in spans(fd, done, size):
                    if span.end > span.start:
                        spooled.append(self._spool(fd, span))
                if done:
                    log.warning("mailbox %s grew while locked: a writer ignores locks", self.path)
                done = size
            if done:
                os.ftruncate(fd, 0)
                os.fsync(fd)
        except BaseException:
            if spooled:
                log.warning(
                    "%d message(s) spooled but left in %s; they will be spooled again",
                    len(spooled),
                    self.path,
                )
            raise
        if spooled:
            log.info("collected %d message(s) from %s", len(spooled), self.path)
        return spooled

    def _spool(self, fd: int, span: Span) -> SpooledMessage:
        size = span.end - span.start
        if self.max_message_bytes is not None and size > self.max_message_bytes:
            log.warning(
                "message of %d bytes in %s exceeds %d; spooling it anyway",
                size,
                self.path,
                self.max_message_bytes,
            )
        return self.spool.put_stream(read_span(fd, span.start, span.end), source=self.source)
