"""ImapWatcher against the rig's real Dovecot: IDLE, NOOP polling, reconnects, read-only."""

from __future__ import annotations

import imaplib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mailsh.client.imap import ImapLoginError, ImapTarget, ImapWatcher, TlsMode
from mailsh.errors import TransportError
from tests.kit.mailrig import (
    MailRig,
    MailUser,
    build_message,
    contains,
    submit,
    unique_token,
    wait_for_message,
)

pytestmark = pytest.mark.mailrig

Cleanup = Callable[[Path, str], None]
WAKE_TIMEOUT = 60.0


def make_watcher(rig: MailRig, user: MailUser, tls: TlsMode, **kwargs: Any) -> ImapWatcher:
    port = rig.imaps_port if tls is TlsMode.IMPLICIT else rig.imap_port
    target = ImapTarget(rig.host, port, user.name, tls=tls)
    return ImapWatcher(target, user.password, ca_file=rig.ca_file, **kwargs)


def mailbox_of(rig: MailRig, user: MailUser) -> Path:
    return rig.bob_maildir if user == rig.bob else rig.alice_mbox


def deliver(rig: MailRig, user: MailUser, token: str, body: str = "reply body\n") -> bytes:
    raw = build_message(sender=rig.root_address, to=user.address, subject=token, body=body)
    submit(rig, raw, to=[user.address])
    return raw


@contextmanager
def deliver_later(rig: MailRig, user: MailUser, token: str, delay: float) -> Iterator[list[bytes]]:
    """Deliver from a thread after ``delay`` s; yields a list that receives the raw bytes."""
    sent: list[bytes] = []
    thread = threading.Timer(delay, lambda: sent.append(deliver(rig, user, token)))
    thread.start()
    try:
        yield sent
    finally:
        thread.join(30)


