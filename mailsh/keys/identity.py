"""This home's own key: generate it, describe it, export its public half."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mailsh.errors import GpgError, IdentityError
from mailsh.keys.gpg import Gpg

Algo = Literal["ed25519", "rsa3072", "rsa4096"]
FINGERPRINT_RE = re.compile(r"^[0-9A-F]{40}$")
EMAIL_RE = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


@dataclass(frozen=True)
class Identity:
    """The primary key of a home (the one with a secret key)."""

    fingerprint: str
    uids: tuple[str, ...]
    expires: int | None  # epoch seconds, None = never

    @property
    def email(self) -> str | None:
        for uid in self.uids:
            match = EMAIL_RE.search(uid)
            if match:
                return match.group(1)
        return None


def _key_params(algo: Algo) -> dict[str, str | int | bool]:
    if algo == "ed25519":
        return {
            "key_type": "eddsa",
            "key_curve": "ed25519",
            "key_usage": "sign",
            "subkey_type": "ecdh",
            "subkey_curve": "cv25519",
            "subkey_usage": "encrypt",
        }
    length = 3072 if algo == "rsa3072" else 4096
    return {
        "key_type": "RSA",
        "key_length": length,
        "key_usage": "sign",
        "subkey_type": "RSA",
        "subkey_length": length,
        "subkey_usage": "encrypt",
    }


def own_identity(gpg: Gpg) -> Identity | None:
    """The home's identity, or None when keygen has not run yet."""
    keys = gpg.raw.list_keys(secret=True)
    if not keys:
        return None
    if len(keys) > 1:
        raise IdentityError(
            f"this home holds {len(keys)} secret keys; mailsh expects exactly one",
            hint="use a separate --home per identity",
        )
    key = keys[0]
    expires = int(key["expires"]) if key.get("expires") else None
    return Identity(fingerprint=key["fingerprint"], uids=tuple(key["uids"]), expires=expires)


def require_identity(gpg: Gpg) -> Identity:
    identity = own_identity(gpg)
    if identity is None:
        raise IdentityError(
            "this home has no identity yet",
            hint="mailsh keygen --email you@example.org",
        )
    return identity


def refuse_existing(gpg: Gpg, *, force: bool) -> Identity | None:
    """The identity ``generate`` would replace; without ``force``, IdentityError if any.

    Call it before announcing a key generation, so a second keygen says no at once."""
    existing = own_identity(gpg)
    if existing is not None and not force:
        raise IdentityError(
            f"this home already has an identity ({existing.fingerprint})",
            hint="pass --force to replace it, or use another --home",
        )
    return existing


def generate(
    gpg: Gpg,
    *,
    email: str,
    name: str,
    algo: Algo,
    expire: str,
    passphrase: str | None,
    force: bool,
) -> Identity:
    """Create this home's key: a signing primary and an encryption subkey."""
    existing = refuse_existing(gpg, force=force)
    if existing is not None:
        result = gpg.raw.delete_keys(existing.fingerprint, secret=True, expect_passphrase=False)
        gpg.raw.delete_keys(existing.fingerprint)
        if str(result) != "ok":
            raise GpgError(f"could not remove the old identity: {result.status}")
    params: dict[str, str | int | bool] = {
        **_key_params(algo),
        "name_real": name,
        "name_email": email,
        "expire_date": expire,
    }
    if passphrase is None:
        params["no_protection"] = True
    else:
        params["passphrase"] = passphrase
    key_input = gpg.raw.gen_key_input(**params)
    result = gpg.raw.gen_key(key_input)
    if not result.fingerprint:
        stderr = result.stderr or ""
        lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("[GNUPG:]")]
        raise GpgError(
            f"gpg could not generate a key: {lines[-1] if lines else result.status}",
            hint="run again with --debug to see gpg's output",
            gpg_output=stderr,
        )
    return require_identity(gpg)


def export_public(gpg: Gpg, fingerprint: str) -> str:
    armored = gpg.raw.export_keys(fingerprint, armor=True, minimal=True)
    if not isinstance(armored, str) or "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
        raise GpgError(f"gpg could not export key {fingerprint}")
    return armored


def new_identity(
    gpg: Gpg,
    email: str,
    *,
    expire: str,
    pubkey: Path,
    algo: Algo = "ed25519",
    passphrase: str | None = None,
) -> Identity:
    """A fresh identity for a home made on the spot (``mailsh demo``, the benchmark, the
    tests): generated, named after the address, its public half written to ``pubkey``."""
    identity = generate(
        gpg,
        email=email,
        name=email.split("@", maxsplit=1)[0],
        algo=algo,
        expire=expire,
        passphrase=passphrase,
        force=False,
    )
    pubkey.write_text(export_public(gpg, identity.fingerprint), encoding="utf-8")
    return identity
