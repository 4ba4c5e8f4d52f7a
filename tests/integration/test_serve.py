"""mailsh serve end to end with real gpg, real files, real SMTP on 127.0.0.1.

Each test runs the real Server (in-process, ``--once`` or in a thread) against a real
mbox / Maildir / embedded SMTP listener, and the replies land in a real SMTP sink.
"""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailsh.protocol import OriginalState, ReplyStatus
from mailsh.server.daemon import ServeOptions, Server
from mailsh.server.state import MessageState, StateDB
from tests.kit.homes import Home, pair
from tests.kit.mailbox import mbox_append
from tests.kit.serverkit import (
    listening_port,
    notices_for,
    open_reply,
    replies_for,
    request,
    server_settings,
)
from tests.kit.smtp import Sink


def serve_once(home: Home, sink: Sink, tmp_path: Path, **options: object) -> Server:
    settings = server_settings(home, sink, workdir=tmp_path, poll_interval=0.2)
    server = Server(settings, ServeOptions(once=True, **options))  # type: ignore[arg-type]
    server.run()
    return server


def test_mbox_request_runs_once_and_gets_signed_encrypted_reply(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, "echo hello; echo oops >&2; exit 3", stdin=None)
    mbox_append(mbox, sealed.mail)
    serve_once(srv, sink, tmp_path, mboxes=[mbox])

    assert mbox.read_bytes() == b""  # taken out of the mbox
    [msg] = sink.messages
    assert msg.rcpt_tos == ["alice@example.org"]
    assert b"Auto-Submitted: auto-replied" in msg.data
    assert b"-----BEGIN PGP MESSAGE-----" in msg.data
    assert b"hello" not in msg.data  # encrypted: the output is not in clear
    reply = open_reply(alice, srv, sealed, msg.data)
    assert reply.status is ReplyStatus.OK
    assert reply.exit_code == 3
    assert reply.stdout == b"hello\n"
    assert reply.stderr == b"oops\n"


