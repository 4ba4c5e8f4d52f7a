"""The mailsh wire protocol, version 1 (spec: docs/protocol.md).

A request is a JSON document (:class:`Request`, kind ``mailsh.request.v1``) that the
operator's key signs (and encrypts to the server key when known); the ASCII-armored
OpenPGP message is uuencoded (``begin 600 request.asc``) into a text/plain mail body. A
reply is a JSON document (:class:`Reply`, kind ``mailsh.reply.v1``) signed by the server
and encrypted to the authorizing key, carried as a plain armored block after a short
human-readable preamble so a person with only gpg can read it.

Strict inside the signature (frozen models, unknown fields rejected), tolerant outside
it: mail headers are routing hints, never trusted. This module imports no CLI, network
or GnuPG code: it turns bytes into models and models into bytes, and states the rules a
verified payload must still pass (audience, time window, versions).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
)

from mailsh.addresses import validate_address
from mailsh.errors import ProtocolError, first_validation_error

REQUEST_KIND = "mailsh.request.v1"
REPLY_KIND = "mailsh.reply.v1"
NOTICE_KIND = "mailsh.notice.v1"
KIND_RE = re.compile(r"^mailsh\.(request|reply|notice)\.v(\d+)$")

MAX_COMMAND_CHARS = 65_536
MAX_STDIN_BYTES = 8 * 1024 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_REQUEST_LIFETIME = timedelta(days=7)
UU_FILE_NAME = "request.asc"

REQUEST_ID_RE = re.compile(r"^[0-9a-f]{32}$")
"""A request id: 32 lowercase hex characters (128 bits); the one definition."""
_FPR_RE = re.compile(r"^[0-9A-F]{40}$")


def _strict_b64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64: {exc}") from exc


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must carry a time zone")
    return value.astimezone(UTC)


def _check_request_id(value: str) -> str:
    if not REQUEST_ID_RE.match(value):
        raise ValueError("request id must be 32 lowercase hex characters (128 bits)")
    return value


def _check_fpr(value: str) -> str:
    if not _FPR_RE.match(value):
        raise ValueError("fingerprint must be 40 uppercase hex characters")
    return value


def _check_address(value: str) -> str:
    return validate_address(value)


def _check_command(value: str) -> str:
    if "\x00" in value:
        raise ValueError("command contains a NUL byte")
    return value


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_strict_b64),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]
UtcDatetime = Annotated[datetime, AfterValidator(_aware_utc)]
RequestId = Annotated[str, AfterValidator(_check_request_id)]
Fingerprint = Annotated[str, AfterValidator(_check_fpr)]
Address = Annotated[str, Field(max_length=320), AfterValidator(_check_address)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Audience(_Strict):
    """Which server a request is for: bound inside the signature (docs/security.md P6)."""

    address: Address
    fingerprint: Fingerprint | None = None


class Request(_Strict):
    """``mailsh.request.v1``: one command for one server, valid for a time window."""

    kind: Literal["mailsh.request.v1"] = "mailsh.request.v1"
    request_id: RequestId
    audience: Audience
    reply_to: Address
    issued_at: UtcDatetime
    expires_at: UtcDatetime
    command: Annotated[
        str, Field(min_length=1, max_length=MAX_COMMAND_CHARS), AfterValidator(_check_command)
    ]
    stdin: Annotated[B64Bytes, Field(max_length=MAX_STDIN_BYTES)] | None = None
    timeout: Annotated[float, Field(gt=0, le=86_400)] | None = None
    max_output_bytes: Annotated[int, Field(gt=0)] | None = None


class ReplyStatus(StrEnum):
    OK = "ok"  # the command ran; see exit_code / signal / timed_out
    REJECTED = "rejected"  # authenticated but refused (replay, audience, window, policy)
    ERROR = "error"  # the server could not run it (e.g. run-as user missing)
    OUTCOME_UNKNOWN = "outcome-unknown"  # interrupted by a crash or shutdown; not re-run


class Reply(_Strict):
    """``mailsh.reply.v1``: what happened to one request, signed by the server."""

    kind: Literal["mailsh.reply.v1"] = "mailsh.reply.v1"
    request_id: RequestId | None
    request_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    server: Address
    status: ReplyStatus
    reason: Annotated[str, Field(max_length=2000)] | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    stdout: B64Bytes = b""
    stderr: B64Bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    memory_peak_bytes: Annotated[int, Field(ge=0)] | None = None  # cgroup memory.peak
    pids_peak: Annotated[int, Field(ge=0)] | None = None  # cgroup pids.peak

    @property
    def shell_status(self) -> int:
        """The status a shell would report: exit code, 128+N for signal N, else 255."""
        if self.exit_code is not None:
            return self.exit_code
        if self.signal is not None:
            return 128 + self.signal
        return 255


class OriginalState(StrEnum):
    """What had become of a request when the server received another copy of it."""

    RUNNING = "running"  # claimed; its command is (or may still be) running
    FINISHED = "finished"  # its outcome reply was queued (ok, error or rejected)
    OUTCOME_UNKNOWN = "outcome-unknown"  # interrupted; reported as outcome-unknown
    UNREPORTED = "unreported"  # the server could not seal a report for it


class Notice(_Strict):
    """``mailsh.notice.v1``: news about a request that is **not** its outcome.

    A server sends at most one per request: when it receives a copy of a request it has
    already taken (a duplicate delivery, a loop, a replay). A client never ends a wait
    on a notice; the outcome comes only as a :class:`Reply`.
    """

    kind: Literal["mailsh.notice.v1"] = "mailsh.notice.v1"
    request_id: RequestId | None
    request_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    server: Address
    notice: Literal["duplicate"] = "duplicate"
    original: OriginalState
    reason: Annotated[str, Field(max_length=2000)] | None = None


def new_request_id() -> str:
    return secrets.token_hex(16)


#: Reply fields added to v1 before its first release: left out of the payload when
#: unset, so a reply without them is byte-for-byte what every v1 client accepts.
OMITTED_WHEN_UNSET = frozenset({"memory_peak_bytes", "pids_peak"})


def encode_payload(model: Request | Reply | Notice) -> bytes:
    """The exact bytes that get signed: compact, key-sorted JSON in UTF-8."""
    doc = model.model_dump(mode="json", exclude_none=False)
    for name in OMITTED_WHEN_UNSET:
        if doc.get(name, 0) is None:
            del doc[name]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _load_kind(
    plaintext: bytes, expected: Literal["request", "reply"], *, also: str | None = None
) -> dict[str, Any]:
    if len(plaintext) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("payload-too-large", "the signed payload is too large")
    try:
        doc = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed-payload", "the signed payload is not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise ProtocolError("malformed-payload", "the signed payload has no kind")
    match = KIND_RE.match(doc["kind"])
    if match is None or match.group(1) not in (expected, also):
        raise ProtocolError("unknown-kind", f"expected a mailsh {expected}, got {doc['kind']!r}")
    if match.group(2) != "1":
        side = "server" if expected == "request" else "client"
        raise ProtocolError(
            "unsupported-version",
            f"{doc['kind']} is not supported here (this mailsh speaks v1)",
            hint=f"upgrade mailsh on the {side}",
        )
    return doc


def _validate(model: type[Request] | type[Reply] | type[Notice], doc: dict[str, Any]) -> Any:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        where, what = first_validation_error(exc)
        raise ProtocolError("malformed-payload", f"invalid {where}: {what}") from exc


def parse_request(plaintext: bytes) -> Request:
    request: Request = _validate(Request, _load_kind(plaintext, "request"))
    return request


def parse_reply(plaintext: bytes) -> Reply:
    reply: Reply = _validate(Reply, _load_kind(plaintext, "reply"))
    return reply


def parse_server_message(plaintext: bytes) -> Reply | Notice:
    """A payload a server sent about a request: its outcome (:class:`Reply`) or a
    :class:`Notice`, told apart by ``kind`` (a notice can never parse as a reply)."""
    doc = _load_kind(plaintext, "reply", also="notice")
    if str(doc["kind"]).startswith("mailsh.notice."):
        notice: Notice = _validate(Notice, doc)
        return notice
    reply: Reply = _validate(Reply, doc)
    return reply


def check_request(
    request: Request,
    *,
    signed_at: datetime,
    server_addresses: list[str],
    server_fingerprint: str | None,
    now: datetime,
    max_skew: timedelta,
    max_age: timedelta,
) -> None:
    """The rules a verified request must still pass before it may run (P6)."""
    wanted = {a.lower() for a in server_addresses}
    if request.audience.address.lower() not in wanted:
        raise ProtocolError(
            "wrong-audience", f"request is addressed to {request.audience.address}, not here"
        )
    fpr = request.audience.fingerprint
    if fpr is not None and server_fingerprint is not None and fpr != server_fingerprint:
        raise ProtocolError("wrong-audience", "request names another server key")
    if request.expires_at <= request.issued_at:
        raise ProtocolError("bad-window", "request expires before it was issued")
    if request.expires_at - request.issued_at > MAX_REQUEST_LIFETIME:
        raise ProtocolError("bad-window", "request validity window is longer than 7 days")
    if request.issued_at > now + max_skew:
        raise ProtocolError("request-from-future", "request is dated in the future")
    if now > request.expires_at + max_skew:
        raise ProtocolError("request-expired", f"request expired at {request.expires_at}")
    if now - request.issued_at > max_age:
        raise ProtocolError("request-too-old", "request is older than this server accepts")
    if abs(signed_at - request.issued_at) > max_skew:
        raise ProtocolError(
            "signature-time-mismatch", "signature time does not match the request's issued-at"
        )


# --------------------------------------------------------------------------------------
# Armor and uuencoding
# --------------------------------------------------------------------------------------

_ARMOR_ANY_BEGIN = re.compile(rb"^-----BEGIN PGP [A-Z ,0-9/]*-----\s*$", re.M)
_ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"
_ARMOR_END = b"-----END PGP MESSAGE-----"


def extract_armor(data: bytes) -> bytes:
    """The one ``BEGIN PGP MESSAGE`` block in ``data`` (LF line ends), or reject (P4)."""
    text = data.replace(b"\r\n", b"\n")
    begins = _ARMOR_ANY_BEGIN.findall(text)
    ends = re.findall(rb"^-----END PGP [A-Z ,0-9/]*-----\s*$", text, re.M)
    if len(begins) != 1 or len(ends) != 1:
        raise ProtocolError(
            "armor-count", f"exactly one armored block is required (found {len(begins)})"
        )
    if begins[0].strip() != _ARMOR_BEGIN or ends[0].strip() != _ARMOR_END:
        raise ProtocolError("armor-kind", "the armored block is not a PGP MESSAGE")
    start = text.index(begins[0])
    end = text.find(ends[0], start)
    if end < 0:
        raise ProtocolError("armor-count", "armor END before BEGIN")
    return text[start : end + len(ends[0].rstrip())] + b"\n"


_UU_BEGIN = re.compile(rb"^begin(-base64)? +[0-7]{3,4} +\S.*$", re.M)
_UU_ANY_BEGIN = re.compile(rb"^begin(-base64)?\s+\S+", re.M)


def uuencode(data: bytes, name: str = UU_FILE_NAME, mode: int = 0o600) -> bytes:
    """uuencode ``data`` as the classic ``uuencode`` tool does (backtick for zero)."""
    lines = [f"begin {mode:o} {name}\n".encode()]
    for i in range(0, len(data), 45):
        lines.append(binascii.b2a_uu(data[i : i + 45], backtick=True))
    lines.append(b"`\nend\n")
    return b"".join(lines)


def extract_uu(body: bytes, *, max_bytes: int) -> bytes:
    """Decode the one uuencoded block in ``body``; the file name in it is never used."""
    text = body.replace(b"\r\n", b"\n")
    if len(_UU_ANY_BEGIN.findall(text)) != 1 or len(_UU_BEGIN.findall(text)) != 1:
        raise ProtocolError(
            "uu-count", "exactly one uuencoded block is required (begin MODE NAME ... end)"
        )
    match = _UU_BEGIN.search(text)
    if match is None:  # pragma: no cover - findall above found exactly one
        raise ProtocolError("uu-count", "no uuencoded block")
    if match.group(1):
        raise ProtocolError("uu-count", "begin-base64 blocks are not accepted; use uuencode")
    out = bytearray()
    ended = False
    for raw in text[match.end() :].split(b"\n")[1:]:
        line = raw.rstrip(b"\r")
        if line.strip() == b"end":
            ended = True
            break
        if not line:
            continue
        try:
            chunk = binascii.a2b_uu(line)
        except binascii.Error:
            # Workaround for encoders that pad lines (as CPython's uu module did).
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                chunk = binascii.a2b_uu(line[:nbytes])
            except binascii.Error as exc:
                raise ProtocolError("uu-corrupt", "the uuencoded block is corrupt") from exc
        out += chunk
        if len(out) > max_bytes:
            raise ProtocolError("too-large", "the uuencoded block is too large")
    if not ended:
        raise ProtocolError("uu-truncated", "the uuencoded block has no end line")
    return bytes(out)
