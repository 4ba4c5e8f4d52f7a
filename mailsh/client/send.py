"""Sending one request: build, sign (and encrypt), record as pending, submit.

The request is sealed only through :func:`mailsh.seal.seal_request`. The server it
is for is found in this home's trust store by its address
(:meth:`~mailsh.keys.trust.TrustStore.for_address`): that key's fingerprint is bound
into the signed request (``audience.fingerprint``, docs/security.md P6) and the request is
encrypted to it. Without a trusted server key a request can only go out unencrypted
(``encrypt=False``) and unbound to a key, and no reply to it can be verified until the
server key is trusted.

Everything sending needs is checked *before* anything leaves (:func:`prepare_request`):
a request that was sent cannot be taken back, so a mistake found afterwards would leave a
command running that its sender believes failed. The pending record is written (durably)
before the mail is submitted, so a reply can never arrive for a request this home has
forgotten; if the transport refused the mail for certain, the record is removed again,
and if the hand-off may have happened it is kept (:class:`MaybeSentError`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from mailsh.client.pending import MboxMark, PendingRequest, PendingStore, tail_sha256
from mailsh.errors import (
    ConfigError,
    HandoffUnknownError,
    MailshError,
    TrustError,
    UsageError,
    first_validation_error,
)
from mailsh.mail.transport import Transport, transport_from_settings

if TYPE_CHECKING:
    from mailsh.client.sources import ReplyMailbox
    from mailsh.keys.gpg import Gpg
    from mailsh.keys.trust import TrustedKey, TrustStore
    from mailsh.protocol import Request
    from mailsh.seal import SealedRequest
    from mailsh.settings import Settings


SERVER_KEY_HINT = "mailsh trust add SERVER.asc   (the server's key, from its mailsh keys export)"


def resolve_server(trust: TrustStore, address: str, *, encrypt: bool) -> TrustedKey | None:
    """The pinned key of the server at ``address``; required when encrypting."""
    key = trust.for_address(address)
    if key is None and encrypt:
        raise TrustError(
            f"no trusted key for the server {address}, so the request cannot be encrypted",
            hint=f"{SERVER_KEY_HINT}; or --no-encrypt (then no reply can be verified)",
        )
    return key


def build_request(
    *,
    to: str,
    server_fingerprint: str | None,
    reply_to: str,
    command: str,
    stdin: bytes | None,
    timeout: float | None,
    now: datetime,
    lifetime: timedelta,
) -> Request:
    """A fresh ``mailsh.request.v1`` valid from ``now`` for ``lifetime``."""
    from mailsh.protocol import Audience, Request, new_request_id

    issued = now.astimezone(UTC).replace(microsecond=0)
    try:
        return Request(
            request_id=new_request_id(),
            audience=Audience(address=to, fingerprint=server_fingerprint),
            reply_to=reply_to,
            issued_at=issued,
            expires_at=issued + lifetime,
            command=command,
            stdin=stdin,
            timeout=timeout,
        )
    except ValidationError as exc:
        where, what = first_validation_error(exc)
        raise UsageError(
            f"cannot build the request: {where or 'request'}: {what}",
            hint="check the command, --stdin and --timeout",
        ) from exc


def read_stdin_arg(spec: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of ``--stdin FILE`` (``-``: this process's stdin), at most ``max_bytes``."""
    from mailsh.protocol import MAX_STDIN_BYTES

    limit = MAX_STDIN_BYTES if max_bytes is None else max_bytes
    try:
        if spec == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(spec, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise UsageError(
            f"cannot read --stdin {spec}: {exc.strerror}", hint="give a readable file or -"
        ) from exc
    if len(data) > limit:
        raise UsageError(
            f"--stdin {spec} is larger than {limit} bytes, the most a request may carry",
            hint="send less input, or copy the data to the server another way",
        )
    return data


def mbox_mark(path: Path) -> MboxMark | None:
    """Where ``path`` (an mbox) ends now, if that is a message boundary; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size and (size < 2 or os.pread(fd, 2, size - 2) != b"\n\n"):
            return None
        tail = tail_sha256(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)
    return MboxMark(
        path=str(path.absolute()),
        device=st.st_dev,
        inode=st.st_ino,
        offset=size,
        tail_sha256=tail,
    )


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked, sealed and ready to go: nothing has left this machine yet."""

    sealed: SealedRequest
    pending: PendingRequest
    outbound: Transport
    encrypted: bool
    server_key: TrustedKey | None
    from_addr: str
    mailbox: ReplyMailbox | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def request_id(self) -> str:
        return self.sealed.request.request_id


@dataclass(frozen=True)
class SentRequest:
    """What :func:`submit_request` did: the request left, as far as this side can know."""

    sealed: SealedRequest
    pending: PendingRequest
    encrypted: bool
    server_key: TrustedKey | None
    from_addr: str
    warnings: tuple[str, ...] = field(default=())
    mailbox: ReplyMailbox | None = None

    @property
    def request_id(self) -> str:
        return self.sealed.request.request_id


class MaybeSentError(MailshError):
    """The request may have left: the command may run. Never send it again blindly."""


def prepare_request(
    settings: Settings,
    gpg: Gpg,
    *,
    command: str,
    to: str,
    from_addr: str | None = None,
    stdin: bytes | None = None,
    timeout: float | None = None,
    encrypt: bool = True,
    require_server_key: bool = False,
    require_mailbox: bool = False,
    outbound: Transport | None = None,
    now: datetime | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> PreparedRequest:
    """Check everything sending needs, then build and seal the request; send nothing.

    Checked before anything leaves: this home's identity and sender address, the
    server's pinned key (required with ``require_server_key``, what ``send --wait``
    needs since its reply could not be verified otherwise), the way out (SMTP or
    sendmail), and the reply mailbox: with ``require_mailbox`` exactly one must be
    configured and usable; otherwise a configured one must still make sense (one kind,
    an existing directory), so a later ``wait-reply`` can read it. ``on_note`` gets
    informational lines (e.g. "the mbox does not exist yet"), ``on_warning`` warnings.
    """
    from mailsh.addresses import validate_address
    from mailsh.client.sources import choose_mailbox
    from mailsh.keys.identity import require_identity
    from mailsh.keys.trust import load_trust
    from mailsh.seal import seal_request

    warnings: list[str] = []

    def warn(text: str) -> None:
        warnings.append(text)
        if on_warning is not None:
            on_warning(text)

    identity = require_identity(gpg)
    to = validate_address(to)
    sender = from_addr or settings.from_address or identity.email
    if sender is None:
        raise ConfigError(
            "no sender address: this home's key has no email and none is configured",
            hint="--from you@example.org (or MAILSH_FROM_ADDRESS)",
        )
    sender = validate_address(sender)
    key = resolve_server(load_trust(settings.trust_file), to, encrypt=encrypt)
    if key is None and require_server_key:
        raise TrustError(
            f"no trusted key for the server {to}: its reply could not be verified, "
            "so there is nothing to wait for",
            hint=f"{SERVER_KEY_HINT}; or send without --wait",
        )
    outbound = outbound or transport_from_settings(settings)
    configured = any(
        x is not None for x in (settings.reply_mbox, settings.reply_maildir, settings.reply_imap)
    )
    mailbox = (
        choose_mailbox(settings, on_warning=on_note if require_mailbox else None)
        if require_mailbox or configured
        else None
    )
    if not encrypt:
        warn("the request is NOT encrypted: anyone who sees the mail can read the command")
    if key is None:
        warn(
            f"no trusted key for {to}: the request is not bound to a server key, and no "
            f"reply can be verified until you run: {SERVER_KEY_HINT}"
        )
    moment = now or datetime.now(UTC)
    request = build_request(
        to=to,
        server_fingerprint=key.fingerprint if key is not None else None,
        reply_to=sender,
        command=command,
        stdin=stdin,
        timeout=timeout,
        now=moment,
        lifetime=timedelta(seconds=settings.request_lifetime),
    )
    sealed = seal_request(
        gpg,
        request,
        signer=identity.fingerprint,
        recipient=key.fingerprint if (encrypt and key is not None) else None,
        from_addr=sender,
        passphrase=settings.passphrase(),
    )
    mbox_path = mailbox.path if mailbox is not None and mailbox.kind == "mbox" else None
    record = PendingRequest(
        request_id=request.request_id,
        to=to,
        server_fingerprint=key.fingerprint if key is not None else None,
        payload_sha256=sealed.payload_sha256,
        message_id=sealed.message_id,
        created=moment,
        expires_at=request.expires_at,
        mbox_mark=mbox_mark(mbox_path) if mbox_path is not None else None,
        command=command,
    )
    return PreparedRequest(
        sealed=sealed,
        pending=record,
        outbound=outbound,
        encrypted=encrypt and key is not None,
        server_key=key,
        from_addr=sender,
        mailbox=mailbox,
        warnings=tuple(warnings),
    )


def submit_request(settings: Settings, prepared: PreparedRequest) -> SentRequest:
    """Record ``prepared`` as pending (durably), then hand it to the mail transport.

    If the transport refused it for certain, the record is removed and the error raised
    as it is: nothing was sent. If the hand-off may have happened (the connection broke
    while the message was going out, sendmail was killed, an interrupt), the record is
    kept and :class:`MaybeSentError` says so, with the command to wait for the reply.
    """
    rid = prepared.request_id
    store = PendingStore(settings.home)
    store.prune(now=prepared.pending.created)
    path = store.save(prepared.pending)
    try:
        prepared.outbound.submit(
            mail_from=prepared.from_addr,
            rcpt_to=[prepared.pending.to],
            message=prepared.sealed.mail,
        )
    except (HandoffUnknownError, KeyboardInterrupt) as exc:
        detail = exc.message if isinstance(exc, MailshError) else "interrupted while sending"
        raise MaybeSentError(
            f"request {rid} may have been sent, so the command may run: {detail}",
            hint=f"mailsh wait-reply {rid}   (do not send it again before you know)",
        ) from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return SentRequest(
        sealed=prepared.sealed,
        pending=prepared.pending,
        encrypted=prepared.encrypted,
        server_key=prepared.server_key,
        from_addr=prepared.from_addr,
        warnings=prepared.warnings,
        mailbox=prepared.mailbox,
    )