def test_binary_stdin_and_output_byte_exact(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "root.mbox"
    payload = bytes(range(256)) * 3
    sealed = request(alice, srv, "cat; printf '\\000\\377'", stdin=payload)
    mbox_append(mbox, sealed.mail)
    serve_once(srv, sink, tmp_path, mboxes=[mbox])
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.stdout == payload + b"\x00\xff"


def test_replay_runs_once_even_rewrapped(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    """Copies (duplicate delivery, re-wrapped replay) never run and never get a second
    outcome: one ``ok`` reply, one notice for the first copy, nothing for the next."""
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, f"echo x >> {marker}")
    head, _, body = sealed.mail.partition(b"\r\n\r\n")
    rewrapped = (
        head.replace(b"Message-ID: <", b"Message-ID: <other.").replace(
            b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: base64"
        )
        + b"\r\n\r\n"
        + base64.encodebytes(body)
    )
    mbox_append(mbox, sealed.mail, sealed.mail, rewrapped)
    serve_once(srv, sink, tmp_path, mboxes=[mbox])

    assert marker.read_text() == "x\n"  # ran exactly once
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.status is ReplyStatus.OK
    [notice] = notices_for(alice, srv, sealed, sink)
    assert notice.original is OriginalState.FINISHED
    assert notice.request_id == sealed.request.request_id
    assert len(sink.messages) == 2
    counts = StateDB(srv.settings.state_db).report.counts()
    assert (counts["replied"], counts["duplicate"]) == (1, 2)


def test_unauthenticated_and_forged_mail_get_no_reply(
    alice: Home, mallory: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    # mallory's key is good but not pinned; she has the (public) server key and forges
    # alice's From.
    mallory.gpg.raw.import_keys(srv.pubkey.read_text())
    forged = request(mallory, srv, f"touch {marker}").mail.replace(
        b"From: mallory@evil.test", b"From: alice@example.org"
    )
    junk = b"From: x@y\r\nSubject: hi\r\n\r\nnot a request\r\n"
    bounce = b"Return-Path: <>\r\nFrom: MAILER-DAEMON@x\r\n\r\nbounce\r\n"
    mbox_append(mbox, forged, junk, bounce)
    serve_once(srv, sink, tmp_path, mboxes=[mbox])
    assert not marker.exists()
    assert sink.messages == []
    counts = StateDB(srv.settings.state_db).report.counts()
    assert counts.get("discarded") == 3


def test_reply_goes_to_pinned_address_not_from(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, "true")
    mail = sealed.mail.replace(b"From: alice@example.org", b"From: victim@elsewhere.test")
    mail = mail.replace(b"\r\n\r\n", b"\r\nReply-To: victim@elsewhere.test\r\n\r\n", 1)
    mbox_append(mbox, mail)
    serve_once(srv, sink, tmp_path, mboxes=[mbox])
    [msg] = sink.messages
    assert msg.rcpt_tos == ["alice@example.org"]
    assert b"victim" not in msg.data  # no header value copied from the request


def test_wrong_audience_is_rejected_and_signer_told(
    alice: Home, srv: Home, make_home: Callable[..., Home], sink: Sink, tmp_path: Path
) -> None:
    other = make_home("root@other.test", address="root@other.test")
    pair(alice, other)
    marker = tmp_path / "ran"
    # A signed-only request for another server, captured and replayed here (P6). (Had it
    # been encrypted to the other server, this one could not even read it.)
    sealed = request(alice, other, f"touch {marker}", encrypt=False)
    mbox = tmp_path / "root.mbox"
    mbox_append(mbox, sealed.mail.replace(b"To: root@other.test", b"To: root@server.test"))
    serve_once(srv, sink, tmp_path, mboxes=[mbox])
    assert not marker.exists()
    [msg] = sink.messages
    assert msg.rcpt_tos == ["alice@example.org"]
    reply = open_reply(alice, srv, sealed, msg.data)
    assert reply.status is ReplyStatus.REJECTED
    assert "wrong-audience" in (reply.reason or "")


def test_maildir_intake(alice: Home, srv: Home, sink: Sink, tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    sealed = request(alice, srv, "echo from-maildir")
    (maildir / "new" / "1.test").write_bytes(sealed.mail)
    serve_once(srv, sink, tmp_path, maildirs=[maildir])
    assert os.listdir(maildir / "new") == []
    assert len(os.listdir(maildir / "cur")) == 1
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.stdout == b"from-maildir\n"


def test_timeout_and_output_cap_reported(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "root.mbox"
    slow = request(alice, srv, "echo started; sleep 30", timeout=1)
    flood = request(alice, srv, "head -c 5000000 /dev/zero", max_output_bytes=1000)
    mbox_append(mbox, slow.mail, flood.mail)
    serve_once(srv, sink, tmp_path, mboxes=[mbox])
    [r_slow] = replies_for(alice, srv, slow, sink)
    assert r_slow.timed_out
    assert r_slow.stdout == b"started\n"
    [r_flood] = replies_for(alice, srv, flood, sink)
    assert r_flood.stdout_truncated
    assert len(r_flood.stdout) == 1000


def test_smtp_listener_intake_while_running(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    settings = server_settings(srv, sink, workdir=tmp_path, poll_interval=0.2)
    server = Server(settings, ServeOptions(smtp_listen=("127.0.0.1", 0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = listening_port(server)
        sealed = request(alice, srv, "echo via-smtp")
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("alice@example.org", ["root@server.test"], sealed.mail)
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("alice@example.org", ["someone@else.test"], sealed.mail)
        sink.wait_for(1)
        [reply] = replies_for(alice, srv, sealed, sink)
        assert reply.stdout == b"via-smtp\n"
    finally:
        server.request_stop()
        thread.join(30)
    assert not thread.is_alive()


def test_sigkill_during_command_reports_outcome_unknown_and_never_reruns(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, f"echo x >> {marker}; sleep 60")
    mbox_append(mbox, sealed.mail)
    env = {**os.environ, "MAILSH_HOME": str(srv.path), "MAILSH_SMTP": sink.url}
    cmd = [sys.executable, "-m", "mailsh", "serve", "--mbox", str(mbox), "--workdir", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the command never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    subprocess.run([*cmd, "--once"], env=env, stdin=subprocess.DEVNULL, check=True, timeout=120)
    assert marker.read_text() == "x\n"  # not run again after the restart
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.status is ReplyStatus.OUTCOME_UNKNOWN
    state = StateDB(srv.settings.state_db)
    assert state.report.counts().get(MessageState.OUTCOME_UNKNOWN.value) == 1


def test_dependency_floor_is_checked_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """P12: an aiosmtpd older than 1.4.6 refuses --smtp-listen."""
    import importlib.metadata

    from mailsh.errors import DependencyError
    from mailsh.server.daemon import check_dependencies

    check_dependencies(smtp_listener=True)  # the installed versions pass
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.4.5")
    with pytest.raises(DependencyError, match=r"1\.4\.6"):
        check_dependencies(smtp_listener=True)
