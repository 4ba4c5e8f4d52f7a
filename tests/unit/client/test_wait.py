"""mailsh.client.wait: finding and verifying the one reply, with real mailboxes and keys."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import SecretStr

from mailsh.client.imap import ImapWatcher
from mailsh.client.pending import PendingStore
from mailsh.client.send import SentRequest, mbox_mark, prepare_request, submit_request
from mailsh.client.sources import (
    ImapSource,
    MaildirSource,
    imap_search_date,
    imap_start_uid,
    mbox_start,
    open_source,
)
from mailsh.client.wait import (
    RemoteFailureError,
    ReplyMatcher,
    await_reply,
    exit_status,
    failure,
    ignored_summary,
    looks_like_reply,
    notes,
    reply_fingerprint,
    reply_json,
    resumable_wait,
)
from mailsh.errors import (
    ConfigError,
    MailshError,
    TransportError,
    TrustError,
    UsageError,
    WaitTimeoutError,
)
from mailsh.keys.trust import TrustStore, load_trust
from mailsh.protocol import Reply, ReplyStatus
from tests.kit.clientkit import Rig, answer
from tests.kit.homes import Home
from tests.kit.mailbox import drop_maildir, mbox_append
from tests.kit.smtp import Sink


def _send(rig: Rig, sink: Sink, command: str = "id", **changes: object) -> bytes:
    """Send a request; return the request mail the SMTP server received."""
    count = len(sink.messages)
    settings = rig.settings(smtp=sink.url, **changes)
    sent = submit_request(
        settings, prepare_request(settings, rig.client.gpg, command=command, to=rig.server.email)
    )
    sink.wait_for(count + 1)
    raw = sink.messages[count].data
    assert sent.request_id.encode() in raw
    return raw


def _sent(rig: Rig, sink: Sink, **changes: object) -> tuple[SentRequest, bytes]:
    count = len(sink.messages)
    settings = rig.settings(smtp=sink.url, **changes)
    sent = submit_request(
        settings, prepare_request(settings, rig.client.gpg, command="id", to=rig.server.email)
    )
    sink.wait_for(count + 1)
    return sent, sink.messages[count].data


# --------------------------------------------------------------------------- round trips


def test_reply_in_mbox_is_found_verified_and_marked_answered(
    rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    mbox_append(mbox, b"From: someone@else.test\nSubject: unrelated\n\nFrom me, hi\n")
    sent, raw = _sent(rig, sink, reply_mbox=mbox)
    mbox_append(mbox, answer(rig, raw, exit_code=3, stdout=b"out\n", stderr=b"err\n"))
    before = mbox.read_bytes()
    reply = await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=10)
    assert (reply.exit_code, reply.stdout, reply.stderr) == (3, b"out\n", b"err\n")
    assert exit_status(reply) == 3
    assert mbox.read_bytes() == before  # read-only
    assert PendingStore(rig.client.path).load(sent.request_id).answered_at is not None


def test_reply_in_maildir_is_found_and_mailbox_untouched(
    rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    maildir = tmp_path / "Maildir"
    drop_maildir(maildir, b"Subject: noise\n\nnot a reply\n")
    sent, raw = _sent(rig, sink)
    path = drop_maildir(maildir, answer(rig, raw, stdout=b"hello"))
    reply = await_reply(
        rig.settings(reply_maildir=maildir), rig.client.gpg, sent.pending, timeout=10
    )
    assert reply.stdout == b"hello"
    assert path.exists()  # never moved to cur/
    assert sorted(os.listdir(maildir / "cur")) == []


def test_reply_arriving_while_waiting_is_picked_up(rig: Rig, sink: Sink, tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    sent, raw = _sent(rig, sink, reply_mbox=mbox)
    mail = answer(rig, raw, stdout=b"late")
    timer = threading.Timer(0.5, mbox_append, args=(mbox, mail))
    timer.start()
    try:
        reply = await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=60)
    finally:
        timer.join()
    assert reply.stdout == b"late"


def test_reply_in_maildir_arriving_while_waiting(rig: Rig, sink: Sink, tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    drop_maildir(maildir, b"Subject: noise\n\nx\n")
    sent, raw = _sent(rig, sink)
    timer = threading.Timer(0.5, drop_maildir, args=(maildir, answer(rig, raw, stdout=b"m")))
    timer.start()
    try:
        reply = await_reply(
            rig.settings(reply_maildir=maildir), rig.client.gpg, sent.pending, timeout=60
        )
    finally:
        timer.join()
    assert reply.stdout == b"m"


# --------------------------------------------------------------------------- what is ignored


def _flip_one_armor_byte(mail: bytes) -> bytes:
    start = mail.index(b"-----BEGIN PGP MESSAGE-----")
    body = mail.index(b"\r\n\r\n", start) + 4 + 80  # inside the base64 lines
    flipped = b"A" if mail[body : body + 1] != b"A" else b"B"
    return mail[:body] + flipped + mail[body + 1 :]


def test_only_the_genuine_reply_is_accepted_among_forgeries(
    rig: Rig, sink: Sink, tmp_path: Path, mallory_signs: Home
) -> None:
    mbox = tmp_path / "mbox"
    sent, raw = _sent(rig, sink)
    other_raw = _send(rig, sink)
    genuine = answer(rig, raw, stdout=b"genuine")
    mbox_append(mbox, answer(rig, raw, signer=mallory_signs, stdout=b"mallory"))
    mbox_append(mbox, answer(rig, other_raw, stdout=b"other request"))
    mbox_append(
        mbox,  # names our id but hashes another payload
        answer(rig, other_raw, request_id=sent.request_id, stdout=b"wrong hash"),
    )
    mbox_append(mbox, _flip_one_armor_byte(genuine))
    mbox_append(mbox, genuine)
    reply = await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=10)
    assert reply.stdout == b"genuine"


@pytest.mark.parametrize("forgery", ["mallory", "other-request", "tampered"])
def test_only_invalid_replies_time_out_and_say_so(
    rig: Rig, sink: Sink, tmp_path: Path, mallory_signs: Home, forgery: str
) -> None:
    mbox = tmp_path / "mbox"
    sent, raw = _sent(rig, sink)
    if forgery == "mallory":
        mail = answer(rig, raw, signer=mallory_signs)
    elif forgery == "other-request":
        mail = answer(rig, _send(rig, sink), request_id=sent.request_id)
    else:
        mail = _flip_one_armor_byte(answer(rig, raw))
    mbox_append(mbox, mail)
    with pytest.raises(WaitTimeoutError) as err:
        await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=0.3)
    assert "only 1 invalid reply ignored" in err.value.message
    assert err.value.hint is not None
    assert err.value.hint.startswith(f"mailsh wait-reply {sent.request_id}   (wait longer)")
    assert PendingStore(rig.client.path).load(sent.request_id).answered_at is None


def test_timeout_without_any_reply(rig: Rig, sink: Sink, tmp_path: Path) -> None:
    sent, _ = _sent(rig, sink)
    mbox = tmp_path / "mbox"
    mbox_append(mbox, b"Subject: unrelated\n\nhi\n")
    with pytest.raises(WaitTimeoutError) as err:
        await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=0.2)
    assert err.value.message == (
        f"no reply to request {sent.request_id} in mbox {mbox} after 0.2s; "
        "the request may still run"
    )


def test_our_own_request_in_the_mailbox_is_not_counted_as_a_reply(
    rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    sent, raw = _sent(rig, sink)
    mbox_append(mbox, raw)  # e.g. a Bcc to ourselves
    with pytest.raises(WaitTimeoutError) as err:
        await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=0.2)
    assert "invalid" not in err.value.message


def test_looks_like_reply() -> None:
    rid = "ab" * 16
    assert looks_like_reply(f"Subject: mailsh reply {rid} [ok]\n\n".encode(), rid)
    assert looks_like_reply(b"Subject: mailsh reply unknown [rejected]\n\n", rid)
    assert not looks_like_reply(f"Subject: mailsh request {rid}\n\n".encode(), rid)
    assert not looks_like_reply(f"Subject: mailsh reply {'cd' * 16} [ok]\n\n".encode(), rid)


def test_matcher_checks_each_message_once(rig: Rig, sink: Sink) -> None:
    sent, raw = _sent(rig, sink)
    mail = answer(rig, raw)
    trust = load_trust(rig.client.settings.trust_file)
    matcher = ReplyMatcher(
        gpg=rig.client.gpg,
        trust=trust,
        record=sent.pending,
        server_fingerprint=rig.server.fingerprint,
        max_bytes=1 << 20,
        max_skew=timedelta(seconds=rig.client.settings.reply_clock_skew),
    )
    bad = _flip_one_armor_byte(mail)
    assert matcher.check(bad) is None
    assert matcher.check(bad) is None  # the same bytes again (mbox rescanned)
    assert len(matcher.ignored) == 1
    assert matcher.check(mail) is not None


# --------------------------------------------------------------------------- where to look


def test_mbox_start_uses_the_send_time_mark_only_while_valid(tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    mbox_append(mbox, b"Subject: a\n\nold\n")
    mark = mbox_mark(mbox)
    assert mark is not None
    mbox_append(mbox, b"Subject: b\n\nnew\n")
    assert mbox_start(mbox, mark) == mark.offset
    assert mbox_start(tmp_path / "elsewhere", mark) == 0
    # Rewritten in place (same inode) so that the bytes before the mark differ.
    data = mbox.read_bytes()
    with open(mbox, "r+b") as fh:
        fh.write(data.replace(b"old", b"OLD"))
    assert mbox.stat().st_ino == mark.inode
    assert mbox_start(mbox, mark) == 0
    # Replaced by a new file (another inode), even with the same bytes.
    (tmp_path / "copy").write_bytes(data)
    os.replace(tmp_path / "copy", mbox)
    assert mbox.stat().st_ino != mark.inode
    assert mbox_start(mbox, mark) == 0


def test_send_notes_the_mbox_mark_and_the_scan_starts_there(
    rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    mbox_append(mbox, b"Subject: before\n\nold\n")
    size = mbox.stat().st_size
    sent, raw = _sent(rig, sink, reply_mbox=mbox)
    assert sent.pending.mbox_mark is not None
    assert sent.pending.mbox_mark.offset == size
    mbox_append(mbox, answer(rig, raw, stdout=b"after mark"))
    reply = await_reply(rig.settings(reply_mbox=mbox), rig.client.gpg, sent.pending, timeout=10)
    assert reply.stdout == b"after mark"


def test_maildir_files_older_than_the_request_are_not_read(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    old = drop_maildir(maildir, b"Subject: old\n\n")
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    new = drop_maildir(maildir, b"Subject: new\n\n")
    source = MaildirSource(maildir, not_before=datetime.now(UTC) - timedelta(minutes=5))
    try:
        assert source.scan() == [new.read_bytes()]
        assert source.scan() == []
        assert old.name.split(":")[0] in source.seen
    finally:
        source.close()


def test_open_source_errors(rig: Rig, sink: Sink, tmp_path: Path) -> None:
    sent, _ = _sent(rig, sink)
    settings = rig.settings()
    with pytest.raises(ConfigError, match="no mailbox") as err:
        open_source(settings, sent.pending)
    assert err.value.hint is not None
    assert "--mbox PATH" in err.value.hint
    with pytest.raises(UsageError, match="one mailbox"):
        open_source(settings, sent.pending, mbox=tmp_path / "a", maildir=tmp_path / "b")
    with pytest.raises(TransportError, match="not a Maildir"):
        open_source(settings, sent.pending, maildir=tmp_path / "missing")
    with pytest.raises(TransportError, match="is not a directory"):
        open_source(settings, sent.pending, mbox=tmp_path / "no" / "such" / "mbox")
    with pytest.raises(ConfigError, match=r"IMAP .* needs the password of 'me'") as err:
        open_source(settings, sent.pending, imap="imaps://me@imap.test")
    assert err.value.hint is not None
    assert err.value.hint.startswith("export MAILSH_IMAP_PASSWORD=")
    with pytest.raises(ConfigError, match="several"):
        open_source(
            settings.model_copy(update={"reply_mbox": tmp_path / "a", "reply_imap": "imap://x"}),
            sent.pending,
        )
    warnings: list[str] = []
    source = open_source(
        settings.model_copy(update={"reply_mbox": tmp_path / "later"}),
        sent.pending,
        on_warning=warnings.append,
    )
    source.close()
    assert warnings == [f"{tmp_path / 'later'} does not exist yet; waiting for it to be created"]


def test_reply_fingerprint_needs_a_pinned_server_key(rig: Rig, sink: Sink) -> None:
    sent, _ = _sent(rig, sink)
    trust = load_trust(rig.client.settings.trust_file)
    assert reply_fingerprint(sent.pending, trust) == rig.server.fingerprint
    with pytest.raises(TrustError, match="no longer"):
        reply_fingerprint(sent.pending, TrustStore())
    unbound = dataclasses.replace(sent.pending, server_fingerprint=None)
    assert reply_fingerprint(unbound, trust) == rig.server.fingerprint  # pinned since
    with pytest.raises(TrustError, match="can be verified") as err:
        reply_fingerprint(unbound, TrustStore())
    assert err.value.hint is not None
    assert "mailsh trust add" in err.value.hint


# --------------------------------------------------------------------------- meaning


def _reply(**fields: object) -> Reply:
    return Reply.model_validate(
        {
            "request_id": "ab" * 16,
            "request_sha256": "0" * 64,
            "server": "root@server.test",
            **fields,
        }
    )


def test_exit_status_and_notes() -> None:
    assert exit_status(_reply(status="ok", exit_code=0)) == 0
    assert exit_status(_reply(status="ok", exit_code=3)) == 3
    assert exit_status(_reply(status="ok", signal=9)) == 137
    killed = _reply(status="ok", signal=9, timed_out=True, stdout_truncated=True)
    assert exit_status(killed) == 137
    assert notes(killed) == [
        "the remote command timed out and was killed by signal 9; "
        "exit status 137 is what the server reported",
        "the remote stdout was truncated by the server's output limit",
    ]
    assert notes(_reply(status="ok", exit_code=0)) == []
    for status in ("rejected", "error", "outcome-unknown"):
        assert exit_status(_reply(status=status)) == 255


def test_failure_messages_are_one_printable_line() -> None:
    assert failure(_reply(status="ok", exit_code=1)) is None
    err = failure(_reply(status="rejected", reason="replayed\x1b[31m request\nagain"))
    assert isinstance(err, RemoteFailureError)
    assert err.message.endswith("rejected request " + "ab" * 16 + ": replayed [31m request again")
    assert "\n" not in err.message
    unknown = failure(_reply(status="outcome-unknown"))
    assert unknown is not None
    assert unknown.hint is not None
    assert "check on the server" in unknown.hint
    assert failure(_reply(status=ReplyStatus.ERROR, reason="no such user")) is not None


def test_reply_json_has_base64_bytes_and_shell_status() -> None:
    doc = json.loads(reply_json(_reply(status="ok", signal=9, stdout=b"\x00\xff")))
    assert base64.b64decode(doc["stdout"]) == b"\x00\xff"
    assert doc["shell_status"] == 137
    assert doc["status"] == "ok"


def test_ignored_summary() -> None:
    assert ignored_summary([]) == ""
    assert ignored_summary(["a"]) == "1 invalid reply ignored (a)"
    assert ignored_summary(["a", "b", "a"]) == "3 invalid replies ignored (a, b)"


def test_resumable_wait_names_the_request_and_how_to_go_on_waiting(rig: Rig, sink: Sink) -> None:
    sent, _ = _sent(rig, sink)
    rid = sent.request_id
    with pytest.raises(MailshError) as err, resumable_wait(sent.pending):
        raise KeyboardInterrupt
    assert err.value.message.startswith(f"interrupted while waiting for the reply to {rid}")
    assert err.value.hint == f"check later with: mailsh wait-reply {rid}"
    with pytest.raises(TransportError), resumable_wait(sent.pending):  # wait-reply: as is
        raise TransportError("no mailbox", hint="fix it")
    with pytest.raises(MailshError) as err, resumable_wait(sent.pending, sent=True):
        raise TransportError("no mailbox", hint="fix it")
    assert err.value.message == (
        f"request {rid} was sent and may run, but waiting for its reply failed: no mailbox"
    )
    assert err.value.hint == f"fix it; then: mailsh wait-reply {rid}"
    timeout = WaitTimeoutError("no reply")
    with pytest.raises(WaitTimeoutError) as caught, resumable_wait(sent.pending, sent=True):
        raise timeout
    assert caught.value is timeout  # already says both
    with pytest.raises(MailshError) as err, resumable_wait(sent.pending, sent=True):
        raise OSError(5, "Input/output error")  # not a MailshError: the id is still said
    assert err.value.message.startswith(f"request {rid} was sent and may run")
    assert "OSError" in err.value.message
    assert err.value.hint is not None and f"mailsh wait-reply {rid}" in err.value.hint
    with pytest.raises(OSError), resumable_wait(sent.pending):  # wait-reply: as is
        raise OSError(5, "Input/output error")


# --------------------------------------------------------------------------- IMAP


class _FakeImapConn:
    def __init__(self, answer: tuple[str, list[Any]] | BaseException) -> None:
        self.answer = answer
        self.calls: list[tuple[str, ...]] = []

    def uid(self, *args: str) -> tuple[str, list[Any]]:
        self.calls.append(args)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class _FakeWatcher:
    """Stands in for ImapWatcher: records what ImapSource does with it."""

    target = "imap://me@imap.test:143/INBOX"

    def __init__(self, conn: _FakeImapConn, last_uid: int | None = 41) -> None:
        self.conn = conn
        self.last_uid = last_uid
        self.events: list[str] = []

    def _conn(self) -> _FakeImapConn:
        return self.conn

    # The real search, run on the fake connection: its fallbacks are what is tested.
    uids_since = ImapWatcher.uids_since

    def connect(self) -> None:
        self.events.append("connect")

    def fetch_new(self) -> list[bytes]:
        self.events.append("fetch")
        return [b"m"]

    def wait(self, timeout: float) -> bool:
        self.events.append(f"wait {timeout:g}")
        return True

    def close(self) -> None:
        self.events.append("close")


def test_imap_search_date_is_locale_independent() -> None:
    assert imap_search_date(date(2026, 3, 7)) == "7-Mar-2026"
    assert imap_search_date(date(2025, 12, 31)) == "31-Dec-2025"


def test_imap_start_uid_is_just_before_the_first_recent_message() -> None:
    conn = _FakeImapConn(("OK", [b"17 23 19"]))
    watcher = _FakeWatcher(conn)
    assert imap_start_uid(cast(Any, watcher), date(2026, 3, 7)) == 16
    assert conn.calls == [("SEARCH", "SINCE", "7-Mar-2026")]
    # nothing that recent: keep the watcher's own start (UIDNEXT - 1)
    assert imap_start_uid(cast(Any, _FakeWatcher(_FakeImapConn(("OK", [b""])))), date.today()) == 41


def test_imap_start_uid_falls_back_to_everything_when_search_fails() -> None:
    """Regression guard: a failed SEARCH must never skip a reply (scan all instead)."""
    import imaplib

    for result in (("NO", [b"nope"]), imaplib.IMAP4.error("BAD"), OSError("reset")):
        watcher = _FakeWatcher(_FakeImapConn(result))
        assert imap_start_uid(cast(Any, watcher), date.today()) == 0


def test_imap_source_connects_scans_waits_and_closes() -> None:
    watcher = _FakeWatcher(_FakeImapConn(("OK", [b"5"])))
    source = ImapSource(cast(Any, watcher), not_before=date(2026, 1, 2))
    assert watcher.last_uid == 4
    assert source.description == "IMAP imap://me@imap.test:143/INBOX"
    assert source.scan() == [b"m"]
    assert source.wait(2.5) is True
    source.close()
    assert watcher.events == ["connect", "fetch", "wait 2.5", "close"]


def test_open_source_imap_checks_url_and_ca_file_before_connecting(
    rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    sent, _ = _sent(rig, sink)
    settings = rig.settings().model_copy(update={"imap_password": SecretStr("pw")})
    with pytest.raises(UsageError, match="bad IMAP URL"):
        open_source(settings, sent.pending, imap="imap://imap.test")
    missing = tmp_path / "no-ca.pem"
    with pytest.raises(ConfigError, match=r"CA file .* does not exist") as err:
        open_source(
            settings.model_copy(update={"imap_ca_file": missing}),
            sent.pending,
            imap="imaps://me@127.0.0.1:1",
        )
    assert err.value.hint is not None
    assert "--imap-ca-file" in err.value.hint
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(TransportError, match="cannot load the IMAP CA file"):
        open_source(
            settings.model_copy(update={"imap_ca_file": bad}),
            sent.pending,
            imap="imaps://me@127.0.0.1:1",
        )