def wait_for_token(watcher: ImapWatcher, token: str, timeout: float = WAKE_TIMEOUT) -> bytes:
    """wait() + fetch_new() until the token's message comes; every wake must be a real one."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{token} never arrived"
        woke = watcher.wait(remaining)
        assert woke, "wait() returned by timeout, not because the server announced mail"
        found = [m for m in watcher.fetch_new() if token.encode() in m]
        if found:
            assert len(found) == 1
            return found[0]


@pytest.mark.parametrize(
    ("who", "tls"),
    [("bob", TlsMode.STARTTLS), ("alice", TlsMode.IMPLICIT), ("bob", TlsMode.NONE)],
)
def test_idle_wakes_on_delivery_and_fetches_exact_bytes_once(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
    who: str,
    tls: TlsMode,
) -> None:
    user = mailrig.bob if who == "bob" else mailrig.alice
    token = unique_token()
    cleanup_messages(mailbox_of(mailrig, user), token)
    with make_watcher(mailrig, user, tls, since_uid=None) as watcher:
        assert watcher.idle_supported
        assert all(token.encode() not in m for m in watcher.fetch_new())
        started = time.monotonic()
        with deliver_later(mailrig, user, token, delay=1.0) as sent:
            message = wait_for_token(watcher, token)
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"IDLE took {elapsed:.1f} s"
        # Postfix prepends Return-Path/Delivered-To/Received; the rest is byte-exact (CRLF).
        assert message.endswith(sent[0])
        assert all(token.encode() not in m for m in watcher.fetch_new())


def test_since_uid_zero_returns_existing_messages(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    user = mailrig.bob
    token = unique_token()
    cleanup_messages(mailbox_of(mailrig, user), token)
    raw = deliver(mailrig, user, token)
    wait_for_message(mailbox_of(mailrig, user), contains(token))
    with make_watcher(mailrig, user, TlsMode.STARTTLS, since_uid=0) as watcher:
        found = [m for m in watcher.fetch_new() if token.encode() in m]
        assert len(found) == 1 and found[0].endswith(raw)
    with make_watcher(mailrig, user, TlsMode.STARTTLS, since_uid=None) as watcher:
        assert all(token.encode() not in m for m in watcher.fetch_new())


def test_messages_stay_unseen_and_undeleted(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    user = mailrig.bob
    token = unique_token()
    cleanup_messages(mailbox_of(mailrig, user), token)
    deliver(mailrig, user, token)
    wait_for_message(mailbox_of(mailrig, user), contains(token))
    with make_watcher(mailrig, user, TlsMode.STARTTLS, since_uid=0) as watcher:
        assert any(token.encode() in m for m in watcher.fetch_new())
    imap = imaplib.IMAP4(mailrig.host, mailrig.imap_port, timeout=30)
    try:
        imap.starttls(ssl_context=mailrig.ssl_context())
        imap.login(user.name, user.password)
        imap.select("INBOX", readonly=True)
        status, data = imap.uid("SEARCH", "SUBJECT", token)
        assert status == "OK"
        uids = data[0].split() if isinstance(data[0], bytes) else []
        assert len(uids) == 1
        status, data = imap.uid("FETCH", uids[0].decode(), "(FLAGS)")
        assert status == "OK"
        flags = data[0] if isinstance(data[0], bytes) else b""
        assert b"\\Seen" not in flags
        assert b"\\Deleted" not in flags
    finally:
        imap.logout()


def test_wrong_password_is_a_transport_error_and_does_not_slow_later_logins(
    mailrig: MailRig,
) -> None:
    target = ImapTarget(mailrig.host, mailrig.imap_port, mailrig.bob.name)
    with pytest.raises(ImapLoginError) as caught:
        ImapWatcher(target, "wrong-password", ca_file=mailrig.ca_file).connect()
    assert isinstance(caught.value, TransportError)
    assert "wrong-password" not in str(caught.value)
    assert "MAILSH_IMAP_PASSWORD" in (caught.value.hint or "")
    started = time.monotonic()
    with make_watcher(mailrig, mailrig.bob, TlsMode.STARTTLS):
        pass
    assert time.monotonic() - started < 2.0


def test_untrusted_certificate_is_a_transport_error_with_a_hint(
    mailrig: MailRig,
) -> None:
    target = ImapTarget(mailrig.host, mailrig.imap_port, mailrig.bob.name)
    with pytest.raises(TransportError) as caught:
        ImapWatcher(target, mailrig.bob.password).connect()  # system CAs only
    assert "certificate" in caught.value.message
    assert "CA file" in (caught.value.hint or "")


def test_connection_refused_is_a_transport_error(mailrig: MailRig) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = ImapTarget("127.0.0.1", port, "bob")
    with pytest.raises(TransportError) as caught:
        ImapWatcher(target, "x").connect()
    assert "cannot connect" in caught.value.message


def server_process_of(client: socket.socket) -> int:
    """The Dovecot process holding the server end of ``client``'s TCP connection.

    Found through /proc so that only this connection is killed: ``doveadm kick USER``
    would also drop every other session of USER (other xdist workers' tests).
    """
    local_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    wanted = f"0100007F:{server_port:04X} 0100007F:{local_port:04X}"
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if f"{fields[1]} {fields[2]}" == wanted:
            inode = fields[9]
    assert inode, "server end of the connection not found in /proc/net/tcp"
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
        except OSError:
            continue
    raise AssertionError(f"no process holds socket inode {inode}")


def kill_server_side(watcher: ImapWatcher) -> None:
    assert watcher._imap is not None
    os.kill(server_process_of(watcher._imap.sock), signal.SIGKILL)


def test_reconnects_after_the_server_process_dies_during_idle(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    user = mailrig.alice
    token = unique_token()
    cleanup_messages(mailbox_of(mailrig, user), token)
    with make_watcher(mailrig, user, TlsMode.STARTTLS, since_uid=None, backoff=0.2) as watcher:
        watcher.fetch_new()
        kicker = threading.Timer(1.0, kill_server_side, args=(watcher,))
        kicker.start()
        started = time.monotonic()
        woke = watcher.wait(WAKE_TIMEOUT)
        kicker.join(30)
        assert woke, "a reconnect must wake the caller (mail may have come meanwhile)"
        assert time.monotonic() - started < 20
        assert watcher.reconnects == 1
        # Mail delivered while the watcher is reconnected is still found, once.
        with deliver_later(mailrig, user, token, delay=0.5):
            wait_for_token(watcher, token)


def test_reconnects_when_the_socket_dies_before_a_command(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    user = mailrig.bob
    token = unique_token()
    cleanup_messages(mailbox_of(mailrig, user), token)
    with make_watcher(mailrig, user, TlsMode.STARTTLS, since_uid=None, backoff=0.2) as watcher:
        watcher.fetch_new()
        raw = deliver(mailrig, user, token)
        wait_for_message(mailbox_of(mailrig, user), contains(token))
        assert watcher._imap is not None
        watcher._imap.sock.shutdown(socket.SHUT_RDWR)  # the network drops the connection
        found = [m for m in watcher.fetch_new() if token.encode() in m]
        assert watcher.reconnects == 1
        assert len(found) == 1 and found[0].endswith(raw)


def test_gives_up_after_bounded_reconnects(mailrig: MailRig) -> None:
    with make_watcher(
        mailrig, mailrig.bob, TlsMode.STARTTLS, max_reconnects=2, backoff=0.05
    ) as watcher:
        # Point the watcher at a closed port, then drop its connection.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        watcher.target = ImapTarget("127.0.0.1", port, "bob")
        assert watcher._imap is not None
        watcher._imap.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(TransportError) as caught:
            watcher.fetch_new()
        assert "2 reconnects failed" in caught.value.message


def test_noop_polling_when_idle_is_not_used(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    user = mailrig.bob
    token = unique_token()
    cleanup_messages(mailbox_of(mailrig, user), token)
    with make_watcher(
        mailrig, user, TlsMode.STARTTLS, since_uid=None, use_idle=False, poll_interval=0.3
    ) as watcher:
        assert not watcher.idle_supported
        watcher.fetch_new()
        started = time.monotonic()
        with deliver_later(mailrig, user, token, delay=0.5) as sent:
            message = wait_for_token(watcher, token)
        assert message.endswith(sent[0])
        assert time.monotonic() - started < 30


def test_wait_times_out_without_mail(mailrig: MailRig) -> None:
    # alice's mailbox only gets mail from tests that target her; a short quiet window.
    with make_watcher(mailrig, mailrig.alice, TlsMode.STARTTLS, since_uid=None) as watcher:
        watcher.fetch_new()
        started = time.monotonic()
        woke = watcher.wait(1.5)
        elapsed = time.monotonic() - started
        if not woke:
            assert 1.4 < elapsed < 5
