"""mailsh.keys.crypto.verify: the accepting check, one test per rejection rule.

Two layers of tests. Real gpg: hostile messages forged with the gpg CLI (see
tests/kit/forge.py) must be rejected with the right reason. Synthetic gpg: verify()
also re-reads python-gnupg's summary fields, so each of its checks is exercised alone
by mutating one line or field of a genuine good transcript; commenting out any single
check in verify() turns at least one test here red.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from mailsh.errors import GpgError, ProtocolError
from mailsh.keys import crypto
from mailsh.keys.crypto import VerifiedPayload, seal, verify
from mailsh.keys.gpg import Gpg
from tests.kit import forge
from tests.kit.homes import Home

PAYLOAD = b'{"kind":"test","bytes":"\\u0000"}'
DAY = timedelta(days=1)
SKEW = timedelta(minutes=5)
PAST = "20200101T000000!"
PAST_SIGN = "20200101T000100!"
PAST_NOW = datetime(2020, 1, 1, 0, 1, 30, tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Keyring:
    """A verifier: a GnuPG home holding public keys only, plus what is pinned."""

    home: Path
    gpg: Gpg
    pinned: set[str] = field(default_factory=set)

    def is_pinned(self, fpr: str) -> bool:
        return fpr in self.pinned

    def verify(self, armored: bytes, **kw: Any) -> VerifiedPayload:
        kw.setdefault("now", _now())
        kw.setdefault("max_age", DAY)
        kw.setdefault("max_skew", SKEW)
        return verify(self.gpg, armored, is_pinned=self.is_pinned, **kw)


@dataclass
class PastKeys:
    """Keys made in 2020 (faked system time): one valid for a day, one forever."""

    home: Path
    short: str
    ancient: str


@pytest.fixture(scope="module")
def past() -> Iterator[PastKeys]:
    with forge.scratch_home() as home:
        uid1, uid2 = "short <short@example.org>", "ancient <ancient@example.org>"
        forge.gpg(home, "--quick-gen-key", uid1, "ed25519", "sign", "1d", faked=PAST)
        forge.gpg(home, "--quick-gen-key", uid2, "ed25519", "sign", "never", faked=PAST)
        short, ancient = forge.fingerprints(home)
        yield PastKeys(home=home, short=short, ancient=ancient)


@pytest.fixture(scope="module")
def keyring(alice: Home, mallory: Home, past: PastKeys) -> Iterator[Keyring]:
    """alice pinned; mallory and the 2020 keys known to gpg (and pinned where a test says)."""
    with forge.scratch_home() as home:
        forge.copy_public_key(alice.settings.gnupg_home, alice.fingerprint, home)
        forge.copy_public_key(mallory.settings.gnupg_home, mallory.fingerprint, home)
        for fpr in (past.short, past.ancient):
            forge.copy_public_key(past.home, fpr, home)
        ring = Keyring(home=home, gpg=Gpg(home, max_output=1 << 20), pinned={alice.fingerprint})
        yield ring
        ring.gpg.kill_agent()


@pytest.fixture
def pin(keyring: Keyring) -> Iterator[Callable[[str], None]]:
    """Pin extra fingerprints for one test only."""
    before = set(keyring.pinned)
    yield keyring.pinned.add
    keyring.pinned.clear()
    keyring.pinned.update(before)


@pytest.fixture(scope="module")
def encrypting(alice: Home, server: Home) -> None:
    """alice's keyring knows the server key and the server's knows alice's."""
    alice.gpg.raw.import_keys(server.pubkey.read_text())
    server.gpg.raw.import_keys(alice.pubkey.read_text())


def _alice_signs(alice: Home, data: bytes = PAYLOAD, *args: str, faked: str | None = None) -> bytes:
    return forge.gpg(
        alice.settings.gnupg_home, "--sign", "-u", alice.fingerprint, *args, data=data, faked=faked
    )


