"""Fuzzing the whole verification path, ``read_mail`` then ``seal.open_request``, with real gpg.

Starting from valid sealed requests (signed and encrypted, and signed only), hypothesis
flips bytes, truncates, inserts, edits headers and re-wraps the mail. Whatever comes
out, open_request either refuses it with the documented ProtocolError / GpgError family
(AuthenticatedRejectionError is a ProtocolError) or returns exactly the original,
signed request: nothing else can ever reach the command runner. Each example is guarded
against hangs (tests/kit/fuzzing.py).
"""

from __future__ import annotations

import base64
import quopri
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsh import protocol, seal
from mailsh.errors import GpgError, ProtocolError
from mailsh.keys.trust import TrustStore, add_trusted_key, load_trust
from mailsh.mail.message import read_mail
from tests.kit import forge
from tests.kit.fuzzing import budget, guard
from tests.kit.homes import Home
from tests.kit.serverkit import request

MAX = 256 * 1024


@dataclass
class Target:
    signer: str
    server: Home
    trust: TrustStore
    policy: seal.OpenPolicy
    sealed: list[seal.SealedRequest]


@pytest.fixture(scope="module")
def target(alice: Home, server: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    alice.gpg.raw.import_keys(server.pubkey.read_text())
    server.gpg.raw.import_keys(alice.pubkey.read_text())
    trust_file = tmp_path_factory.mktemp("fuzz") / "trust.json"
    add_trusted_key(server.gpg, trust_file, alice.pubkey, reply_to=None)
    sealed = [
        request(alice, server, "echo fuzz-original", stdin=b"in\x00put", encrypt=encrypt)
        for encrypt in (True, False)
    ]
    policy = seal.OpenPolicy(
        addresses=(server.email,),
        fingerprint=server.fingerprint,
        max_skew=timedelta(minutes=5),
        max_age=timedelta(days=1),
        max_bytes=MAX,
    )
    yield Target(alice.fingerprint, server, load_trust(trust_file), policy, sealed)


def _open(t: Target, raw: bytes) -> seal.VerifiedRequest | None:
    with guard():
        try:
            mail = read_mail(raw, max_bytes=MAX)
            return seal.open_request(
                t.server.gpg, mail, t.policy, trust=t.trust, now=datetime.now(UTC)
            )
        except (ProtocolError, GpgError):
            return None


def _only_the_original(t: Target, which: int, raw: bytes) -> None:
    got = _open(t, raw)
    if got is None:
        return
    original = t.sealed[which]
    assert got.payload_sha256 == original.payload_sha256
    assert got.request_id == original.request.request_id
    assert got.command == "echo fuzz-original"
    assert got.stdin == b"in\x00put"
    assert got.signer == t.signer


# -- mutations ---------------------------------------------------------------------------


def _split(mail: bytes) -> tuple[bytes, bytes]:
    head, _, body = mail.partition(b"\r\n\r\n")
    return head, body


@st.composite
def byte_edits(draw: st.DrawFn, mail: bytes) -> bytes:
    """Flip, overwrite, delete or insert a few bytes anywhere."""
    data = bytearray(mail)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "delete", "insert"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 40))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=60))
        if not data:
            data = bytearray(b"x")
    return bytes(data)


@st.composite
def truncations(draw: st.DrawFn, mail: bytes) -> bytes:
    return mail[: draw(st.integers(0, len(mail) - 1))]


_HEADERS = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=x",
        b"Content-Type: text/html",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"Content-Transfer-Encoding: 8bit",
        b"Auto-Submitted: auto-replied",
        b"Return-Path: <>",
        b"From: mallory@evil.test",
        b"Reply-To: victim@elsewhere.test",
        b"Message-ID: <x@y>",
        b"To: root@elsewhere.test",
        b"X-Junk: \x00",
    ]
)


@st.composite
def header_edits(draw: st.DrawFn, mail: bytes) -> bytes:
    head, body = _split(mail)
    lines = head.split(b"\r\n")
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()) and len(lines) > 1:
            del lines[draw(st.integers(0, len(lines) - 1))]
        else:
            lines.insert(draw(st.integers(0, len(lines))), draw(_HEADERS))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@st.composite
def rewraps(draw: st.DrawFn, mail: bytes) -> bytes:
    """What relays and replaying attackers do: new line ends, encodings, uu names,
    re-armoring, attacker text around the block."""
    head, body = _split(mail)
    op = draw(st.sampled_from(["lf", "base64", "qp", "uu-name", "rearmor", "surround"]))
    if op == "lf":
        return mail.replace(b"\r\n", b"\n")
    if op in ("base64", "qp"):
        cte = b"base64" if op == "base64" else b"quoted-printable"
        head = head.replace(
            b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: " + cte
        )
        enc = base64.encodebytes(body) if op == "base64" else quopri.encodestring(body)
        return head + b"\r\n\r\n" + enc
    armored = protocol.extract_armor(protocol.extract_uu(body, max_bytes=MAX))
    if op == "uu-name":
        name = draw(st.sampled_from(["../../etc/x", "a b", "-", "request.asc"]))
        return forge.request_mail(armored, uu_name=name)
    if op == "rearmor":
        return forge.request_mail(forge.armor(forge.dearmor(armored)))
    before = draw(st.binary(max_size=200)).replace(b"\n", b" ")
    after = draw(st.binary(max_size=200)).replace(b"\n", b" ")
    return head + b"\r\n\r\n" + before + b"\r\n" + body + b"\r\n" + after


@st.composite
def packet_edits(draw: st.DrawFn, mail: bytes) -> bytes:
    """Edit the OpenPGP packets themselves, then re-armor with a valid checksum and
    re-wrap: these get past the armor and uu layers, into the packet check and gpg."""
    _, body = _split(mail)
    armored = protocol.extract_armor(protocol.extract_uu(body, max_bytes=MAX))
    edited = draw(
        st.one_of(byte_edits(forge.dearmor(armored)), truncations(forge.dearmor(armored)))
    )
    return forge.request_mail(forge.armor(edited))


def mutations(mail: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        byte_edits(mail), truncations(mail), header_edits(mail), rewraps(mail), packet_edits(mail)
    )


@st.composite
def cases(draw: st.DrawFn, t: Target) -> tuple[int, bytes]:
    which = draw(st.sampled_from([0, 1]))
    return which, draw(mutations(t.sealed[which].mail))


def test_the_originals_open(target: Target) -> None:
    """The baseline the fuzz mutates really is accepted (else the fuzz proves nothing)."""
    for which, sealed in enumerate(target.sealed):
        got = _open(target, sealed.mail)
        assert got is not None
        assert got.encrypted is (which == 0)


def test_mutations_run_only_the_original(target: Target) -> None:
    @budget(60)
    @given(cases(target))
    def check(case: tuple[int, bytes]) -> None:
        which, raw = case
        _only_the_original(target, which, raw)

    check()
