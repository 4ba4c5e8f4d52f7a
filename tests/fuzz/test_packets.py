"""Fuzzing the OpenPGP packet-shape check (mailsh/keys/packets.py) that runs before gpg.

Two properties: on any bytes it returns or raises ProtocolError, with decompression
bounded by its cap; and on well-formed packet streams it accepts exactly the shapes
its module doc lists (one encrypted message, or one signed message, possibly inside
one compressed packet), whatever the packet bodies and header formats.
"""

from __future__ import annotations

import contextlib
import zlib

from hypothesis import given
from hypothesis import strategies as st

from mailsh.errors import ProtocolError
from mailsh.keys import packets
from mailsh.keys.packets import COMPRESSED, LITERAL, ONEPASS, PKESK, SEIPD, SIG
from tests.kit import forge
from tests.kit.fuzzing import budget, guard

CAP = 64 * 1024


def new_header(tag: int, length: int) -> bytes:
    head = bytes([0xC0 | tag])
    if length < 192:
        return head + bytes([length])
    if length < 8384:
        length -= 192
        return head + bytes([(length >> 8) + 192, length & 0xFF])
    return head + b"\xff" + length.to_bytes(4, "big")


def old_header(tag: int, length: int) -> bytes:
    if length < 256:
        return bytes([0x80 | tag << 2, length])
    if length < 65536:
        return bytes([0x80 | tag << 2 | 1]) + length.to_bytes(2, "big")
    return bytes([0x80 | tag << 2 | 2]) + length.to_bytes(4, "big")


_TAGS = st.one_of(st.sampled_from([PKESK, SIG, ONEPASS, LITERAL, SEIPD]), st.integers(1, 15))


@st.composite
def packet(draw: st.DrawFn, tag: st.SearchStrategy[int] = _TAGS) -> tuple[int, bytes]:
    t = draw(tag)
    body = draw(st.binary(max_size=300))
    header = new_header if t > 15 or draw(st.booleans()) else old_header
    return t, header(t, len(body)) + body


def accepted(tags: list[int]) -> bool:
    encrypted = len(tags) >= 2 and tags[-1] == SEIPD and set(tags[:-1]) == {PKESK}
    return encrypted or tags == [ONEPASS, LITERAL, SIG]


def shape_ok(stream: bytes) -> bool:
    with guard(memory=True):
        try:
            packets.check_message_shape(forge.armor(stream), max_bytes=CAP)
        except ProtocolError:
            return False
    return True


@budget(300)
@given(st.lists(packet(), max_size=6))
def test_shape_check_accepts_exactly_the_listed_shapes(stream: list[tuple[int, bytes]]) -> None:
    tags = [t for t, _ in stream]
    assert shape_ok(b"".join(p for _, p in stream)) == accepted(tags)


@budget(200)
@given(st.lists(packet(), max_size=5), st.sampled_from([0, 1, 2]), st.binary(max_size=8))
def test_compressed_wrapper_accepts_only_one_signed_message(
    inner: list[tuple[int, bytes]], algo: int, trailing: bytes
) -> None:
    data = b"".join(p for _, p in inner)
    if algo == 1:
        engine = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = engine.compress(data) + engine.flush()
    elif algo == 2:
        data = zlib.compress(data)
    body = bytes([algo]) + data + (trailing if algo else b"")
    stream = new_header(COMPRESSED, len(body)) + body
    tags = [t for t, _ in inner]
    want = tags == [ONEPASS, LITERAL, SIG] and (algo == 0 or not trailing)
    assert shape_ok(stream) == want


@budget(300)
@given(st.binary(max_size=2048))
def test_split_packets_on_any_bytes(data: bytes) -> None:
    with guard(memory=True):
        try:
            found = packets.split_packets(data)
        except ProtocolError:
            return
    assert sum(len(body) for _, body in found) <= len(data)


@budget(200)
@given(st.binary(max_size=2048), st.integers(0, 255))
def test_decompress_on_any_bytes(data: bytes, algo: int) -> None:
    with guard(memory=True):
        try:
            out = packets.decompress(bytes([algo]) + data, max_bytes=CAP)
        except ProtocolError:
            return
    assert len(out) <= CAP or algo == 0  # algorithm 0 is the data itself, never expanded
    if algo == 0:
        assert out == data


@budget(20)
@given(st.integers(CAP + 1, 8 << 20), st.sampled_from([1, 2]))
def test_decompression_bombs_stop_at_the_cap(size: int, algo: int) -> None:
    if algo == 1:
        engine = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = engine.compress(bytes(size)) + engine.flush()
    else:
        bomb = zlib.compress(bytes(size), 9)
    with guard(memory=True):
        try:
            packets.decompress(bytes([algo]) + bomb, max_bytes=CAP)
        except ProtocolError as exc:
            assert exc.reason == "too-large"
        else:
            raise AssertionError("a bomb past the cap was decompressed")


@budget(300)
@given(st.binary(max_size=1024))
def test_dearmor_round_trips_and_rejects_garbage(data: bytes) -> None:
    assert packets.dearmor(forge.armor(data)) == data
    with guard(), contextlib.suppress(ProtocolError):
        packets.dearmor(data)
