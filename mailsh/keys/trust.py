"""The trust store: the single source of authorization.

A versioned JSON file (``trust.json`` in the home) listing pinned **primary** key
fingerprints with the address replies to that key go to. gpg's own trust levels, keyring
contents and mail headers never authorize anything (docs/security.md P2). Written atomically
(temp file, fsync, rename, fsync directory).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from mailsh.errors import IdentityError, TrustError
from mailsh.fsio import atomic_write
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import EMAIL_RE

TRUST_FORMAT = "mailsh.trust.v1"
MAX_KEY_FILE_BYTES = 1024 * 1024
MIN_PREFIX = 8
"""Fewest leading hex digits of a fingerprint that may name a pinned key."""
STDIN = Path("-")
"""``trust add -``: read the key from standard input."""
_HEX_RE = re.compile(r"[0-9A-F]+")


@dataclass(frozen=True)
class TrustedKey:
    fingerprint: str
    reply_to: str
    uids: tuple[str, ...]
    added_at: str
    allow_plain_scripts: bool = False


@dataclass(frozen=True)
class TrustStore:
    keys: tuple[TrustedKey, ...] = field(default_factory=tuple)

    def get(self, fingerprint: str) -> TrustedKey | None:
        fpr = fingerprint.upper()
        for key in self.keys:
            if key.fingerprint == fpr:
                return key
        return None

    def find(self, ref: str) -> TrustedKey:
        """The one pinned key ``ref`` names: a fingerprint, a unique prefix of at least
        :data:`MIN_PREFIX` hex digits, or an email (reply address or user id).

        TrustError when nothing or more than one key matches, listing the candidates."""
        wanted = ref.strip()
        compact = wanted.replace(" ", "").upper().removeprefix("0X")
        if "@" in wanted:
            matches = self._by_email(wanted)
        elif _HEX_RE.fullmatch(compact) and len(compact) >= MIN_PREFIX:
            matches = [k for k in self.keys if k.fingerprint.startswith(compact)]
        else:
            raise TrustError(
                f"{wanted[:80]!r} does not name a key: give a fingerprint, at least "
                f"{MIN_PREFIX} of its leading hex digits, or an email address",
                hint="mailsh trust list   (shows the pinned keys)",
            )
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TrustError(
                f"no pinned key matches {wanted[:80]!r}",
                hint="mailsh trust list   (shows the pinned keys)",
            )
        raise TrustError(
            f"{wanted[:80]!r} matches {len(matches)} pinned keys: "
            + ", ".join(k.fingerprint for k in matches),
            hint="give more of the fingerprint (mailsh trust list shows them)",
        )

    def _by_email(self, address: str) -> list[TrustedKey]:
        wanted = address.lower()
        out = []
        for key in self.keys:
            emails = {key.reply_to.lower()}
            for uid in key.uids:
                match = EMAIL_RE.search(uid)
                if match:
                    emails.add(match.group(1).lower())
            if wanted in emails:
                out.append(key)
        return out

    def is_pinned(self, fingerprint: str) -> bool:
        return self.get(fingerprint) is not None

    def for_address(self, address: str) -> TrustedKey | None:
        """The pinned key whose reply address (or user-id email) is ``address``."""
        wanted = address.strip().lower()
        for key in self.keys:
            if key.reply_to.lower() == wanted:
                return key
        for key in self.keys:
            for uid in key.uids:
                match = EMAIL_RE.search(uid)
                if match and match.group(1).lower() == wanted:
                    return key
        return None


def load_trust(path: Path) -> TrustStore:
    if not path.exists():
        return TrustStore()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrustError(
            f"cannot read the trust store {path}: {exc}",
            hint=f"restore {path} from a backup, or move it away and re-run mailsh trust add",
        ) from exc
    if not isinstance(doc, dict) or doc.get("format") != TRUST_FORMAT:
        raise TrustError(
            f"{path} is not a {TRUST_FORMAT} trust store",
            hint="it was written by another mailsh version; upgrade mailsh",
        )
    try:
        keys = tuple(
            TrustedKey(
                fingerprint=str(k["fingerprint"]).upper(),
                reply_to=str(k["reply_to"]),
                uids=tuple(str(u) for u in k.get("uids", ())),
                added_at=str(k.get("added_at", "")),
                allow_plain_scripts=bool(k.get("allow_plain_scripts", False)),
            )
            for k in doc.get("keys", [])
        )
    except (KeyError, TypeError) as exc:
        raise TrustError(f"{path} is damaged: {exc}", hint=f"inspect {path}") from exc
    return TrustStore(keys=keys)


def save_trust(path: Path, store: TrustStore) -> None:
    doc = {"format": TRUST_FORMAT, "keys": [asdict(k) for k in store.keys]}
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, data, prefix=".trust.")


def add_trusted_key(
    gpg: Gpg,
    path: Path,
    key_file: Path,
    *,
    reply_to: str | None,
    allow_plain_scripts: bool = False,
) -> TrustedKey:
    """Import exactly the one public key in ``key_file`` (:data:`STDIN`: standard input)
    and pin its primary fingerprint."""
    data = _read_key_file(key_file)
    scanned = gpg.raw.scan_keys_mem(data.decode("utf-8", errors="replace"))
    secret = [k for k in scanned if k.get("type") == "sec"]
    if secret:
        raise IdentityError(
            f"{key_file} contains a SECRET key; never share or import secret keys here",
            hint="on the key's owner: mailsh keys export --output key.asc, then trust that",
        )
    public = [k for k in scanned if k.get("type") == "pub"]
    if len(public) != 1:
        raise IdentityError(
            f"{key_file} holds {len(public)} public keys; trust add takes exactly one",
            hint="export a single key (mailsh keys export) and trust that file",
        )
    fingerprint = str(public[0]["fingerprint"]).upper()
    _refuse_own_key(gpg, fingerprint, key_file)
    _refuse_unanswerable(public[0], fingerprint, key_file)
    result = gpg.raw.import_keys(data.decode("utf-8", errors="replace"))
    imported = {str(r.get("fingerprint", "")).upper() for r in result.results}
    if fingerprint not in imported:
        raise IdentityError(
            f"gpg did not import key {fingerprint} from {key_file}",
            hint="check the file with: gpg --show-keys " + str(key_file),
        )
    uids = tuple(str(u) for u in public[0].get("uids", ()))
    if reply_to is None:
        for uid in uids:
            match = EMAIL_RE.search(uid)
            if match:
                reply_to = match.group(1)
                break
    if reply_to is None:
        raise IdentityError(
            f"key {fingerprint} has no email address in its user ids",
            hint=f"mailsh trust add {key_file} --reply-to ADDRESS",
        )
    from mailsh.addresses import validate_address

    reply_to = validate_address(reply_to)
    entry = TrustedKey(
        fingerprint=fingerprint,
        reply_to=reply_to,
        uids=uids,
        added_at=datetime.now(UTC).isoformat(timespec="seconds"),
        allow_plain_scripts=allow_plain_scripts,
    )
    store = load_trust(path)
    kept = tuple(k for k in store.keys if k.fingerprint != fingerprint)
    save_trust(path, replace(store, keys=(*kept, entry)))
    return entry


def _read_key_file(key_file: Path) -> bytes:
    """The bytes of ``key_file``, or of standard input for :data:`STDIN`, size-capped."""
    if key_file == STDIN:
        data = sys.stdin.buffer.read(MAX_KEY_FILE_BYTES + 1)
        if not data.strip():
            raise IdentityError(
                "no key on standard input",
                hint="pipe an exported key in: mailsh keys export | mailsh --home OTHER "
                "trust add -",
            )
        if len(data) > MAX_KEY_FILE_BYTES:
            raise IdentityError("standard input is too large for a public key")
        return data
    try:
        if key_file.stat().st_size > MAX_KEY_FILE_BYTES:
            raise IdentityError(f"{key_file} is too large for a public key file")
        return key_file.read_bytes()
    except OSError as exc:
        raise IdentityError(
            f"cannot read {key_file}: {exc.strerror}",
            hint="give the path of an exported public key (mailsh keys export), "
            "or - to read it from standard input",
        ) from exc


def _source(key_file: Path) -> str:
    return "standard input" if key_file == STDIN else str(key_file)


def _refuse_own_key(gpg: Gpg, fingerprint: str, key_file: Path) -> None:
    """A home pins the *other* side's key; its own key in its trust store is a mix-up
    (keygen writes EMAIL.asc next to the other side's file, so it is an easy one)."""
    from mailsh.keys.identity import own_identity

    own = own_identity(gpg)
    if own is not None and own.fingerprint.upper() == fingerprint:
        raise IdentityError(
            f"{_source(key_file)} holds this home's own key ({fingerprint}); "
            "a home trusts the other side's key, not its own",
            hint="trust the key that keygen wrote on the other side (or its `mailsh keys "
            "export`); this file is for the other side's `mailsh trust add`",
        )


def _refuse_unanswerable(key: dict[str, object], fingerprint: str, key_file: Path) -> None:
    """A key that cannot receive an encrypted reply could never be answered: refuse it."""
    from mailsh.keys.capability import NO_ENCRYPTION_HINT, usable_for_encryption

    if not usable_for_encryption(key):
        raise IdentityError(
            f"key {fingerprint} in {_source(key_file)} has no usable encryption subkey (it is "
            "sign-only, or its encryption subkey expired or was revoked), so no reply "
            "could ever be encrypted to it",
            hint=NO_ENCRYPTION_HINT,
        )


def remove_trusted_key(path: Path, ref: str) -> TrustedKey:
    """Unpin the key ``ref`` names (see :meth:`TrustStore.find`)."""
    store = load_trust(path)
    entry = store.find(ref)
    save_trust(path, replace(store, keys=tuple(k for k in store.keys if k is not entry)))
    return entry
