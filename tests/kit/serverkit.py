"""The server kit: requests sealed as ``mailsh send`` seals them, and the replies opened.

Replies are read from a :class:`~tests.kit.smtp.Sink`, the real SMTP server on 127.0.0.1
that the server under test sends them to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TypedDict, Unpack

import pytest

from mailsh import protocol, seal
from mailsh.errors import ProtocolError, TransportError
from mailsh.keys.trust import load_trust
from mailsh.protocol import Notice, Reply
from mailsh.server.daemon import Server
from mailsh.server.spool import Spool, SpooledMessage
from mailsh.settings import Settings, load_settings
from tests.kit.homes import Home
from tests.kit.smtp import Sink


class RequestFields(TypedDict, total=False):
    """What a test may set on a request (the keywords of :func:`request_to`)."""

    stdin: bytes | None
    timeout: float | None
    max_output_bytes: int | None
    issued_at: datetime | None
    encrypt: bool


def request(
    client: Home, server_home: Home, command: str, **fields: Unpack[RequestFields]
) -> seal.SealedRequest:
    """A request from ``client`` to ``server_home``, sealed as ``mailsh send`` seals it."""
    return request_to(client, server_home.email, server_home.fingerprint, command, **fields)


def request_to(
    client: Home,
    address: str,
    fingerprint: str,
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
        audience=protocol.Audience(address=address, fingerprint=fingerprint),
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
        recipient=fingerprint if encrypt else None,
        from_addr=client.email,
        passphrase=None,
    )


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
        max_skew=timedelta(seconds=client.settings.reply_clock_skew),
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


def answers_for(
    client: Home, server_home: Home, sealed: seal.SealedRequest, sink: Sink
) -> list[Reply | Notice]:
    """Every answer to ``sealed`` that ``sink`` received (replies and notices), in order."""
    out = []
    for msg in sink.messages:
        try:
            out.append(open_answer(client, server_home, sealed, msg.data))
        except Exception:  # noqa: S112 - other requests' replies are expected here
            continue
    return out


def replies_for(
    client: Home, server_home: Home, sealed: seal.SealedRequest, sink: Sink
) -> list[Reply]:
    """The outcome replies to ``sealed`` (a notice is never one)."""
    found = answers_for(client, server_home, sealed, sink)
    return [answer for answer in found if isinstance(answer, Reply)]


def notices_for(
    client: Home, server_home: Home, sealed: seal.SealedRequest, sink: Sink
) -> list[Notice]:
    found = answers_for(client, server_home, sealed, sink)
    return [answer for answer in found if isinstance(answer, Notice)]


def fail_second_put(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the spool's second ``put_stream`` fail with a TransportError ("disk full")."""
    real = Spool.put_stream
    calls = 0

    def flaky(self: Spool, chunks: Iterator[bytes], *, source: str) -> SpooledMessage:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TransportError("disk full")
        return real(self, chunks, source=source)

    monkeypatch.setattr(Spool, "put_stream", flaky)


def listening_port(server: Server, timeout: float = 30) -> int:
    """The port of ``server``'s SMTP listener, once it listens (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while server.smtp_port is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.smtp_port is not None
    return server.smtp_port


def spooled(spool: Spool) -> list[bytes]:
    """The bytes of every message waiting in ``spool``."""
    return [spool.read(m, 1 << 30) for m in spool.pending()]
