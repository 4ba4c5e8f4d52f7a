"""Sealing and opening mailsh mails: protocol + mail format + GnuPG, glued in one place.

``open_request(gpg, mail, policy, ...)`` is the only way the server turns a received
mail into something that may run: the mail is read once, by the caller (the server
looks at its headers first), and judged by one :class:`OpenPolicy`. It raises
:class:`ProtocolError` for anything not authenticated (the server discards those
silently: no backscatter, no oracle) and :class:`AuthenticatedRejectionError` for a
message whose signature is good but which must not run (the signer is told why).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mailsh import protocol
from mailsh.errors import ProtocolError
from mailsh.keys.crypto import VerifiedPayload, seal, verify
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import TrustStore
from mailsh.mail.message import IncomingMail, build_reply_mail, build_request_mail, read_mail
from mailsh.protocol import Notice, Reply, Request
from mailsh.settings import Settings

REPLY_MAX_AGE = timedelta(days=30)
_SEAL = object()


class AuthenticatedRejectionError(ProtocolError):
    """A pinned key signed this message, but it must not run. The signer is told."""

    def __init__(
        self,
        error: ProtocolError,
        *,
        verified: VerifiedPayload,
        request_id: str | None,
    ) -> None:
        super().__init__(error.reason, error.message, hint=error.hint)
        self.verified = verified
        self.request_id = request_id
        self.payload_sha256 = hashlib.sha256(verified.plaintext).hexdigest()


@dataclass(frozen=True)
class SealedRequest:
    request: Request
    payload_sha256: str
    mail: bytes
    message_id: str


@dataclass(frozen=True)
class VerifiedRequest:
    """A request that passed every check. Only :func:`open_request` builds one."""

    signer: str
    signature_id: str | None
    signed_at: datetime
    encrypted: bool
    payload_sha256: str
    request_id: str
    command: str
    stdin: bytes | None
    timeout: float | None
    max_output_bytes: int | None
    plain_script: bool  # the seed's form: a signed script, no JSON envelope
    message_id: str | None
    _seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("VerifiedRequest is only built by mailsh.seal.open_request")


def seal_request(
    gpg: Gpg,
    request: Request,
    *,
    signer: str,
    recipient: str | None,
    from_addr: str,
    passphrase: str | None,
) -> SealedRequest:
    payload = protocol.encode_payload(request)
    armored = seal(gpg, payload, signer=signer, recipient=recipient, passphrase=passphrase)
    mail, message_id = build_request_mail(
        uu_block=protocol.uuencode(armored),
        from_addr=from_addr,
        to_addr=request.audience.address,
        request_id=request.request_id,
    )
    return SealedRequest(
        request=request,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        mail=mail,
        message_id=message_id,
    )


@dataclass(frozen=True)
class OpenPolicy:
    """What a server accepts, fixed for its run: built once, from Settings, by the server.

    The trust store and the time are not part of it: each mail is judged against the
    trust store as it is when the mail is opened (``mailsh trust add`` applies at once),
    at that moment's time.
    """

    addresses: tuple[str, ...]  # the audience a request must name: this server's addresses
    fingerprint: str | None  # ... and key
    max_skew: timedelta  # clock skew tolerated between the signer and this server
    max_age: timedelta  # the oldest request accepted
    max_bytes: int  # the largest mail, and so the largest payload, accepted
    require_encrypted: bool = False  # refuse signed-only requests

    @classmethod
    def from_settings(
        cls, settings: Settings, *, addresses: Sequence[str], fingerprint: str
    ) -> OpenPolicy:
        return cls(
            addresses=tuple(addresses),
            fingerprint=fingerprint,
            max_skew=timedelta(seconds=settings.clock_skew),
            max_age=timedelta(seconds=settings.max_request_age),
            max_bytes=settings.max_message_bytes,
            require_encrypted=settings.require_encryption,
        )


def open_request(
    gpg: Gpg,
    mail: IncomingMail,
    policy: OpenPolicy,
    *,
    trust: TrustStore,
    now: datetime,
    passphrase: str | None = None,
) -> VerifiedRequest:
    """The request in ``mail`` (read once, by the caller, with :func:`read_mail`) if it
    passes every check of ``policy`` against ``trust`` at ``now``; else raise."""
    armored = protocol.extract_armor(protocol.extract_uu(mail.body, max_bytes=policy.max_bytes))
    verified = verify(
        gpg,
        armored,
        is_pinned=trust.is_pinned,
        now=now,
        max_age=policy.max_age,
        max_skew=policy.max_skew,
        require_encrypted=policy.require_encrypted,
        passphrase=passphrase,
    )
    # From here on the signer is authenticated: failures are reported to it.
    entry = trust.get(verified.signer)
    if entry is None:  # verify() checked the pin; the store cannot change in between
        raise ProtocolError("signer-not-pinned", "signer vanished from the trust store")

    def reject(error: ProtocolError, request_id: str | None = None) -> ProtocolError:
        return AuthenticatedRejectionError(error, verified=verified, request_id=request_id)

    plain = not verified.plaintext.lstrip().startswith(b"{")
    if plain:
        if not entry.allow_plain_scripts:
            raise reject(
                ProtocolError(
                    "plain-script-not-allowed",
                    "this key may not send plain signed scripts",
                    hint="on the server: mailsh trust add KEY --allow-plain-scripts",
                )
            )
        request_id, command = _plain_script(verified, reject)
        stdin, timeout, max_output_bytes = None, None, None
    else:
        parsed_id: str | None = None
        try:
            request = protocol.parse_request(verified.plaintext)
            parsed_id = request.request_id
            protocol.check_request(
                request,
                signed_at=verified.signed_at,
                server_addresses=list(policy.addresses),
                server_fingerprint=policy.fingerprint,
                now=now,
                max_skew=policy.max_skew,
                max_age=policy.max_age,
            )
        except ProtocolError as exc:
            raise reject(exc, parsed_id) from exc
        request_id, command = request.request_id, request.command
        stdin, timeout, max_output_bytes = request.stdin, request.timeout, request.max_output_bytes
    return VerifiedRequest(
        signer=verified.signer,
        signature_id=verified.signature_id,
        signed_at=verified.signed_at,
        encrypted=verified.encrypted,
        payload_sha256=hashlib.sha256(verified.plaintext).hexdigest(),
        request_id=request_id,
        command=command,
        stdin=stdin,
        timeout=timeout,
        max_output_bytes=max_output_bytes,
        plain_script=plain,
        message_id=mail.message_id,
        _seal=_SEAL,
    )


def plain_script_id(signer: str, signed_at: datetime, script: bytes) -> str:
    """The request id of a plain script: what was signed, never how the signature is encoded.

    OpenPGP signatures are malleable (an ed25519 signature has 16 valid encodings of one
    message, ECDSA two), so gpg's signature id cannot be a replay key: a re-encoded
    signature would get a new one. The signer's primary fingerprint, the signature's
    creation time (a hashed subpacket, covered by the signature) and the digest of the
    signed script are fixed by the signature itself.
    """
    stamp = int(signed_at.timestamp())
    digest = hashlib.sha256(script).hexdigest()
    return hashlib.sha256(f"mailsh.plain.v1:{signer}:{stamp}:{digest}".encode()).hexdigest()[:32]


def _plain_script(
    verified: VerifiedPayload, reject: Callable[[ProtocolError], ProtocolError]
) -> tuple[str, str]:
    """The seed's form: the signed bytes are the script; the id comes from what was signed."""
    try:
        script = verified.plaintext.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise reject(ProtocolError("malformed-payload", "the script is not UTF-8 text")) from exc
    if "\x00" in script:
        raise reject(ProtocolError("malformed-payload", "the script contains a NUL byte"))
    return plain_script_id(verified.signer, verified.signed_at, verified.plaintext), script


