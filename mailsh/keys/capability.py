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

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from mailsh.keys.gpg import Gpg

NO_ENCRYPTION_HINT = (
    "on the key's owner: add or renew an encryption subkey (gpg --quick-add-key FPR "
    "cv25519 encr, or gpg --quick-set-expire FPR 1y '*'), export the key again "
    "(mailsh keys export) and run mailsh trust add with the new file"
)


def usable_for_encryption(key: Mapping[str, object], now: float | None = None) -> bool:
    """True when a python-gnupg key listing entry (list_keys or scan_keys) can be
    encrypted to at ``now`` (default: the current time).

    gpg's capability field must offer ``E``, *and* an encryption-capable key must still
    be unexpired now: gpg caches validity in its trustdb, so after one listing an
    encryption subkey that has since expired can still be shown as usable (until the next
    trustdb check, which may be a year away). The expiry dates themselves do not lie.
    """
    when = time.time() if now is None else now
    if "E" not in str(key.get("cap") or ""):
        return False
    return max(_encryption_ends(key), default=when) > when


def _encryption_ends(key: Mapping[str, object]) -> list[float]:
    """When each encryption-capable part of ``key`` expires (inf: never); revoked,
    invalid or disabled parts and the parts of an expired primary left out."""
    primary_end = _expiry(key.get("expires"))
    ends = []
    if "e" in str(key.get("cap") or ""):  # the primary key itself encrypts (e.g. RSA)
        ends.append(primary_end)
    info = key.get("subkey_info")
    for sub in info.values() if isinstance(info, dict) else ():
        validity = str(sub.get("trust", ""))
        if "e" in str(sub.get("cap", "")) and validity not in _UNUSABLE_VALIDITY:
            ends.append(min(_expiry(sub.get("expires")), primary_end))
    return ends


_UNUSABLE_VALIDITY = frozenset("erid")  # expired, revoked, invalid, disabled
RECHECK_UNUSABLE = 60.0
"""Seconds a "cannot encrypt" answer is reused (a key whose subkey is not yet valid)."""
RECHECK_USABLE_MAX = 3600.0
"""The longest a "can encrypt" answer is reused, even when no expiry is near."""


class EncryptionCheck:
    """Can the key with this fingerprint be encrypted to now? Asked of gpg at most once
    per key until the answer could change: an answer is reused only while the keyring
    file is unchanged (an import, a revocation or a new subkey changes it) and no expiry
    it depended on has passed. Thread-safe. The server asks it for every authorized
    request."""

    def __init__(self, gpg: Gpg, *, clock: Callable[[], float] = time.time) -> None:
        self.gpg = gpg
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[bool, float, tuple[int, ...] | None]] = {}

    def __call__(self, fingerprint: str) -> bool:
        fpr = fingerprint.upper()
        stamp = _keyring_stamp(self.gpg.home)
        now = self._clock()
        with self._lock:
            cached = self._answers.get(fpr)
        if cached is not None and stamp is not None and cached[2] == stamp and now < cached[1]:
            return cached[0]
        usable, until = self._ask(fpr, now)
        with self._lock:
            self._answers[fpr] = (usable, until, stamp)
        return usable

    def _ask(self, fpr: str, now: float) -> tuple[bool, float]:
        for key in self.gpg.raw.list_keys(keys=[fpr]):
            if str(key.get("fingerprint", "")).upper() != fpr:
                continue
            if not usable_for_encryption(key, now):
                return False, now + RECHECK_UNUSABLE
            # Usable until the last usable encryption part expires (or an hour passes).
            until = max(end for end in _encryption_ends(key) if end > now)
            return True, min(until, now + RECHECK_USABLE_MAX)
        return False, now + RECHECK_UNUSABLE


def _expiry(value: object) -> float:
    """An expiry in epoch seconds from a colon listing ('' or None: never)."""
    text = str(value or "").strip()
    return float(text) if text.isdigit() else float("inf")


def _keyring_stamp(home: Path) -> tuple[int, ...] | None:
    """What changes when the public keyring changes (None: cannot tell, never reuse)."""
    for name in ("pubring.kbx", "pubring.gpg"):
        try:
            st = os.stat(home / name)
        except OSError:
            continue
        return (st.st_ino, st.st_size, st.st_mtime_ns)
    return None
