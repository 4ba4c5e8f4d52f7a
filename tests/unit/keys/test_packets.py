"""The top-level packet grammar (P4), on messages made by the real gpg."""

from __future__ import annotations

import pytest

from mailsh.errors import ProtocolError
from mailsh.keys.crypto import seal
from mailsh.keys.packets import (
    COMPRESSED,
    LITERAL,
    ONEPASS,
    PKESK,
    SEIPD,
    SIG,
    check_message_shape,
    dearmor,
    top_level_tags,
)
from tests.kit import forge
from tests.kit.homes import Home

PAYLOAD = b'{"kind":"mailsh.request.v1"}'
CAP = 1 << 20


def _signed(home: Home, *args: str) -> bytes:
    return forge.gpg(
        home.settings.gnupg_home, "--sign", "-u", home.fingerprint, *args, data=PAYLOAD
    )


def test_what_gpg_makes_for_mailsh_is_accepted(alice: Home, server: Home) -> None:
    alice.gpg.raw.import_keys(server.pubkey.read_text())
    signed = seal(alice.gpg, PAYLOAD, signer=alice.fingerprint, recipient=None)
    encrypted = seal(alice.gpg, PAYLOAD, signer=alice.fingerprint, recipient=server.fingerprint)
    assert top_level_tags(dearmor(signed)) == [COMPRESSED]
    assert top_level_tags(dearmor(encrypted)) == [PKESK, SEIPD]
    check_message_shape(signed, max_bytes=CAP)
    check_message_shape(encrypted, max_bytes=CAP)
    uncompressed = forge.armor(_signed(alice, "--compress-algo", "none"))
    assert top_level_tags(dearmor(uncompressed)) == [ONEPASS, LITERAL, SIG]
    check_message_shape(uncompressed, max_bytes=CAP)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda s, lit: s + lit, id="literal-after-signed"),
        pytest.param(lambda s, lit: lit + s, id="literal-before-signed"),
        pytest.param(lambda s, lit: s + s, id="two-signed-messages"),
        pytest.param(lambda s, lit: lit, id="only-a-literal"),
        pytest.param(lambda s, lit: b"\xca\x03PGP" + s, id="marker-packet-first"),
    ],
)
def test_other_shapes_are_rejected(alice: Home, build: object) -> None:
    signed = _signed(alice)
    literal = forge.gpg(alice.settings.gnupg_home, "--store", data=b"rm -rf /")
    packets = build(signed, literal)  # type: ignore[operator]
    with pytest.raises(ProtocolError) as exc:
        check_message_shape(forge.armor(packets), max_bytes=CAP)
    assert exc.value.reason == "packet-sequence"


def test_truncated_and_garbage_packets_are_rejected(alice: Home) -> None:
    signed = _signed(alice)
    for bad in (signed[:-10], b"\x00garbage", signed[:1]):
        with pytest.raises(ProtocolError) as exc:
            check_message_shape(forge.armor(bad), max_bytes=CAP)
        assert exc.value.reason == "packet-corrupt"


def test_partial_body_lengths_are_followed(alice: Home) -> None:
    """gpg streams stdin with partial body lengths; the parser must walk them."""
    big = forge.gpg(
        alice.settings.gnupg_home, "--store", "--compress-algo", "none", data=b"x" * 100_000
    )
    assert top_level_tags(big) == [LITERAL]


@pytest.mark.parametrize("algo", ["zip", "zlib", "bzip2"])
def test_every_compression_gpg_uses_is_followed_to_its_end(alice: Home, algo: str) -> None:
    signed = _signed(alice, "--compress-algo", algo)
    check_message_shape(forge.armor(signed), max_bytes=CAP)
    literal = forge.gpg(alice.settings.gnupg_home, "--store", data=b"rm -rf /")
    with pytest.raises(ProtocolError) as exc:
        check_message_shape(forge.armor(signed + literal), max_bytes=CAP)
    assert exc.value.reason == "packet-sequence"


def test_decompression_bomb_is_capped(alice: Home) -> None:
    """P10: the shape check decompresses, so it stops at the same cap as gpg's output."""
    bomb = forge.gpg(
        alice.settings.gnupg_home, "--sign", "-u", alice.fingerprint, data=b"\0" * 5_000_000
    )
    with pytest.raises(ProtocolError) as exc:
        check_message_shape(forge.armor(bomb), max_bytes=CAP)
    assert exc.value.reason == "too-large"


def test_malformed_armor(alice: Home) -> None:
    with pytest.raises(ProtocolError):
        dearmor(b"-----BEGIN PGP MESSAGE-----\n\n!!!notbase64\n-----END PGP MESSAGE-----\n")
    with pytest.raises(ProtocolError):
        dearmor(b"no armor here")
