"""The free-space floor: intake pauses while the home's file system is nearly full.

Below ``--min-free-space`` (``MAILSH_MIN_FREE_SPACE``) bytes free, mail is not taken in
(docs/server.md "Disk", docs/security.md P16): the SMTP listener answers
``452 4.3.1`` to MAIL, RCPT and DATA, mailboxes are left untouched, and
``mailsh deliver`` exits 75 so the MTA retries. Each side keeps the mail and tries again
later; nothing is lost. Processing, replies and pruning go on, so space can come back.
A change of state is logged once, not on every check.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from mailsh.units import format_size

log = logging.getLogger("mailsh.server")

#: What the SMTP listener answers while intake is paused (RFC 3463 4.3.1).
SMTP_PAUSED = "452 4.3.1 insufficient system storage, try again later"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged user may still write on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class SpaceGuard:
    """Answers "may intake accept mail now?" for the file system of ``path``.

    ``min_free`` 0 turns the floor off. ``on_low`` is called (outside the lock) each time
    free space falls below the floor, e.g. to start pruning early. Thread-safe: the SMTP
    listener and the daemon loop share one guard, so a transition is logged once.
    """

    def __init__(
        self, path: Path, min_free: int, *, on_low: Callable[[], None] | None = None
    ) -> None:
        self.path = path
        self.min_free = min_free
        self._on_low = on_low
        self._lock = threading.Lock()
        self._paused = False
        self._unknown = False

    def accepting(self) -> bool:
        """True unless free space is known to be below the floor."""
        if self.min_free <= 0:
            return True
        try:
            free = free_bytes(self.path)
        except OSError as exc:
            with self._lock:
                first, self._unknown = not self._unknown, True
            if first:  # cannot tell: keep accepting, the spool's own errors still hold
                log.warning("cannot measure free space on %s: %s", self.path, exc.strerror)
            return True
        paused = free < self.min_free
        with self._lock:
            changed = paused != self._paused
            self._paused, self._unknown = paused, False
        if changed and paused:
            log.warning(
                "intake paused: %s free on %s, below --min-free-space %s; mail waits "
                "with its sender (SMTP 452, mailboxes untouched, deliver exits 75)",
                format_size(free),
                self.path,
                format_size(self.min_free),
            )
            if self._on_low is not None:
                self._on_low()
        elif changed:
            log.info(
                "intake resumed: %s free on %s (floor %s)",
                format_size(free),
                self.path,
                format_size(self.min_free),
            )
        return not paused


def count_files(directory: Path) -> tuple[int, int]:
    """How many regular files ``directory`` holds (not below it), and their bytes; (0, 0)
    if it cannot be listed. Symlinks are not followed."""
    files = size = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0, 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                files += 1
                size += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return files, size


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue  # moved or pruned while we looked
    return total


def disk_status(spool_dir: Path, state_db: Path, min_free: int) -> dict[str, int | str]:
    """The ``mailsh status`` keys about disk use: sizes in bytes, and whether intake runs."""
    db_bytes = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            db_bytes += os.stat(f"{state_db}{suffix}").st_size
        except FileNotFoundError:
            continue
    home = state_db.parent
    free = free_bytes(home)
    return {
        "spool_bytes": tree_bytes(spool_dir) if spool_dir.is_dir() else 0,
        "state_db_bytes": db_bytes,
        "free_bytes": free,
        "min_free_bytes": min_free,
        "intake": "paused (below --min-free-space)" if free < min_free else "accepting",
    }
