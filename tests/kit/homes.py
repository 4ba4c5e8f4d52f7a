"""Throwaway mailsh homes with freshly generated keys, and pairing them.

No key material is committed: every test session generates its own keys in short
temporary paths (gpg-agent socket paths must stay under 108 bytes) and stops the
agents it started (the fixtures are in :mod:`tests.kit.fixtures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import Identity
from mailsh.keys.trust import add_trusted_key, load_trust
from mailsh.settings import Settings


@dataclass
class Home:
    """One mailsh home with an identity: what a user gets after `mailsh keygen`."""

    settings: Settings
    gpg: Gpg
    identity: Identity
    email: str
    pubkey: Path  # the exported public key file

    @property
    def path(self) -> Path:
        return self.settings.home

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint


def pair(client: Home, server_home: Home) -> None:
    """Cross-trust two homes (idempotent)."""
    if not load_trust(server_home.settings.trust_file).is_pinned(client.fingerprint):
        add_trusted_key(
            server_home.gpg, server_home.settings.trust_file, client.pubkey, reply_to=None
        )
    if not load_trust(client.settings.trust_file).is_pinned(server_home.fingerprint):
        add_trusted_key(client.gpg, client.settings.trust_file, server_home.pubkey, reply_to=None)
