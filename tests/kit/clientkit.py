"""The client rig: a client home paired with a server, and a server built from the library.

A test "server" opens the request mails the client sent (as ``mailsh serve`` does first)
and seals reply mails to them, so the client's send and wait are tested without a serve.
The ``rig`` fixture (:mod:`tests.kit.fixtures`) makes one per test module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailsh.keys.trust import add_trusted_key, load_trust
from mailsh.mail.message import read_mail
from mailsh.protocol import Reply, ReplyStatus
from mailsh.seal import OpenPolicy, VerifiedRequest, open_request, seal_reply
from mailsh.settings import Settings
from tests.kit.homes import Home

MiB = 1024 * 1024


@dataclass
class Rig:
    """A client home that trusts ``server``, and a server trust store pinning the client."""

    client: Home
    server: Home
    server_trust: Path

    def settings(self, **changes: Any) -> Settings:
        return self.client.settings.model_copy(update=changes)


def make_rig(make_home: Callable[..., Home], server: Home, tmp: Path) -> Rig:
    client = make_home("op@client.test")
    add_trusted_key(client.gpg, client.settings.trust_file, server.pubkey, reply_to=None)
    server_trust = tmp / "server-trust.json"
    add_trusted_key(server.gpg, server_trust, client.pubkey, reply_to=None)
    return Rig(client=client, server=server, server_trust=server_trust)


def open_as_server(rig: Rig, raw: bytes, *, address: str | None = None) -> VerifiedRequest:
    """What ``mailsh serve`` does first: verify the received request mail."""
    policy = OpenPolicy(
        addresses=(address or rig.server.email,),
        fingerprint=rig.server.fingerprint,
        max_skew=timedelta(minutes=5),
        max_age=timedelta(days=1),
        max_bytes=10 * MiB,
    )
    mail = read_mail(raw, max_bytes=policy.max_bytes)
    return open_request(
        rig.server.gpg, mail, policy, trust=load_trust(rig.server_trust), now=datetime.now(UTC)
    )


def answer(
    rig: Rig,
    raw: bytes,
    *,
    signer: Home | None = None,
    request_id: str | None = None,
    request_sha256: str | None = None,
    **fields: Any,
) -> bytes:
    """A reply mail to the request mail ``raw``, built and sealed with the library.

    ``fields`` go into the Reply (default: status ok, exit code 0); ``signer`` signs
    instead of the server (its keyring must hold the client's key).
    """
    verified = open_as_server(rig, raw)
    fields.setdefault("status", ReplyStatus.OK)
    if fields["status"] is ReplyStatus.OK and "signal" not in fields:
        fields.setdefault("exit_code", 0)
    reply = Reply(
        request_id=request_id or verified.request_id,
        request_sha256=request_sha256 or verified.payload_sha256,
        server=rig.server.email,
        **fields,
    )
    by = signer or rig.server
    return seal_reply(
        by.gpg,
        reply,
        signer=by.fingerprint,
        recipient=rig.client.fingerprint,
        to_addr=rig.client.email,
        in_reply_to=verified.message_id,
        passphrase=None,
    )
