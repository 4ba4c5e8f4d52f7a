"""open_request / open_answer against hostile mails: the server-side accepting path."""

from __future__ import annotations

import base64
import contextlib
import json
import quopri
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailsh import protocol, seal
from mailsh.errors import ProtocolError
from mailsh.keys.crypto import seal as pgp_seal
from mailsh.keys.trust import TrustStore, add_trusted_key, load_trust
from mailsh.mail.message import read_mail
from mailsh.protocol import Audience, Reply, ReplyStatus, Request
from mailsh.seal import AuthenticatedRejectionError, SealedRequest, VerifiedRequest
from mailsh.settings import load_settings
from tests.kit import forge
from tests.kit.homes import Home

SKEW = timedelta(minutes=5)
AGE = timedelta(days=1)
MAX = 1 << 20
SERVER = "root@server.test"


@dataclass
class World:
    alice: Home
    server: Home
    mallory: Home
    server_trust: TrustStore  # alice pinned (plain scripts allowed when asked)
    alice_trust: TrustStore  # the server and mallory pinned


@pytest.fixture(scope="module")
def world(
    alice: Home, server: Home, mallory: Home, tmp_path_factory: pytest.TempPathFactory
) -> World:
    d = tmp_path_factory.mktemp("env")
    for home, other in (
        (alice, server),
        (mallory, alice),
        (alice, mallory),
        (mallory, server),
        (server, mallory),
    ):
        home.gpg.raw.import_keys(other.pubkey.read_text())
    add_trusted_key(server.gpg, d / "s.json", alice.pubkey, reply_to=None)
    add_trusted_key(alice.gpg, d / "a.json", server.pubkey, reply_to=None)
    add_trusted_key(alice.gpg, d / "a.json", mallory.pubkey, reply_to=None)
    return World(alice, server, mallory, load_trust(d / "s.json"), load_trust(d / "a.json"))


def now() -> datetime:
    return datetime.now(UTC)


def make_request(w: World, **over: Any) -> Request:
    t = now()
    fields: dict[str, Any] = {
        "request_id": protocol.new_request_id(),
        "audience": Audience(address=SERVER, fingerprint=w.server.fingerprint),
        "reply_to": "alice@example.org",
        "issued_at": t,
        "expires_at": t + timedelta(hours=1),
        "command": "cat",
        "stdin": b"\x00\xff\x00data\r\n",
    }
    fields.update(over)
    return Request(**fields)


def seal_req(
    w: World, req: Request, *, encrypt: bool = True, by: Home | None = None
) -> SealedRequest:
    signer = by or w.alice
    return seal.seal_request(
        signer.gpg,
        req,
        signer=signer.fingerprint,
        recipient=w.server.fingerprint if encrypt else None,
        from_addr=signer.email,
        passphrase=None,
    )


def open_req(
    w: World,
    raw: bytes,
    trust: TrustStore | None = None,
    at: datetime | None = None,
    **over: Any,
) -> VerifiedRequest:
    """What the server does with ``raw``: read it, then open it (``over``: the policy)."""
    fields: dict[str, Any] = {
        "addresses": (SERVER,),
        "fingerprint": w.server.fingerprint,
        "max_skew": SKEW,
        "max_age": AGE,
        "max_bytes": MAX,
    }
    fields.update(over)
    policy = seal.OpenPolicy(**fields)
    mail = read_mail(raw, max_bytes=policy.max_bytes)
    return seal.open_request(
        w.server.gpg, mail, policy, trust=trust or w.server_trust, now=at or now()
    )


def signed_bytes_mail(w: World, payload: bytes, *, by: Home | None = None) -> bytes:
    signer = by or w.alice
    armored = pgp_seal(
        signer.gpg, payload, signer=signer.fingerprint, recipient=w.server.fingerprint
    )
    return forge.request_mail(armored)


