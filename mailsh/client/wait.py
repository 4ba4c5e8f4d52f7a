"""Waiting for the one reply to a pending request, and what that reply means to the caller.

The reply mailbox is a :class:`~mailsh.client.sources.ReplySource` (an mbox, a Maildir
or an IMAP mailbox, read-only; see :mod:`mailsh.client.sources`): it is scanned, then
waited on until it may have changed, then scanned again, until the reply or the timeout.

Each new message is first checked cheaply (does it look like a mailsh reply to this
request id?), and only such candidates go to :func:`mailsh.seal.open_answer`, which
accepts a reply only when it is signed by the pinned server key of the request, decrypts
cleanly, and answers exactly this request id and payload hash. Every other candidate is
ignored and its reason remembered, so a timeout can say "only invalid replies arrived".
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from mailsh.errors import MailshError, TrustError, WaitTimeoutError

if TYPE_CHECKING:
    from mailsh.client.pending import PendingRequest
    from mailsh.client.sources import ReplySource
    from mailsh.keys.gpg import Gpg
    from mailsh.keys.trust import TrustStore
    from mailsh.protocol import Notice, Reply
    from mailsh.settings import Settings

REMOTE_FAILURE_STATUS = 255


class RemoteFailureError(MailshError):
    """The server answered, but did not run the command (rejected, error, unknown)."""


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
    timeout: float | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_notice: Callable[[Notice], None] | None = None,
    source: ReplySource | None = None,
) -> Reply:
    """Everything ``mailsh wait-reply`` does before printing: find and verify the reply.

    ``source`` is a mailbox opened before the request was sent (``send --wait`` watches
    first, then sends); without it the reply mailbox of ``settings`` is opened here
    (:func:`~mailsh.client.sources.open_source`, warnings to ``on_warning``). The source
    is closed here. Notices about the request go to ``on_notice`` and never end the
    wait. Marks the pending record answered once the reply is accepted.
    """
    from mailsh.client.pending import PendingStore
    from mailsh.client.sources import open_source
    from mailsh.keys.trust import load_trust

    try:
        trust = load_trust(settings.trust_file)
        matcher = ReplyMatcher(
            gpg=gpg,
            trust=trust,
            record=record,
            server_fingerprint=reply_fingerprint(record, trust),
            max_bytes=settings.max_reply_bytes,
            max_skew=timedelta(seconds=settings.reply_clock_skew),
            passphrase=settings.passphrase(),
            on_notice=on_notice,
        )
        if source is None:
            source = open_source(settings, record, on_warning=on_warning)
        reply = wait_for_reply(
            matcher, source, timeout=settings.wait_timeout if timeout is None else timeout
        )
    finally:
        if source is not None:
            source.close()
    if record.answered_at is None:
        PendingStore(settings.home).mark_answered(record, now=datetime.now(UTC))
    return reply


@contextlib.contextmanager
def resumable_wait(record: PendingRequest, *, sent: bool = False) -> Iterator[None]:
    """Around a wait the user can take up again with ``mailsh wait-reply ID``.

    An interruption says the request may still run and how to go on waiting. With
    ``sent`` (``send --wait``: the request left moments ago) any other failure of the
    wait itself says so too, so the request id is never lost, even when stderr is not a
    terminal; a timeout already says both.
    """
    rid = record.request_id
    try:
        yield
    except KeyboardInterrupt:
        raise MailshError(
            f"interrupted while waiting for the reply to {rid}; the request may still run",
            hint=f"check later with: mailsh wait-reply {rid}",
        ) from None
    except MailshError as exc:
        if not sent or isinstance(exc, WaitTimeoutError):
            raise
        raise MailshError(
            f"request {rid} was sent and may run, but waiting for its reply failed: {exc.message}",
            hint=f"{exc.hint + '; then: ' if exc.hint else ''}mailsh wait-reply {rid}",
        ) from exc
    except Exception as exc:  # unexpected (an OSError of the mailbox, a bug): keep the id
        if not sent:
            raise
        raise MailshError(
            f"request {rid} was sent and may run, but waiting for its reply failed: "
            f"{type(exc).__name__}: {exc}",
            hint=f"mailsh wait-reply {rid} (--debug shows where it failed)",
        ) from exc


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
