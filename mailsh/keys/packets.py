"""The outer shape of an OpenPGP message, checked before gpg sees it (docs/security.md P4).

gpg 2.2 stops after a complete compressed signed message and silently ignores packets
that follow it, so "signed message + unsigned literal" would verify. mailsh accepts only
these top-level packet sequences (RFC 4880 tags), nothing before or after:

- encrypted: one or more PKESK (1), then exactly one SEIPD (18);
- signed: one-pass signature (4), literal data (11), signature (2) — either as they are,
  or as the whole content of exactly one compressed data packet (8), with nothing after
  the compressed stream (gpg stops reading there, so trailing data would be ignored).

Only packet headers are read (lengths, tags), plus the decompression of a signed
message, capped like gpg's own output. What lies inside an encrypted packet is left to
gpg, whose status lines must then show exactly one literal and one signature
(:func:`mailsh.keys.crypto.verify`).
"""

from __future__ import annotations

import base64
import binascii
import bz2
import zlib
from collections.abc import Callable
from typing import Any

from mailsh.errors import ProtocolError

PKESK, SIG, ONEPASS, COMPRESSED, LITERAL, SEIPD = 1, 2, 4, 8, 11, 18


def dearmor(armored: bytes) -> bytes:
    """The binary packets of one ASCII-armored block (headers and checksum skipped)."""
    lines = armored.replace(b"\r\n", b"\n").split(b"\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(b"-----BEGIN PGP"))
        end = next(i for i, ln in enumerate(lines) if ln.startswith(b"-----END PGP"))
        blank = next(i for i in range(start + 1, end) if not lines[i].strip())
    except StopIteration as exc:
        raise ProtocolError("armor-corrupt", "the armored block is malformed") from exc
    body = [ln.strip() for ln in lines[blank + 1 : end] if ln.strip()]
    if body and body[-1].startswith(b"="):
        body = body[:-1]  # CRC24 checksum; gpg checks it
    try:
        return base64.b64decode(b"".join(body), validate=True)
    except binascii.Error as exc:
        raise ProtocolError("armor-corrupt", "the armored block is not valid base64") from exc


def split_packets(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of each packet at this level; raise on a truncated or odd header."""
    packets: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        head = data[pos]
        if not head & 0x80:
            raise ProtocolError("packet-corrupt", "not an OpenPGP packet header")
        pos += 1
        if head & 0x40:  # new format
            tag = head & 0x3F
            chunks = []
            length, pos, partial = _new_length(data, pos)
            while partial:  # partial body lengths: chunks until a final length
                chunks.append(data[pos : pos + length])
                pos += length
                length, pos, partial = _new_length(data, pos)
        else:  # old format
            tag = (head >> 2) & 0x0F
            chunks = []
            kind = head & 0x03
            if kind == 3:  # indeterminate: the rest of the data
                length = len(data) - pos
            else:
                size = (1, 2, 4)[kind]
                if pos + size > len(data):
                    raise ProtocolError("packet-corrupt", "truncated packet header")
                length = int.from_bytes(data[pos : pos + size], "big")
                pos += size
        if pos + length > len(data):
            raise ProtocolError("packet-corrupt", "truncated packet")
        chunks.append(data[pos : pos + length])
        pos += length
        packets.append((tag, b"".join(chunks)))
    return packets


def top_level_tags(data: bytes) -> list[int]:
    """Tags of the packets at this level, in order."""
    return [tag for tag, _ in split_packets(data)]


def decompress(body: bytes, *, max_bytes: int) -> bytes:
    """The packets inside a compressed data packet; trailing bytes after the compressed
    stream (where gpg stops reading) are rejected, and so is output over ``max_bytes``.
    """
    if not body:
        raise ProtocolError("packet-corrupt", "empty compressed packet")
    algo, data = body[0], body[1:]
    if algo == 0:
        return data
    engines: dict[int, Callable[[], Any]] = {
        1: lambda: zlib.decompressobj(-15),  # ZIP (raw deflate)
        2: lambda: zlib.decompressobj(15),  # ZLIB
        3: bz2.BZ2Decompressor,  # BZip2
    }
    if algo not in engines:
        raise ProtocolError("packet-corrupt", f"unknown compression algorithm {algo}")
    engine = engines[algo]()
    out = bytearray()
    pending = data
    try:
        while not engine.eof:
            chunk = engine.decompress(pending, max_bytes + 1 - len(out))
            out += chunk
            if len(out) > max_bytes:
                raise ProtocolError("too-large", "the compressed message expands too far")
            pending = getattr(engine, "unconsumed_tail", b"")
            stalled = not chunk and not pending and getattr(engine, "needs_input", True)
            if stalled and not engine.eof:
                raise ProtocolError("packet-corrupt", "truncated compressed data")
    except (zlib.error, OSError, EOFError) as exc:
        raise ProtocolError("packet-corrupt", "corrupt compressed data") from exc
    if engine.unused_data:
        raise ProtocolError(
            "packet-sequence", "data follows the compressed message (gpg would ignore it)"
        )
    return bytes(out)


def _new_length(data: bytes, pos: int) -> tuple[int, int, bool]:
    """(length, position after the length octets, whether it is a partial length)."""
    if pos >= len(data):
        raise ProtocolError("packet-corrupt", "truncated packet length")
    first = data[pos]
    if first < 192:
        return first, pos + 1, False
    if first < 224:
        if pos + 1 >= len(data):
            raise ProtocolError("packet-corrupt", "truncated packet length")
        return ((first - 192) << 8) + data[pos + 1] + 192, pos + 2, False
    if first == 255:
        if pos + 5 > len(data):
            raise ProtocolError("packet-corrupt", "truncated packet length")
        return int.from_bytes(data[pos + 1 : pos + 5], "big"), pos + 5, False
    return 1 << (first & 0x1F), pos + 1, True


def check_message_shape(armored: bytes, *, max_bytes: int) -> None:
    """Reject any packet sequence but the accepted ones (see module doc)."""
    packets = split_packets(dearmor(armored))
    tags = [tag for tag, _ in packets]
    if tags and tags[-1] == SEIPD and len(tags) >= 2 and set(tags[:-1]) == {PKESK}:
        return  # what is inside is gpg's to check (one literal, one signature)
    if tags == [COMPRESSED]:
        tags = top_level_tags(decompress(packets[0][1], max_bytes=max_bytes))
    if tags == [ONEPASS, LITERAL, SIG]:
        return
    raise ProtocolError(
        "packet-sequence",
        f"the OpenPGP message is not one signed or one encrypted message (packets {tags})",
    )
