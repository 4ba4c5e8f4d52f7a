"""Can a key receive an encrypted reply? The server asks for every authorized request, so
the answer is reused, but only while it cannot have changed (real gpg, real keyrings)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailsh.keys.capability import EncryptionCheck
from mailsh.keys.gpg import Gpg
from tests.kit import forge


@pytest.fixture
def ring() -> Iterator[Gpg]:
    with forge.scratch_home() as home:
        gpg = Gpg(home, max_output=1 << 20)
        yield gpg
        gpg.kill_agent()


def _key(ring: Gpg, encryption_expiry: str) -> str:
    forge.gpg(ring.home, "--quick-gen-key", "ops <ops@example.org>", "ed25519", "sign", "1y")
    [fpr] = forge.fingerprints(ring.home)
    forge.gpg(ring.home, "--quick-add-key", fpr, "cv25519", "encr", encryption_expiry)
    return fpr


def _counting(ring: Gpg) -> list[int]:
    """Count the gpg key listings the check makes (the real call still runs)."""
    calls = [0]
    real = ring.raw.list_keys

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    ring.raw.list_keys = counted
    return calls


def test_answer_is_reused_until_the_subkey_expires(ring: Gpg) -> None:
    fpr = _key(ring, "seconds=3")
    calls = _counting(ring)
    check = EncryptionCheck(ring)
    assert check(fpr) and check(fpr) and check(fpr)
    assert calls[0] == 1  # asked gpg once
    time.sleep(3.5)  # the encryption subkey expires: the reused answer must not outlive it
    assert not EncryptionCheck(ring)(fpr)  # a fresh check: gpg's own answer
    assert not check(fpr)
    assert calls[0] == 3


def test_a_keyring_change_asks_again(ring: Gpg) -> None:
    fpr = _key(ring, "1y")
    calls = _counting(ring)
    check = EncryptionCheck(ring)
    assert check(fpr)
    assert check(fpr)
    assert calls[0] == 1
    time.sleep(0.01)  # a distinct mtime on coarse file systems
    forge.gpg(ring.home, "--quick-add-uid", fpr, "ops2 <ops2@example.org>")
    assert check(fpr)
    assert calls[0] == 2


def test_unknown_or_sign_only_key_cannot_be_encrypted_to(ring: Gpg) -> None:
    forge.gpg(ring.home, "--quick-gen-key", "s <s@example.org>", "ed25519", "sign", "1y")
    [fpr] = forge.fingerprints(ring.home)
    check = EncryptionCheck(ring)
    assert not check(fpr)
    assert not check("0" * 40)
