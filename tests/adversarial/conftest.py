"""The actors of the adversarial corpus: throwaway keys, some pinned, some revoked.

Here ``rig`` is a running serve (tests.kit.adversarial), not the client rig that
tests.kit.fixtures registers under that name for the other folders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from mailsh.keys.trust import TrustedKey, load_trust, save_trust
from tests.kit import forge
from tests.kit.adversarial import Kit, PastKey, Rig, serve_rig
from tests.kit.homes import Home, pair

PAST = "20200101T000000!"  # keys made then, valid for a day: long expired


@pytest.fixture(scope="session")
def kit(make_home: Callable[..., Home], alice: Home, mallory: Home) -> Iterator[Kit]:
    """A fresh server home pinning alice and a soon-revoked key; mallory, eve and an
    expired key known or not as each case needs. Session-scoped: keys are the slow part."""
    server = make_home("root@adv.test", address="root@adv.test")
    pair(alice, server)
    server.gpg.raw.import_keys(mallory.pubkey.read_text())  # known to gpg, never pinned
    mallory.gpg.raw.import_keys(server.pubkey.read_text())
    alice.gpg.raw.import_keys(mallory.pubkey.read_text())  # to encrypt to the wrong key
    revoked = make_home("revoked@example.org")
    pair(revoked, server)  # pinned, then revoked below: REVKEYSIG must not authorize
    cert = revoked.settings.gnupg_home / "openpgp-revocs.d" / f"{revoked.fingerprint}.rev"
    text = cert.read_text().replace(":-----BEGIN PGP PUBLIC", "-----BEGIN PGP PUBLIC")
    server.gpg.raw.import_keys(text)
    with forge.scratch_home() as scratch, forge.scratch_home() as past:
        forge.copy_secret_key(alice.settings.gnupg_home, alice.fingerprint, scratch)
        forge.copy_secret_key(mallory.settings.gnupg_home, mallory.fingerprint, scratch)
        forge.copy_public_key(server.settings.gnupg_home, server.fingerprint, scratch)
        forge.gpg(scratch, "--quick-gen-key", "eve <eve@example.org>", "ed25519", "sign", "1y")
        [eve] = [
            f
            for f in forge.fingerprints(scratch, secret=True)
            if f not in (alice.fingerprint, mallory.fingerprint)
        ]
        uid = "expired <expired@example.org>"
        forge.gpg(past, "--quick-gen-key", uid, "future-default", "default", "1d", faked=PAST)
        [old] = forge.fingerprints(past)
        # Pinned while it was valid (trust add now refuses a key that can no longer
        # receive an encrypted reply): its entry written as trust add wrote it then.
        server.gpg.raw.import_keys(forge.gpg(past, "--armor", "--export", old).decode())
        store = load_trust(server.settings.trust_file)
        entry = TrustedKey(
            fingerprint=old, reply_to="expired@example.org", uids=(uid,), added_at="2020-01-01"
        )
        save_trust(server.settings.trust_file, replace(store, keys=(*store.keys, entry)))
        yield Kit(
            alice=alice,
            server=server,
            mallory=mallory,
            revoked=revoked,
            expired=PastKey(past, old, "20200101T120000!"),
            scratch=scratch,
            eve=eve,
        )


@pytest.fixture(scope="module")
def rig(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One long-running serve with every intake, shared by the module's tests."""
    with serve_rig(kit, tmp_path_factory.mktemp("rig")) as running:
        yield running
