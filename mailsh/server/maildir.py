"""Reading a Maildir: server intake (moves mail) and a read-only client scanner.

Server intake, ``MaildirIntake.collect`` (THREATS.md P9): for each file in ``new/``
(dotfiles and ``tmp/`` ignored), copy it into the spool with ``Spool.put_stream``, which
is durable when it returns, and only then rename it to ``cur/NAME:2,S``. A crash between
the two leaves it in ``new/`` and it is spooled again: duplicated, never lost (the
replay record, P5, drops the duplicate). The renames are fsynced once per collect; a
rename lost in a crash only means another duplicate.

Maildir needs no locks: delivery agents write in ``tmp/`` and rename into ``new/``, so
every file in ``new/`` is complete. Files are opened with O_NOFOLLOW; a symlink or other
non-regular file is left alone with a warning (never followed, never removed).

Client side, ``scan_maildir`` never moves, renames or removes anything.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from mailsh.errors import TransportError
from mailsh.server.spool import Spool, SpooledMessage

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _names(directory: Path) -> list[str]:
    """Visible entries of ``directory`` in name order ([] if it does not exist)."""
    try:
        return sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TransportError(f"cannot list {directory}: {exc.strerror}") from exc


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


def _chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, _BLOCK):
        yield chunk


def _key(name: str) -> str:
    """A Maildir file's unique name without its ``:2,FLAGS`` info part."""
    return name.split(":", 1)[0]


class MaildirIntake:
    """Moves mail from a Maildir's ``new/`` into the spool (see module docstring)."""

    source = "maildir"

    def __init__(self, path: Path, spool: Spool) -> None:
        self.path = Path(path)
        self.spool = spool

    def collect(self) -> list[SpooledMessage]:
        """Spool every message in ``new/`` and move it to ``cur/``; returns what was spooled.

        A missing Maildir is nothing to do. If spooling fails, the message stays in
        ``new/`` and the error propagates (messages before it were already moved).
        """
        new, cur = self.path / "new", self.path / "cur"
        spooled: list[SpooledMessage] = []
        try:
            for name in _names(new):
                fd = _open_regular(new / name)
                if fd is None:
                    continue
                try:
                    msg = self.spool.put_stream(_chunks(fd), source=self.source)
                finally:
                    os.close(fd)
                spooled.append(msg)
                try:
                    os.rename(new / name, cur / f"{_key(name)}:2,S")
                except FileNotFoundError:
                    log.warning("%s vanished after spooling (taken by another reader?)", name)
                except OSError as exc:
                    raise TransportError(
                        f"cannot move {new / name} to cur/: {exc.strerror}",
                        hint="it stays in new/ and will be spooled again; check permissions",
                    ) from exc
        finally:
            if spooled:
                try:
                    _fsync_dir(cur)
                    _fsync_dir(new)
                except OSError as exc:
                    log.warning("cannot fsync %s: %s", self.path, exc.strerror)
        if spooled:
            log.info("collected %d message(s) from %s", len(spooled), self.path)
        return spooled


def scan_maildir(path: Path, seen: set[str]) -> list[tuple[str, bytes]]:
    """Messages in ``new/`` and ``cur/`` whose key is not in ``seen``, in key order.

    The key is the file name without the ``:2,FLAGS`` info part, so it stays the same
    when a mail program moves the file from ``new/`` to ``cur/``. Read-only: nothing is
    moved or flagged, and ``seen`` is not changed (the caller adds the keys it handled).
    A file that moves while we look is simply found again by the next scan.
    """
    found: dict[str, Path] = {}
    for sub in ("new", "cur"):
        for name in _names(path / sub):
            key = _key(name)
            if key not in seen:
                found.setdefault(key, path / sub / name)
    out: list[tuple[str, bytes]] = []
    for key in sorted(found):
        fd = _open_regular(found[key])
        if fd is None:
            continue
        try:
            out.append((key, b"".join(_chunks(fd))))
        finally:
            os.close(fd)
    return out
