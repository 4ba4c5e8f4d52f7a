"""Sign/encrypt outgoing payloads and verify incoming ones, strictly.

:func:`verify` implements the accepting check of docs/security.md (P1-P4): gpg return code 0, a good
and valid signature, no problems, no key status, exactly one signature and exactly one
literal packet, an allowlist of status keywords (anything unexpected rejects), the
**primary** fingerprint pinned in the trust store, the signature time inside the window,
and decryption OK where the data was encrypted. python-gnupg's summary fields are used
*and* gpg's raw status lines are re-read here, so one library quirk cannot open a hole.
Plaintext is only handed out inside a :class:`VerifiedPayload`, which nothing else can
construct.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mailsh.errors import GpgError, ProtocolError
from mailsh.keys.gpg import Gpg, status_lines
from mailsh.keys.packets import check_message_shape

# Status keywords an acceptable verification may contain. Everything else (BADSIG,
# ERRSIG, EXPKEYSIG, REVKEYSIG, EXPSIG, NO_PUBKEY, BADMDC, DECRYPTION_FAILED, FAILURE,
# NOTATION_*, IMPORT_*, ...) rejects the message.
_ALLOWED_STATUS = frozenset(
    {
        "NEWSIG",
        "GOODSIG",
        "VALIDSIG",
        "SIG_ID",
        "TRUST_UNDEFINED",
        "TRUST_NEVER",
        "TRUST_MARGINAL",
        "TRUST_FULLY",
        "TRUST_ULTIMATE",
        "PLAINTEXT",
        "PLAINTEXT_LENGTH",
        "KEY_CONSIDERED",
        "ENC_TO",
        "DECRYPTION_KEY",
        "BEGIN_DECRYPTION",
        "END_DECRYPTION",
        "DECRYPTION_INFO",
        "DECRYPTION_OKAY",
        "GOODMDC",
        "VERIFICATION_COMPLIANCE_MODE",
        "DECRYPTION_COMPLIANCE_MODE",
        "NEED_PASSPHRASE",
        "USERID_HINT",
        "GOOD_PASSPHRASE",
        "PINENTRY_LAUNCHED",
    }
)

# gpg's ERRSIG return code for "the public key is not available".
_ERRSIG_NO_PUBKEY = "9"

_SEAL = object()


def _quiet_gnupg_library(record: logging.LogRecord) -> bool:
    """Drop python-gnupg's warnings about a gpg run mailsh judges itself.

    :func:`verify` re-reads every status line and reports each failure with a reason
    code, so "gpg returned a non-zero error code" and "potential problem" lines from the
    library only add a second, vaguer log line per refused message.
    """
    return not (
        record.levelno == logging.WARNING
        and str(record.msg).startswith(("gpg returned a non-zero error code", "potential problem"))
    )


logging.getLogger("gnupg").addFilter(_quiet_gnupg_library)


@dataclass(frozen=True)
class VerifiedPayload:
    """Plaintext that passed every check. Only :func:`verify` can build one."""

    signer: str  # primary key fingerprint, pinned
    signing_key: str  # the (sub)key that made the signature
    signature_id: str | None
    signed_at: datetime
    encrypted: bool
    plaintext: bytes = field(repr=False)
    _seal: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("VerifiedPayload is only built by mailsh.keys.crypto.verify")


def _reject(reason: str, message: str) -> ProtocolError:
    return ProtocolError(reason, message)


def _parse_time(value: str) -> datetime:
    if value.isdigit():
        return datetime.fromtimestamp(int(value), UTC)
    # ISO 8601 basic form, e.g. 20240101T120000
    return datetime.strptime(value, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


def _unknown_signer(
    statuses: list[tuple[str, list[str]]], names: Counter[str], unexpected: list[str]
) -> str | None:
    """The key id of the one signature gpg could not check for lack of its public key.

    None unless that is the *only* problem: exactly one signature, no good one, and no
    status outside the allowlist but ERRSIG (with return code 9, "no public key") and
    NO_PUBKEY. Anything else stays ``bad-signature`` and is judged by the checks below.
    """
    if not unexpected or not set(unexpected) <= {"ERRSIG", "NO_PUBKEY"}:
        return None
    if names["NEWSIG"] > 1 or names["GOODSIG"] or names["VALIDSIG"]:
        return None
    errsigs = [args for name, args in statuses if name == "ERRSIG"]
    if len(errsigs) > 1 or any(len(a) < 6 or a[5] != _ERRSIG_NO_PUBKEY for a in errsigs):
        return None
    # gpg >= 2.2.7 appends the issuer fingerprint to ERRSIG; else the long key id.
    ids = [a[6] if len(a) >= 7 else a[0] for a in errsigs] or [
        args[0] for name, args in statuses if name == "NO_PUBKEY" and args
    ]
    return ids[0].upper() if len(ids) == 1 else None


def verify(  # noqa: PLR0912 - one branch per accepting check, kept flat on purpose
    gpg: Gpg,
    armored: bytes,
    *,
    is_pinned: Callable[[str], bool],
    now: datetime,
    max_age: timedelta,
    max_skew: timedelta,
    require_encrypted: bool = False,
    passphrase: str | None = None,
) -> VerifiedPayload:
    """Decrypt (if needed) and verify ``armored``; raise ProtocolError on any doubt."""
    check_message_shape(armored, max_bytes=gpg.max_output)
    result = gpg.raw.decrypt(armored, passphrase=passphrase)
    statuses = status_lines(result.stderr or "")
    names = Counter(name for name, _ in statuses)

    unexpected = sorted(set(names) - _ALLOWED_STATUS)
    unknown = _unknown_signer(statuses, names, unexpected)
    if unknown is not None:
        raise _reject(
            "unknown-key",
            f"signed by key {unknown}, which is not in this home's keyring "
            "(gpg reported NO_PUBKEY)",
        )
    if unexpected:
        raise _reject(
            "bad-signature" if names["NEWSIG"] else "unsigned",
            "gpg reported " + ", ".join(unexpected),
        )
    if result.returncode != 0:
        raise _reject("gpg-failed", f"gpg exited with status {result.returncode}")
    if names["NEWSIG"] == 0 and names["GOODSIG"] == 0:
        raise _reject("unsigned", "the payload carries no signature")
    if names["NEWSIG"] != 1 or names["GOODSIG"] != 1 or names["VALIDSIG"] != 1:
        raise _reject(
            "signature-count",
            f"exactly one signature is required (gpg saw {names['NEWSIG']})",
        )
    if names["PLAINTEXT"] != 1:
        raise _reject(
            "literal-count",
            f"exactly one literal data packet is required (gpg saw {names['PLAINTEXT']})",
        )
    encrypted = names["BEGIN_DECRYPTION"] > 0
    if encrypted and (names["DECRYPTION_OKAY"] != 1 or names["END_DECRYPTION"] != 1):
        raise _reject("decryption-failed", "the payload did not decrypt cleanly")
    if require_encrypted and not encrypted:
        raise _reject("not-encrypted", "this server only accepts encrypted requests")
    if not result.valid or getattr(result, "key_status", None) is not None:
        raise _reject("bad-signature", f"gpg did not accept the signature ({result.status})")
    if getattr(result, "problems", None):
        raise _reject("bad-signature", "gpg reported problems with the signature")

    validsig = next(args for name, args in statuses if name == "VALIDSIG")
    if len(validsig) < 10:
        raise _reject("bad-signature", "gpg's VALIDSIG line is incomplete")
    signing_key = validsig[0].upper()
    primary = validsig[9].upper()
    try:
        signed_at = _parse_time(validsig[2])
    except ValueError as exc:
        raise _reject("bad-signature", "unreadable signature time") from exc
    if not is_pinned(primary):
        raise _reject("signer-not-pinned", f"signer {primary} is not in the trust store")
    if signed_at > now + max_skew:
        raise _reject("signature-from-future", f"signature made in the future ({signed_at})")
    if signed_at < now - max_age:
        raise _reject("signature-too-old", f"signature is too old ({signed_at})")

    sig_ids = [args[0] for name, args in statuses if name == "SIG_ID" and args]
    plaintext = result.data
    if not isinstance(plaintext, bytes):
        raise GpgError("gpg returned no plaintext")
    return VerifiedPayload(
        signer=primary,
        signing_key=signing_key,
        signature_id=sig_ids[0] if len(sig_ids) == 1 else None,
        signed_at=signed_at,
        encrypted=encrypted,
        plaintext=plaintext,
        _seal=_SEAL,
    )


def seal(
    gpg: Gpg,
    payload: bytes,
    *,
    signer: str,
    recipient: str | None,
    passphrase: str | None = None,
) -> bytes:
    """Sign ``payload`` with ``signer`` and, when ``recipient`` is given, encrypt to it.

    Returns ASCII-armored OpenPGP bytes. Encryption uses ``--trust-model always`` because
    mailsh pins fingerprints itself; gpg's web of trust plays no part.
    """
    if recipient is None:
        result = gpg.raw.sign(
            payload, keyid=signer, passphrase=passphrase, binary=False, clearsign=False
        )
    else:
        result = gpg.raw.encrypt(
            payload,
            [recipient],
            sign=signer,
            always_trust=True,
            passphrase=passphrase,
            armor=True,
        )
    data = result.data
    if getattr(result, "returncode", 1) != 0 or not data:
        lines = (result.stderr or "").strip().splitlines()
        detail = next((ln for ln in reversed(lines) if not ln.startswith("[GNUPG:]")), "")
        hint = (
            "check --passphrase-file / MAILSH_PASSPHRASE_FILE"
            if "passphrase" in (detail.lower())
            else "run with --debug to see gpg's output"
        )
        raise GpgError(
            f"gpg could not sign/encrypt: {detail or result.status}",
            hint=hint,
            gpg_output=result.stderr or "",
        )
    return bytes(data)
