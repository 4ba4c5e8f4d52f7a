"""Reading an mbox that Postfix local(8) appends to (server intake) or that the client reads.

Format (mboxo, as Postfix writes it): each message starts with a ``From `` separator line
at the start of the file or after a blank line, body lines that start with ``From `` are
quoted as ``>From `` (not reversible, so we never unquote), and a blank line ends each
message. A message's bytes here are what lies between its separator line and the next
separator, without the separator line and without that trailing blank line.

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

Client side, ``scan_mbox`` only ever opens the file read-only and takes a shared lock.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailsh.errors import TransportError
from mailsh.server.intake_files import (
    MailboxRefusedError,
    RefusalRecord,
    kind,
    open_below,
    open_dir,
)
from mailsh.server.spool import Spool, SpooledMessage

log = logging.getLogger(__name__)

#: A dotlock older than this is stale (Postfix's ``stale_lock_time`` default), seconds.
STALE_LOCK_SECONDS = 500.0
_BLOCK = 1 << 20
_SEP = b"\n\nFrom "
_LOCK_BUSY = (errno.EAGAIN, errno.EACCES)
_LOCK_TAG_RE = re.compile(rb"mailsh (\d+) (\S+)\n")


@dataclass(frozen=True)
class _Span:
    """One message inside ``[region start, region end)`` of an open mbox."""

    start: int  # first byte of the message (after its separator line)
    end: int  # one past its last byte (trailing blank line excluded)
    stop: int  # where the next message's separator starts (or the region end)
    complete: bool  # followed by a separator, or the region ends with a blank line


def _pread(fd: int, start: int, end: int) -> Iterator[bytes]:
    """Yield ``[start, end)`` of ``fd`` in blocks; fail if the file shrank under us."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_BLOCK, end - pos), pos)
        if not chunk:
            raise TransportError(f"mailbox shrank while locked (at byte {pos})")
        pos += len(chunk)
        yield chunk


def _separators(fd: int, start: int, end: int) -> list[int]:
    """Offsets in ``[start, end)`` where a separator line begins.

    ``start`` counts as the beginning of a file: a ``From `` there is a separator.
    """
    found = [start] if end - start >= 5 and os.pread(fd, 5, start) == b"From " else []
    pos = start
    while pos < end:
        n = min(_BLOCK, end - pos)
        buf = os.pread(fd, min(n + len(_SEP) - 1, end - pos), pos)
        i = buf.find(_SEP)
        while 0 <= i < n:
            found.append(pos + i + 2)
            i = buf.find(_SEP, i + 1)
        pos += n
    return found


def _line_end(fd: int, pos: int, limit: int) -> int:
    """Offset just after the newline that ends the line at ``pos`` (or ``limit``)."""
    while pos < limit:
        buf = os.pread(fd, min(4096, limit - pos), pos)
        if not buf:
            break
        i = buf.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(buf)
    return limit


def _spans(fd: int, start: int, end: int) -> list[_Span]:
    """Split ``[start, end)`` of an mbox into messages, reading it in bounded blocks."""
    if end <= start:
        return []
    seps = _separators(fd, start, end)
    ends_blank = end - start >= 2 and os.pread(fd, 2, end - 2) == b"\n\n"
    spans: list[_Span] = []
    if not seps or seps[0] != start:
        # Bytes before the first separator: not mbox as Postfix writes it. Keep them
        # (never lose) unless they are only blank lines.
        stop = seps[0] if seps else end
        lead_end = stop - 1 if seps else (end - 1 if ends_blank else end)
        blank = lead_end - start <= 64 and not os.pread(fd, lead_end - start, start).strip()
        if not blank:
            log.warning("mailbox has %d bytes before its first From line", stop - start)
            spans.append(_Span(start, lead_end, stop, bool(seps) or ends_blank))
    for i, sep in enumerate(seps):
        body = _line_end(fd, sep, end)
        if i + 1 < len(seps):
            stop = seps[i + 1]
            spans.append(_Span(body, max(body, stop - 1), stop, True))
        else:
            spans.append(_Span(body, max(body, end - 1 if ends_blank else end), end, ends_blank))
    return spans


