"""Durable file writes: fsync a directory, replace a small file atomically.

A rename is durable only once its directory is fsynced; a file replaced by rename is
whole only if its bytes were fsynced before. Every small record mailsh keeps on disk
(pending requests, the trust store, refused mailboxes, the containment mode) is written
by :func:`atomic_write`: readers see the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the renames and creations in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, prefix: str) -> None:
    """Replace ``path`` by ``data`` (mode 0600), durably: a temporary file ``PREFIX*`` in
    the same directory, fsynced, renamed over ``path``, then the directory fsynced.

    Raises :class:`OSError`; the temporary file is removed whatever fails before the
    rename.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
