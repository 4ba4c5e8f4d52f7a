"""mailsh.protocol: payload models, encoding, the request rules, armor and uu framing."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from mailsh import protocol
from mailsh.errors import ProtocolError
from mailsh.protocol import Audience, Reply, ReplyStatus, Request

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
AGE = timedelta(days=1)
SERVER = "root@server.test"
SERVER_FPR = "A" * 40
BINARY = bytes(range(256)) + b"\x00\xff\r\n\r"


def make_request(**over: Any) -> Request:
    fields: dict[str, Any] = {
        "request_id": "0123456789abcdef" * 2,
        "audience": Audience(address=SERVER, fingerprint=SERVER_FPR),
        "reply_to": "alice@example.org",
        "issued_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "command": "printf '%s' \"$x\" | wc -c",
        "stdin": BINARY,
    }
    fields.update(over)
    return Request(**fields)


def make_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(protocol.encode_payload(make_request()))
    doc.update(over)
    return doc


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def reason_of(fn: Any, *args: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def test_request_round_trip_is_byte_exact() -> None:
    req = make_request()
    wire = protocol.encode_payload(req)
    back = protocol.parse_request(wire)
    assert back == req
    assert back.stdin == BINARY
    assert protocol.encode_payload(back) == wire


def test_reply_round_trip_is_byte_exact() -> None:
    rep = Reply(
        request_id="f" * 32,
        request_sha256="0" * 64,
        server=SERVER,
        status=ReplyStatus.OK,
        exit_code=3,
        stdout=BINARY,
        stderr=b"\xff\x00err",
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=1),
    )
    wire = protocol.encode_payload(rep)
    back = protocol.parse_reply(wire)
    assert back == rep
    assert back.stdout == BINARY
    assert back.stderr == b"\xff\x00err"
    assert protocol.encode_payload(back) == wire


def test_encoding_is_compact_sorted_utf8_json() -> None:
    wire = protocol.encode_payload(make_request(command="echo é"))
    doc = json.loads(wire)
    assert list(doc) == sorted(doc)
    assert b": " not in wire
    assert b", " not in wire.replace(b"echo", b"")
    assert doc["kind"] == "mailsh.request.v1"
    assert base64.b64decode(doc["stdin"]) == BINARY


def test_request_hash_is_sha256_of_signed_bytes() -> None:
    wire = protocol.encode_payload(make_request())
    assert len(hashlib.sha256(wire).hexdigest()) == 64


def test_models_are_frozen() -> None:
    req = make_request()
    with pytest.raises(ValidationError):
        req.command = "id"  # type: ignore[misc]


def test_request_ids_are_128_bit_hex() -> None:
    ids = {protocol.new_request_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    ("exit_code", "signal", "status"),
    [(0, None, 0), (7, None, 7), (None, 9, 137), (None, None, 255)],
)
def test_shell_status(exit_code: int | None, signal: int | None, status: int) -> None:
    rep = Reply(
        request_id=None,
        request_sha256="0" * 64,
        server=SERVER,
        status=ReplyStatus.OK,
        exit_code=exit_code,
        signal=signal,
    )
    assert rep.shell_status == status


# --------------------------------------------------------------------------------------
# Parsing: strict inside the signature
# --------------------------------------------------------------------------------------

PARSE_REJECTS: list[tuple[str, bytes, str]] = [
    ("not-utf8", b'{"kind":"\xff"}', "malformed-payload"),
    ("not-json", b"echo hello", "malformed-payload"),
    ("json-list", b"[]", "malformed-payload"),
    ("no-kind", raw({"command": "id"}), "malformed-payload"),
    ("kind-not-string", raw(make_doc(kind=1)), "malformed-payload"),
    ("unknown-kind", raw(make_doc(kind="mailsh.exec.v1")), "unknown-kind"),
    ("reply-as-request", raw(make_doc(kind="mailsh.reply.v1")), "unknown-kind"),
    ("foreign-kind", raw(make_doc(kind="other.request.v1")), "unknown-kind"),
    ("version-2", raw(make_doc(kind="mailsh.request.v2")), "unsupported-version"),
    ("extra-field", raw(make_doc(run_as="root")), "malformed-payload"),
    (
        "extra-audience-field",
        raw(make_doc(audience={"address": SERVER, "x": 1})),
        "malformed-payload",
    ),
    (
        "missing-request-id",
        raw({k: v for k, v in make_doc().items() if k != "request_id"}),
        "malformed-payload",
    ),
    (
        "missing-audience",
        raw({k: v for k, v in make_doc().items() if k != "audience"}),
        "malformed-payload",
    ),
    (
        "missing-issued-at",
        raw({k: v for k, v in make_doc().items() if k != "issued_at"}),
        "malformed-payload",
    ),
    (
        "missing-command",
        raw({k: v for k, v in make_doc().items() if k != "command"}),
        "malformed-payload",
    ),
    ("nul-in-command", raw(make_doc(command="id\x00; rm -rf /")), "malformed-payload"),
    ("empty-command", raw(make_doc(command="")), "malformed-payload"),
    (
        "long-command",
        raw(make_doc(command="x" * (protocol.MAX_COMMAND_CHARS + 1))),
        "malformed-payload",
    ),
    ("naive-time", raw(make_doc(issued_at="2024-05-01T12:00:00")), "malformed-payload"),
    ("short-request-id", raw(make_doc(request_id="abc")), "malformed-payload"),
    ("upper-request-id", raw(make_doc(request_id="A" * 32)), "malformed-payload"),
    (
        "lower-fingerprint",
        raw(make_doc(audience={"address": SERVER, "fingerprint": "a" * 40})),
        "malformed-payload",
    ),
    (
        "bad-audience-address",
        raw(make_doc(audience={"address": "root@server.test\r\nBcc: x@y"})),
        "malformed-payload",
    ),
    ("bad-reply-to", raw(make_doc(reply_to="a@b>, c@d")), "malformed-payload"),
    ("stdin-not-base64", raw(make_doc(stdin="!!!")), "malformed-payload"),
    ("timeout-zero", raw(make_doc(timeout=0)), "malformed-payload"),
    ("timeout-huge", raw(make_doc(timeout=86_401)), "malformed-payload"),
    ("max-output-negative", raw(make_doc(max_output_bytes=-1)), "malformed-payload"),
]


@pytest.mark.parametrize(
    ("payload", "reason"), [c[1:] for c in PARSE_REJECTS], ids=[c[0] for c in PARSE_REJECTS]
)
def test_parse_request_rejects(payload: bytes, reason: str) -> None:
    assert reason_of(protocol.parse_request, payload).reason == reason


def test_unknown_request_version_says_upgrade_the_server() -> None:
    err = reason_of(protocol.parse_request, raw(make_doc(kind="mailsh.request.v2")))
    assert "mailsh.request.v2" in err.message
    assert err.hint is not None
    assert "upgrade" in err.hint
    assert "server" in err.hint


def test_unknown_reply_version_says_upgrade_the_client() -> None:
    doc = {"kind": "mailsh.reply.v7"}
    err = reason_of(protocol.parse_reply, raw(doc))
    assert err.reason == "unsupported-version"
    assert err.hint is not None
    assert "client" in err.hint


def test_request_is_not_a_reply() -> None:
    assert (
        reason_of(protocol.parse_reply, protocol.encode_payload(make_request())).reason
        == "unknown-kind"
    )


def test_oversize_payload_is_rejected_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_PAYLOAD_BYTES", 100)
    assert reason_of(protocol.parse_request, b" " * 101).reason == "payload-too-large"


def test_validation_message_names_the_field() -> None:
    err = reason_of(protocol.parse_request, raw(make_doc(run_as="root")))
    assert "run_as" in err.message


# --------------------------------------------------------------------------------------
# check_request: each rule alone (the others would pass)
# --------------------------------------------------------------------------------------


def run_check(req: Request, **over: Any) -> None:
    kw: dict[str, Any] = {
        "signed_at": req.issued_at,
        "server_addresses": [SERVER, "other@server.test"],
        "server_fingerprint": SERVER_FPR,
        "now": NOW,
        "max_skew": SKEW,
        "max_age": AGE,
    }
    kw.update(over)
    protocol.check_request(req, **kw)


def test_check_request_accepts_a_good_request() -> None:
    run_check(make_request())
    run_check(make_request(audience=Audience(address="ROOT@Server.Test")))  # case-insensitive
    run_check(make_request(audience=Audience(address=SERVER)))  # fingerprint optional
    run_check(make_request(), server_fingerprint=None)


T = timedelta
CHECKS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    (
        "wrong-audience-address",
        {"audience": Audience(address="root@elsewhere.test")},
        {},
        "wrong-audience",
    ),
    (
        "wrong-audience-fingerprint",
        {"audience": Audience(address=SERVER, fingerprint="B" * 40)},
        {},
        "wrong-audience",
    ),
    ("expires-before-issued", {"expires_at": NOW - T(seconds=1)}, {}, "bad-window"),
    ("expires-at-issued", {"expires_at": NOW}, {}, "bad-window"),
    ("window-over-7-days", {"expires_at": NOW + T(days=7, seconds=1)}, {}, "bad-window"),
    (
        "issued-in-future",
        {"issued_at": NOW + T(hours=1), "expires_at": NOW + T(hours=2)},
        {"signed_at": NOW + T(hours=1)},
        "request-from-future",
    ),
    (
        "expired",
        {"issued_at": NOW - T(hours=2), "expires_at": NOW - T(hours=1)},
        {"signed_at": NOW - T(hours=2)},
        "request-expired",
    ),
    (
        "too-old",
        {"issued_at": NOW - T(days=2), "expires_at": NOW + T(days=3)},
        {"signed_at": NOW - T(days=2)},
        "request-too-old",
    ),
    (
        "signed-after-issued",
        {},
        {"signed_at": NOW + SKEW + T(seconds=1)},
        "signature-time-mismatch",
    ),
    (
        "signed-before-issued",
        {},
        {"signed_at": NOW - SKEW - T(seconds=1)},
        "signature-time-mismatch",
    ),
]


@pytest.mark.parametrize(
    ("req_over", "kw", "reason"), [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS]
)
def test_check_request_rejects(req_over: dict[str, Any], kw: dict[str, Any], reason: str) -> None:
    req = make_request(**req_over)
    with pytest.raises(ProtocolError) as info:
        run_check(req, **kw)
    assert info.value.reason == reason


def test_check_request_edges_inside_skew_are_accepted() -> None:
    run_check(make_request(issued_at=NOW + SKEW, expires_at=NOW + T(hours=1)), signed_at=NOW + SKEW)
    run_check(
        make_request(issued_at=NOW - T(hours=1), expires_at=NOW - SKEW), signed_at=NOW - T(hours=1)
    )
    run_check(make_request(), signed_at=NOW + SKEW)
    run_check(make_request(expires_at=NOW + T(days=7)))


# --------------------------------------------------------------------------------------
# Armor and uu framing
# --------------------------------------------------------------------------------------

ARMOR = b"-----BEGIN PGP MESSAGE-----\n\nowGbwMvMwMV4\n=abcd\n-----END PGP MESSAGE-----\n"


def test_extract_armor_finds_the_one_block() -> None:
    assert protocol.extract_armor(b"hello\r\n" + ARMOR.replace(b"\n", b"\r\n") + b"bye\n") == ARMOR


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"no armor here", "armor-count"),
        (ARMOR + ARMOR, "armor-count"),
        (ARMOR + b"-----BEGIN PGP SIGNATURE-----\n", "armor-count"),
        (ARMOR.replace(b"MESSAGE", b"PUBLIC KEY BLOCK"), "armor-kind"),
        (ARMOR.replace(b"BEGIN PGP MESSAGE", b"BEGIN PGP SIGNED MESSAGE"), "armor-kind"),
        (b"-----END PGP MESSAGE-----\n-----BEGIN PGP MESSAGE-----\n", "armor-count"),
    ],
    ids=["none", "two", "extra-begin", "key-block", "clearsigned", "end-before-begin"],
)
def test_extract_armor_rejects(body: bytes, reason: str) -> None:
    assert reason_of(protocol.extract_armor, body).reason == reason


def test_uu_round_trip_is_byte_exact() -> None:
    block = protocol.uuencode(BINARY * 3)
    assert block.startswith(b"begin 600 request.asc\n")
    assert block.endswith(b"`\nend\n")
    assert (
        protocol.extract_uu(b"preamble\r\n\r\n" + block.replace(b"\n", b"\r\n"), max_bytes=10_000)
        == BINARY * 3
    )


def test_uu_padded_lines_are_accepted() -> None:
    """Some encoders (CPython's old uu module) pad lines; the data is still exact."""
    block = protocol.uuencode(b"abcd")
    lines = block.split(b"\n")
    lines[1] = lines[1] + b"``"
    assert protocol.extract_uu(b"\n".join(lines), max_bytes=100) == b"abcd"


UU = protocol.uuencode(b"payload")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"no block", "uu-count"),
        (UU + UU, "uu-count"),
        (UU + b"begin 644 other.txt\n`\nend\n", "uu-count"),
        (UU.replace(b"begin 600", b"begin-base64 600"), "uu-count"),
        (b"begin-base64 600 x\ncGF5bG9hZA==\n====\n", "uu-count"),
        (UU + b"begin-base64 644 y\n====\n", "uu-count"),
        (UU.replace(b"end\n", b""), "uu-truncated"),
        (b"begin 600 x\n\x7f\x7f\x7f\x7f\x7f\nend\n", "uu-corrupt"),
    ],
    ids=[
        "none",
        "two",
        "two-names",
        "base64",
        "only-base64",
        "uu-plus-base64",
        "no-end",
        "corrupt",
    ],
)
def test_extract_uu_rejects(body: bytes, reason: str) -> None:
    assert reason_of(lambda b: protocol.extract_uu(b, max_bytes=10_000), body).reason == reason


def test_extract_uu_enforces_max_bytes() -> None:
    assert (
        reason_of(
            lambda b: protocol.extract_uu(b, max_bytes=500), protocol.uuencode(b"x" * 1000)
        ).reason
        == "too-large"
    )


def test_uu_file_name_is_irrelevant() -> None:
    """The name in ``begin`` is never used: a hostile path decodes like any other."""
    block = protocol.uuencode(b"payload", name="../../etc/cron.d/x")
    assert protocol.extract_uu(block, max_bytes=100) == b"payload"
