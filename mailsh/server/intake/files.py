"""Opening mailbox files safely, and the record of mailboxes intake refuses (P13).

serve often runs as root, while others can write where the mail is: anyone in group
``mail`` can create files in ``/var/mail`` (mode 2775, no sticky bit), and the owner of
a Maildir controls everything in it. A path there must never make root read, move or
truncate a file somewhere else, and never block.

The approach: descriptors, not paths. The directory that holds a mailbox is opened
once (the path up to it is the operator's choice and is followed as given); every name
below it (the mbox, ``PATH.lock``, the Maildir, its ``new/`` and ``cur/``, each message
file) is opened relative to a directory descriptor (``openat`` via ``dir_fd``) with
``O_NOFOLLOW`` and ``O_NONBLOCK``, then checked with ``fstat`` on the descriptor that
is actually used: type (regular file or directory), link count (an mbox with a second
hard link is refused, as Postfix does) and owner where it means something (a Maildir's
subdirectories and messages belong to the Maildir's owner, root, or serve's user).
Renames are ``renameat`` between the two directory descriptors. The alternative,
intake as the mailbox owner's uid, was not chosen: it needs a process per owner and
still has to refuse FIFOs and links.

A refused mailbox is logged as an error once (and again only when the reason changes)
and recorded in ``SPOOL/refused.json`` for ``mailsh status``; the entry is removed when
the mailbox is accepted again. Intake never raises for it, so serve keeps serving the
other mailboxes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailsh.errors import TransportError
from mailsh.fsio import atomic_write

log = logging.getLogger(__name__)

#: The record of refused mailboxes, inside the spool directory.
REFUSED_FILE = "refused.json"
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFSOCK: "a socket",
    stat.S_IFREG: "a regular file",
}


class MailboxRefusedError(TransportError):
    """A mailbox (or a file it needs) is not what it must be; nothing was touched."""


def kind(mode: int) -> str:
    """What a file is, in words, from its ``st_mode``."""
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def open_dir(path: Path) -> int | None:
    """A descriptor for the directory an operator named (followed as given); None if
    it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TransportError(f"cannot open directory {path}: {exc.strerror}") from exc


def open_below(dir_fd: int, name: str, shown: Path, *, flags: int, want: int) -> int | None:
    """Open ``name`` inside ``dir_fd`` without following a symlink or blocking.

    ``want`` is ``stat.S_IFREG`` or ``stat.S_IFDIR``. Returns the descriptor, None if the
    name does not exist, or raises :class:`MailboxRefusedError` naming ``shown`` when it
    is a symlink or another type of file.
    """
    extra = os.O_DIRECTORY if want == stat.S_IFDIR else 0
    try:
        fd = os.open(name, flags | extra | _NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except OSError:
                mode = 0
            raise MailboxRefusedError(
                f"{shown} is {kind(mode)}, not {kind(want)}; it is not touched",
                hint=f"replace {shown} by {kind(want)} (nothing follows links there)",
            ) from exc
        raise TransportError(f"cannot open {shown}: {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if stat.S_IFMT(mode) != want:
        os.close(fd)
        raise MailboxRefusedError(
            f"{shown} is {kind(mode)}, not {kind(want)}; it is not touched",
            hint=f"replace {shown} by {kind(want)}",
        )
    return fd


def check_owner(st: os.stat_result, allowed: set[int], shown: Path) -> None:
    """Refuse ``shown`` unless it is owned by one of ``allowed`` uids."""
    if st.st_uid not in allowed:
        raise MailboxRefusedError(
            f"{shown} is owned by uid {st.st_uid}, not by the mailbox's owner",
            hint=f"chown {shown} to the mailbox's owner, or remove it",
        )


# -- the record for status -------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A mailbox intake currently refuses, and why (for ``mailsh status``)."""

    mailbox: str
    reason: str
    since: str  # ISO 8601, UTC

    def line(self) -> str:
        """One line for ``mailsh status`` (the reason names the mailbox or its part)."""
        return f"{self.reason} (since {self.since})"


def _load(path: Path) -> dict[str, dict[str, str]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); starting it afresh", path, exc)
        return {}
    return doc if isinstance(doc, dict) else {}


def read_refusals(spool_root: Path) -> list[Refusal]:
    """The mailboxes intake refused at its last look, from ``SPOOL/refused.json``."""
    out = []
    for mailbox, entry in sorted(_load(spool_root / REFUSED_FILE).items()):
        if isinstance(entry, dict):
            out.append(Refusal(mailbox, str(entry.get("reason", "")), str(entry.get("since", ""))))
    return out


class RefusalRecord:
    """Keeps ``SPOOL/refused.json`` current for one mailbox (see module docstring)."""

    def __init__(self, spool_root: Path, mailbox: Path) -> None:
        self.path = spool_root / REFUSED_FILE
        self.mailbox = str(mailbox)
        self._reason: str | None = None  # what this process last logged
        self._clean = False  # the record is known to hold no entry for this mailbox

    def refuse(self, exc: MailboxRefusedError) -> None:
        """Log (once per reason) and record that the mailbox is refused."""
        if exc.message != self._reason:
            hint = f" (next: {exc.hint})" if exc.hint else ""
            log.error("refusing mailbox %s: %s%s", self.mailbox, exc.message, hint)
            self._reason = exc.message
        self._clean = False
        doc = _load(self.path)
        old = doc.get(self.mailbox)
        if isinstance(old, dict) and old.get("reason") == exc.message:
            return
        since = datetime.now(UTC).isoformat(timespec="seconds")
        doc[self.mailbox] = {"reason": exc.message, "since": since}
        self._save(doc)

    def accept(self) -> None:
        """The mailbox is fine (again): drop its entry, and say so if it was refused.

        Reads the record only after a refusal, and once per process (an entry left by
        an earlier run), so a healthy mailbox costs nothing here.
        """
        if self._clean and self._reason is None:
            return
        if self._reason is not None:
            log.info("mailbox %s is accepted again", self.mailbox)
            self._reason = None
        self._clean = True
        doc = _load(self.path)
        if self.mailbox in doc:
            del doc[self.mailbox]
            self._save(doc)

    def _save(self, doc: dict[str, dict[str, str]]) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path, data, prefix=".refused.")
        except OSError as exc:
            log.warning("cannot record mailbox refusals in %s: %s", self.path, exc)