def _lockf(fd: int, how: int, attempts: int, interval: float) -> bool:
    """Take an fcntl (POSIX) lock, retried like Postfix; False if it stayed busy."""
    for attempt in range(max(1, attempts)):
        try:
            fcntl.lockf(fd, how | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in _LOCK_BUSY:
                raise TransportError(f"cannot lock mailbox: {exc.strerror}") from exc
        if attempt + 1 < attempts:
            time.sleep(interval)
    return False


def _names_dead_mailsh(content: bytes) -> bool:
    """True if a dotlock's content names a mailsh process on this host that is gone."""
    match = _LOCK_TAG_RE.fullmatch(content)
    if match is None or match[2].decode(errors="replace") != socket.gethostname():
        return False
    pid = int(match[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


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
        content = os.read(fd, 256)
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
        lock_attempts: int = 20,
        lock_interval: float = 0.5,
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
        dir_fd = open_dir(self.path.parent)
        if dir_fd is None:
            return []
        try:
            spooled = self._collect_in(dir_fd)
        except MailboxRefusedError as exc:
            self.refusals.refuse(exc)
            return []
        finally:
            os.close(dir_fd)
        self.refusals.accept()
        return spooled

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
            if not _lockf(fd, fcntl.LOCK_EX, self.lock_attempts, self.lock_interval):
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
                for span in _spans(fd, done, size):
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

    def _spool(self, fd: int, span: _Span) -> SpooledMessage:
        size = span.end - span.start
        if self.max_message_bytes is not None and size > self.max_message_bytes:
            log.warning(
                "message of %d bytes in %s exceeds %d; spooling it anyway",
                size,
                self.path,
                self.max_message_bytes,
            )
        return self.spool.put_stream(_pread(fd, span.start, span.end), source=self.source)


def _resumable(fd: int, offset: int, size: int) -> bool:
    """True if ``offset`` is where a previous scan of this same file stopped."""
    if offset == 0:
        return True
    if offset > size or offset < 2 or os.pread(fd, 2, offset - 2) != b"\n\n":
        return False
    return offset == size or os.pread(fd, 5, offset) == b"From "


def scan_mbox(
    path: Path, offset: int = 0, *, lock_attempts: int = 10, lock_interval: float = 0.2
) -> tuple[list[bytes], int]:
    """Complete messages at or after ``offset`` in a mailbox, and the offset to resume at.

    Read-only: the file is opened O_RDONLY and only a shared ``lockf`` is taken while
    reading (a locking writer such as Postfix waits for it). It never modifies, moves or
    removes anything.

    A message is returned only when it is complete: followed by the next separator, or
    at the end of a file that ends with the blank line Postfix adds after each message.
    So a message being written without locks, or a truncated tail, is returned only
    once it is finished (a truncated tail: once the next message arrives).

    ``offset`` must be a value this function returned for the same file. If the file
    shrank, or was replaced/rewritten so that ``offset`` is no longer a message boundary
    of it, scanning restarts at 0: old messages are returned again, so callers must
    tolerate duplicates. A missing file gives ``([], 0)``. If the lock stays busy,
    nothing is returned and ``offset`` is unchanged (try again after the next change).
    """
    try:  # O_NONBLOCK: a FIFO at the path must not hang the client
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise TransportError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TransportError(f"{path} is not a regular file", hint="give the path of an mbox")
        if not _lockf(fd, fcntl.LOCK_SH, lock_attempts, lock_interval):
            log.info("mailbox %s is locked; will look again later", path)
            return [], offset
        size = os.fstat(fd).st_size
        if not _resumable(fd, offset, size):
            log.info("mailbox %s changed under us; rescanning from the start", path)
            offset = 0
        messages: list[bytes] = []
        for span in _spans(fd, offset, size):
            if not span.complete:
                break
            if span.end > span.start:
                messages.append(b"".join(_pread(fd, span.start, span.end)))
            offset = span.stop
        return messages, offset
    finally:
        os.close(fd)