def rejected(fn: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypt", [True, False], ids=["signed+encrypted", "signed-only"])
def test_request_round_trip(world: World, encrypt: bool) -> None:
    req = make_request(world)
    sealed = seal_req(world, req, encrypt=encrypt)
    got = open_req(world, sealed.mail)
    assert got.request_id == req.request_id
    assert got.command == "cat"
    assert got.stdin == b"\x00\xff\x00data\r\n"
    assert got.encrypted is encrypt
    assert got.signer == world.alice.fingerprint
    assert got.payload_sha256 == sealed.payload_sha256
    assert got.message_id == sealed.message_id
    assert not got.plain_script


def test_the_servers_policy_is_its_settings(tmp_path: Path) -> None:
    """serve builds its one OpenPolicy from exactly these settings."""
    settings = load_settings(
        home=tmp_path,
        clock_skew=7,
        max_request_age=9,
        max_message_bytes=11,
        require_encryption=True,
    )
    policy = seal.OpenPolicy.from_settings(settings, addresses=[SERVER], fingerprint="F" * 40)
    assert policy == seal.OpenPolicy(
        addresses=(SERVER,),
        fingerprint="F" * 40,
        max_skew=timedelta(seconds=7),
        max_age=timedelta(seconds=9),
        max_bytes=11,
        require_encrypted=True,
    )


def test_verified_request_cannot_be_built_directly() -> None:
    fields: dict[str, Any] = {
        "signer": "A" * 40,
        "signature_id": None,
        "signed_at": now(),
        "encrypted": True,
        "payload_sha256": "0" * 64,
        "request_id": "0" * 32,
        "command": "id",
        "stdin": None,
        "timeout": None,
        "max_output_bytes": None,
        "plain_script": False,
        "message_id": None,
    }
    with pytest.raises(TypeError):
        VerifiedRequest(**fields)
    with pytest.raises(TypeError):
        VerifiedRequest(**fields, _seal=object())


@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
def test_transfer_encodings_of_a_valid_request_are_accepted(world: World, cte: str) -> None:
    """A relay may re-encode the body; the bytes gpg checks are the same."""
    sealed = seal_req(world, make_request(world))
    head, _, body = sealed.mail.partition(b"\r\n\r\n")
    head = head.replace(
        b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: " + cte.encode()
    )
    encoded = base64.encodebytes(body) if cte == "base64" else quopri.encodestring(body)
    got = open_req(world, head + b"\r\n\r\n" + encoded)
    assert got.payload_sha256 == sealed.payload_sha256


def test_rewrapped_capture_has_the_same_request_hash(world: World) -> None:
    """Replay: new headers, new uu name, LF line ends change the mail, not the hash."""
    sealed = seal_req(world, make_request(world))
    armored = protocol.extract_armor(
        protocol.extract_uu(sealed.mail.split(b"\r\n\r\n", 1)[1], max_bytes=MAX)
    )
    again = forge.request_mail(armored, uu_name="other.asc").replace(b"\r\n", b"\n")
    assert open_req(world, again).payload_sha256 == sealed.payload_sha256


# --------------------------------------------------------------------------------------
# Not authenticated: plain ProtocolError, never the authenticated subclass (no reply)
# --------------------------------------------------------------------------------------


def test_unpinned_signer_is_not_an_authenticated_rejection(world: World) -> None:
    req = make_request(world, audience=Audience(address="root@elsewhere.test"))
    mail = signed_bytes_mail(world, protocol.encode_payload(req), by=world.mallory)
    err = rejected(lambda: open_req(world, mail))
    assert type(err) is ProtocolError
    assert err.reason == "signer-not-pinned"


def test_unsigned_payload_in_mail(world: World) -> None:
    armored = forge.gpg(
        world.alice.settings.gnupg_home,
        "--store",
        "--armor",
        data=protocol.encode_payload(make_request(world)),
    )
    err = rejected(lambda: open_req(world, forge.request_mail(armored)))
    assert type(err) is ProtocolError  # unauthenticated: discarded, never answered
    assert err.reason == "packet-sequence"  # a bare literal is not a signed message


def test_encrypted_but_unsigned_request(world: World) -> None:
    with forge.scratch_home() as home:
        forge.gpg(home, "--import", data=world.server.pubkey.read_bytes())
        armored = forge.gpg(
            home,
            "--encrypt",
            "--armor",
            "-r",
            world.server.fingerprint,
            data=protocol.encode_payload(make_request(world)),
        )
    err = rejected(lambda: open_req(world, forge.request_mail(armored)))
    assert type(err) is ProtocolError
    assert err.reason == "unsigned"


def test_require_encryption_rejects_signed_only_mail(world: World) -> None:
    sealed = seal_req(world, make_request(world), encrypt=False)
    assert (
        rejected(lambda: open_req(world, sealed.mail, require_encrypted=True)).reason
        == "not-encrypted"
    )
    assert open_req(
        world, seal_req(world, make_request(world)).mail, require_encrypted=True
    ).encrypted


def test_future_dated_signature(world: World) -> None:
    later = now() + timedelta(days=1)
    req = make_request(world, issued_at=later, expires_at=later + timedelta(hours=1))
    armored = forge.gpg(
        world.alice.settings.gnupg_home,
        "--sign",
        "--armor",
        data=protocol.encode_payload(req),
        faked=later.strftime("%Y%m%dT%H%M%S!"),
    )
    err = rejected(lambda: open_req(world, forge.request_mail(armored)))
    assert err.reason == "signature-from-future"


def test_stale_signature(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    err = rejected(lambda: open_req(world, sealed.mail, at=now() + timedelta(days=2)))
    assert err.reason == "signature-too-old"


def test_flipped_byte_in_mail(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    lines = sealed.mail.split(b"\r\n")
    i = next(n for n, ln in enumerate(lines) if ln.startswith(b"begin 600 ")) + 3
    line = bytearray(lines[i])
    line[10] = 32 + ((line[10] - 32 + 1) & 63)  # a different 6-bit value
    lines[i] = bytes(line)
    rejected(lambda: open_req(world, b"\r\n".join(lines)))


# --------------------------------------------------------------------------------------
# Framing and MIME (P4)
# --------------------------------------------------------------------------------------


def _body(mail: bytes) -> bytes:
    return mail.split(b"\r\n\r\n", 1)[1]


def _armored(world: World) -> bytes:
    sealed = seal_req(world, make_request(world))
    return protocol.extract_armor(protocol.extract_uu(_body(sealed.mail), max_bytes=MAX))


def test_two_armor_blocks(world: World) -> None:
    a, b = _armored(world), _armored(world)
    assert rejected(lambda: open_req(world, forge.request_mail(a + b))).reason == "armor-count"


def test_two_uu_blocks(world: World) -> None:
    one = protocol.uuencode(_armored(world))
    raw = forge.mail_with_body(one + one)
    assert rejected(lambda: open_req(world, raw)).reason == "uu-count"


def test_begin_base64_block(world: World) -> None:
    b64 = base64.encodebytes(_armored(world))
    raw = forge.mail_with_body(b"begin-base64 600 request.asc\n" + b64 + b"====\n")
    assert rejected(lambda: open_req(world, raw)).reason == "uu-count"


def test_armor_outside_uu_is_not_used(world: World) -> None:
    """A bare armored block in the body (no uu) is not a request."""
    raw = forge.mail_with_body(_armored(world))
    assert rejected(lambda: open_req(world, raw)).reason == "uu-count"


def test_uu_path_name_is_never_used(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    raw = forge.request_mail(_armored(world), uu_name="../../etc/cron.d/x")
    with contextlib.suppress(ProtocolError):
        open_req(world, raw)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not Path("/etc/cron.d/x").exists()
    assert not (world.server.path / "etc").exists()


def test_multipart_wrapping_a_captured_request(world: World) -> None:
    """P4: a valid signed request next to attacker text is not accepted."""
    sealed = seal_req(world, make_request(world))
    body = (
        b"--XX\r\nContent-Type: text/plain\r\n\r\nrm -rf / # attacker text\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\n" + _body(sealed.mail) + b"\r\n--XX--\r\n"
    )
    raw = forge.mail_with_body(body, {"Content-Type": 'multipart/mixed; boundary="XX"'})
    err = rejected(lambda: open_req(world, raw))
    assert type(err) is ProtocolError
    assert err.reason == "not-plain-text"


def test_mime_depth_bomb(world: World) -> None:
    depth = 1000
    body = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(depth)
    )
    raw = forge.mail_with_body(body, {"Content-Type": 'multipart/mixed; boundary="b0"'})
    assert rejected(lambda: open_req(world, raw)).reason == "not-plain-text"


def test_oversize_mail(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    err = rejected(lambda: open_req(world, sealed.mail, max_bytes=len(sealed.mail) - 1))
    assert err.reason == "too-large"


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\xfd garbage \x80\r\n", b"begin 600 x\r\n\xff\xff\xff\xff\r\nend\r\n"],
    ids=["garbage", "uu-of-garbage"],
)
def test_non_utf8_body(world: World, body: bytes) -> None:
    rejected(lambda: open_req(world, forge.mail_with_body(body)))


def test_bare_cr_line_ends(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    head, _, body = sealed.mail.partition(b"\r\n\r\n")
    rejected(lambda: open_req(world, head + b"\r\n\r\n" + body.replace(b"\r\n", b"\r")))


def test_nul_in_mail(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    assert rejected(lambda: open_req(world, sealed.mail + b"\x00")).reason == "nul-byte"


# --------------------------------------------------------------------------------------
# Authenticated but refused: AuthenticatedRejectionError (the signer is told)
# --------------------------------------------------------------------------------------


def _authenticated(fn: Callable[[], object]) -> AuthenticatedRejectionError:
    with pytest.raises(AuthenticatedRejectionError) as info:
        fn()
    return info.value


REQUEST_RULES: list[
    tuple[str, Callable[[World, datetime], dict[str, Any]], dict[str, Any], str]
] = [
    (
        "wrong-audience-address",
        lambda w, t: {"audience": Audience(address="root@elsewhere.test")},
        {},
        "wrong-audience",
    ),
    (
        "wrong-audience-fingerprint",
        lambda w, t: {"audience": Audience(address=SERVER, fingerprint="F" * 40)},
        {},
        "wrong-audience",
    ),
    (
        "expired",
        lambda w, t: {"issued_at": t - timedelta(hours=2), "expires_at": t - timedelta(hours=1)},
        {},
        "request-expired",
    ),
    (
        "issued-in-future",
        lambda w, t: {"issued_at": t + timedelta(hours=1), "expires_at": t + timedelta(hours=2)},
        {},
        "request-from-future",
    ),
    (
        "too-old",
        lambda w, t: {"issued_at": t - timedelta(hours=3), "expires_at": t + timedelta(hours=1)},
        {"max_age": timedelta(hours=2)},
        "request-too-old",
    ),
    (
        "signature-time-mismatch",
        lambda w, t: {"issued_at": t - timedelta(minutes=10)},
        {},
        "signature-time-mismatch",
    ),
    ("window-too-long", lambda w, t: {"expires_at": t + timedelta(days=8)}, {}, "bad-window"),
]


@pytest.mark.parametrize(
    ("over", "kw", "reason"), [r[1:] for r in REQUEST_RULES], ids=[r[0] for r in REQUEST_RULES]
)
def test_request_rules_are_authenticated_rejections(
    world: World, over: Callable[[World, datetime], dict[str, Any]], kw: dict[str, Any], reason: str
) -> None:
    req = make_request(world, **over(world, now()))
    err = _authenticated(lambda: open_req(world, seal_req(world, req).mail, **kw))
    assert err.reason == reason
    assert err.request_id == req.request_id
    assert err.verified.signer == world.alice.fingerprint


def _doc(world: World, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(protocol.encode_payload(make_request(world)))
    doc.update(over)
    return doc


PAYLOAD_RULES: list[tuple[str, Callable[[World], bytes], str]] = [
    ("unknown-kind", lambda w: json.dumps(_doc(w, kind="mailsh.exec.v1")).encode(), "unknown-kind"),
    (
        "version-2",
        lambda w: json.dumps(_doc(w, kind="mailsh.request.v2")).encode(),
        "unsupported-version",
    ),
    ("extra-field", lambda w: json.dumps(_doc(w, run_as="root")).encode(), "malformed-payload"),
    (
        "missing-field",
        lambda w: json.dumps({k: v for k, v in _doc(w).items() if k != "audience"}).encode(),
        "malformed-payload",
    ),
    (
        "nul-in-command",
        lambda w: json.dumps(_doc(w, command="id\x00x")).encode(),
        "malformed-payload",
    ),
    ("not-json", lambda w: b"{not json", "malformed-payload"),
]


@pytest.mark.parametrize(
    ("payload", "reason"), [r[1:] for r in PAYLOAD_RULES], ids=[r[0] for r in PAYLOAD_RULES]
)
def test_signed_payload_rules(world: World, payload: Callable[[World], bytes], reason: str) -> None:
    err = _authenticated(lambda: open_req(world, signed_bytes_mail(world, payload(world))))
    assert err.reason == reason
    assert err.payload_sha256


def test_unknown_version_tells_to_upgrade_the_server(world: World) -> None:
    mail = signed_bytes_mail(world, json.dumps(_doc(world, kind="mailsh.request.v2")).encode())
    err = _authenticated(lambda: open_req(world, mail))
    assert err.hint is not None
    assert "upgrade mailsh on the server" in err.hint


def test_plain_script_needs_permission(world: World, tmp_path: Path) -> None:
    mail = signed_bytes_mail(world, b"#!/bin/sh\nuname -a\n")
    assert _authenticated(lambda: open_req(world, mail)).reason == "plain-script-not-allowed"
    add_trusted_key(
        world.server.gpg,
        tmp_path / "t.json",
        world.alice.pubkey,
        reply_to=None,
        allow_plain_scripts=True,
    )
    got = open_req(world, mail, trust=load_trust(tmp_path / "t.json"))
    assert got.plain_script
    assert got.command == "#!/bin/sh\nuname -a\n"
    assert got.signature_id is not None
    assert len(got.request_id) == 32


def test_plain_script_with_nul_is_refused(world: World, tmp_path: Path) -> None:
    add_trusted_key(
        world.server.gpg,
        tmp_path / "t.json",
        world.alice.pubkey,
        reply_to=None,
        allow_plain_scripts=True,
    )
    mail = signed_bytes_mail(world, b"id\x00; rm -rf /\n")
    err = _authenticated(lambda: open_req(world, mail, trust=load_trust(tmp_path / "t.json")))
    assert err.reason == "malformed-payload"


# --------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------


def _reply_mail(
    world: World, sealed: SealedRequest, *, by: Home | None = None, **over: Any
) -> bytes:
    signer = by or world.server
    fields: dict[str, Any] = {
        "request_id": sealed.request.request_id,
        "request_sha256": sealed.payload_sha256,
        "server": SERVER,
        "status": ReplyStatus.OK,
        "exit_code": 0,
        "stdout": b"\x00\xffout",
    }
    fields.update(over)
    return seal.seal_reply(
        signer.gpg,
        Reply(**fields),
        signer=signer.fingerprint,
        recipient=world.alice.fingerprint,
        to_addr="alice@example.org",
        in_reply_to=sealed.message_id,
        passphrase=None,
    )


def _open_reply(world: World, raw: bytes, sealed: SealedRequest) -> Reply:
    found = seal.open_answer(
        world.alice.gpg,
        raw,
        trust=world.alice_trust,
        server_fingerprint=world.server.fingerprint,
        request_id=sealed.request.request_id,
        request_sha256=sealed.payload_sha256,
        now=now(),
        max_skew=timedelta(seconds=world.alice.settings.reply_clock_skew),
        max_bytes=MAX,
    )
    assert isinstance(found, Reply)
    return found


def test_reply_clock_skew_is_ten_minutes_unless_set(tmp_path: Path) -> None:
    assert load_settings(home=tmp_path).reply_clock_skew == 600
    assert load_settings(home=tmp_path, reply_clock_skew=5).reply_clock_skew == 5


def test_reply_round_trip(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    rep = _open_reply(world, _reply_mail(world, sealed), sealed)
    assert rep.stdout == b"\x00\xffout"
    assert rep.shell_status == 0


def test_reply_from_another_pinned_key_is_rejected(world: World) -> None:
    """mallory is pinned on alice's side too, but is not the server she asked."""
    sealed = seal_req(world, make_request(world))
    err = rejected(lambda: _open_reply(world, _reply_mail(world, sealed, by=world.mallory), sealed))
    assert err.reason == "signer-not-pinned"


def test_reply_answering_another_request_is_rejected(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    other = seal_req(world, make_request(world))
    err = rejected(lambda: _open_reply(world, _reply_mail(world, other), sealed))
    assert err.reason == "not-our-reply"
    forged = _reply_mail(world, sealed, request_id=other.request.request_id)
    assert rejected(lambda: _open_reply(world, forged, sealed)).reason == "not-our-reply"


def test_reply_without_request_id_but_right_hash_is_ours(world: World) -> None:
    sealed = seal_req(world, make_request(world))
    rep = _open_reply(
        world, _reply_mail(world, sealed, request_id=None, status=ReplyStatus.REJECTED), sealed
    )
    assert rep.status is ReplyStatus.REJECTED
