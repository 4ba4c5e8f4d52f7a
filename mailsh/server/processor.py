"""Deciding what happens to one spooled message: the server's per-message pipeline.

Every message ends in exactly one recorded state (docs/security.md P9):

- unauthenticated (bad/unknown signature, not a mailsh mail, auto-reply, bounce):
  ``discarded`` and logged, never answered (P7: no backscatter, no oracle);
- authenticated: the request is *taken* first (the replay record, durable before
  anything runs, P5). A request is taken once; its one outcome is reported once:
  - refused (audience, window, version, plain script not allowed, a key that cannot
    receive an encrypted reply): ``rejected``, and the signer is told why when a reply
    can be encrypted to it;
  - authorized: the command runs, and the reply is queued in the same transaction that
    finishes the claim and marks the message ``replied``; a failure at any point after
    the claim still ends it in a final state with the most truthful report that can be
    sealed (``error``, ``outcome-unknown``), or ``unreported`` when none can;
- a copy of a request already taken (duplicate delivery, loop, replay): ``duplicate``;
  never run, never a second outcome, at most one notice per request
  (docs/protocol.md section 9);
- a claim whose process died (crash, SIGKILL) is settled ``outcome_unknown`` and
  reported once, by whichever serve process notices first; a live process's claim is
  never answered by another;
- anything that crashes the pipeline twice before a claim: ``quarantined`` (P11).

Replies go only to the address pinned with the authorizing key (P7), are signed by the
server and encrypted to that key (P8); no decrypted byte of a failed message leaves.
There is one place that builds an answer: :meth:`Processor._seal`.

This module is over the ~400-line guide on purpose for now: every path that takes or ends
a claim is here, so the exactly-once rules can be read in one place. Splitting it
(verdicts; copies and claim settlement; sealing) is left to the redesign (issue 11).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailsh import seal
from mailsh.errors import MailshError, ProtocolError
from mailsh.keys.capability import EncryptionCheck
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import TrustStore, load_trust
from mailsh.mail.message import read_mail
from mailsh.protocol import Notice, OriginalState, Reply, ReplyStatus
from mailsh.server import claimant
from mailsh.server.cgroup import Containment
from mailsh.server.execute import ExecLimits, run_command
from mailsh.server.spool import MessageTooLarge, Spool, SpooledMessage
from mailsh.server.state import ClaimedRequest, MailToQueue, MessageState, StateDB
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


INTERRUPTED_REASON = (
    "the server stopped while the command was running; it may or may not have "
    "completed, and it will not be run again"
)


def _original_state(claim: ClaimedRequest) -> OriginalState:
    if claim.finished_at is None:
        return OriginalState.RUNNING
    status = claim.status or ""
    if status.startswith("outcome-unknown"):
        return OriginalState.OUTCOME_UNKNOWN
    if status.endswith("(unreported)"):
        return OriginalState.UNREPORTED
    return OriginalState.FINISHED


def _reply_id(request_id: str) -> str | None:
    """The id a reply may carry: a 32-hex request id (rejections of unreadable payloads
    are recorded under the payload hash, and their replies carry no id)."""
    return request_id if len(request_id) == 32 else None


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
        self._can_encrypt = EncryptionCheck(gpg)
        self.containment: Containment | None = None  # set by serve: cgroup or session kill

    # -- entry point ----------------------------------------------------------------

    def process(self, msg: SpooledMessage) -> MessageState:
        """Take one message to its final state. Never raises for bad input.

        The caller holds the message's spool lock, so no other worker or serve process
        is working on it: a message found ``executing`` was claimed by a process that
        died (or by an earlier failed pass of this one) and is settled, never re-run.
        """
        try:
            existing = self.state.message(msg.id)
            if existing is not None and existing.state.is_final:
                self.spool.finish(msg)  # crashed after recording, before moving
                return existing.state
            if existing is not None and existing.state is MessageState.EXECUTING:
                return self._settle_message(msg)
            attempts = self.state.begin_processing(msg.id, source=msg.source, size=msg.size)
            if attempts > MAX_ATTEMPTS:
                return self._quarantine(msg, f"processing failed {attempts - 1} times")
            final = self._process(msg)
            self.spool.finish(msg)
            return final
        except Exception as exc:  # containment: one message never stops the server
            log.exception("processing %s failed", msg.id)
            return self._contain(msg, exc)

    def _contain(self, msg: SpooledMessage, exc: Exception) -> MessageState:
        """After an unexpected failure: settle a claim the message holds, else quarantine."""
        try:
            record = self.state.message(msg.id)
            if record is not None and record.state is MessageState.EXECUTING:
                return self._settle_message(msg)
            return self._quarantine(msg, f"internal error: {type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the failure of %s; it stays pending", msg.id)
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
            request = seal.open_request(
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
        except seal.AuthenticatedRejectionError as exc:
            return self._reject(
                msg,
                trust,
                signer=exc.verified.signer,
                request_id=exc.request_id or exc.payload_sha256,
                request_sha256=exc.payload_sha256,
                issued_at=exc.verified.signed_at,
                in_reply_to=exc.mail.message_id,
                reason=exc.reason,
                detail=exc.message,
            )
        except ProtocolError as exc:
            return self._discard(msg, exc.reason, detail=exc.message)
        if not self._can_encrypt(request.signer):
            return self._reject(
                msg,
                trust,
                signer=request.signer,
                request_id=request.request_id,
                request_sha256=request.payload_sha256,
                issued_at=request.signed_at,
                in_reply_to=request.message_id,
                reason="no-encryption-key",
                detail="the signing key has no usable encryption subkey (expired or "
                "revoked since it was pinned), so no reply can be encrypted to it; "
                "nothing was run",
            )
        return self._run(msg, trust, request)

    def _reject(
        self,
        msg: SpooledMessage,
        trust: TrustStore,
        *,
        signer: str,
        request_id: str,
        request_sha256: str,
        issued_at: datetime,
        in_reply_to: str | None,
        reason: str,
        detail: str,
    ) -> MessageState:
        """An authenticated request's one outcome is "rejected" (unless it was taken before:
        then this is a copy). Reported when a reply can be encrypted to the signer."""
        if self.state.find_claim(signer, request_id) is not None:
            return self._duplicate(msg, trust, signer, request_id, request_sha256, in_reply_to)
        why = f"{reason}: {detail}"
        reply = Reply(
            request_id=_reply_id(request_id),
            request_sha256=request_sha256,
            server=self.identity.address,
            status=ReplyStatus.REJECTED,
            reason=why,
        )
        mail = self._seal(trust, signer, reply, in_reply_to)
        recorded = self.state.record_rejection(
            spool_id=msg.id,
            signer=signer,
            request_id=request_id,
            issued_at=issued_at,
            request_sha256=request_sha256,
            reason=why if mail is not None else f"{why} (unreported)",
            reply=mail,
        )
        if not recorded:  # another copy was taken in between
            return self._duplicate(msg, trust, signer, request_id, request_sha256, in_reply_to)
        self._queued(mail)
        decision(
            "rejected",
            message=msg.id,
            signer=signer,
            request=request_id,
            reason=reason,
            reported=mail is not None,
        )
        return MessageState.REJECTED if mail is not None else MessageState.UNREPORTED

    def _run(
        self, msg: SpooledMessage, trust: TrustStore, request: seal.VerifiedRequest
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
        if not claimed:
            return self._duplicate(
                msg,
                trust,
                request.signer,
                request.request_id,
                request.payload_sha256,
                request.message_id,
            )
        # From here on this message holds the claim: every path below ends it, once.
        timeout = min(request.timeout or s.command_timeout, s.max_command_timeout)
        cap = min(request.max_output_bytes or s.max_output_bytes, s.max_output_bytes)
        decision(
            "executing",
            message=msg.id,
            signer=request.signer,
            request=request.request_id,
            timeout=timeout,
        )
        answer: dict[str, Any] = {
            "request_id": request.request_id,
            "request_sha256": request.payload_sha256,
            "server": self.identity.address,
        }
        try:
            result = run_command(
                request.command,
                stdin=request.stdin,
                limits=ExecLimits(
                    timeout=timeout,
                    max_output_bytes=cap,
                    max_processes=s.command_max_processes,
                    kill_grace=s.kill_grace,
                ),
                cwd=self.workdir,
                run_as=s.run_as,
                containment=self.containment,
            )
        except MailshError as exc:  # refused before the command started (e.g. run-as user)
            decision("error", message=msg.id, request=request.request_id, reason=exc.message)
            return self._conclude(
                msg,
                trust,
                request,
                Reply(
                    **answer,
                    status=ReplyStatus.ERROR,
                    reason=f"the server could not start the command: {exc.message}",
                ),
            )
        except Exception as exc:
            log.exception("running request %s failed", request.request_id)
            return self._conclude(
                msg,
                trust,
                request,
                Reply(
                    **answer,
                    status=ReplyStatus.OUTCOME_UNKNOWN,
                    reason=f"the server failed while running the command "
                    f"({type(exc).__name__}); it may or may not have run, and it will "
                    "not be run again",
                ),
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
        reply = Reply(
            **answer,
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
            memory_peak_bytes=result.memory_peak_bytes,
            pids_peak=result.pids_peak,
        )
        status = "exit " + (
            str(result.exit_code) if result.signal is None else f"signal {result.signal}"
        )
        fallback = Reply(
            **answer,
            status=ReplyStatus.ERROR,
            reason=f"the command ran and ended with {status}, but its result could not be "
            "sealed for you; it will not be run again",
        )
        return self._conclude(msg, trust, request, reply, fallback=fallback)

    def _conclude(
        self,
        msg: SpooledMessage,
        trust: TrustStore,
        request: seal.VerifiedRequest,
        reply: Reply,
        *,
        fallback: Reply | None = None,
    ) -> MessageState:
        """End the claim this message holds with ``reply`` (or, if that cannot be sealed,
        ``fallback``; if neither can, with no report), in one transaction."""
        mail = self._seal(trust, request.signer, reply, request.message_id)
        if mail is None and fallback is not None:
            reply = fallback
            mail = self._seal(trust, request.signer, reply, request.message_id)
        final = {
            ReplyStatus.OUTCOME_UNKNOWN: MessageState.OUTCOME_UNKNOWN,
        }.get(reply.status, MessageState.REPLIED)
        status = reply.status.value
        if mail is None:
            final, status = MessageState.UNREPORTED, f"{status} (unreported)"
            decision("unreported", message=msg.id, request=request.request_id, status=status)
        settled = self.state.settle_claim(
            signer=request.signer,
            request_id=request.request_id,
            status=status,
            message_state=final,
            reason=reply.reason,
            reply=mail,
        )
        if not settled:  # given up on at shutdown and already reported outcome-unknown
            log.warning("request %s finished after it was reported", request.request_id)
            return self.state.message_state(msg.id) or MessageState.OUTCOME_UNKNOWN
        self._queued(mail)
        return final

    # -- copies and interrupted claims --------------------------------------------------

    def _duplicate(
        self,
        msg: SpooledMessage,
        trust: TrustStore,
        signer: str,
        request_id: str,
        request_sha256: str,
        in_reply_to: str | None,
    ) -> MessageState:
        """A copy of a request already taken: never run, never a second outcome.

        The first copy of a request gets one notice (docs/protocol.md section 9) naming
        what became of the original; later copies get nothing. A copy of a request
        whose claimant died settles that claim first (outcome unknown, reported once).
        """
        original = self.state.find_claim(signer, request_id)
        if original is None:  # only its signature was seen (a claim of an older version)
            self.state.set_message_state(
                msg.id,
                MessageState.DUPLICATE,
                reason="copy of an earlier request",
                signer=signer,
                request_id=request_id,
            )
            decision("duplicate", message=msg.id, signer=signer, request=request_id)
            return MessageState.DUPLICATE
        if original.finished_at is None and claimant.is_gone(original.claimed_by):
            self.settle_claim(original)
            original = self.state.find_claim(signer, request_id) or original
        was = _original_state(original)
        mail = None
        if original.notice_sent_at is None:
            notice = Notice(
                request_id=_reply_id(request_id),
                request_sha256=request_sha256,
                server=self.identity.address,
                original=was,
                reason=f"this server received another copy of request {request_id}; the "
                f"original is {was.value}; the copy was not run",
            )
            mail = self._seal(trust, signer, notice, in_reply_to)
        queued = self.state.finish_duplicate(
            spool_id=msg.id,
            signer=signer,
            request_id=request_id,
            reason=f"copy of request {request_id} (original {was.value})",
            notice=mail,
        )
        if queued:
            self._queued(mail)
        decision(
            "duplicate",
            message=msg.id,
            signer=signer,
            request=request_id,
            original=was.value,
            notice=queued,
        )
        return MessageState.DUPLICATE

    def _settle_message(self, msg: SpooledMessage) -> MessageState:
        """A message left ``executing``: settle the claim it holds, then file it."""
        record = self.state.message(msg.id)
        claim = None
        if record is not None and record.signer and record.request_id:
            claim = self.state.find_claim(record.signer, record.request_id)
        if claim is None or claim.spool_id != msg.id:
            return self._quarantine(msg, "executing without a claim of its own")
        if claim.finished_at is None and not (
            claimant.is_me(claim.claimed_by) or claimant.is_gone(claim.claimed_by)
        ):
            return MessageState.EXECUTING  # a live process holds it: never answer for it
        self.settle_claim(claim)
        self.spool.finish(msg)
        current = self.state.message_state(msg.id)
        return current if current is not None else MessageState.OUTCOME_UNKNOWN

    def settle_claim(self, claim: ClaimedRequest, reason: str = INTERRUPTED_REASON) -> bool:
        """Report an interrupted claim "outcome unknown", once; never re-run it.

        The caller has established that no process is running it any more (its process
        died, or it is this process's own after the shutdown grace). False if someone
        else settled it first.
        """
        if claim.finished_at is not None:
            return False
        reply = Reply(
            request_id=_reply_id(claim.request_id),
            request_sha256=claim.request_sha256,
            server=self.identity.address,
            status=ReplyStatus.OUTCOME_UNKNOWN,
            reason=reason,
        )
        mail = self._seal(load_trust(self.settings.trust_file), claim.signer, reply, None)
        settled = self.state.settle_claim(
            signer=claim.signer,
            request_id=claim.request_id,
            status="outcome-unknown" if mail is not None else "outcome-unknown (unreported)",
            message_state=MessageState.OUTCOME_UNKNOWN,
            reason="interrupted",
            reply=mail,
        )
        if settled:
            self._queued(mail)
            decision(
                "outcome-unknown",
                message=claim.spool_id,
                signer=claim.signer,
                request=claim.request_id,
                reported=mail is not None,
            )
        return settled

    def settle_abandoned(self, running: Collection[str] = (), *, mine_too: bool = False) -> int:
        """Settle every open claim whose process is gone; returns how many were settled.

        Claims of this process are settled only with ``mine_too`` (at shutdown, after the
        grace period) or when their message is not in ``running`` (a worker of this
        process failed without ending its claim). One claim's failure never stops the
        others (no message state can keep serve from starting).
        """
        settled = 0
        for claim in self.state.unfinished_requests():
            try:
                if claimant.is_me(claim.claimed_by):
                    if claim.spool_id in running and not mine_too:
                        continue
                elif not claimant.is_gone(claim.claimed_by):
                    continue
                settled += self.settle_claim(claim)
            except Exception:
                log.exception("could not settle request %s of %s", claim.request_id, claim.signer)
        return settled

    # -- the one place an answer is sealed --------------------------------------------

    def _seal(
        self, trust: TrustStore, signer: str, payload: Reply | Notice, in_reply_to: str | None
    ) -> MailToQueue | None:
        """The signed, encrypted mail carrying ``payload`` to ``signer``'s pinned address.

        None when it cannot be sent: the signer is no longer pinned (say nothing, P7), or
        sealing failed (no usable encryption subkey, a gpg failure); the caller records
        that the outcome went unreported.
        """
        entry = trust.get(signer)
        if entry is None:
            log.warning("not answering %s: the key is no longer pinned", signer)
            return None
        try:
            message = seal.seal_reply(
                self.gpg,
                payload,
                signer=self.identity.fingerprint,
                recipient=signer,
                to_addr=entry.reply_to,
                in_reply_to=in_reply_to,
                passphrase=self.settings.passphrase(),
                summary=self.settings.reply_summary,
            )
        except Exception as exc:
            log.error("could not seal the answer to %s for %s: %s", payload.request_id, signer, exc)
            return None
        return MailToQueue(to_addr=entry.reply_to, from_addr=self.identity.address, message=message)

    def _queued(self, mail: MailToQueue | None) -> None:
        if mail is not None and callable(self._notify):
            self._notify()
