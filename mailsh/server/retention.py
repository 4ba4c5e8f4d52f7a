"""Retention: what ``mailsh serve`` deletes, and when, so the disk stays bounded.

docs/server.md "Disk" and docs/security.md P16. A sweep runs at start and then every
:data:`PRUNE_INTERVAL` seconds in a background thread (never in the intake path), and
early when free space falls below the floor (:mod:`mailsh.server.diskspace`):

- ``spool/done/`` files older than ``--retention`` (default 7d) are deleted; those of
  *discarded* (unauthenticated) messages already after ``--discard-retention``
  (default 1h). Age counts from arrival, which the spool file name records.
- Rows of messages final for longer than ``--retention`` are deleted, except
  quarantined ones, and those with an unsent reply or an unfinished claim. A discarded
  message's row (its metadata) stays the full ``--retention``.
- Sent replies older than ``--retention`` are deleted; unsent and abandoned ones stay.
- Replay records (the ``requests`` table) stay at least as long as a request could
  still be accepted: ``MAX_REQUEST_LIFETIME + --clock-skew + --max-request-age``
  after both its issue and claim time (and never less than ``--retention``), so pruning
  can never let a replay run. Unfinished claims are never deleted.

Leftovers of crashed writes in ``spool/tmp/`` go after a day and a half
(:data:`mailsh.server.spool.TMP_MAX_AGE`). ``spool/quarantine/`` is kept for a human
and never pruned; the audit log is append-only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mailsh.protocol import MAX_REQUEST_LIFETIME
from mailsh.server.spool import Spool, SpooledMessage
from mailsh.server.state import MessageState, StateDB
from mailsh.settings import Settings
from mailsh.units import format_size

log = logging.getLogger("mailsh.server")

#: Seconds between two sweeps of a running ``mailsh serve``. Internal, not a setting:
#: ``--retention`` and ``--discard-retention`` say how long things stay, and falling
#: below ``--min-free-space`` sweeps at once.
PRUNE_INTERVAL = 3600.0
#: Seconds :meth:`Pruner.stop` waits for a sweep under way to end (internal).
PRUNER_STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of record is kept (see the module docstring)."""

    retention: timedelta
    discard_retention: timedelta
    replay_window: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        retention = timedelta(seconds=settings.retention)
        valid_for = (
            MAX_REQUEST_LIFETIME
            + timedelta(seconds=settings.clock_skew)
            + timedelta(seconds=settings.max_request_age)
        )
        return cls(
            retention=retention,
            discard_retention=min(timedelta(seconds=settings.discard_retention), retention),
            replay_window=max(valid_for, retention),
        )


@dataclass(frozen=True)
class PruneResult:
    files: int = 0
    bytes: int = 0
    messages: int = 0
    requests: int = 0
    outbound: int = 0

    def __bool__(self) -> bool:
        return any((self.files, self.messages, self.requests, self.outbound))


def arrived_at(msg: SpooledMessage) -> datetime:
    """When the message was spooled: the nanosecond time that starts its id."""
    return datetime.fromtimestamp(int(msg.id[:20]) / 1e9, UTC)


def prune(spool: Spool, state: StateDB, policy: RetentionPolicy, now: datetime) -> PruneResult:
    """One sweep at time ``now``; returns what was deleted."""
    files, freed = 0, 0
    keep_until = now - policy.retention
    discard_until = now - policy.discard_retention
    maybe_discarded: list[SpooledMessage] = []
    for msg in spool.done_messages():
        arrived = arrived_at(msg)
        if arrived < keep_until:
            if spool.remove_done(msg):
                files, freed = files + 1, freed + msg.size
        elif arrived < discard_until:
            maybe_discarded.append(msg)
    if maybe_discarded:
        states = state.messages.states([m.id for m in maybe_discarded])
        for msg in maybe_discarded:
            if states.get(msg.id) == MessageState.DISCARDED and spool.remove_done(msg):
                files, freed = files + 1, freed + msg.size
    pending = {m.id for m in spool.pending()}
    files += spool.clean_tmp()  # leftovers of crashed writes, also in a long-running serve
    return PruneResult(
        files=files,
        bytes=freed,
        messages=state.prune.messages(keep_until, keep=pending),
        requests=state.prune.requests(now - policy.replay_window),
        outbound=state.prune.outbox(keep_until),
    )


class Pruner:
    """Runs :func:`prune` at start, every ``interval`` seconds, and when kicked."""

    def __init__(
        self, settings: Settings, spool: Spool, state: StateDB, *, interval: float = PRUNE_INTERVAL
    ) -> None:
        self.policy = RetentionPolicy.from_settings(settings)
        self.spool = spool
        self.state = state
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mailsh-prune", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Sweep now (e.g. free space fell below the floor)."""
        self._wake.set()

    def stop(self, timeout: float = PRUNER_STOP_TIMEOUT) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sweep(self) -> PruneResult:
        """One sweep now, contained: an error is logged and the next sweep tries again."""
        try:
            result = prune(self.spool, self.state, self.policy, datetime.now(UTC))
        except Exception:
            log.exception("pruning failed; retrying at the next sweep")
            return PruneResult()
        if result:
            log.info(
                "pruned %d spool file(s) (%s), %d message, %d replay and %d sent-reply row(s)",
                result.files,
                format_size(result.bytes),
                result.messages,
                result.requests,
                result.outbound,
            )
        return result

    def _run(self) -> None:
        while True:  # the first sweep runs even when stop() came at once (serve --once)
            self._wake.clear()
            self.sweep()
            self._wake.wait(self.interval)
            if self._stop.is_set():
                return
