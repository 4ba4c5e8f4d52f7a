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
- a claim whose process died (crash, SIGKILL) is settled ``outcome-unknown`` and
  reported once, by whichever serve process notices first; a live process's claim is
  never answered by another;
- anything that crashes the pipeline twice before a claim: ``quarantined`` (P11).

What is said to the signer, and how it is sealed, is :mod:`mailsh.server.replies`.

This module is over the ~400-line guide on purpose: every path that takes or ends a
claim (run, reject, copy, settle) is here, so the exactly-once rules read in one place.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailsh import seal
from mailsh.errors import MailshError, ProtocolError
from mailsh.keys.capability import EncryptionCheck
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import TrustStore, load_trust
from mailsh.mail.message import read_mail
from mailsh.protocol import OriginalState, Reply, ReplyStatus
from mailsh.server import claimant
from mailsh.server.cgroup import Containment
from mailsh.server.execute import ExecLimits, run_command
from mailsh.server.replies import Addressee, Replies
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


def _original_state(claim: ClaimedRequest) -> OriginalState:
    if claim.finished_at is None:
        return OriginalState.RUNNING
    if claim.status is ReplyStatus.OUTCOME_UNKNOWN:
        return OriginalState.OUTCOME_UNKNOWN
    if not claim.reported:
        return OriginalState.UNREPORTED
    return OriginalState.FINISHED


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
        self.policy = seal.OpenPolicy.from_settings(
            settings, addresses=identity.addresses, fingerprint=identity.fingerprint
        )
        self.replies = Replies(
            settings, gpg, address=identity.address, fingerprint=identity.fingerprint
        )
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
            existing = self.state.messages.get(msg.id)
            if existing is not None and existing.state.is_final:
                self.spool.finish(msg)  # crashed after recording, before moving
                return existing.state
            if existing is not None and existing.state is MessageState.EXECUTING:
                return self._settle_message(msg)
            attempts = self.state.messages.begin_processing(
                msg.id, source=msg.source, size=msg.size
            )
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
            record = self.state.messages.get(msg.id)
            if record is not None and record.state is MessageState.EXECUTING:
                return self._settle_message(msg)
            return self._quarantine(msg, f"internal error: {type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the failure of %s; it stays pending", msg.id)
            return MessageState.RECEIVED

    def _quarantine(self, msg: SpooledMessage, reason: str) -> MessageState:
        self.state.messages.set_state(msg.id, MessageState.QUARANTINED, reason=reason)
        self.spool.quarantine(msg, reason)
        decision("quarantined", message=msg.id, reason=reason)
        return MessageState.QUARANTINED

    def _discard(self, msg: SpooledMessage, reason: str, **fields: object) -> MessageState:
        self.state.messages.set_state(msg.id, MessageState.DISCARDED, reason=reason)
        decision("discarded", message=msg.id, reason=reason, **fields)
        return MessageState.DISCARDED

    # -- the pipeline ---------------------------------------------------------------

    def _process(self, msg: SpooledMessage) -> MessageState:  # noqa: PLR0911 - one exit per verdict
        try:  # the one size check on this path (P10): the spool reads no more than this
            raw = self.spool.read(msg, self.policy.max_bytes)
        except MessageTooLarge:
            return self._discard(msg, "too-large", size=msg.size)
        self.state.messages.record(
            msg.id, source=msg.source, size=len(raw), sha256=hashlib.sha256(raw).hexdigest()
        )
        try:
            mail = read_mail(raw, max_bytes=None)
        except ProtocolError as exc:
            return self._discard(msg, exc.reason)
        if mail.auto_submitted not in (None, "no"):
            return self._discard(msg, "auto-submitted")
        if mail.is_bounce:
            return self._discard(msg, "bounce")
        trust = load_trust(self.settings.trust_file)
        try:
            request = seal.open_request(
                self.gpg,
                mail,
                self.policy,
                trust=trust,
                now=datetime.now(UTC),
                passphrase=self.settings.passphrase(),
            )
        except seal.AuthenticatedRejectionError as exc:
            sha256 = exc.payload_sha256
            to = Addressee(exc.verified.signer, exc.request_id or sha256, sha256, mail.message_id)
            return self._reject(msg, trust, to, exc.verified.signed_at, exc.reason, exc.message)
        except ProtocolError as exc:
            return self._discard(msg, exc.reason, detail=exc.message)
        to = _addressee(request)
        if not self._can_encrypt(request.signer):
            return self._reject(
                msg,
                trust,
                to,
                request.signed_at,
                "no-encryption-key",
                "the signing key has no usable encryption subkey (expired or "
                "revoked since it was pinned), so no reply can be encrypted to it; "
                "nothing was run",
                sealable=False,
            )
        return self._run(msg, trust, request, to)

    def _reject(
        self,
        msg: SpooledMessage,
        trust: TrustStore,
        to: Addressee,
        issued_at: datetime,
        reason: str,
        detail: str,
        *,
        sealable: bool = True,
    ) -> MessageState:
        """An authenticated request's one outcome is "rejected" (unless it was taken before:
        then this is a copy). Reported when a reply can be encrypted to the signer
        (``sealable=False``: known not to be, so gpg is not asked to try)."""
        if self.state.requests.find(to.signer, to.request_id) is not None:
            return self._duplicate(msg, trust, to)
        why = f"{reason}: {detail}"
        rejected = self.replies.rejected(to, why)
        mail = self.replies.seal(trust, to, rejected) if sealable else None
        recorded = self.state.requests.record_rejection(
            spool_id=msg.id,
            signer=to.signer,
            request_id=to.request_id,
            issued_at=issued_at,
            request_sha256=to.request_sha256,
            reason=why if mail is not None else f"{why} (unreported)",
            reply=mail,
        )
        if not recorded:  # another copy was taken in between
            return self._duplicate(msg, trust, to)
        self._reported("rejected", msg.id, to, mail, reason=reason)
        return MessageState.REJECTED if mail is not None else MessageState.UNREPORTED

    def _run(
        self, msg: SpooledMessage, trust: TrustStore, request: seal.VerifiedRequest, to: Addressee
    ) -> MessageState:
        s = self.settings
        claimed = self.state.requests.claim(
            signer=request.signer,
            request_id=request.request_id,
            signature_id=request.signature_id,
            issued_at=request.signed_at,
            request_sha256=request.payload_sha256,
            spool_id=msg.id,
        )
        if not claimed:
            return self._duplicate(msg, trust, to)
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
            return self._conclude(msg, trust, to, self.replies.not_started(to, exc.message))
        except Exception as exc:
            log.exception("running request %s failed", request.request_id)
            return self._conclude(msg, trust, to, self.replies.failed_running(to, exc))
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
        return self._conclude(msg, trust, to, *self.replies.result(to, result))

    def _conclude(
        self,
        msg: SpooledMessage,
        trust: TrustStore,
        to: Addressee,
        reply: Reply,
        fallback: Reply | None = None,
    ) -> MessageState:
        """End the claim this message holds with ``reply`` (or, if that cannot be sealed,
        ``fallback``; if neither can, with no report), in one transaction."""
        mail = self.replies.seal(trust, to, reply)
        if mail is None and fallback is not None:
            reply = fallback
            mail = self.replies.seal(trust, to, reply)
        final = {
            ReplyStatus.OUTCOME_UNKNOWN: MessageState.OUTCOME_UNKNOWN,
        }.get(reply.status, MessageState.REPLIED)
        status = reply.status.value
        if mail is None:
            final, status = MessageState.UNREPORTED, f"{status} (unreported)"
            decision("unreported", message=msg.id, request=to.request_id, status=status)
        settled = self.state.requests.settle(
            signer=to.signer,
            request_id=to.request_id,
            status=reply.status,
            message_state=final,
            reason=reply.reason,
            reply=mail,
        )
        if not settled:  # given up on at shutdown and already reported outcome-unknown
            log.warning("request %s finished after it was reported", to.request_id)
            return self.state.messages.state(msg.id) or MessageState.OUTCOME_UNKNOWN
        self._queued(mail)
        return final

    # -- copies and interrupted claims --------------------------------------------------

    def _duplicate(self, msg: SpooledMessage, trust: TrustStore, to: Addressee) -> MessageState:
        """A copy of a request already taken: never run, never a second outcome.

        The first copy of a request gets one notice (docs/protocol.md section 9) naming
        what became of the original; later copies get nothing. A copy of a request
        whose claimant died settles that claim first (outcome unknown, reported once).
        """
        signer, request_id = to.signer, to.request_id
        original = self.state.requests.find(signer, request_id)
        if original is None:  # only its signature was seen (a claim of an older version)
            self.state.messages.set_state(
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
            original = self.state.requests.find(signer, request_id) or original
        was = _original_state(original)
        mail = None
        if original.notice_sent_at is None:
            mail = self.replies.seal(trust, to, self.replies.notice(to, was))
        queued = self.state.requests.finish_duplicate(
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
        record = self.state.messages.get(msg.id)
        claim = None
        if record is not None and record.signer and record.request_id:
            claim = self.state.requests.find(record.signer, record.request_id)
        if claim is None or claim.spool_id != msg.id:
            return self._quarantine(msg, "executing without a claim of its own")
        if claim.finished_at is None and not (
            claimant.is_me(claim.claimed_by) or claimant.is_gone(claim.claimed_by)
        ):
            return MessageState.EXECUTING  # a live process holds it: never answer for it
        self.settle_claim(claim)
        self.spool.finish(msg)
        current = self.state.messages.state(msg.id)
        return current if current is not None else MessageState.OUTCOME_UNKNOWN

    def settle_claim(self, claim: ClaimedRequest) -> bool:
        """Report an interrupted claim "outcome unknown", once; never re-run it.

        The caller has established that no process is running it any more (its process
        died, or it is this process's own after the shutdown grace). False if someone
        else settled it first.
        """
        if claim.finished_at is not None:
            return False
        to = Addressee(claim.signer, claim.request_id, claim.request_sha256)
        trust = load_trust(self.settings.trust_file)
        mail = self.replies.seal(trust, to, self.replies.interrupted(to))
        settled = self.state.requests.settle(
            signer=claim.signer,
            request_id=claim.request_id,
            status=ReplyStatus.OUTCOME_UNKNOWN,
            message_state=MessageState.OUTCOME_UNKNOWN,
            reason="interrupted",
            reply=mail,
        )
        if settled:
            self._reported("outcome-unknown", claim.spool_id, to, mail)
        return settled

    def settle_abandoned(self, running: Collection[str] = (), *, mine_too: bool = False) -> int:
        """Settle every open claim whose process is gone; returns how many were settled.

        Claims of this process are settled only with ``mine_too`` (at shutdown, after the
        grace period) or when their message is not in ``running`` (a worker of this
        process failed without ending its claim). One claim's failure never stops the
        others (no message state can keep serve from starting).
        """
        settled = 0
        for claim in self.state.requests.unfinished():
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

    def _queued(self, mail: MailToQueue | None) -> None:
        if mail is not None and callable(self._notify):
            self._notify()

    def _reported(
        self, event: str, spool_id: str, to: Addressee, mail: MailToQueue | None, **fields: object
    ) -> None:
        """An outcome was recorded: wake the sender if it was sealed, and log it."""
        self._queued(mail)
        decision(
            event,
            message=spool_id,
            signer=to.signer,
            request=to.request_id,
            **fields,
            reported=mail is not None,
        )


def _addressee(request: seal.VerifiedRequest) -> Addressee:
    return Addressee(request.signer, request.request_id, request.payload_sha256, request.message_id)
