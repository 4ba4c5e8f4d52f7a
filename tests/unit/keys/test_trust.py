"""mailsh.keys.trust: the pinned-fingerprint store, the only source of authorization."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailsh.addresses import InvalidAddressError
from mailsh.errors import IdentityError, ProtocolError, TrustError
from mailsh.keys.crypto import seal, verify
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import (
    TRUST_FORMAT,
    TrustStore,
    add_trusted_key,
    load_trust,
    remove_trusted_key,
)
from tests.kit import forge
from tests.kit.homes import Home


@pytest.fixture(scope="module")
def ring() -> Iterator[Gpg]:
    """A fresh verifier keyring, so imports here never leak into the session homes."""
    with forge.scratch_home() as home:
        gpg = Gpg(home, max_output=1 << 20)
        yield gpg
        gpg.kill_agent()


def test_add_list_remove(ring: Gpg, alice: Home, mallory: Home, tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    assert load_trust(path) == TrustStore()
    a = add_trusted_key(ring, path, alice.pubkey, reply_to=None)
    m = add_trusted_key(ring, path, mallory.pubkey, reply_to="m2@evil.test")
    store = load_trust(path)
    assert [k.fingerprint for k in store.keys] == [alice.fingerprint, mallory.fingerprint]
    assert a.reply_to == "alice@example.org"
    assert m.reply_to == "m2@evil.test"
    assert store.is_pinned(alice.fingerprint.lower())
    assert store.for_address("ALICE@example.org") == a
    assert store.for_address("mallory@evil.test") == m  # by uid email
    assert store.for_address("nobody@x.test") is None
    assert remove_trusted_key(path, alice.fingerprint) == a
    assert not load_trust(path).is_pinned(alice.fingerprint)
    with pytest.raises(TrustError) as info:
        remove_trusted_key(path, alice.fingerprint)
    assert info.value.hint is not None


def test_re_adding_replaces_not_duplicates(ring: Gpg, alice: Home, tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    add_trusted_key(ring, path, alice.pubkey, reply_to=None)
    add_trusted_key(ring, path, alice.pubkey, reply_to="ops@example.org", allow_plain_scripts=True)
    [only] = load_trust(path).keys
    assert only.reply_to == "ops@example.org"
    assert only.allow_plain_scripts


def test_file_format_mode_and_atomic_write(ring: Gpg, alice: Home, tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    add_trusted_key(ring, path, alice.pubkey, reply_to=None)
    doc = json.loads(path.read_text())
    assert doc["format"] == TRUST_FORMAT == "mailsh.trust.v1"
    assert doc["keys"][0]["fingerprint"] == alice.fingerprint
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trust.json"]  # no temp file left


def test_pinned_fingerprint_is_the_primary(ring: Gpg, alice: Home, tmp_path: Path) -> None:
    entry = add_trusted_key(ring, tmp_path / "t.json", alice.pubkey, reply_to=None)
    subkeys = alice.gpg.raw.list_keys(keys=[alice.fingerprint])[0]["subkeys"]
    assert subkeys  # the encryption subkey exists ...
    assert entry.fingerprint == alice.fingerprint  # ... and is not what gets pinned
    assert entry.fingerprint not in {s[2] for s in subkeys}


def test_secret_key_file_is_refused(ring: Gpg, alice: Home, tmp_path: Path) -> None:
    secret = tmp_path / "secret.asc"
    secret.write_bytes(
        forge.gpg(alice.settings.gnupg_home, "--armor", "--export-secret-keys", alice.fingerprint)
    )
    with pytest.raises(IdentityError, match="SECRET"):
        add_trusted_key(ring, tmp_path / "t.json", secret, reply_to=None)
    assert not (tmp_path / "t.json").exists()


def test_file_with_two_keys_is_refused(
    ring: Gpg, alice: Home, mallory: Home, tmp_path: Path
) -> None:
    both = tmp_path / "both.asc"
    both.write_text(alice.pubkey.read_text() + mallory.pubkey.read_text())
    with pytest.raises(IdentityError, match="2 public keys"):
        add_trusted_key(ring, tmp_path / "t.json", both, reply_to=None)
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("content", [b"", b"not a key\n"], ids=["empty", "garbage"])
def test_file_without_a_key_is_refused(ring: Gpg, tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "k.asc"
    f.write_bytes(content)
    with pytest.raises(IdentityError):
        add_trusted_key(ring, tmp_path / "t.json", f, reply_to=None)


def test_missing_file_is_an_identity_error(ring: Gpg, tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as info:
        add_trusted_key(ring, tmp_path / "t.json", tmp_path / "nope.asc", reply_to=None)
    assert info.value.hint is not None


def test_key_without_email_needs_reply_to(ring: Gpg, tmp_path: Path) -> None:
    with forge.scratch_home() as home:
        forge.gpg(home, "--quick-gen-key", "Ops Robot", "ed25519", "sign", "1y")
        [fpr] = forge.fingerprints(home)
        forge.gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "1y")
        key = tmp_path / "ops.asc"
        key.write_bytes(forge.gpg(home, "--armor", "--export", fpr))
    with pytest.raises(IdentityError) as info:
        add_trusted_key(ring, tmp_path / "t.json", key, reply_to=None)
    assert info.value.hint is not None
    assert "--reply-to" in info.value.hint
    entry = add_trusted_key(ring, tmp_path / "t.json", key, reply_to="ops@example.org")
    assert entry.fingerprint == fpr
    assert entry.reply_to == "ops@example.org"


def test_bad_reply_to_is_refused(ring: Gpg, alice: Home, tmp_path: Path) -> None:
    with pytest.raises(InvalidAddressError):
        add_trusted_key(ring, tmp_path / "t.json", alice.pubkey, reply_to="a@b\r\nBcc: c@d")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"format": "mailsh.trust.v2", "keys": []}',
        '{"format": "mailsh.trust.v1", "keys": [{}]}',
    ],
    ids=["not-json", "list", "future-format", "damaged-entry"],
)
def test_unreadable_store_is_a_trust_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(TrustError) as info:
        load_trust(path)
    assert info.value.hint is not None


def test_gpg_keyring_and_trust_levels_do_not_authorize(
    ring: Gpg, alice: Home, tmp_path: Path
) -> None:
    """P2: a key in the keyring, even ultimately trusted by gpg, verifies only when pinned."""
    path = tmp_path / "trust.json"
    add_trusted_key(ring, path, alice.pubkey, reply_to=None)
    forge.gpg(ring.home, "--import-ownertrust", data=f"{alice.fingerprint}:6:\n".encode())
    armored = seal(alice.gpg, b"id", signer=alice.fingerprint, recipient=None)
    now = datetime.now(UTC)

    def check() -> str:
        store = load_trust(path)
        return verify(
            ring,
            armored,
            is_pinned=store.is_pinned,
            now=now,
            max_age=timedelta(days=1),
            max_skew=timedelta(minutes=5),
        ).signer

    assert check() == alice.fingerprint
    remove_trusted_key(path, alice.fingerprint)
    assert alice.fingerprint in forge.fingerprints(ring.home)  # still in gpg's keyring
    with pytest.raises(ProtocolError) as info:
        check()
    assert info.value.reason == "signer-not-pinned"


def test_key_that_cannot_receive_a_reply_is_refused(ring: Gpg, tmp_path: Path) -> None:
    """A sign-only key, or one whose encryption subkey expired, could authorize commands
    whose results could never be encrypted to it (issue: exactly once, point 4)."""
    with forge.scratch_home() as home:
        forge.gpg(home, "--quick-gen-key", "ops <ops@example.org>", "ed25519", "sign", "1y")
        [fpr] = forge.fingerprints(home)
        sign_only = tmp_path / "sign-only.asc"
        sign_only.write_bytes(forge.gpg(home, "--armor", "--export", fpr))
        forge.gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "seconds=1")
        expired = tmp_path / "expired-subkey.asc"
        time.sleep(2)
        expired.write_bytes(forge.gpg(home, "--armor", "--export", fpr))
    store = tmp_path / "t.json"
    for key in (sign_only, expired):
        with pytest.raises(IdentityError, match="no usable encryption subkey") as info:
            add_trusted_key(ring, store, key, reply_to=None)
        assert info.value.hint is not None and "encr" in info.value.hint
    assert not load_trust(store).is_pinned(fpr)
