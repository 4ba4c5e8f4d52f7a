"""Listener limits (docs/server.md "Listener limits", P11): real sockets on 127.0.0.0/8.

Linux routes all of 127.0.0.0/8 to the loopback interface, so binding a client socket to
127.0.0.2, 127.0.0.3, ... gives real, distinct peer addresses without any set-up.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from mailsh.server.intake.smtp import SmtpListener
from mailsh.server.intake.smtp_limits import SmtpLimits, peer_key
from mailsh.server.spool import Spool
from mailsh.settings import load_settings

OURS = "run@mailsh.test"
MESSAGE = b"From: a@client.test\r\nTo: run@mailsh.test\r\nSubject: x\r\n\r\nbody\r\n"
BACKSTOP = 30.0  # socket timeout: a broken limit shows up as a failure, never a hang


def _listener(spool: Spool, **limits: float) -> SmtpListener:
    return SmtpListener(
        host="127.0.0.1",
        port=0,
        spool=spool,
        accept=lambda address: address.lower() == OURS,
        hostname="mx.mailsh.test",
        limits=SmtpLimits(**limits),  # type: ignore[arg-type]
    )


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=BACKSTOP, source_address=(source, 0)
    )
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    """Everything up to and including the first complete reply line ('' at EOF)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _until_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_one_peer_flooding_does_not_lock_out_the_others(spool: Spool, stack: ExitStack) -> None:
    listener = stack.enter_context(_listener(spool, max_sessions=5, max_sessions_per_peer=2))
    flood = [stack.enter_context(_connect(listener.port)) for _ in range(2)]
    for sock in flood:
        assert _read_reply(sock).startswith(b"220 ")
    # The flooding peer's next connections are answered 421 and closed at once ...
    for _ in range(3):
        with _connect(listener.port) as extra:
            answer = _until_eof(extra)
        assert answer.startswith(b"421 4.7.0 mx.mailsh.test too many connections from your")
    # ... while another address is served normally, message and all.
    with smtplib.SMTP(
        "127.0.0.1", listener.port, timeout=BACKSTOP, source_address=("127.0.0.2", 0)
    ) as client:
        client.sendmail("a@client.test", [OURS], MESSAGE)
    assert len(spool.pending()) == 1
    # Closing a session frees its slot for the same peer.
    flood.pop().close()
    deadline = time.monotonic() + BACKSTOP
    while True:  # the listener notices the close asynchronously
        with _connect(listener.port) as again:
            answer = _read_reply(again)
        if answer.startswith(b"220 ") or time.monotonic() > deadline:
            break
    assert answer.startswith(b"220 ")


def test_total_session_cap(spool: Spool, stack: ExitStack) -> None:
    listener = stack.enter_context(_listener(spool, max_sessions=3, max_sessions_per_peer=1))
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        sock = stack.enter_context(_connect(listener.port, source))
        assert _read_reply(sock).startswith(b"220 ")
    with _connect(listener.port, "127.0.0.5") as fourth:
        assert _until_eof(fourth).startswith(b"421 4.7.0 mx.mailsh.test too many connections,")


def test_idle_client_gets_421_and_is_closed(spool: Spool) -> None:
    with _listener(spool, idle_timeout=0.3) as listener, _connect(listener.port) as sock:
        assert _read_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        # Sending nothing more: the server speaks last, then closes.
        rest = _until_eof(sock)
    assert rest.rstrip().endswith(b"421 4.4.2 idle too long, closing")


def test_unfinished_command_is_cut_by_the_command_timeout(spool: Spool) -> None:
    """A client that has sent part of a command is not idle, but a command must be done
    within the command timeout (a slow drip, a DATA that never ends). The client stops
    sending after a few bytes: bytes arriving after the server closed would make its
    kernel answer with a reset, which may discard the 421 before the test reads it."""
    with (
        _listener(spool, idle_timeout=30, command_timeout=0.5) as listener,
        _connect(listener.port) as sock,
    ):
        assert _read_reply(sock).startswith(b"220 ")
        sock.sendall(b"EHLO cli")  # no CRLF: the command never completes
        rest = _until_eof(sock)
    assert rest == b"421 4.4.2 command timeout, closing\r\n"


def test_messages_per_session_are_capped(spool: Spool) -> None:
    with _listener(spool, max_messages=2) as listener:
        client = smtplib.SMTP("127.0.0.1", listener.port, timeout=BACKSTOP)
        try:
            client.sendmail("a@client.test", [OURS], MESSAGE)
            client.sendmail("a@client.test", [OURS], MESSAGE)
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("a@client.test", [OURS], MESSAGE)
        finally:
            client.close()
    assert refused.value.smtp_code == 421
    assert len(spool.pending()) == 2


def test_endless_noop_is_capped(spool: Spool) -> None:
    with _listener(spool, max_messages=1) as listener:
        client = smtplib.SMTP("127.0.0.1", listener.port, timeout=BACKSTOP)
        try:
            codes = [client.noop()[0] for _ in range(1 + 20 + 1)]  # 1 + OTHER_COMMANDS_SLACK
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()  # closed after the 421
        finally:
            client.close()
    assert codes == [250] * 21 + [421]


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        (("192.0.2.7", 25), "192.0.2.7"),
        (("::ffff:192.0.2.7", 25, 0, 0), "192.0.2.7"),
        (("2001:db8:1:2:a::1", 25, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:b::9", 25, 0, 0), "2001:db8:1:2::/64"),
        ("unix-socket", "unix-socket"),
    ],
)
def test_peer_key_groups_an_ipv6_host_by_its_64(peer: object, key: str) -> None:
    assert peer_key(peer) == key


def test_settings_defaults_match_the_listener_defaults(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path)
    assert SmtpLimits() == SmtpLimits.from_settings(s)
    assert SmtpLimits().max_sessions_per_peer * 5 <= SmtpLimits().max_sessions


def test_per_peer_cap_above_total_is_a_config_error(tmp_path: Path) -> None:
    from mailsh.errors import ConfigError

    with pytest.raises(ConfigError, match=r"smtp_max_sessions_per_peer \(5\) must not exceed"):
        load_settings(home=tmp_path, smtp_max_sessions=4, smtp_max_sessions_per_peer=5)
