"""Building and reading the RFC 5322 mails that carry protocol payloads.

Outgoing headers come from fixed templates filled with validated values only: nothing
of an incoming mail is copied into a reply except a Message-ID that passed a strict
syntax check (docs/security.md P8: CVE-2024-6923 header injection). Incoming mails are size-
checked before parsing, parsed headers-first, and must be a single text/plain part
(P4: no extra parts, no MIME wrapping of a captured request).
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP, compat32
from email.utils import format_datetime

from mailsh.errors import ProtocolError

MESSAGE_ID_RE = re.compile(r"^<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,200}@[A-Za-z0-9.-]{1,200}>$")
REQUEST_SUBJECT = "mailsh request {request_id}"
REPLY_SUBJECT = "mailsh reply {request_id}"
#: The Subject with ``--reply-summary``: status readable by every relay on the way.
REPLY_SUBJECT_SUMMARY = "mailsh reply {request_id} [{status}]"


def _domain(address: str) -> str:
    return address.rsplit("@", 1)[-1]


def new_message_id(from_addr: str) -> str:
    return f"<mailsh.{secrets.token_hex(12)}@{_domain(from_addr)}>"


def _base(from_addr: str, to_addr: str, subject: str) -> EmailMessage:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = from_addr
    msg["To"] = to_addr
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = new_message_id(from_addr)
    msg["MIME-Version"] = "1.0"
    msg["X-Mailsh"] = "1"
    return msg


def _set_ascii_body(msg: EmailMessage, body: bytes) -> None:
    msg["Content-Type"] = "text/plain; charset=us-ascii"
    msg["Content-Transfer-Encoding"] = "7bit"
    msg.set_payload(body.decode("ascii").replace("\n", "\r\n"))


def build_request_mail(
    *, uu_block: bytes, from_addr: str, to_addr: str, request_id: str
) -> tuple[bytes, str]:
    """A request mail (CRLF line ends) and its Message-ID."""
    msg = _base(from_addr, to_addr, REQUEST_SUBJECT.format(request_id=request_id))
    preamble = (
        f"mailsh request {request_id}\n"
        "The uuencoded block below is an OpenPGP message for mailsh serve.\n\n"
    ).encode()
    _set_ascii_body(msg, preamble + uu_block)
    return msg.as_bytes(), str(msg["Message-ID"])


def build_reply_mail(
    *,
    armored: bytes,
    from_addr: str,
    to_addr: str,
    request_id: str | None,
    status: str,
    exit_code: int | None,
    in_reply_to: str | None,
    summary: bool = False,
) -> bytes:
    """A reply mail a person can read with gpg alone: preamble, then the armored block.

    By default the Subject and the preamble name only the request: status, exit code
    and reason stay inside the encryption, so relays learn nothing of the outcome
    (docs/security.md P17). ``summary`` (``--reply-summary``) adds status and exit code
    in clear text to both.
    """
    rid = request_id or "unknown"
    subject = REPLY_SUBJECT_SUMMARY if summary else REPLY_SUBJECT
    msg = _base(from_addr, to_addr, subject.format(request_id=rid, status=status))
    msg["Auto-Submitted"] = "auto-replied"
    if in_reply_to is not None and MESSAGE_ID_RE.match(in_reply_to):
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    if summary:
        code = "-" if exit_code is None else str(exit_code)
        preamble = (
            f"mailsh reply\nrequest: {rid}\nstatus: {status}\nexit code: {code}\n\n"
            "The signed (and encrypted) result follows; read it with: gpg --decrypt FILE\n\n"
        )
    else:
        preamble = (
            f"mailsh reply\nrequest: {rid}\n\n"
            f"The encrypted reply to request {rid} follows; status, exit code and output\n"
            "are inside. Read it with: gpg --decrypt FILE\n\n"
        )
    _set_ascii_body(msg, preamble.encode() + armored)
    return msg.as_bytes()


def _raw_body(raw: bytes) -> bytes:
    """The bytes after the header/body separator (the stdlib would re-decode them)."""
    cuts = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    if not cuts:
        return b""
    cut = min(cuts)
    return raw[cut + (4 if raw.startswith(b"\r\n\r\n", cut) else 2) :]


@dataclass(frozen=True)
class IncomingMail:
    """What mailsh reads of a received mail. Headers here are hints, never trusted."""

    body: bytes
    message_id: str | None  # only when syntactically valid
    auto_submitted: str | None
    is_bounce: bool
    subject_hint: str


def read_mail(raw: bytes, *, max_bytes: int | None) -> IncomingMail:
    """Parse a received mail, or raise ProtocolError (reason says why).

    ``max_bytes`` None: the caller already bounded ``raw`` (the server's spool read).
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raise ProtocolError("too-large", f"mail is larger than {max_bytes} bytes")
    if b"\x00" in raw:
        raise ProtocolError("nul-byte", "mail contains NUL bytes")
    # Headers only: a MIME depth bomb is never parsed (it is rejected as multipart).
    headers = BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    ctype = (headers.get_content_type() or "text/plain").lower()
    if ctype != "text/plain":
        raise ProtocolError("not-plain-text", f"mail must be a single text/plain part ({ctype})")
    body_bytes = _raw_body(raw)
    cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte == "base64":
        try:
            body_bytes = base64.b64decode(b"".join(body_bytes.split()), validate=True)
        except binascii.Error as exc:
            raise ProtocolError("bad-encoding", "invalid base64 body") from exc
    elif cte == "quoted-printable":
        body_bytes = quopri.decodestring(body_bytes)
    elif cte not in ("7bit", "8bit", "binary"):
        raise ProtocolError("bad-encoding", f"unknown Content-Transfer-Encoding {cte!r}")
    message_ids = headers.get_all("Message-ID") or []
    message_id = str(message_ids[0]).strip() if len(message_ids) == 1 else None
    if message_id is not None and not MESSAGE_ID_RE.match(message_id):
        message_id = None
    auto = headers.get("Auto-Submitted")
    # The first Return-Path is the one the MTA (or serve's own listener) put on top. What
    # the sender wrote after it can fold into it ("Return-Path: <>" + " x"): a null
    # sender is a value that *starts* with "<>", whatever was folded on.
    return_path = str(headers.get("Return-Path", "")).strip()
    return IncomingMail(
        body=body_bytes,
        message_id=message_id,
        auto_submitted=str(auto).strip().lower() if auto is not None else None,
        is_bounce=return_path.startswith("<>"),
        subject_hint=str(headers.get("Subject", ""))[:200],
    )
