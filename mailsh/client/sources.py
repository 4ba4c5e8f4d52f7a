"""Where replies are read: an mbox, a Maildir or an IMAP mailbox, chosen and opened.

The mailbox is only ever read: nothing is moved, flagged or deleted, and a message that
is not the reply stays where it is. Waiting does not busy-poll: a
:class:`~mailsh.mail.watch.Watcher` (inotify, stat polling as fallback) wakes us when
the mailbox may have changed, and only then is it scanned again. Over IMAP the mailbox is
opened with EXAMINE and read with ``BODY.PEEK[]`` (:class:`~mailsh.client.imap.ImapWatcher`),
and IDLE (NOOP polling where the server has none) does the waking.

Where a scan starts: a Maildir scan skips files last modified more than
:data:`MAILDIR_SLACK` before the request was sent (delivery sets the mtime, so these
cannot be the reply); an mbox scan starts at the mark noted by ``mailsh send`` when the
file is provably unchanged up to it (same inode, the 4 KiB before the mark unchanged),
and at the beginning otherwise. An IMAP scan starts at the first message the server
received on or after the day before the request was sent (``UID SEARCH SINCE``, which
has day granularity in the server's time zone), and at the beginning if that search
fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailsh.errors import ConfigError, TransportError, UsageError

if TYPE_CHECKING:
    from mailsh.client.imap import ImapWatcher
    from mailsh.client.imap_url import ImapTarget
    from mailsh.client.pending import MboxMark, PendingRequest
    from mailsh.mail.watch import Watcher
    from mailsh.settings import Settings

MAILDIR_SLACK = timedelta(hours=1)
"""Maildir files modified this long before the request was sent are not read."""
IMAP_SINCE_SLACK = timedelta(days=1)
"""IMAP scans start at mail received on or after the request's (UTC) day minus this."""
POLL_INTERVAL = 2.0
"""Seconds between stat polls when inotify cannot watch the mailbox."""
MAILBOX_HINT = (
    "--mbox PATH, --maildir PATH or --imap URL "
    "(or MAILSH_REPLY_MBOX / MAILSH_REPLY_MAILDIR / MAILSH_REPLY_IMAP)"
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ReplySource(Protocol):
    """A read-only mailbox: new messages since the last scan, and a way to wait."""

    description: str

    def scan(self) -> list[bytes]:
        """Messages not returned before (after a rewrite of the mailbox, maybe again)."""
        ...

    def wait(self, timeout: float) -> bool:
        """Block until the mailbox may have changed (True) or ``timeout`` passes."""
        ...

    def close(self) -> None: ...


class MboxSource:
    """New complete messages of an mbox file, read with :func:`scan_mbox`."""

    def __init__(self, path: Path, *, start: int = 0, poll_interval: float = POLL_INTERVAL):
        from mailsh.mail.watch import Watcher

        self.path = path
        self.description = f"mbox {path}"
        self.offset = start
        # Watch first, then scan: nothing can fall between the two.
        self._watcher: Watcher = Watcher([path], poll_interval=poll_interval)

    def scan(self) -> list[bytes]:
        from mailsh.mail.mbox import scan_mbox

        messages, self.offset = scan_mbox(self.path, self.offset)
        return messages

    def wait(self, timeout: float) -> bool:
        return self._watcher.wait(timeout)

    def close(self) -> None:
        self._watcher.close()


class MaildirSource:
    """New messages in a Maildir's ``new/`` and ``cur/``, read with :func:`scan_maildir`."""

    def __init__(
        self,
        path: Path,
        *,
        not_before: datetime | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        from mailsh.mail.watch import Watcher

        self.path = path
        self.description = f"Maildir {path}"
        self.seen: set[str] = set()
        self._cutoff = None if not_before is None else not_before.timestamp()
        self._watcher: Watcher = Watcher([path], poll_interval=poll_interval)

    def _skip_old(self) -> None:
        """Mark files older than the cutoff as seen, so they are never read."""
        if self._cutoff is None:
            return
        for sub in ("new", "cur"):
            try:
                entries = list(os.scandir(self.path / sub))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise TransportError(f"cannot list {self.path / sub}: {exc.strerror}") from exc
            for entry in entries:
                key = entry.name.split(":", 1)[0]
                if key in self.seen:
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < self._cutoff:
                        self.seen.add(key)
                except FileNotFoundError:
                    continue

    def scan(self) -> list[bytes]:
        from mailsh.mail.maildir import scan_maildir

        self._skip_old()
        found = scan_maildir(self.path, self.seen)
        self.seen.update(key for key, _ in found)
        return [data for _, data in found]

    def wait(self, timeout: float) -> bool:
        return self._watcher.wait(timeout)

    def close(self) -> None:
        self._watcher.close()


class ImapSource:
    """New messages of an IMAP mailbox, read-only, through an :class:`ImapWatcher`.

    Connects (and so fails early on a wrong host, password or certificate) when made.
    ``not_before`` moves the first scan past mail received before that day (see
    :func:`imap_start_uid`); without it the first scan reads the whole mailbox.
    """

    def __init__(self, watcher: ImapWatcher, *, not_before: date | None = None) -> None:
        self._watcher = watcher
        self.description = f"IMAP {watcher.target}"
        watcher.connect()
        if not_before is not None:
            try:
                watcher.last_uid = imap_start_uid(watcher, not_before)
            except BaseException:
                watcher.close()
                raise

    def scan(self) -> list[bytes]:
        return self._watcher.fetch_new()

    def wait(self, timeout: float) -> bool:
        return self._watcher.wait(timeout)

    def close(self) -> None:
        self._watcher.close()


def imap_search_date(day: date) -> str:
    """``day`` as an IMAP date (``7-Mar-2026``), independent of the C locale."""
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def imap_start_uid(watcher: ImapWatcher, since: date) -> int:
    """The UID to scan after: just before the first message received on or after ``since``.

    The watcher must be connected (its mailbox EXAMINEd). With no such message, the
    watcher's own start (UIDNEXT - 1 after connecting with ``since_uid=None``) is kept.
    If the search fails, 0: everything is scanned (slower, but nothing is missed).
    """
    uids = watcher.uids_since(imap_search_date(since))
    if uids is None:
        return 0
    if uids:
        return min(uids) - 1
    return watcher.last_uid if watcher.last_uid is not None else 0


def _imap_target(settings: Settings, url: str) -> tuple[ImapTarget, Path | None]:
    """The parsed URL and CA file of an IMAP mailbox, checked without connecting."""
    from mailsh.client.imap_url import parse_imap_url

    target = parse_imap_url(url)
    if settings.imap_password is None:
        raise ConfigError(
            f"reading replies over IMAP ({target}) needs the password of {target.user!r}",
            hint=f"export MAILSH_IMAP_PASSWORD=...   (the IMAP password of {target.user})",
        )
    ca_file = settings.imap_ca_file
    if ca_file is not None:
        ca_file = ca_file.expanduser().absolute()
        if not ca_file.is_file():
            raise ConfigError(
                f"the IMAP CA file {ca_file} does not exist",
                hint="check --imap-ca-file / MAILSH_IMAP_CA_FILE (a PEM file)",
            )
    return target, ca_file


def open_imap(settings: Settings, url: str, *, not_before: datetime | None = None) -> ImapSource:
    """Connect to the IMAP mailbox at ``url`` with the password and CA file of ``settings``."""
    from mailsh.client.imap import ImapWatcher

    target, ca_file = _imap_target(settings, url)
    assert settings.imap_password is not None  # noqa: S101 - checked by _imap_target
    watcher = ImapWatcher(
        target,
        settings.imap_password.get_secret_value(),
        ca_file=ca_file,
        since_uid=None if not_before is not None else 0,
        timeout=settings.imap_timeout,
        poll_interval=settings.imap_poll_interval,
        max_reconnects=settings.imap_max_reconnects,
        max_message_bytes=settings.max_reply_bytes,
    )
    since = None if not_before is None else (not_before - IMAP_SINCE_SLACK).astimezone(UTC).date()
    return ImapSource(watcher, not_before=since)


def mbox_start(path: Path, mark: MboxMark | None) -> int:
    """Where to start scanning ``path``: the send-time mark if provably valid, else 0."""
    from mailsh.client.pending import tail_sha256

    if mark is None or mark.path != str(path.absolute()):
        return 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (mark.device, mark.inode) or st.st_size < mark.offset:
            return 0
        tail = tail_sha256(fd, mark.offset)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return mark.offset if tail == mark.tail_sha256 else 0


@dataclass(frozen=True)
class ReplyMailbox:
    """The one mailbox replies are read from, checked but not yet opened."""

    kind: str  # "mbox", "maildir" or "imap"
    path: Path | None = None
    url: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.url if self.url is not None else self.path}"


def choose_mailbox(
    settings: Settings,
    *,
    mbox: Path | None = None,
    maildir: Path | None = None,
    imap: str | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> ReplyMailbox:
    """The mailbox to read: the one given, else the one in settings; exactly one.

    Everything that can be checked without reading it is checked here (its kind, that it
    exists or can appear, an IMAP URL, password and CA file), so ``send --wait`` can
    refuse before the request leaves rather than after.
    """
    given = [x for x in (mbox, maildir, imap) if x is not None]
    if len(given) > 1:
        raise UsageError("give one mailbox to read: --mbox, --maildir or --imap", hint=MAILBOX_HINT)
    if not given:
        mbox, maildir, imap = settings.reply_mbox, settings.reply_maildir, settings.reply_imap
        if sum(x is not None for x in (mbox, maildir, imap)) != 1:
            raise ConfigError(
                "no mailbox to read replies from"
                if not any((mbox, maildir, imap))
                else "several reply mailboxes are configured; choose one",
                hint=MAILBOX_HINT,
            )
    if imap is not None:
        _imap_target(settings, imap)
        return ReplyMailbox("imap", url=imap)
    if maildir is not None:
        path = maildir.expanduser().absolute()
        if not (path / "new").is_dir():
            raise TransportError(
                f"{path} is not a Maildir (it has no new/ directory)",
                hint=f"check --maildir / MAILSH_REPLY_MAILDIR; or: mkdir -p {path}/{{new,cur,tmp}}",
            )
        return ReplyMailbox("maildir", path=path)
    assert mbox is not None  # noqa: S101 - exactly one of the three is set here
    path = mbox.expanduser().absolute()
    if not path.parent.is_dir():
        raise TransportError(
            f"the mailbox {path} cannot exist: {path.parent} is not a directory",
            hint="check --mbox / MAILSH_REPLY_MBOX",
        )
    if path.exists() and not path.is_file():
        raise TransportError(f"{path} is not an mbox file", hint="check --mbox / MAILSH_REPLY_MBOX")
    if not path.exists() and on_warning is not None:
        on_warning(f"{path} does not exist yet; waiting for it to be created")
    return ReplyMailbox("mbox", path=path)


def open_source(
    settings: Settings,
    record: PendingRequest,
    *,
    mbox: Path | None = None,
    maildir: Path | None = None,
    imap: str | None = None,
    on_warning: Callable[[str], None] | None = None,
    mailbox: ReplyMailbox | None = None,
) -> ReplySource:
    """Open the reply mailbox (``mailbox``, else :func:`choose_mailbox`) for ``record``."""
    if mailbox is None:
        mailbox = choose_mailbox(
            settings, mbox=mbox, maildir=maildir, imap=imap, on_warning=on_warning
        )
    if mailbox.url is not None:
        return open_imap(settings, mailbox.url, not_before=record.created)
    assert mailbox.path is not None  # noqa: S101 - mbox and Maildir have a path
    if mailbox.kind == "maildir":
        return MaildirSource(mailbox.path, not_before=record.created - MAILDIR_SLACK)
    return MboxSource(mailbox.path, start=mbox_start(mailbox.path, record.mbox_mark))
