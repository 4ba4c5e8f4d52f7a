"""mailsh.mail.message: reading hostile mails, building requests and replies from templates."""

from __future__ import annotations

import base64
import quopri
from email import message_from_bytes
from email.policy import default

import pytest

from mailsh.errors import ProtocolError
from mailsh.mail.message import build_reply_mail, build_request_mail, read_mail
from tests.kit.forge import mail_with_body

BODY = b"line one\r\nbegin 600 request.asc\r\n`\r\nend\r\n"
LIMIT = 1 << 20


def reject(raw: bytes, max_bytes: int = LIMIT) -> str:
    with pytest.raises(ProtocolError) as info:
        read_mail(raw, max_bytes=max_bytes)
    return info.value.reason


def test_plain_body_is_returned_byte_exact() -> None:
    mail = read_mail(mail_with_body(BODY), max_bytes=LIMIT)
    assert mail.body == BODY
    assert mail.message_id == "<hostile.1@example.org>"
    assert not mail.is_bounce
    assert mail.auto_submitted is None


def test_oversize_mail_is_rejected() -> None:
    raw = mail_with_body(b"x" * 2000)
    assert reject(raw, max_bytes=len(raw) - 1) == "too-large"
    assert read_mail(raw, max_bytes=len(raw)).body == b"x" * 2000


def test_nul_byte_is_rejected() -> None:
    assert reject(mail_with_body(b"id\x00\r\n")) == "nul-byte"


def test_multipart_is_rejected() -> None:
    raw = mail_with_body(
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n",
        {"Content-Type": 'multipart/mixed; boundary="b"'},
    )
    assert reject(raw) == "not-plain-text"


def test_html_is_rejected() -> None:
    assert reject(mail_with_body(b"<p>x</p>", {"Content-Type": "text/html"})) == "not-plain-text"


def test_mime_depth_bomb_is_a_protocol_error() -> None:
    """1000 nested multiparts raise RecursionError in the stdlib parser: never parse them."""
    depth = 1000
    opening = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(depth)
    )
    closing = b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth + 1)))
    raw = mail_with_body(
        opening + b"--b1000\r\nContent-Type: text/plain\r\n\r\nx\r\n" + closing,
        {"Content-Type": 'multipart/mixed; boundary="b0"'},
    )
    with pytest.raises(RecursionError):  # the danger is real
        message_from_bytes(raw, policy=default).get_body()
    assert reject(raw) == "not-plain-text"


def test_non_utf8_body_is_passed_as_bytes() -> None:
    """read_mail does not decode text; non-UTF-8 bytes reach the uu/armor stage untouched."""
    assert read_mail(mail_with_body(b"\xff\xfe caf\xe9\r\n"), max_bytes=LIMIT).body == (
        b"\xff\xfe caf\xe9\r\n"
    )


def test_non_utf8_headers_do_not_crash() -> None:
    raw = b"Subject: \xff\xfe\r\nMessage-ID: <\xff@x>\r\n\r\nbody\r\n"
    mail = read_mail(raw, max_bytes=LIMIT)
    assert mail.body == b"body\r\n"
    assert mail.message_id is None


def test_bare_cr_is_kept_not_turned_into_lines() -> None:
    mail = read_mail(mail_with_body(b"a\rb\r\n"), max_bytes=LIMIT)
    assert mail.body == b"a\rb\r\n"


def test_base64_transfer_encoding_is_decoded() -> None:
    raw = mail_with_body(
        base64.encodebytes(BODY).replace(b"\n", b"\r\n"),
        {"Content-Transfer-Encoding": "base64"},
    )
    assert read_mail(raw, max_bytes=LIMIT).body == BODY


def test_quoted_printable_is_decoded() -> None:
    raw = mail_with_body(
        quopri.encodestring(BODY.replace(b"\r\n", b"\n")),
        {"Content-Transfer-Encoding": "quoted-printable"},
    )
    assert read_mail(raw, max_bytes=LIMIT).body == BODY.replace(b"\r\n", b"\n")


@pytest.mark.parametrize(
    ("cte", "body", "reason"),
    [("base64", b"!!!not base64", "bad-encoding"), ("x-uuencode", b"x", "bad-encoding")],
)
def test_bad_transfer_encodings(cte: str, body: bytes, reason: str) -> None:
    assert reject(mail_with_body(body, {"Content-Transfer-Encoding": cte})) == reason


