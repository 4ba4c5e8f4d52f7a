"""IMAP server text reaches the user as one printable line (P14).

A real TCP server on 127.0.0.1 speaking just enough IMAP to greet and refuse a login
with a hostile answer (a real Dovecot cannot be made to say this).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from mailsh.client.imap import ImapLoginError, ImapWatcher
from mailsh.client.imap_url import parse_imap_url

HOSTILE = b"bad\x1b[2J\x1b]0;owned\x07 password\rINFO forged"


@pytest.fixture
def hostile_imap() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as rfile:
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
            for line in rfile:
                tag = line.split(b" ", 1)[0]
                if b"CAPABILITY" in line.upper():
                    conn.sendall(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
                elif b"LOGIN" in line.upper():
                    conn.sendall(tag + b" NO [AUTHENTICATIONFAILED] " + HOSTILE + b"\r\n")
                else:
                    conn.sendall(tag + b" BAD what\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    thread.join(10)


def test_refused_login_text_is_sanitised(hostile_imap: int) -> None:
    target = parse_imap_url(f"imap://alice@127.0.0.1:{hostile_imap}/INBOX?tls=none")
    watcher = ImapWatcher(target, "pw", timeout=10, max_reconnects=0)
    with pytest.raises(ImapLoginError) as info:
        watcher.connect()
    message = info.value.message
    assert "bad [2J ]0;owned password INFO forged" in message
    assert message.isprintable()
