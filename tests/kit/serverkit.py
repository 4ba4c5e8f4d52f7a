"""The server kit: requests sealed as ``mailsh send`` seals them, and the replies opened.

Replies are read from a :class:`~tests.kit.smtp.Sink`, the real SMTP server on 127.0.0.1
that the server under test sends them to.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mailsh import protocol, seal
from mailsh.errors import ProtocolError
from mailsh.keys.trust import load_trust
from mailsh.protocol import Notice, Reply
from mailsh.settings import Settings, load_settings
from tests.kit.homes import Home
from tests.kit.smtp import Sink


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
