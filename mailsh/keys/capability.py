"""Can a key receive an encrypted reply? Asked before a key is pinned and before a run.

Every answer mailsh sends is encrypted to the key that asked (docs/security.md P8). A key
without a usable encryption subkey (a sign-only key, or one whose encryption subkey has
expired or been revoked while the primary is still valid) could authorize a command whose
result could never be reported, so such a key is refused at ``trust add`` and its
requests are refused before anything runs.

gpg's colon listing answers the question: the capability field of the primary key
carries an upper-case ``E`` exactly when the key as a whole has a usable encryption
(sub)key now (expiry and revocation taken into account).
"""

from __future__ import annotations

from collections.abc import Mapping

from mailsh.keys.gpg import Gpg

NO_ENCRYPTION_HINT = (
    "on the key's owner: add or renew an encryption subkey (gpg --quick-add-key FPR "
    "cv25519 encr, or gpg --quick-set-expire FPR 1y '*'), export the key again "
    "(mailsh keys export) and run mailsh trust add with the new file"
)


def usable_for_encryption(key: Mapping[str, object]) -> bool:
    """True when a python-gnupg key listing entry (list_keys or scan_keys) can be
    encrypted to now."""
    return "E" in str(key.get("cap") or "")


def can_encrypt_to(gpg: Gpg, fingerprint: str) -> bool:
    """True when the key ``fingerprint`` in ``gpg``'s keyring can be encrypted to now."""
    for key in gpg.raw.list_keys(keys=[fingerprint]):
        if str(key.get("fingerprint", "")).upper() == fingerprint.upper():
            return usable_for_encryption(key)
    return False
