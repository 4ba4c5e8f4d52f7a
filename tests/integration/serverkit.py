"""Test kit for the server: a reply sink (real SMTP on 127.0.0.1), request builders.

The sink is a real aiosmtpd server on an ephemeral port that records every message the
server sends, so tests observe replies exactly as a mail server would receive them.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from mailsh import protocol, seal
from mailsh.errors import ProtocolError
from mailsh.keys.trust import load_trust
from mailsh.protocol import Notice, Reply
from mailsh.settings import Settings, load_settings
from tests.kit.homes import Home, pair


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class _Recorder:
    messages: list[Received] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: Any, session: Any, env: Any) -> str:  # noqa: N802
        with self.cond:
            self.messages.append(
                Received(env.mail_from, list(env.rcpt_tos), bytes(env.original_content))
            )
            self.cond.notify_all()
        return "250 OK"


class Sink:
    """A real SMTP server on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        self._rec = _Recorder()
        # aiosmtpd's Controller cannot bind port 0 itself: ask the kernel for a free port.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self._ctl = Controller(self._rec, hostname="127.0.0.1", port=port)

    def __enter__(self) -> Sink:
        self._ctl.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctl.stop()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self._ctl.port}"

    @property
    def messages(self) -> list[Received]:
        with self._rec.cond:
            return list(self._rec.messages)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._rec.cond:
            while len(self._rec.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._rec.cond.wait(left)
            return list(self._rec.messages)


def request(
    client: Home,
    server_home: Home,
    command: str,
    *,
    stdin: bytes | None = None,
    timeout: float | None = None,
    max_output_bytes: int | None = None,
    issued_at: datetime | None = None,
    encrypt: bool = True,
) -> seal.SealedRequest:
    now = issued_at or datetime.now(UTC)
    req = protocol.Request(
        request_id=protocol.new_request_id(),
        audience=protocol.Audience(address=server_home.email, fingerprint=server_home.fingerprint),
        reply_to=client.email,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        command=command,
        stdin=stdin,
        timeout=timeout,
        max_output_bytes=max_output_bytes,
    )
    return seal.seal_request(
        client.gpg,
        req,
        signer=client.fingerprint,
        recipient=server_home.fingerprint if encrypt else None,
        from_addr=client.email,
        passphrase=None,
    )


def mbox_append(path: Path, *mails: bytes) -> None:
    with path.open("ab") as fh:
        for mail in mails:
            body = mail.replace(b"\r\n", b"\n")
            fh.write(b"From alice@example.org Wed Nov 25 00:00:00 2026\n" + body)
            if not body.endswith(b"\n"):
                fh.write(b"\n")
            fh.write(b"\n")


def open_reply(client: Home, server_home: Home, sealed: seal.SealedRequest, raw: bytes) -> Reply:
    """The outcome reply in ``raw`` (a notice raises: it is never an outcome)."""
    found = open_answer(client, server_home, sealed, raw)
    if isinstance(found, Notice):
        raise ProtocolError("not-an-outcome", "a notice about the request, not its reply")
    return found


def open_answer(
    client: Home, server_home: Home, sealed: seal.SealedRequest, raw: bytes
) -> Reply | Notice:
    return seal.open_answer(
        client.gpg,
        raw,
        trust=load_trust(client.settings.trust_file),
        server_fingerprint=server_home.fingerprint,
        request_id=sealed.request.request_id,
        request_sha256=sealed.payload_sha256,
        now=datetime.now(UTC),
        max_bytes=50_000_000,
    )


def server_settings(server_home: Home, sink: Sink, **overrides: object) -> Settings:
    """The server home's settings with replies going to ``sink``."""
    return load_settings(
        home=server_home.settings.home,
        address=server_home.email,
        smtp=sink.url,
        **overrides,
    )


def replies_for(
    client: Home, server_home: Home, sealed: seal.SealedRequest, sink: Sink
) -> list[Reply]:
    out = []
    for msg in sink.messages:
        try:
            out.append(open_reply(client, server_home, sealed, msg.data))
        except Exception:  # noqa: S112 - other requests' replies are expected here
            continue
    return out


def notices_for(
    client: Home, server_home: Home, sealed: seal.SealedRequest, sink: Sink
) -> list[Notice]:
    out = []
    for msg in sink.messages:
        try:
            found = open_answer(client, server_home, sealed, msg.data)
        except Exception:  # noqa: S112 - other requests' replies are expected here
            continue
        if isinstance(found, Notice):
            out.append(found)
    return out


Factory = Callable[..., Home]
__all__ = ["Factory", "Iterator", "Received", "Sink", "mbox_append", "pair", "request"]
