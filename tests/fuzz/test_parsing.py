"""Fuzzing the pure-Python parsers: mail reading, uu and armor extraction.

Each parser either returns what its contract says or raises ProtocolError (the server
discards those), on any input, within bounded time and memory.
"""

from __future__ import annotations

import binascii

from hypothesis import given
from hypothesis import strategies as st

from mailsh import protocol
from mailsh.errors import ProtocolError
from mailsh.mail.message import MESSAGE_ID_RE, IncomingMail, read_mail
from tests.kit import forge
from tests.kit.fuzzing import budget, guard

MAX = 64 * 1024

_EOL = st.sampled_from([b"\r\n", b"\n", b"\r"])
_HEADER_NAMES = st.sampled_from(
    [
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"Message-ID",
        b"Auto-Submitted",
        b"Return-Path",
        b"From",
        b"Subject",
        b"MIME-Version",
        b"content-type",
        b"X-Other",
    ]
)
_HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            b"text/plain",
            b'multipart/mixed; boundary="x"',
            b"message/rfc822",
            b"base64",
            b"quoted-printable",
            b"7bit",
            b"x-uue",
            b"<a@b>",
            b"<>",
            b"auto-replied",
            b"no",
            b"=?utf-8?b?w6k=?=",
            b"text/plain; charset=utf-16",
        ]
    ),
    st.binary(max_size=80),
)


@st.composite
def mails(draw: st.DrawFn) -> bytes:
    """Mail-shaped bytes: headers (folded or not) of interesting names, any body."""
    eol = draw(_EOL)
    headers = draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=12))
    lines = [name + b": " + value for name, value in headers]
    if draw(st.booleans()) and lines:
        lines.insert(draw(st.integers(0, len(lines))), b"\tfolded continuation")
    body = draw(st.one_of(st.binary(max_size=2048), st.sampled_from([b"", b"\x00", b"=\r\n"])))
    return eol.join(lines) + eol + eol + body


def _check_read(raw: bytes) -> None:
    with guard(memory=True):
        try:
            mail = read_mail(raw, max_bytes=MAX)
        except ProtocolError:
            return
    assert isinstance(mail, IncomingMail)
    assert len(raw) <= MAX
    assert b"\x00" not in raw
    assert mail.message_id is None or MESSAGE_ID_RE.match(mail.message_id)
    assert len(mail.subject_hint) <= 200


@budget(300)
@given(st.binary(max_size=4096))
def test_read_mail_on_any_bytes(raw: bytes) -> None:
    _check_read(raw)


@budget(300)
@given(mails())
def test_read_mail_on_mail_shaped_bytes(raw: bytes) -> None:
    _check_read(raw)


def _check_uu(body: bytes, max_bytes: int = MAX) -> bytes | None:
    with guard(memory=True):
        try:
            out = protocol.extract_uu(body, max_bytes=max_bytes)
        except ProtocolError:
            return None
    assert len(out) <= max_bytes
    return out


@budget(300)
@given(st.binary(max_size=4096))
def test_extract_uu_on_any_bytes(body: bytes) -> None:
    _check_uu(body)


_NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30).map(
    str.encode
)


@budget(200)
@given(st.binary(max_size=3000), _NAMES, st.booleans())
def test_extract_uu_round_trips_uuencode(data: bytes, name: bytes, crlf: bool) -> None:
    block = protocol.uuencode(data, name=name.decode())
    if crlf:
        block = block.replace(b"\n", b"\r\n")
    body = b"preamble line\n" + block + b"trailing text\n"
    assert _check_uu(body) == data


@st.composite
def mutated_uu(draw: st.DrawFn) -> bytes:
    """A valid uu block with lines dropped, duplicated, replaced or inserted."""
    data = draw(st.binary(min_size=1, max_size=600))
    lines = protocol.uuencode(data).split(b"\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "replace", "insert"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "replace":
            lines[i] = draw(st.binary(max_size=70).filter(lambda b: b"\n" not in b))
        else:
            token = draw(
                st.sampled_from(
                    [b"begin 644 x", b"begin-base64 600 y", b"end", b"`", b"M" + b"!" * 60]
                )
            )
            lines.insert(i, token)
        if not lines:
            break
    return b"\n".join(lines)


@budget(300)
@given(mutated_uu())
def test_extract_uu_on_mutated_blocks(body: bytes) -> None:
    _check_uu(body)


def test_extract_uu_output_cap_holds() -> None:
    block = protocol.uuencode(bytes(10_000))
    assert _check_uu(block, max_bytes=1000) is None


_ARMOR_LINES = st.one_of(
    st.sampled_from(
        [
            b"-----BEGIN PGP MESSAGE-----",
            b"-----END PGP MESSAGE-----",
            b"-----BEGIN PGP SIGNATURE-----",
            b"-----END PGP SIGNATURE-----",
            b"-----BEGIN PGP SIGNED MESSAGE-----",
            b"Comment: x",
            b"",
            b"=abcd",
            b"hQEMA0Zm",
        ]
    ),
    st.binary(max_size=70).filter(lambda b: b"\n" not in b),
)


@budget(300)
@given(st.lists(_ARMOR_LINES, max_size=20), _EOL)
def test_extract_armor_on_armor_shaped_text(lines: list[bytes], eol: bytes) -> None:
    data = eol.join(lines)
    with guard(memory=True):
        try:
            out = protocol.extract_armor(data)
        except ProtocolError:
            return
    assert out.startswith(b"-----BEGIN PGP MESSAGE-----")
    assert out.rstrip().endswith(b"-----END PGP MESSAGE-----")
    # One complete BEGIN and END line; anything else inside is the OpenPGP layer's to
    # refuse (packets.dearmor, gpg), as a stray "-----BEGIN PGP" line is.
    assert out.count(b"-----BEGIN PGP MESSAGE-----") == 1
    assert out.count(b"-----END PGP MESSAGE-----") == 1


@budget(100)
@given(st.binary(max_size=2000))
def test_extract_armor_finds_the_one_block(packets: bytes) -> None:
    armored = forge.armor(packets)
    got = protocol.extract_armor(b"text before\n" + armored + b"text after\n")
    assert got == armored
    assert binascii.a2b_base64(b"".join(got.split(b"\n")[2:-3])) == packets
