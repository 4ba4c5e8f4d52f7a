"""The one place the server builds and seals an answer: a reply (the outcome) or a notice.

The processor decides what became of a message; this module says it to the signer. It
builds the :class:`~mailsh.protocol.Reply` or :class:`~mailsh.protocol.Notice` with its
reason text, and seals it (signed by the server, encrypted to the signer, P8) into a
mail for the address pinned with the signer's key only (P7); nothing of a request
that failed leaves with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailsh import seal
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import TrustStore
from mailsh.protocol import Notice, OriginalState, Reply, ReplyStatus
from mailsh.server.execute import ExecResult
from mailsh.server.state import MailToQueue
from mailsh.settings import Settings

log = logging.getLogger("mailsh.server")

#: Said of every claim settled without its result: the serve process died or stopped,
#: or this one failed to record the result (e.g. the state database stayed locked).
INTERRUPTED_REASON = (
    "the server stopped, or failed, before the outcome of this request was recorded; the "
    "command may or may not have completed, and it will not be run again"
)


@dataclass(frozen=True)
class Addressee:
    """Who an answer goes to, and what it answers: an authenticated signer's request."""

    signer: str
    request_id: str
    request_sha256: str
    in_reply_to: str | None = None  # the request mail's Message-ID, when it had a valid one

    @property
    def reply_id(self) -> str | None:
        """The id a reply may carry: a 32-hex request id (rejections of unreadable
        payloads are recorded under the payload hash, and their replies carry no id)."""
        return self.request_id if len(self.request_id) == 32 else None


class Replies:
    """Builds this server's answers and seals them. Thread-safe (holds no state)."""

    def __init__(self, settings: Settings, gpg: Gpg, *, address: str, fingerprint: str) -> None:
        self.settings = settings
        self.gpg = gpg
        self.address = address
        self.fingerprint = fingerprint

    # -- what is said ---------------------------------------------------------------

    def _reply(self, to: Addressee, status: ReplyStatus, reason: str) -> Reply:
        return Reply(
            request_id=to.reply_id,
            request_sha256=to.request_sha256,
            server=self.address,
            status=status,
            reason=reason,
        )

    def rejected(self, to: Addressee, why: str) -> Reply:
        return self._reply(to, ReplyStatus.REJECTED, why)

    def not_started(self, to: Addressee, why: str) -> Reply:
        """The command was refused before it started (e.g. the run-as user)."""
        return self._reply(to, ReplyStatus.ERROR, f"the server could not start the command: {why}")

    def failed_running(self, to: Addressee, exc: Exception) -> Reply:
        return self._reply(
            to,
            ReplyStatus.OUTCOME_UNKNOWN,
            f"the server failed while running the command ({type(exc).__name__}); it may "
            "or may not have run, and it will not be run again",
        )

    def interrupted(self, to: Addressee) -> Reply:
        return self._reply(to, ReplyStatus.OUTCOME_UNKNOWN, INTERRUPTED_REASON)

    def result(self, to: Addressee, result: ExecResult) -> tuple[Reply, Reply]:
        """The reply carrying ``result``, and the one to send when that cannot be sealed."""
        reply = Reply(
            request_id=to.reply_id,
            request_sha256=to.request_sha256,
            server=self.address,
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
        ended = "exit " + (
            str(result.exit_code) if result.signal is None else f"signal {result.signal}"
        )
        fallback = self._reply(
            to,
            ReplyStatus.ERROR,
            f"the command ran and ended with {ended}, but its result could not be sealed "
            "for you; it will not be run again",
        )
        return reply, fallback

    def notice(self, to: Addressee, original: OriginalState) -> Notice:
        """What a copy of a request taken before gets (once): what became of the original."""
        return Notice(
            request_id=to.reply_id,
            request_sha256=to.request_sha256,
            server=self.address,
            original=original,
            reason=f"this server received another copy of request {to.request_id}; the "
            f"original is {original.value}; the copy was not run",
        )

    # -- sealing ----------------------------------------------------------------------

    def seal(self, trust: TrustStore, to: Addressee, payload: Reply | Notice) -> MailToQueue | None:
        """The signed, encrypted mail carrying ``payload`` to the signer's pinned address.

        None when it cannot be sent: the signer is no longer pinned (say nothing, P7), or
        sealing failed (no usable encryption subkey, a gpg failure); the caller records
        that the outcome went unreported.
        """
        entry = trust.get(to.signer)
        if entry is None:
            log.warning("not answering %s: the key is no longer pinned", to.signer)
            return None
        try:
            message = seal.seal_reply(
                self.gpg,
                payload,
                signer=self.fingerprint,
                recipient=to.signer,
                to_addr=entry.reply_to,
                in_reply_to=to.in_reply_to,
                passphrase=self.settings.passphrase(),
                summary=self.settings.reply_summary,
            )
        except Exception as exc:
            log.error(
                "could not seal the answer to %s for %s: %s", payload.request_id, to.signer, exc
            )
            return None
        return MailToQueue(to_addr=entry.reply_to, from_addr=self.address, message=message)