def _reject(reason: str, fn: Callable[[], object], match: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn()
    assert info.value.reason == reason, info.value.message
    if match is not None:
        assert re.search(match, info.value.message), info.value.message
    return info.value


@pytest.fixture
def in_depth(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Check both layers: the packet-shape check rejects the message first, and with
    that check switched off, gpg's status lines still reject it for ``reason``."""

    def check(reason: str, fn: Callable[[], object], match: str | None = None) -> None:
        _reject("packet-sequence", fn)
        with monkeypatch.context() as m:
            m.setattr(crypto, "check_message_shape", lambda *a, **k: None)
            _reject(reason, fn, match)

    return check


# --------------------------------------------------------------------------------------
# Accepting
# --------------------------------------------------------------------------------------


def test_signed_only_round_trip(alice: Home, keyring: Keyring) -> None:
    data = PAYLOAD + bytes(range(256))
    armored = seal(alice.gpg, data, signer=alice.fingerprint, recipient=None)
    before = _now()
    out = keyring.verify(armored)
    assert out.plaintext == data
    assert out.signer == alice.fingerprint
    assert not out.encrypted
    assert out.signature_id
    assert before - SKEW <= out.signed_at <= _now() + SKEW


def test_signed_and_encrypted_round_trip(alice: Home, server: Home, encrypting: None) -> None:
    data = b"\x00\xff\r\n" + PAYLOAD
    armored = seal(alice.gpg, data, signer=alice.fingerprint, recipient=server.fingerprint)
    out = verify(
        server.gpg,
        armored,
        is_pinned={alice.fingerprint}.__contains__,
        now=_now(),
        max_age=DAY,
        max_skew=SKEW,
        require_encrypted=True,
    )
    assert out.plaintext == data
    assert out.encrypted
    assert out.signer == alice.fingerprint


def test_verified_payload_cannot_be_built_directly() -> None:
    with pytest.raises(TypeError):
        VerifiedPayload(
            signer="A" * 40,
            signing_key="A" * 40,
            signature_id=None,
            signed_at=_now(),
            encrypted=False,
            plaintext=b"rm -rf /",
        )
    with pytest.raises(TypeError):
        VerifiedPayload("A" * 40, "A" * 40, None, _now(), False, b"x", object())


# --------------------------------------------------------------------------------------
# Rejections with messages forged by the real gpg
# --------------------------------------------------------------------------------------


def test_unsigned_literal_is_rejected(
    in_depth: Callable[..., None], alice: Home, keyring: Keyring
) -> None:
    armored = forge.gpg(alice.settings.gnupg_home, "--store", "--armor", data=PAYLOAD)
    in_depth("unsigned", lambda: keyring.verify(armored))


def test_signer_known_to_gpg_but_not_pinned(mallory: Home, keyring: Keyring) -> None:
    """P2: mallory's key is in the keyring (gpg says GOODSIG) but nobody pinned it."""
    armored = seal(mallory.gpg, PAYLOAD, signer=mallory.fingerprint, recipient=None)
    assert keyring.gpg.raw.decrypt(armored).valid  # python-gnupg would say yes
    _reject("signer-not-pinned", lambda: keyring.verify(armored), mallory.fingerprint)


def test_signer_unknown_to_gpg(keyring: Keyring) -> None:
    with forge.scratch_home() as eve:
        forge.gpg(eve, "--quick-gen-key", "eve <eve@example.org>", "ed25519", "sign", "1y")
        [eve_fpr] = forge.fingerprints(eve)
        armored = forge.gpg(eve, "--sign", "--armor", data=PAYLOAD)
    # Its own code, not bad-signature: the usual cause is a key nobody pinned yet.
    _reject("unknown-key", lambda: keyring.verify(armored), f"{eve_fpr}.*NO_PUBKEY")


def test_gpg_trust_level_is_irrelevant(mallory: Home, keyring: Keyring) -> None:
    """P2: even ultimate trust in gpg's trustdb does not make a key authorize."""
    # Not through forge.gpg: its "--trust-model always" never creates a trustdb, and
    # --import-ownertrust needs one (it failed when this test ran first).
    subprocess.run(
        ["gpg", "--homedir", str(keyring.home), "--batch", "--import-ownertrust"],
        input=f"{mallory.fingerprint}:6:\n".encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    armored = seal(mallory.gpg, PAYLOAD, signer=mallory.fingerprint, recipient=None)
    _reject("signer-not-pinned", lambda: keyring.verify(armored))


def test_revoked_key_is_rejected(make_home: Callable[..., Home], keyring: Keyring) -> None:
    """P3: a pinned key revoked after signing no longer authorizes."""
    rev = make_home("revoked@example.org")
    armored = seal(rev.gpg, PAYLOAD, signer=rev.fingerprint, recipient=None)
    forge.gpg(keyring.home, "--import", data=rev.pubkey.read_bytes())
    keyring.pinned.add(rev.fingerprint)
    assert keyring.verify(armored).signer == rev.fingerprint  # good before revocation
    cert = (rev.settings.gnupg_home / "openpgp-revocs.d" / f"{rev.fingerprint}.rev").read_text()
    cert = cert.replace(
        ":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----"
    )
    forge.gpg(keyring.home, "--import", data=cert.encode())
    _reject("bad-signature", lambda: keyring.verify(armored), "REVKEYSIG")


def test_expired_key_is_rejected(
    past: PastKeys, keyring: Keyring, pin: Callable[[str], None]
) -> None:
    """P3: signed in 2020 while the key was valid; the key expired a day later."""
    pin(past.short)
    armored = forge.gpg(
        past.home, "--sign", "--armor", "-u", past.short, data=PAYLOAD, faked=PAST_SIGN
    )
    _reject("bad-signature", lambda: keyring.verify(armored, now=PAST_NOW), "EXPKEYSIG")


def test_expired_signature_is_rejected(
    past: PastKeys, keyring: Keyring, pin: Callable[[str], None]
) -> None:
    """P3: the key never expires, but the signature itself carried a one-day expiry."""
    pin(past.ancient)
    armored = forge.gpg(
        past.home,
        "--sign",
        "--armor",
        "-u",
        past.ancient,
        "--default-sig-expire",
        "1d",
        data=PAYLOAD,
        faked=PAST_SIGN,
    )
    _reject("bad-signature", lambda: keyring.verify(armored, now=PAST_NOW), "EXPSIG")


def test_stale_signature_is_rejected(
    past: PastKeys, keyring: Keyring, pin: Callable[[str], None]
) -> None:
    pin(past.ancient)
    armored = forge.gpg(
        past.home, "--sign", "--armor", "-u", past.ancient, data=PAYLOAD, faked=PAST_SIGN
    )
    assert keyring.verify(armored, now=PAST_NOW).signer == past.ancient  # fine back then
    _reject("signature-too-old", lambda: keyring.verify(armored))


def test_future_dated_signature_is_rejected(alice: Home, keyring: Keyring) -> None:
    """gpg itself accepts signatures from the future; verify() must not."""
    future = (_now() + timedelta(days=2)).strftime("%Y%m%dT%H%M%S!")
    armored = _alice_signs(alice, PAYLOAD, "--armor", faked=future)
    _reject("signature-from-future", lambda: keyring.verify(armored))


def test_two_signatures_both_pinned(
    in_depth: Callable[..., None],
    alice: Home,
    mallory: Home,
    keyring: Keyring,
    pin: Callable[[str], None],
) -> None:
    """P4: exactly one signature, even when every signer would be acceptable alone."""
    pin(mallory.fingerprint)
    with forge.scratch_home() as both:
        forge.copy_secret_key(alice.settings.gnupg_home, alice.fingerprint, both)
        forge.copy_secret_key(mallory.settings.gnupg_home, mallory.fingerprint, both)
        armored = forge.gpg(
            both,
            "--sign",
            "--armor",
            "-u",
            alice.fingerprint,
            "-u",
            mallory.fingerprint,
            data=PAYLOAD,
        )
    in_depth("signature-count", lambda: keyring.verify(armored))


def test_pinned_signature_plus_unknown_signature(
    in_depth: Callable[..., None], alice: Home, keyring: Keyring
) -> None:
    """python-gnupg says valid (last good sig) next to an unverifiable one; verify() doesn't."""
    with forge.scratch_home() as both:
        forge.gpg(both, "--quick-gen-key", "eve <eve@example.org>", "ed25519", "sign", "1y")
        [eve] = forge.fingerprints(both)
        forge.copy_secret_key(alice.settings.gnupg_home, alice.fingerprint, both)
        armored = forge.gpg(
            both, "--sign", "--armor", "-u", eve, "-u", alice.fingerprint, data=PAYLOAD
        )
    assert keyring.gpg.raw.decrypt(armored).valid  # the pitfall is real
    in_depth("bad-signature", lambda: keyring.verify(armored), "ERRSIG|NO_PUBKEY")


def test_pinned_signature_plus_mallorys(
    in_depth: Callable[..., None], alice: Home, mallory: Home, keyring: Keyring
) -> None:
    with forge.scratch_home() as both:
        forge.copy_secret_key(alice.settings.gnupg_home, alice.fingerprint, both)
        forge.copy_secret_key(mallory.settings.gnupg_home, mallory.fingerprint, both)
        armored = forge.gpg(
            both,
            "--sign",
            "--armor",
            "-u",
            mallory.fingerprint,
            "-u",
            alice.fingerprint,
            data=PAYLOAD,
        )
    in_depth("signature-count", lambda: keyring.verify(armored))


def test_unsigned_literal_before_signed_message(
    in_depth: Callable[..., None], alice: Home, keyring: Keyring
) -> None:
    """gpg outputs the first (unsigned) literal and stops: nothing signed at all."""
    evil = forge.gpg(alice.settings.gnupg_home, "--store", data=b"rm -rf /")
    armored = forge.armor(evil + _alice_signs(alice))
    in_depth("unsigned", lambda: keyring.verify(armored))


def test_raw_literal_before_uncompressed_signed_message(alice: Home, keyring: Keyring) -> None:
    evil = forge.gpg(
        alice.settings.gnupg_home, "--store", "--compress-algo", "none", data=b"rm -rf /"
    )
    signed = _alice_signs(alice, PAYLOAD, "--compress-algo", "none")
    with pytest.raises(ProtocolError):
        keyring.verify(forge.armor(evil + signed))


@pytest.mark.parametrize("compress", [True, False])
def test_unsigned_literal_after_signed_message(
    alice: Home, keyring: Keyring, compress: bool
) -> None:
    """P4: one signed message followed by an unsigned literal is rejected.

    gpg 2.2.40 itself stops after a complete compressed signed message and ignores what
    follows; mailsh's packet-shape check rejects it before gpg runs.
    """
    comp = () if compress else ("--compress-algo", "none")
    evil = forge.gpg(alice.settings.gnupg_home, "--store", *comp, data=b"rm -rf /")
    armored = forge.armor(_alice_signs(alice, PAYLOAD, *comp) + evil)
    _reject("packet-sequence", lambda: keyring.verify(armored))


def test_flipped_byte_in_armor_is_rejected(alice: Home, keyring: Keyring) -> None:
    armored = seal(alice.gpg, PAYLOAD, signer=alice.fingerprint, recipient=None)
    lines = armored.split(b"\n")
    mid = len(lines) // 2
    line = bytearray(lines[mid])
    line[5] = ord("A") if line[5] != ord("A") else ord("B")
    lines[mid] = bytes(line)
    with pytest.raises(ProtocolError):
        keyring.verify(b"\n".join(lines))


def test_flipped_byte_with_valid_crc_is_rejected(alice: Home, keyring: Keyring) -> None:
    """Re-armored with a correct CRC, so only the signature itself can catch it."""
    packets = bytearray(_alice_signs(alice, PAYLOAD, "--compress-algo", "none"))
    at = packets.index(PAYLOAD[:8])
    packets[at] ^= 0x01
    _reject("bad-signature", lambda: keyring.verify(forge.armor(bytes(packets))), "BADSIG")


def test_status_line_injection_via_literal_file_name(
    in_depth: Callable[..., None], alice: Home, mallory: Home, keyring: Keyring
) -> None:
    """A file name holding fake [GNUPG:] lines naming alice must not make alice the signer."""
    fake = (
        f"x\n[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG {alice.fingerprint[-16:]} alice\n"
        f"[GNUPG:] VALIDSIG {alice.fingerprint} 2024-01-01 {int(_now().timestamp())} 0 4 0 22 8 00 "
        f"{alice.fingerprint}\n"
    )
    unsigned = forge.gpg(
        alice.settings.gnupg_home, "--store", "--armor", "--set-filename", fake, data=PAYLOAD
    )
    in_depth("unsigned", lambda: keyring.verify(unsigned))
    by_mallory = forge.gpg(
        mallory.settings.gnupg_home, "--sign", "--armor", "--set-filename", fake, data=PAYLOAD
    )
    _reject("signer-not-pinned", lambda: keyring.verify(by_mallory))


def test_embedded_key_is_never_imported(alice: Home) -> None:
    """An attacker's key inside the message is not imported, even with auto-key-import in
    the home's gpg.conf (mailsh runs gpg with --no-options)."""
    with forge.scratch_home() as eve_home, forge.scratch_home() as home:
        forge.gpg(eve_home, "--quick-gen-key", "eve <eve@example.org>", "ed25519", "sign", "1y")
        [eve] = forge.fingerprints(eve_home)
        with_block = forge.gpg(eve_home, "--sign", "--armor", "--include-key-block", data=PAYLOAD)
        key_then_msg = forge.armor(
            forge.gpg(eve_home, "--export", eve) + forge.gpg(eve_home, "--sign", data=PAYLOAD)
        )
        forge.copy_public_key(alice.settings.gnupg_home, alice.fingerprint, home)
        (home / "gpg.conf").write_text("auto-key-import\nauto-key-retrieve\n")
        ring = Keyring(home=home, gpg=Gpg(home, max_output=1 << 20), pinned={eve})
        try:
            for armored in (with_block, key_then_msg):
                with pytest.raises(ProtocolError):
                    ring.verify(armored)
                assert eve not in forge.fingerprints(home)
            # Control: plain gpg with that gpg.conf would have imported eve's key.
            forge.gpg(home, "--verify", data=with_block)
            assert eve in forge.fingerprints(home)
        finally:
            ring.gpg.kill_agent()


def test_encrypted_but_unsigned_is_rejected(server: Home, encrypting: None) -> None:
    """P1: bool(decrypt_result) is true for this; verify() must still say unsigned."""
    with forge.scratch_home() as home:
        forge.gpg(home, "--import", data=server.pubkey.read_bytes())
        armored = forge.gpg(home, "--encrypt", "--armor", "-r", server.fingerprint, data=PAYLOAD)
    assert server.gpg.raw.decrypt(armored)  # the pitfall is real
    _reject(
        "unsigned",
        lambda: verify(
            server.gpg, armored, is_pinned=lambda _: True, now=_now(), max_age=DAY, max_skew=SKEW
        ),
    )


def test_require_encryption_rejects_signed_only(alice: Home, keyring: Keyring) -> None:
    armored = seal(alice.gpg, PAYLOAD, signer=alice.fingerprint, recipient=None)
    assert keyring.verify(armored).plaintext == PAYLOAD
    _reject("not-encrypted", lambda: keyring.verify(armored, require_encrypted=True))


def test_encrypted_to_another_key_is_rejected(alice: Home, mallory: Home, keyring: Keyring) -> None:
    forge.gpg(alice.settings.gnupg_home, "--import", data=mallory.pubkey.read_bytes())
    armored = seal(alice.gpg, PAYLOAD, signer=alice.fingerprint, recipient=mallory.fingerprint)
    with pytest.raises(ProtocolError):
        keyring.verify(armored)


# --------------------------------------------------------------------------------------
# Each check alone: a genuine good transcript with one line or field changed
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeResult:
    stderr: str
    returncode: int
    valid: bool
    data: bytes | None
    status: str = "signature valid"
    key_status: str | None = None
    problems: tuple[str, ...] = ()
    armored: bytes = b""  # the real message gpg saw (verify checks its packet shape first)


class FakeRaw:
    def __init__(self, result: FakeResult) -> None:
        self.result = result

    def decrypt(self, armored: bytes, passphrase: str | None = None) -> FakeResult:
        return self.result


class FakeGpg:
    max_output = 1 << 20

    def __init__(self, result: FakeResult) -> None:
        self.raw = FakeRaw(result)


@pytest.fixture(scope="module")
def good(alice: Home, keyring: Keyring) -> tuple[FakeResult, datetime]:
    """A real good verification transcript of alice's signature, and when it was made."""
    armored = seal(alice.gpg, PAYLOAD, signer=alice.fingerprint, recipient=None)
    res = keyring.gpg.raw.decrypt(armored)
    fake = FakeResult(
        stderr=res.stderr,
        returncode=res.returncode,
        valid=res.valid,
        data=res.data,
        armored=armored,
    )
    return fake, keyring.verify(armored).signed_at


def _lines(result: FakeResult, edit: Callable[[list[str]], list[str]]) -> FakeResult:
    return replace(result, stderr="\n".join(edit(result.stderr.splitlines())) + "\n")


def _drop(*names: str) -> Callable[[list[str]], list[str]]:
    return lambda ls: [
        ln
        for ln in ls
        if not any(ln.startswith(f"[GNUPG:] {n} ") or ln == f"[GNUPG:] {n}" for n in names)
    ]


def _dup(name: str) -> Callable[[list[str]], list[str]]:
    def edit(ls: list[str]) -> list[str]:
        out: list[str] = []
        for ln in ls:
            out.append(ln)
            if ln.startswith(f"[GNUPG:] {name}"):
                out.append(ln)
        return out

    return edit


def _sub(pattern: str, repl: str) -> Callable[[list[str]], list[str]]:
    return lambda ls: [re.sub(pattern, repl, ln) for ln in ls]


def _add(line: str) -> Callable[[list[str]], list[str]]:
    return lambda ls: [*ls, line]


def _fake_verify(result: FakeResult, at: datetime, **kw: Any) -> VerifiedPayload:
    kw.setdefault("is_pinned", lambda _: True)
    kw.setdefault("now", at)
    kw.setdefault("max_age", DAY)
    kw.setdefault("max_skew", SKEW)
    return verify(cast(Gpg, FakeGpg(result)), result.armored, **kw)


def test_fake_baseline_is_accepted(good: tuple[FakeResult, datetime]) -> None:
    result, at = good
    assert _fake_verify(result, at).plaintext == PAYLOAD


SINGLE_CHECKS: list[tuple[str, Callable[[FakeResult], FakeResult], str, str]] = [
    (
        "unknown status keyword",
        lambda r: _lines(r, _add("[GNUPG:] REVKEYSIG 0 x")),
        "bad-signature",
        "REVKEYSIG",
    ),
    (
        "unexpected status, unsigned",
        lambda r: _lines(
            r,
            lambda ls: [
                *_drop("NEWSIG", "GOODSIG", "VALIDSIG", "SIG_ID")(ls),
                "[GNUPG:] NOTATION_DATA x",
            ],
        ),
        "unsigned",
        "NOTATION_DATA",
    ),
    ("gpg exit status", lambda r: replace(r, returncode=2), "gpg-failed", "status 2"),
    (
        "no signature",
        lambda r: _lines(r, _drop("NEWSIG", "GOODSIG", "VALIDSIG", "SIG_ID")),
        "unsigned",
        "no signature",
    ),
    ("two NEWSIG", lambda r: _lines(r, _dup("NEWSIG")), "signature-count", ""),
    ("two GOODSIG", lambda r: _lines(r, _dup("GOODSIG")), "signature-count", ""),
    ("no VALIDSIG", lambda r: _lines(r, _drop("VALIDSIG")), "signature-count", ""),
    ("two literals", lambda r: _lines(r, _dup("PLAINTEXT ")), "literal-count", "saw 2"),
    ("no literal", lambda r: _lines(r, _drop("PLAINTEXT")), "literal-count", "saw 0"),
    (
        "decryption not okay",
        lambda r: _lines(r, _add("[GNUPG:] BEGIN_DECRYPTION")),
        "decryption-failed",
        "",
    ),
    (
        "python-gnupg not valid",
        lambda r: replace(r, valid=False),
        "bad-signature",
        "did not accept",
    ),
    (
        "python-gnupg key_status",
        lambda r: replace(r, key_status="signing key was revoked"),
        "bad-signature",
        "did not accept",
    ),
    ("python-gnupg problems", lambda r: replace(r, problems=("x",)), "bad-signature", "problems"),
    (
        "VALIDSIG truncated",
        lambda r: _lines(r, _sub(r"^(\[GNUPG:\] VALIDSIG( \S+){8}).*$", r"\1")),
        "bad-signature",
        "incomplete",
    ),
    (
        "VALIDSIG time unreadable",
        lambda r: _lines(r, _sub(r"^(\[GNUPG:\] VALIDSIG \S+ \S+) \S+", r"\1 yesterday")),
        "bad-signature",
        "unreadable",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "reason", "match"), [c[1:] for c in SINGLE_CHECKS], ids=[c[0] for c in SINGLE_CHECKS]
)
def test_each_check_alone(
    good: tuple[FakeResult, datetime],
    mutate: Callable[[FakeResult], FakeResult],
    reason: str,
    match: str,
) -> None:
    result, at = good
    _reject(reason, lambda: _fake_verify(mutate(result), at), match or None)


def test_check_require_encrypted_alone(good: tuple[FakeResult, datetime]) -> None:
    result, at = good
    _reject("not-encrypted", lambda: _fake_verify(result, at, require_encrypted=True))


def test_check_pin_uses_primary_not_subkey(good: tuple[FakeResult, datetime], alice: Home) -> None:
    """Identity is VALIDSIG's last field (primary), not its first (signing subkey)."""
    result, at = good
    sub = "B" * 40
    swapped = _lines(result, _sub(r"^(\[GNUPG:\] VALIDSIG) \S+", rf"\1 {sub}"))
    out = _fake_verify(swapped, at, is_pinned={alice.fingerprint}.__contains__)
    assert out.signer == alice.fingerprint
    assert out.signing_key == sub
    _reject("signer-not-pinned", lambda: _fake_verify(swapped, at, is_pinned={sub}.__contains__))


def test_check_signature_window_alone(good: tuple[FakeResult, datetime]) -> None:
    result, at = good
    _reject("signature-from-future", lambda: _fake_verify(result, at - SKEW - timedelta(seconds=5)))
    _reject("signature-too-old", lambda: _fake_verify(result, at + DAY + timedelta(seconds=5)))
    assert _fake_verify(result, at - SKEW + timedelta(seconds=5)).signed_at == at
    assert _fake_verify(result, at + DAY - timedelta(seconds=5)).signed_at == at


def test_check_no_plaintext_alone(good: tuple[FakeResult, datetime]) -> None:
    result, at = good
    with pytest.raises(GpgError):
        _fake_verify(replace(result, data=None), at)


def test_signature_id_is_the_sig_id_line(good: tuple[FakeResult, datetime]) -> None:
    result, at = good
    sig_id = next(
        ln.split()[2] for ln in result.stderr.splitlines() if ln.startswith("[GNUPG:] SIG_ID")
    )
    assert _fake_verify(result, at).signature_id == sig_id


def test_module_exposes_no_other_constructor() -> None:
    """Only verify() holds the seal; nothing public hands it out."""
    public = {n for n in vars(crypto) if not n.startswith("_")}
    assert "_SEAL" not in public
