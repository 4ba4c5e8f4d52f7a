"""Reading an mbox (mboxo, as Postfix local(8) writes it) without changing it.

Format: each message starts with a ``From `` separator line at the start of the file or
after a blank line, body lines that start with ``From `` are quoted as ``>From `` (not
reversible, so we never unquote), and a blank line ends each message. A message's bytes
here are what lies between its separator line and the next separator, without the
separator line and without that trailing blank line.

``spans`` splits a region of an open mbox into messages and ``read_span`` reads one, in
bounded blocks; ``lockf`` takes an fcntl (POSIX) lock retried like Postfix. The server's
intake (``mailsh.server.intake.mbox``) uses them under its exclusive locks; ``scan_mbox``, the
client's view, only ever opens the file read-only and takes a shared lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailsh.errors import TransportError

log = logging.getLogger(__name__)

SCAN_LOCK_ATTEMPTS = 10
SCAN_LOCK_INTERVAL = 0.2
"""A scan tries the shared lock ``SCAN_LOCK_ATTEMPTS`` times, ``SCAN_LOCK_INTERVAL``
seconds apart, then returns nothing for now. Internal, not a setting: a busy lock only
delays the scan until the mailbox changes again; nothing is lost."""

_BLOCK = 1 << 20
_LINE_BLOCK = 4096  # bytes read at a time while looking for the end of one line
_SEP = b"\n\nFrom "
_LOCK_BUSY = (errno.EAGAIN, errno.EACCES)


@dataclass(frozen=True)
class Span:
    """One message inside ``[region start, region end)`` of an open mbox."""

    start: int  # first byte of the message (after its separator line)
    end: int  # one past its last byte (trailing blank line excluded)
    stop: int  # where the next message's separator starts (or the region end)
    complete: bool  # followed by a separator, or the region ends with a blank line


def read_span(fd: int, start: int, end: int) -> Iterator[bytes]:
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
        buf = os.pread(fd, min(_LINE_BLOCK, limit - pos), pos)
        if not buf:
            break
        i = buf.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(buf)
    return limit


def spans(fd: int, start: int, end: int) -> list[Span]:
    """Split ``[start, end)`` of an mbox into messages, reading it in bounded blocks."""
    if end <= start:
        return []
    seps = _separators(fd, start, end)
    ends_blank = end - start >= 2 and os.pread(fd, 2, end - 2) == b"\n\n"
    spans: list[Span] = []
    if not seps or seps[0] != start:
        # Bytes before the first separator: not mbox as Postfix writes it. Keep them
        # (never lose) unless they are only blank lines.
        stop = seps[0] if seps else end
        lead_end = stop - 1 if seps else (end - 1 if ends_blank else end)
        blank = lead_end - start <= 64 and not os.pread(fd, lead_end - start, start).strip()
        if not blank:
            log.warning("mailbox has %d bytes before its first From line", stop - start)
            spans.append(Span(start, lead_end, stop, bool(seps) or ends_blank))
    for i, sep in enumerate(seps):
        body = _line_end(fd, sep, end)
        if i + 1 < len(seps):
            stop = seps[i + 1]
            spans.append(Span(body, max(body, stop - 1), stop, True))
        else:
            spans.append(Span(body, max(body, end - 1 if ends_blank else end), end, ends_blank))
    return spans


def lockf(fd: int, how: int, attempts: int, interval: float) -> bool:
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


def _resumable(fd: int, offset: int, size: int) -> bool:
    """True if ``offset`` is where a previous scan of this same file stopped."""
    if offset == 0:
        return True
    if offset > size or offset < 2 or os.pread(fd, 2, offset - 2) != b"\n\n":
        return False
    return offset == size or os.pread(fd, 5, offset) == b"From "


def scan_mbox(
    path: Path,
    offset: int = 0,
    *,
    lock_attempts: int = SCAN_LOCK_ATTEMPTS,
    lock_interval: float = SCAN_LOCK_INTERVAL,
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
        if not lockf(fd, fcntl.LOCK_SH, lock_attempts, lock_interval):
            log.info("mailbox %s is locked; will look again later", path)
            return [], offset
        size = os.fstat(fd).st_size
        if not _resumable(fd, offset, size):
            log.info("mailbox %s changed under us; rescanning from the start", path)
            offset = 0
        messages: list[bytes] = []
        for span in spans(fd, offset, size):
            if not span.complete:
                break
            if span.end > span.start:
                messages.append(b"".join(read_span(fd, span.start, span.end)))
            offset = span.stop
        return messages, offset
    finally:
        os.close(fd)
