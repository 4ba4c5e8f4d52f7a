"""State records, states and time helpers of the server database (no SQL here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from mailsh.errors import StateError
from mailsh.protocol import ReplyStatus

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Record = TypeVar("Record", bound=DataclassInstance)

#: Seconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT = 30.0
#: Retry delays for outbound mail: BACKOFF_BASE * 2**(attempts-1), at most BACKOFF_CAP.
BACKOFF_BASE = timedelta(minutes=1)
BACKOFF_CAP = timedelta(hours=1)
#: Characters of a failed send's error that are kept.
MAX_ERROR_CHARS = 2000
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class MessageState(StrEnum):
    """Where a spooled message is. Every state but the first two is final (P9).

    A state that is also a reply status or a notice's ``original`` is spelled as on the
    wire (``outcome-unknown``, docs/protocol.md): one name for one outcome.
    """

    RECEIVED = "received"
    EXECUTING = "executing"
    REPLIED = "replied"  # executed and reported
    REJECTED = "rejected"  # rejected and reported to the signer
    OUTCOME_UNKNOWN = "outcome-unknown"  # interrupted by a crash, reported, never re-run
    DUPLICATE = "duplicate"  # a copy of a request already taken: never run, at most a notice
    UNREPORTED = "unreported"  # taken, but no report could be sealed (e.g. no encryption key)
    DISCARDED = "discarded"  # unauthenticated: discarded and logged, no reply (P7)
    QUARANTINED = "quarantined"  # unparseable or crashed the processor repeatedly (P11)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        MessageState.REPLIED,
        MessageState.REJECTED,
        MessageState.OUTCOME_UNKNOWN,
        MessageState.DUPLICATE,
        MessageState.UNREPORTED,
        MessageState.DISCARDED,
        MessageState.QUARANTINED,
    }
)


def next_backoff(attempts: int) -> timedelta:
    """Delay before retrying a reply that failed ``attempts`` times: 1, 2, 4 ... 60 min."""
    exponent = min(max(attempts, 1) - 1, 16)  # 2**16 minutes is far past the cap
    delay: timedelta = BACKOFF_BASE * (1 << exponent)
    return min(delay, BACKOFF_CAP)


@dataclass(frozen=True)
class MessageRecord:
    spool_id: str
    source: str
    size: int
    sha256: str | None  # None until Messages.record (begin_processing may come first)
    state: MessageState
    reason: str | None
    signer: str | None
    request_id: str | None
    attempts: int
    received_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ClaimedRequest:
    """A replay-record row: a request this server has taken, run or not.

    ``claimed_by`` names the claiming process (:mod:`mailsh.server.claimant`);
    ``status`` is set when the request got its outcome (``finished_at``): the status of
    the reply sent for it, ``reported`` False when no reply could be sealed;
    ``notice_sent_at`` when a copy of it was answered with a notice (at most once).
    """

    signer: str
    request_id: str
    signature_id: str | None
    issued_at: datetime
    request_sha256: str
    spool_id: str
    claimed_at: datetime
    claimed_by: str
    finished_at: datetime | None = None
    status: ReplyStatus | None = None
    notice_sent_at: datetime | None = None
    reported: bool = True


@dataclass(frozen=True)
class MailToQueue:
    """A sealed mail to queue with a state change (see :meth:`Requests.settle`)."""

    to_addr: str
    from_addr: str
    message: bytes


@dataclass(frozen=True)
class QueuedReply:
    """A queued reply (``message`` is the complete, already signed and encrypted mail)."""

    id: int
    to_addr: str
    from_addr: str
    message: bytes
    spool_id: str
    request_id: str | None
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True)
class StatusError:
    """A recent problem for ``mailsh status``: ``kind`` is outbound/rejected/quarantined."""

    at: datetime
    kind: str
    ref: str
    error: str


@dataclass(frozen=True)
class ReasonCount:
    """How many messages ended in ``state`` for ``reason``, and the latest one's time."""

    state: MessageState
    reason: str
    count: int
    last_at: datetime


def timestamp(when: datetime) -> str:
    """``when`` as stored: fixed-width UTC text, so text order is time order."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: state timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime(_TS_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """A stored timestamp as an aware datetime."""
    return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=UTC)


def from_row(cls: type[Record], row: Sequence[Any]) -> Record:
    """A ``cls`` record from a row whose columns are its fields, in order: timestamps
    parsed, states made :class:`MessageState` (by the field types as written here:
    this module's annotations are strings)."""
    return cls(*(_column(spec.type, value) for spec, value in zip(fields(cls), row, strict=True)))


def _column(kind: object, value: Any) -> Any:
    if value is not None and kind in ("datetime", "datetime | None"):
        return parse_timestamp(value)
    return MessageState(value) if kind == "MessageState" else value


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_transition(spool_id: str, current: MessageState, new: MessageState) -> None:
    """received -> executing -> final, or received -> final; nothing leaves a final state."""
    if current in FINAL_STATES:
        raise StateError(f"message {spool_id} is already {current}; it cannot become {new}")
    if new == MessageState.RECEIVED and current != MessageState.RECEIVED:
        raise StateError(f"message {spool_id} is {current}; it cannot go back to received")
