"""Deciding what happens to one spooled message: the server's per-message pipeline.

Every message ends in exactly one recorded state (THREATS.md P9):

- unauthenticated (bad/unknown signature, not a mailsh mail, auto-reply, bounce):
  ``discarded`` and logged, never answered (P7: no backscatter, no oracle);
- authenticated but refused (audience, window, version, replay, plain script not
  allowed): ``rejected``, and the signer is told why;
- authorized: the replay record is committed **before** the command starts (P5), the
  command runs, and the reply is queued in the same transaction that marks the
  message ``replied``;
- anything that crashes the pipeline twice: ``quarantined`` (P11: no crash loop).

Replies go only to the address pinned with the authorizing key (P7), are signed by the
server and encrypted to that key (P8); no decrypted byte of a failed message leaves.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailsh import envelope
from mailsh.errors import MailshError, ProtocolError
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import TrustStore, load_trust
from mailsh.mailfmt import read_mail
from mailsh.protocol import Reply, ReplyStatus
from mailsh.server.execute import ExecLimits, run_command
from mailsh.server.spool import MessageTooLarge, Spool, SpooledMessage
from mailsh.server.state import MessageState, StateDB
from mailsh.settings import Settings

log = logging.getLogger("mailsh.server")

MAX_ATTEMPTS = 2  # a message that crashed the pipeline this often is quarantined


@dataclass(frozen=True)
class ServerIdentity:
    fingerprint: str
    addresses: list[str]

    @property
    def address(self) -> str:
        return self.addresses[0]


def decision(event: str, **fields: object) -> None:
    """One log line per decision (formatted as text or JSON by the daemon's handler)."""
    log.info(event, extra={"mailsh": {"event": event, **fields}})


class Processor:
    """Runs the pipeline for spooled messages. Thread-safe: one call per message."""

    def __init__(
        self,
        settings: Settings,
        *,
        gpg: Gpg,
        state: StateDB,
        spool: Spool,
        identity: ServerIdentity,
        on_reply_queued: object = None,
    ) -> None:
        self.settings = settings
        self.gpg = gpg
        self.state = state
        self.spool = spool
        self.identity = identity
        self._notify = on_reply_queued
        self.workdir = settings.workdir or Path("/")

    # -- entry point ----------------------------------------------------------------

    def process(self, msg: SpooledMessage) -> MessageState:
        """Take one message to its final state. Never raises for bad input."""
        try:
            existing = self.state.message_state(msg.id)
            if existing is not None and existing.is_final:
                self.spool.finish(msg)  # crashed after recording, before moving
                return existing
            attempts = self.state.begin_processing(msg.id, source=msg.source, size=msg.size)
            if attempts > MAX_ATTEMPTS:
                return self._quarantine(msg, f"processing failed {attempts - 1} times")
            final = self._process(msg)
            self.spool.finish(msg)
            return final
        except Exception as exc:  # containment: one message never stops the server
            log.exception("processing %s failed", msg.id)
            try:
                return self._quarantine(msg, f"internal error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("could not quarantine %s; it stays pending", msg.id)
                return MessageState.RECEIVED

    def _quarantine(self, msg: SpooledMessage, reason: str) -> MessageState:
        self.state.set_message_state(msg.id, MessageState.QUARANTINED, reason=reason)
        self.spool.quarantine(msg, reason)
        decision("quarantined", message=msg.id, reason=reason)
        return MessageState.QUARANTINED

    def _discard(self, msg: SpooledMessage, reason: str, **fields: object) -> MessageState:
        self.state.set_message_state(msg.id, MessageState.DISCARDED, reason=reason)
        decision("discarded", message=msg.id, reason=reason, **fields)
        return MessageState.DISCARDED

    # -- the pipeline ---------------------------------------------------------------

    def _process(self, msg: SpooledMessage) -> MessageState:  # noqa: PLR0911 - one exit per verdict
        s = self.settings
        try:
            raw = self.spool.read(msg, s.max_message_bytes)
        except MessageTooLarge:
            return self._discard(msg, "too-large", size=msg.size)
        self.state.record_message(
            msg.id, source=msg.source, size=len(raw), sha256=hashlib.sha256(raw).hexdigest()
        )
        try:
            mail = read_mail(raw, max_bytes=s.max_message_bytes)
        except ProtocolError as exc:
            return self._discard(msg, exc.reason)
        if mail.auto_submitted not in (None, "no"):
            return self._discard(msg, "auto-submitted")
        if mail.is_bounce:
            return self._discard(msg, "bounce")
        trust = load_trust(s.trust_file)
        now = datetime.now(UTC)
        try:
            request = envelope.open_request(
                self.gpg,
                raw,
                trust=trust,
                server_addresses=self.identity.addresses,
                server_fingerprint=self.identity.fingerprint,
                now=now,
                max_skew=timedelta(seconds=s.clock_skew),
                max_age=timedelta(seconds=s.max_request_age),
                max_bytes=s.max_message_bytes,
                require_encrypted=s.require_encryption,
                passphrase=s.passphrase(),
            )
        except envelope.AuthenticatedRejectionError as exc:
            return self._reject(msg, trust, exc)
        except ProtocolError as exc:
            return self._discard(msg, exc.reason, detail=exc.message)
        return self._run(msg, trust, request)

    def _reject(
        self, msg: SpooledMessage, trust: TrustStore, exc: envelope.AuthenticatedRejectionError
    ) -> MessageState:
        signer = exc.verified.signer
        self._answer(
            msg,
            trust,
            signer,
            exc.mail.message_id,
            MessageState.REJECTED,
            None,
            request_id=exc.request_id,
            request_sha256=exc.payload_sha256,
            status=ReplyStatus.REJECTED,
            reason=f"{exc.reason}: {exc.message}",
        )
        decision(
            "rejected", message=msg.id, signer=signer, request=exc.request_id, reason=exc.reason
        )
        return MessageState.REJECTED

    def _run(
        self, msg: SpooledMessage, trust: TrustStore, request: envelope.VerifiedRequest
    ) -> MessageState:
        s = self.settings
        claimed = self.state.claim_request(
            signer=request.signer,
            request_id=request.request_id,
            signature_id=request.signature_id,
            issued_at=request.signed_at,
            request_sha256=request.payload_sha256,
            spool_id=msg.id,
        )

        def answer(final: MessageState, request_status: str | None, **fields: Any) -> None:
            self._answer(
                msg,
                trust,
                request.signer,
                request.message_id,
                final,
                request_status,
                request_id=request.request_id,
                request_sha256=request.payload_sha256,
                **fields,
            )

        if not claimed:
            answer(
                MessageState.REJECTED,
                None,
                status=ReplyStatus.REJECTED,
                reason="replay: this request was already received; it is not run again",
            )
            decision("rejected", message=msg.id, signer=request.signer, reason="replay")
            return MessageState.REJECTED
        self.state.set_message_state(
            msg.id, MessageState.EXECUTING, signer=request.signer, request_id=request.request_id
        )
        timeout = min(request.timeout or s.command_timeout, s.max_command_timeout)
        cap = min(request.max_output_bytes or s.max_output_bytes, s.max_output_bytes)
        decision(
            "executing",
            message=msg.id,
            signer=request.signer,
            request=request.request_id,
            timeout=timeout,
        )
        try:
            result = run_command(
                request.command,
                stdin=request.stdin,
                limits=ExecLimits(timeout=timeout, max_output_bytes=cap),
                cwd=self.workdir,
                run_as=s.run_as,
            )
        except MailshError as exc:
            answer(
                MessageState.REPLIED,
                "error",
                status=ReplyStatus.ERROR,
                reason=f"the server could not run the command: {exc.message}",
            )
            decision("error", message=msg.id, request=request.request_id, reason=exc.message)
            return MessageState.REPLIED
        answer(
            MessageState.REPLIED,
            "ok",
            status=ReplyStatus.OK,
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            stdout=result.stdout,
            stderr=result.stderr,
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            started_at=result.started_at,
            finished_at=result.finished_at,
        )
        decision(
            "executed",
            message=msg.id,
            signer=request.signer,
            request=request.request_id,
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            seconds=round((result.finished_at - result.started_at).total_seconds(), 3),
        )
        return MessageState.REPLIED

    def _answer(
        self,
        msg: SpooledMessage,
        trust: TrustStore,
        signer: str,
        in_reply_to: str | None,
        final: MessageState,
        request_status: str | None,
        **fields: Any,
    ) -> None:
        """Seal a reply from this server and queue it with the message's final state."""
        reply = Reply(server=self.identity.address, **fields)
        entry = trust.get(signer)
        if entry is None:  # unpinned between verify and now: say nothing (P7)
            self.state.set_message_state(msg.id, MessageState.DISCARDED, reason="unpinned")
            return
        mail = envelope.seal_reply(
            self.gpg,
            reply,
            signer=self.identity.fingerprint,
            recipient=signer,
            to_addr=entry.reply_to,
            in_reply_to=in_reply_to,
            passphrase=self.settings.passphrase(),
            summary=self.settings.reply_summary,
        )
        self.state.finish_with_reply(
            spool_id=msg.id,
            state=final,
            reason=reply.reason,
            signer=signer,
            request_id=reply.request_id,
            request_status=request_status,
            to_addr=entry.reply_to,
            from_addr=self.identity.address,
            message=mail,
        )
        if callable(self._notify):
            self._notify()