@pytest.mark.parametrize(
    "message_id",
    ["<a@b>\r\n Bcc: x@y", "<a b@c>", "no-brackets@x", "<a@b>, <c@d>", "<" + "a" * 300 + "@b>"],
)
def test_bad_message_ids_are_dropped(message_id: str) -> None:
    raw = mail_with_body(b"x", {"Message-ID": message_id})
    assert read_mail(raw, max_bytes=LIMIT).message_id is None


def test_two_message_ids_are_dropped() -> None:
    raw = b"Message-ID: <a@b>\r\nMessage-ID: <c@d>\r\n\r\nx"
    assert read_mail(raw, max_bytes=LIMIT).message_id is None


def test_bounce_and_auto_submitted_are_seen() -> None:
    raw = mail_with_body(b"x", {"Return-Path": "<>", "Auto-Submitted": "Auto-Replied"})
    mail = read_mail(raw, max_bytes=LIMIT)
    assert mail.is_bounce
    assert mail.auto_submitted == "auto-replied"


def test_a_line_folded_into_the_null_return_path_still_marks_a_bounce() -> None:
    # serve's listener puts "Return-Path: <>" before what a MAIL FROM:<> client sends;
    # a first line starting with a space would fold into it (docs/security.md P7)
    raw = b"Return-Path: <>\r\n folded\r\nSubject: t\r\n\r\nx"
    assert read_mail(raw, max_bytes=LIMIT).is_bounce
    assert not read_mail(b"Return-Path: <a@b>\r\n <>\r\n\r\nx", max_bytes=LIMIT).is_bounce


def test_request_mail_is_single_text_plain_crlf() -> None:
    raw, message_id = build_request_mail(
        uu_block=b"begin 600 request.asc\n`\nend\n",
        from_addr="alice@example.org",
        to_addr="root@server.test",
        request_id="a" * 32,
    )
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = message_from_bytes(raw, policy=default)
    assert msg.get_content_type() == "text/plain"
    assert not msg.is_multipart()
    assert msg["Message-ID"] == message_id
    assert message_id.endswith("@example.org>")
    assert read_mail(raw, max_bytes=LIMIT).body.endswith(b"begin 600 request.asc\r\n`\r\nend\r\n")


def _reply(in_reply_to: str | None, *, summary: bool = False) -> bytes:
    return build_reply_mail(
        armored=b"-----BEGIN PGP MESSAGE-----\n\nx\n-----END PGP MESSAGE-----\n",
        from_addr="root@server.test",
        to_addr="alice@example.org",
        request_id="b" * 32,
        status="ok",
        exit_code=0,
        in_reply_to=in_reply_to,
        summary=summary,
    )


def test_reply_mail_headers() -> None:
    raw = _reply("<req.1@example.org>")
    msg = message_from_bytes(raw, policy=default)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<req.1@example.org>"
    assert msg["References"] == "<req.1@example.org>"
    assert msg.get_content_type() == "text/plain"
    assert msg["Subject"] == "mailsh reply " + "b" * 32
    body = read_mail(raw, max_bytes=LIMIT).body
    assert body.startswith(b"mailsh reply\r\nrequest: " + b"b" * 32 + b"\r\n\r\n")
    assert b"status:" not in body
    assert b"exit code:" not in body
    assert b"-----BEGIN PGP MESSAGE-----" in body


def test_reply_summary_shows_status_and_exit_code() -> None:
    raw = _reply(None, summary=True)
    msg = message_from_bytes(raw, policy=default)
    assert msg["Subject"] == "mailsh reply " + "b" * 32 + " [ok]"
    body = read_mail(raw, max_bytes=LIMIT).body
    assert body.startswith(b"mailsh reply\r\nrequest: " + b"b" * 32 + b"\r\nstatus: ok\r\n")
    assert b"exit code: 0\r\n" in body


@pytest.mark.parametrize(
    "evil",
    ["<a@b>\r\nBcc: victim@example.org", "<a@b>\nBcc: v@x", "=?utf-8?q?=0ABcc:_v@x?=", "junk"],
)
def test_reply_never_copies_an_unchecked_message_id(evil: str) -> None:
    """CVE-2024-6923 class: nothing but a syntax-checked Message-ID is copied."""
    raw = _reply(evil)
    msg = message_from_bytes(raw, policy=default)
    assert msg["In-Reply-To"] is None
    assert msg["References"] is None
    assert msg["Bcc"] is None
    assert b"victim" not in raw
