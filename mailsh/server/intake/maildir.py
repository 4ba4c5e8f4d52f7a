"""Server intake from a Maildir: spool each message, then move it to ``cur/``.

The read-only pieces (listing, reading, the message key, the client's ``scan_maildir``)
are in :mod:`mailsh.mail.maildir`.

Server intake, ``MaildirIntake.collect`` (docs/security.md P9): for each file in ``new/``
(dotfiles and ``tmp/`` ignored), copy it into the spool with ``Spool.put_stream``, which
is durable when it returns, and only then rename it to ``cur/NAME:2,S``. A crash between
the two leaves it in ``new/`` and it is spooled again: duplicated, never lost (the
replay record, P5, drops the duplicate). The renames are fsynced once per collect; a
rename lost in a crash only means another duplicate.

Maildir needs no locks: delivery agents write in ``tmp/`` and rename into ``new/``, so
every file in ``new/`` is complete. Everything below the Maildir's own directory is
opened and renamed through directory descriptors without following links
(``intake_files``, P13): a message that is a symlink, not a regular file or owned by
another user is left alone with a warning; a Maildir whose ``new/`` or ``cur/`` is a
link or another user's is refused as a whole.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from mailsh.errors import TransportError
from mailsh.mail.maildir import message_key, read_chunks, visible_names
from mailsh.server.intake.files import (
    MailboxRefusedError,
    RefusalRecord,
    check_owner,
    open_below,
)
from mailsh.server.spool import Spool, SpooledMessage

log = logging.getLogger(__name__)

_NAME_MAX = 255  # bytes in one file name (Linux NAME_MAX)


class MaildirIntake:
    """Moves mail from a Maildir's ``new/`` into the spool (see module docstring)."""

    source = "maildir"

    def __init__(self, path: Path, spool: Spool) -> None:
        self.path = Path(path)
        self.spool = spool
        self.refusals = RefusalRecord(spool.root, self.path)
        self._ignored: set[str] = set()  # names in new/ already warned about

    def collect(self) -> list[SpooledMessage]:
        """Spool every message in ``new/`` and move it to ``cur/``; returns what was spooled.

        A missing Maildir is nothing to do. If spooling fails, the message stays in
        ``new/`` and the error propagates (messages before it were already moved). A
        Maildir refused for what it is (itself, ``new/`` or ``cur/`` a symlink, not a
        directory, or owned by another user) is logged, recorded for ``mailsh status``
        and left untouched (``intake_files``); that returns ``[]``.
        """
        return self.refusals.collect(self._collect)

    def _subdir(self, top: int, fds: list[int], name: str, owners: set[int]) -> int | None:
        """``new/`` or ``cur/``: a real directory owned by the Maildir's owner (or None)."""
        fd = open_below(top, name, self.path / name, flags=os.O_RDONLY, want=stat.S_IFDIR)
        if fd is not None:
            fds.append(fd)
            check_owner(os.fstat(fd), owners, self.path / name)
        return fd

    def _collect(self, fds: list[int]) -> list[SpooledMessage]:
        top = open_below(fds[0], self.path.name, self.path, flags=os.O_RDONLY, want=stat.S_IFDIR)
        if top is None:
            return []
        fds.append(top)
        owners = {os.fstat(top).st_uid, 0, os.geteuid()}
        new_fd = self._subdir(top, fds, "new", owners)
        if new_fd is None:
            return []
        names = visible_names(new_fd, self.path / "new")
        if not names:
            return []
        cur_fd = self._subdir(top, fds, "cur", owners)
        if cur_fd is None:
            raise MailboxRefusedError(
                f"{self.path} has no cur/ directory: not a Maildir",
                hint=f"mkdir {self.path / 'cur'} (owned by the Maildir's owner)",
            )
        return self._take(names, new_fd, cur_fd, owners)

    def _take(
        self, names: list[str], new_fd: int, cur_fd: int, owners: set[int]
    ) -> list[SpooledMessage]:
        """Spool each message of ``names`` in ``new/``, then rename it into ``cur/``."""
        spooled: list[SpooledMessage] = []
        try:
            for name in names:
                fd = self._open_message(new_fd, name, owners)
                if fd is None:
                    continue
                try:
                    msg = self.spool.put_stream(read_chunks(fd), source=self.source)
                finally:
                    os.close(fd)
                spooled.append(msg)
                try:
                    moved = f"{message_key(name)}:2,S"
                    os.rename(name, moved, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
                except FileNotFoundError:
                    log.warning("%s vanished after spooling (taken by another reader?)", name)
                except OSError as exc:
                    raise TransportError(
                        f"cannot move {self.path / 'new' / name} to cur/: {exc.strerror}",
                        hint="it stays in new/ and will be spooled again; check permissions",
                    ) from exc
        finally:
            if spooled:
                try:
                    os.fsync(cur_fd)
                    os.fsync(new_fd)
                except OSError as exc:
                    log.warning("cannot fsync %s: %s", self.path, exc.strerror)
        if spooled:
            log.info("collected %d message(s) from %s", len(spooled), self.path)
        return spooled

    def _open_message(self, new_fd: int, name: str, owners: set[int]) -> int | None:
        """A message file in ``new/``, or None if it is gone or must be left alone
        (a symlink, not a regular file, owned by another user, a name too long to move:
        warned once each)."""
        shown = self.path / "new" / name
        try:
            if len(f"{message_key(name)}:2,S".encode(errors="surrogateescape")) > _NAME_MAX:
                # It could never be moved to cur/: spooling it would repeat forever.
                raise MailboxRefusedError(f"{shown}: name too long to move to cur/")
            fd = open_below(new_fd, name, shown, flags=os.O_RDONLY, want=stat.S_IFREG)
            if fd is not None:
                try:
                    check_owner(os.fstat(fd), owners, shown)
                except MailboxRefusedError:
                    os.close(fd)
                    raise
        except MailboxRefusedError as exc:
            if name not in self._ignored:
                self._ignored.add(name)
                log.warning("ignoring %s", exc.message)
            return None
        return fd
