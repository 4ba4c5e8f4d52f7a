"""Waiting for the one reply to a pending request, in an mbox, a Maildir or over IMAP.

The mailbox is only ever read: nothing is moved, flagged or deleted, and a message that
is not the reply stays where it is. Waiting does not busy-poll: a
:class:`~mailsh.mail.watch.Watcher` (inotify, stat polling as fallback) wakes us when
the mailbox may have changed, and only then is it scanned again. Over IMAP the mailbox is
opened with EXAMINE and read with ``BODY.PEEK[]`` (:class:`~mailsh.client.imap.ImapWatcher`),
and IDLE (NOOP polling where the server has none) does the waking.

Each new message is first checked cheaply (does it look like a mailsh reply to this
request id?), and only such candidates go to :func:`mailsh.seal.open_reply`, which
accepts a reply only when it is signed by the pinned server key of the request, decrypts
cleanly, and answers exactly this request id and payload hash. Every other candidate is
ignored and its reason remembered, so a timeout can say "only invalid replies arrived".

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

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailsh.errors import (
    ConfigError,
    MailshError,
    TransportError,
    TrustError,
    UsageError,
    WaitTimeoutError,
)

if TYPE_CHECKING:
    from mailsh.client.imap import ImapWatcher
    from mailsh.client.imap_url import ImapTarget
    from mailsh.client.pending import MboxMark, PendingRequest
    from mailsh.keys.gpg import Gpg
    from mailsh.keys.trust import TrustStore
    from mailsh.mail.watch import Watcher
    from mailsh.protocol import Notice, Reply
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
REMOTE_FAILURE_STATUS = 255
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class RemoteFailureError(MailshError):
    """The server answered, but did not run the command (rejected, error, unknown)."""


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
    )
    since = None if not_before is None else (not_before - IMAP_SINCE_SLACK).astimezone(UTC).date()
    return ImapSource(watcher, not_before=since)


def mbox_start(path: Path, mark: MboxMark | None) -> int:
    """Where to start scanning ``path``: the send-time mark if provably valid, else 0."""
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
        start = max(0, mark.offset - 4096)
        tail = os.pread(fd, mark.offset - start, start)
    except OSError:
        return 0
    finally:
        os.close(fd)
    return mark.offset if hashlib.sha256(tail).hexdigest() == mark.tail_sha256 else 0


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


def reply_fingerprint(record: PendingRequest, trust: TrustStore) -> str:
    """The pinned key a reply to ``record`` must be signed by."""
    if record.server_fingerprint is not None:
        if not trust.is_pinned(record.server_fingerprint):
            raise TrustError(
                f"the key of {record.to} ({record.server_fingerprint}) is no longer "
                "trusted here, so its reply cannot be verified",
                hint="mailsh trust add SERVER.asc   (if you trust that key again)",
            )
        return record.server_fingerprint
    key = trust.for_address(record.to)
    if key is None:
        raise TrustError(
            f"the request was sent without a trusted key for {record.to}, so no reply "
            "to it can be verified",
            hint=f"mailsh trust add SERVER.asc, then: mailsh wait-reply {record.request_id}",
        )
    return key.fingerprint


def looks_like_reply(raw: bytes, request_id: str) -> bool:
    """Cheap pre-check before gpg runs: a mailsh reply naming this request (or none)."""
    head = raw[:65_536]
    if b"mailsh reply" not in head:
        return False
    return request_id.encode() in head or b"mailsh reply unknown" in head


@dataclass
class ReplyMatcher:
    """Checks candidate messages against one pending request; remembers what failed."""

    gpg: Gpg
    trust: TrustStore
    record: PendingRequest
    server_fingerprint: str
    max_bytes: int
    max_skew: timedelta  # the reply's signature time against this clock
    passphrase: str | None = None
    on_notice: Callable[[Notice], None] | None = None
    ignored: list[str] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    _checked: set[str] = field(default_factory=set)

    def check(self, raw: bytes) -> Reply | None:
        """The reply if ``raw`` is it; None otherwise.

        An invalid candidate's reason is noted in :attr:`ignored`. A valid notice about
        the request (docs/protocol.md section 9) is noted in :attr:`notices` and passed
        to ``on_notice``, but is never the reply: the wait goes on for the outcome.
        """
        from mailsh.errors import GpgError, ProtocolError
        from mailsh.protocol import Notice
        from mailsh.seal import open_answer

        if not looks_like_reply(raw, self.record.request_id):
            return None
        digest = hashlib.sha256(raw).hexdigest()
        if digest in self._checked:  # the same message again (mailbox rewritten)
            return None
        self._checked.add(digest)
        try:
            found = open_answer(
                self.gpg,
                raw,
                trust=self.trust,
                server_fingerprint=self.server_fingerprint,
                request_id=self.record.request_id,
                request_sha256=self.record.payload_sha256,
                now=datetime.now(UTC),
                max_skew=self.max_skew,
                max_bytes=self.max_bytes,
                passphrase=self.passphrase,
            )
        except ProtocolError as exc:
            self.ignored.append(exc.reason)
            return None
        except GpgError:
            self.ignored.append("gpg-error")
            return None
        if isinstance(found, Notice):
            self.notices.append(found)
            if self.on_notice is not None:
                self.on_notice(found)
            return None
        return found


def notice_text(notice: Notice) -> str:
    """One line about a notice (server text made printable)."""
    rid = notice.request_id or "?"
    return _printable(
        f"the server {notice.server} received another copy of request {rid} and did not run "
        f"it; the original was {notice.original.value} then; still waiting for its outcome"
    )


def ignored_summary(reasons: list[str]) -> str:
    """``"2 invalid replies ignored (signer-not-pinned, not-our-reply)"``, or ``""``."""
    if not reasons:
        return ""
    kinds = ", ".join(dict.fromkeys(reasons))
    noun = "reply" if len(reasons) == 1 else "replies"
    return f"{len(reasons)} invalid {noun} ignored ({kinds})"


def wait_for_reply(
    matcher: ReplyMatcher,
    source: ReplySource,
    *,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> Reply:
    """Scan, then wait for changes and scan again, until the reply or ``timeout``."""
    deadline = clock() + timeout
    while True:
        for raw in source.scan():
            reply = matcher.check(raw)
            if reply is not None:
                return reply
        remaining = deadline - clock()
        if remaining <= 0:
            break
        source.wait(remaining)
    raise timeout_error(matcher, source, timeout)


def timeout_error(matcher: ReplyMatcher, source: ReplySource, timeout: float) -> WaitTimeoutError:
    """What a wait that saw no reply says: the usual causes, and how to check each."""
    record = matcher.record
    rid = record.request_id
    message = f"no reply to request {rid} in {source.description} after {timeout:g}s"
    if matcher.ignored:
        message = (
            f"no valid reply to request {rid} in {source.description} after {timeout:g}s, "
            f"only {ignored_summary(matcher.ignored)}"
        )
    if datetime.now(UTC) > record.expires_at:
        message += f"; the request expired at {record.expires_at:%Y-%m-%d %H:%M:%S}Z"
    else:
        message += "; the request may still run"
    if matcher.notices:
        message += (
            f"; the server received a copy of it, and the original was "
            f"{matcher.notices[-1].original.value} then"
        )
    pad = "\n" + " " * 8  # under the text after "  next: "
    hint = pad.join(
        (
            f"mailsh wait-reply {rid}   (wait longer); if no reply ever comes, check:",
            "- does the server trust your key? on the server, `mailsh status` lists",
            "  unknown-key or signer-not-pinned under 'problems', and `mailsh trust list`",
            "  must show your fingerprint (`mailsh keys show` here)",
            "- is serve running? on the server, `mailsh status` shows it under 'serve'",
            f"- do replies land in {source.description}? the server mails them to the",
            "  address pinned with your key (`mailsh trust list` on the server); wait on",
            "  the mailbox it delivers to (--mbox, --maildir, --imap or mailsh.toml)",
        )
    )
    return WaitTimeoutError(message, hint=hint)


def await_reply(
    settings: Settings,
    gpg: Gpg,
    record: PendingRequest,
    *,
    mbox: Path | None = None,
    maildir: Path | None = None,
    imap: str | None = None,
    timeout: float | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_notice: Callable[[Notice], None] | None = None,
    source: ReplySource | None = None,
) -> Reply:
    """Everything ``mailsh wait-reply`` does before printing: find and verify the reply.

    ``source`` is a mailbox opened before the request was sent (``send --wait`` watches
    first, then sends); it is closed here. Notices about the request go to ``on_notice``
    and never end the wait. Marks the pending record answered once the reply is accepted.
    """
    from mailsh.client.pending import PendingStore
    from mailsh.keys.trust import load_trust

    try:
        trust = load_trust(settings.trust_file)
        matcher = ReplyMatcher(
            gpg=gpg,
            trust=trust,
            record=record,
            server_fingerprint=reply_fingerprint(record, trust),
            max_bytes=settings.max_message_bytes,
            max_skew=timedelta(seconds=settings.reply_clock_skew),
            passphrase=settings.passphrase(),
            on_notice=on_notice,
        )
        if source is None:
            source = open_source(
                settings, record, mbox=mbox, maildir=maildir, imap=imap, on_warning=on_warning
            )
        reply = wait_for_reply(
            matcher, source, timeout=settings.wait_timeout if timeout is None else timeout
        )
    finally:
        if source is not None:
            source.close()
    if record.answered_at is None:
        PendingStore(settings.home).mark_answered(record, now=datetime.now(UTC))
    return reply


# -- what the reply means to the caller --------------------------------------------------


def exit_status(reply: Reply) -> int:
    """ssh-like: the remote shell status for a command that ran, else 255."""
    from mailsh.protocol import ReplyStatus

    if reply.status is ReplyStatus.OK:
        return reply.shell_status
    return REMOTE_FAILURE_STATUS


def _printable(text: str) -> str:
    """Server-written text made one printable line (no escape sequences reach a tty)."""
    from mailsh.text import printable_line

    return printable_line(text)


def notes(reply: Reply) -> list[str]:
    """Lines for stderr about a reply whose command ran (time-outs, truncation)."""
    out: list[str] = []
    if reply.timed_out:
        how = f"killed by signal {reply.signal}" if reply.signal is not None else "stopped"
        out.append(
            f"the remote command timed out and was {how}; "
            f"exit status {exit_status(reply)} is what the server reported"
        )
    for stream in ("stdout", "stderr"):
        if getattr(reply, f"{stream}_truncated"):
            out.append(f"the remote {stream} was truncated by the server's output limit")
    return out


def failure(reply: Reply) -> RemoteFailureError | None:
    """The error to report when the server did not run the command; None if it did."""
    from mailsh.protocol import ReplyStatus

    reason = _printable(reply.reason or "no reason given")
    rid = reply.request_id or "?"
    if reply.status is ReplyStatus.REJECTED:
        return RemoteFailureError(
            f"the server {reply.server} rejected request {rid}: {reason}",
            hint="fix what the reason says and send a new request",
        )
    if reply.status is ReplyStatus.ERROR:
        return RemoteFailureError(
            f"the server {reply.server} reported an error for request {rid}: {reason}",
            hint="the reason says whether the command ran; it will not be run again. "
            "Ask the server's operator to look at its log",
        )
    if reply.status is ReplyStatus.OUTCOME_UNKNOWN:
        return RemoteFailureError(
            f"the server {reply.server} was interrupted while running request {rid}; "
            f"the command may or may not have run: {reason}",
            hint="check on the server before sending the command again",
        )
    return None


def reply_json(reply: Reply) -> str:
    """The whole reply as JSON (bytes as base64), plus the derived ``shell_status``."""
    import json

    doc = reply.model_dump(mode="json")
    doc["shell_status"] = exit_status(reply)
    return json.dumps(doc, sort_keys=True)
