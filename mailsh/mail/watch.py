"""Waking up when a mailbox (mbox file or Maildir) may have changed.

Contract: ``Watcher.wait`` returns True after *anything* may have changed since the
previous ``wait`` returned (or since the watcher was created), and the caller re-scans
after every return. A spurious wake-up costs one empty scan; a missed change would
leave mail waiting, so every design choice below errs towards waking:

* inotify (``inotify_simple``) watches an mbox file (modify, close_write, attrib,
  move_self, delete_self) and its directory (create/moved_to of that file name only, so
  dotlocks such as ``PATH.lock`` do not wake us), and a Maildir's ``new/`` and ``cur/``
  (create, moved_to). Any directory is watched like a Maildir, which also covers the
  mailsh spool (``Spool.put`` renames into ``new/``). Watches are re-armed before
  ``wait`` returns, so a file replaced by a new inode is followed, and events are
  drained only after re-arming: anything that happens after that is either seen by the
  caller's scan or queued for the next wait.
* A stat snapshot of every path (inode, size, mtime, ctime; for a Maildir the names in
  ``new/`` and ``cur/``) is taken when ``wait`` returns and compared at the start of
  the next one. Paths inotify cannot cover (inotify unavailable, path or its directory
  missing, watch limit reached) are polled this way every ``poll_interval`` seconds.
  Polling can in theory miss a truncate-and-refill to the same size within one
  timestamp tick; inotify does not.

Watch the mailbox before the first scan, so nothing falls between the two.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags  # type: ignore[import-untyped]

from mailsh.resources import Closing

log = logging.getLogger(__name__)

_FILE_MASK = int(
    flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB | flags.MOVE_SELF | flags.DELETE_SELF
)
_DIR_MASK = int(flags.CREATE | flags.MOVED_TO)
_OVERFLOW = int(flags.Q_OVERFLOW)

# A watch: (directory or file to watch, mask, names of interest (None: any), essential).
# A path is covered by inotify when all its essential watches could be added.
_Spec = tuple[Path, int, str | None, bool]


def _specs(path: Path) -> list[_Spec]:
    if path.is_dir():  # a Maildir
        return [(path / "new", _DIR_MASK, None, True), (path / "cur", _DIR_MASK, None, False)]
    return [(path, _FILE_MASK, None, False), (path.parent, _DIR_MASK, path.name, True)]


def _snapshot(path: Path) -> object:
    """What polling compares: changes whenever new mail can have arrived."""
    try:
        if path.is_dir():
            return tuple(frozenset(_listdir(path / sub)) for sub in ("new", "cur"))
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


class Watcher(Closing):
    """Waits for changes to mailboxes (see module docstring); a context manager."""

    def __init__(
        self, paths: Sequence[Path], *, poll_interval: float = 2.0, use_inotify: bool = True
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.poll_interval = poll_interval
        self._inotify: Any = None
        self._wds: dict[int, set[str] | None] = {}
        self._warned: set[Path] = set()
        self._closed = False
        if use_inotify:
            try:
                self._inotify = INotify()
            except OSError as exc:
                log.warning("inotify unavailable (%s); polling every %ss", exc, poll_interval)
        self._covered = self._arm()
        self._snapshots = [_snapshot(p) for p in self.paths]

    def _arm(self) -> bool:
        """(Re-)add all watches; True if inotify covers every path."""
        if self._inotify is None:
            return False
        wanted: dict[Path, tuple[int, set[str] | None]] = {}
        essential: dict[Path, list[Path]] = {}
        for path in self.paths:
            for target, mask, name, needed in _specs(path):
                old_mask, old_names = wanted.get(target, (0, set()))
                names = None if name is None or old_names is None else old_names | {name}
                wanted[target] = (old_mask | mask, names)
                if needed:
                    essential.setdefault(path, []).append(target)
        wds: dict[int, set[str] | None] = {}
        failed: set[Path] = set()
        for target, (mask, names) in wanted.items():
            try:
                wd = int(self._inotify.add_watch(target, mask))
            except OSError as exc:
                failed.add(target)
                if not isinstance(exc, FileNotFoundError) and target not in self._warned:
                    self._warned.add(target)
                    log.warning("cannot watch %s (%s); polling it", target, exc.strerror)
                continue
            old = wds.get(wd, set())
            wds[wd] = None if names is None or old is None else old | names
        for wd in set(self._wds) - set(wds):
            with contextlib.suppress(OSError):  # already gone with its file
                self._inotify.rm_watch(wd)
        self._wds = wds
        return not any(t in failed for targets in essential.values() for t in targets)

    def _relevant(self, events: Iterable[Any]) -> bool:
        for event in events:
            if event.mask & _OVERFLOW or event.wd not in self._wds:
                return True
            names = self._wds[event.wd]
            if names is None or not event.name or event.name in names:
                return True
        return False

    def _changed(self) -> bool:
        return any(_snapshot(p) != s for p, s in zip(self.paths, self._snapshots, strict=True))

    def wait(self, timeout: float) -> bool:
        """Block until something may have changed (True) or ``timeout`` seconds pass."""
        if self._closed:
            raise ValueError("wait() on a closed Watcher")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._changed():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            step = remaining if self._covered else min(remaining, self.poll_interval)
            if self._inotify is None:
                time.sleep(step)
            elif self._relevant(self._inotify.read(timeout=math.ceil(step * 1000))):
                break
            self._covered = self._arm()
        # Re-arm (follow replaced files), then drop queued events, then remember state:
        # whatever happens from here on is seen by the caller's scan or by the next wait.
        self._covered = self._arm()
        if self._inotify is not None:
            self._inotify.read(timeout=0)
        self._snapshots = [_snapshot(p) for p in self.paths]
        return True

    def close(self) -> None:
        """Release the inotify descriptor; the watcher cannot be used afterwards."""
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._closed = True
