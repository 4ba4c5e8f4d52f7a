"""Reading a Maildir without changing it: the client's scanner and helpers the intake shares.

Maildir needs no locks: delivery agents write in ``tmp/`` and rename into ``new/``, so
every file in ``new/`` is complete. A message's key is its file name without the
``:2,FLAGS`` info part (``message_key``), so it stays the same when a mail program moves
the file from ``new/`` to ``cur/``. ``scan_maildir`` never moves, renames or removes
anything; the server's intake (``mailsh.server.intake.maildir``) is the part that moves mail.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from mailsh.errors import TransportError

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


def visible_names(directory: Path | int, shown: Path | None = None) -> list[str]:
    """Visible entries of ``directory`` (a path or a descriptor) in name order ([] if it
    does not exist)."""
    try:
        return sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TransportError(f"cannot list {shown or directory}: {exc.strerror}") from exc


def _open_regular(path: Path) -> int | None:
    """Open a regular file read-only without following symlinks (O_NONBLOCK so a FIFO
    cannot hang us); None if it is gone (taken by another reader) or is not a regular
    file (warned)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("ignoring symlink %s in Maildir", path)
            return None
        raise TransportError(f"cannot open {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("ignoring non-regular file %s in Maildir", path)
        return None
    return fd


def read_chunks(fd: int) -> Iterator[bytes]:
    """Everything left to read from ``fd``, in bounded blocks."""
    while chunk := os.read(fd, _BLOCK):
        yield chunk


def message_key(name: str) -> str:
    """A Maildir file's unique name without its ``:2,FLAGS`` info part."""
    return name.split(":", 1)[0]


def scan_maildir(path: Path, seen: set[str]) -> list[tuple[str, bytes]]:
    """Messages in ``new/`` and ``cur/`` whose key is not in ``seen``, in key order.

    The key is the file name without the ``:2,FLAGS`` info part, so it stays the same
    when a mail program moves the file from ``new/`` to ``cur/``. Read-only: nothing is
    moved or flagged, and ``seen`` is not changed (the caller adds the keys it handled).
    A file that moves while we look is simply found again by the next scan.
    """
    found: dict[str, Path] = {}
    for sub in ("new", "cur"):
        for name in visible_names(path / sub):
            key = message_key(name)
            if key not in seen:
                found.setdefault(key, path / sub / name)
    out: list[tuple[str, bytes]] = []
    for key in sorted(found):
        fd = _open_regular(found[key])
        if fd is None:
            continue
        try:
            out.append((key, b"".join(read_chunks(fd))))
        finally:
            os.close(fd)
    return out