def seal_reply(
    gpg: Gpg,
    reply: Reply | Notice,
    *,
    signer: str,
    recipient: str,
    to_addr: str,
    in_reply_to: str | None,
    passphrase: str | None,
    summary: bool = False,
) -> bytes:
    """The signed, encrypted reply mail; ``summary`` puts status and exit code in clear
    text too (``--reply-summary``), else only the request id is readable."""
    payload = protocol.encode_payload(reply)
    armored = seal(gpg, payload, signer=signer, recipient=recipient, passphrase=passphrase)
    if isinstance(reply, Notice):
        status, exit_code = "notice", None
    else:
        status, exit_code = reply.status.value, reply.exit_code
    return build_reply_mail(
        armored=armored,
        from_addr=reply.server,
        to_addr=to_addr,
        request_id=reply.request_id,
        status=status,
        exit_code=exit_code,
        in_reply_to=in_reply_to,
        summary=summary,
    )


def open_answer(
    gpg: Gpg,
    raw: bytes,
    *,
    trust: TrustStore,
    server_fingerprint: str,
    request_id: str,
    request_sha256: str,
    now: datetime,
    max_skew: timedelta,
    max_bytes: int,
    passphrase: str | None = None,
) -> Reply | Notice:
    """What exactly this server said about exactly this request; else raise.

    That is the outcome (:class:`Reply`) or a :class:`~mailsh.protocol.Notice`, which is
    news and never the outcome (a waiting client keeps waiting for the reply).
    ``max_skew`` is the client's ``reply_clock_skew``.
    """
    mail = read_mail(raw, max_bytes=max_bytes)
    armored = protocol.extract_armor(mail.body)
    verified = verify(
        gpg,
        armored,
        is_pinned=lambda fpr: fpr == server_fingerprint and trust.is_pinned(fpr),
        now=now,
        max_age=REPLY_MAX_AGE,
        max_skew=max_skew,
        passphrase=passphrase,
    )
    reply = protocol.parse_server_message(verified.plaintext)
    if reply.request_sha256 != request_sha256 or reply.request_id not in (None, request_id):
        raise ProtocolError("not-our-reply", "reply answers another request")
    return reply
