"""Retention (docs/security.md P16): what a sweep deletes, and what it must never delete.

Real spool files and a real state database in tmp_path. The sweep is given a ``now``
in the future instead of waiting: file ages come from the spool ids (arrival time) and
row ages from the database's timestamps, both written at the real current time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailsh.protocol import MAX_REQUEST_LIFETIME, ReplyStatus
from mailsh.server.retention import Pruner, PruneResult, RetentionPolicy, prune
from mailsh.server.spool import Spool, SpooledMessage
from mailsh.server.state import MailToQueue, MessageState, QueuedReply, StateDB
from mailsh.settings import load_settings

SIGNER = "A" * 40
POLICY = RetentionPolicy(
    retention=timedelta(days=7),
    discard_retention=timedelta(hours=1),
    replay_window=MAX_REQUEST_LIFETIME + timedelta(days=1, minutes=5),
)


class World:
    """A spool and a state database holding one message of each kind."""

    def __init__(self, root: Path) -> None:
        self.spool = Spool(root / "spool")
        self.db = StateDB(root / "state.db")
        self.issued = datetime.now(UTC)
        self.sent = self._replied("a" * 32, send=True)
        self.unsent = self._replied("c" * 32, send=False)
        self.discarded = self._put()
        self.db.messages.set_state(self.discarded.id, MessageState.DISCARDED, reason="no-sig")
        self.spool.finish(self.discarded)
        self.running = self._put()  # claimed, never finished (serve crashed): stays in new/
        self._claim(self.running, "d" * 32)
        self.poison = self._put()
        self.db.messages.set_state(self.poison.id, MessageState.QUARANTINED, reason="crashed")
        self.spool.quarantine(self.poison, "crashed")

    def _put(self) -> SpooledMessage:
        msg = self.spool.put(b"x" * 1000, source="smtp")
        self.db.messages.record(msg.id, msg.source, msg.size, "0" * 64)
        return msg

    def _claim(self, msg: SpooledMessage, rid: str) -> None:
        assert self.db.requests.claim(
            signer=SIGNER,
            request_id=rid,
            signature_id=rid,
            issued_at=self.issued,
            request_sha256="1" * 64,
            spool_id=msg.id,
        )

    def _replied(self, rid: str, *, send: bool) -> SpooledMessage:
        msg = self._put()
        self._claim(msg, rid)
        assert self.db.requests.settle(
            signer=SIGNER,
            request_id=rid,
            status=ReplyStatus.OK,
            message_state=MessageState.REPLIED,
            reason=None,
            reply=MailToQueue(
                to_addr="alice@example.org", from_addr="root@server.test", message=b"reply"
            ),
        )
        if send:
            (outbound,) = self.queued()
            self.db.outbox.mark_sent(outbound.id)
        self.spool.finish(msg)
        return msg

    def queued(self) -> list[QueuedReply]:
        """The unsent replies (looked at, not taken: a lease of zero)."""
        return self.db.outbox.lease(datetime.now(UTC), lease=timedelta(0))

    def in_done(self, msg: SpooledMessage) -> bool:
        return (self.spool.done / msg.name).exists()

    def prune_after(self, delta: timedelta) -> PruneResult:
        return prune(self.spool, self.db, POLICY, datetime.now(UTC) + delta)

    def replay_refused(self, rid: str) -> bool:
        return not self.db.requests.claim(
            signer=SIGNER,
            request_id=rid,
            signature_id=None,
            issued_at=self.issued,
            request_sha256="1" * 64,
            spool_id="replay",
        )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.db.close()


def test_nothing_young_is_pruned(world: World) -> None:
    assert not world.prune_after(timedelta(minutes=30))
    assert world.in_done(world.sent) and world.in_done(world.discarded)


def test_discarded_bytes_go_after_discard_retention_but_metadata_stays(world: World) -> None:
    result = world.prune_after(timedelta(hours=2))
    assert (result.files, result.bytes) == (1, 1000)
    assert not world.in_done(world.discarded)
    record = world.db.messages.get(world.discarded.id)
    assert record is not None and record.state == MessageState.DISCARDED
    assert world.in_done(world.sent) and world.in_done(world.unsent)  # authenticated: kept


def test_after_retention_files_and_finished_rows_go_but_not_pending_work(world: World) -> None:
    result = world.prune_after(timedelta(days=7, hours=1))
    assert not world.in_done(world.sent) and not world.in_done(world.unsent)
    assert world.db.messages.get(world.sent.id) is None  # reply sent: row pruned
    assert world.db.messages.get(world.discarded.id) is None
    assert world.db.messages.get(world.unsent.id) is not None  # its reply is not sent yet
    assert world.db.messages.get(world.running.id) is not None  # unfinished claim
    assert world.db.messages.get(world.poison.id) is not None  # quarantined: kept for a human
    assert (world.spool.quarantine_dir / world.poison.name).exists()
    assert [m.id for m in world.spool.pending()] == [world.running.id]
    assert result.outbound == 1
    assert [o.spool_id for o in world.queued()] == [world.unsent.id]
    # Replay records outlive --retention while a request may still be valid.
    assert result.requests == 0
    assert world.replay_refused("a" * 32)


def test_replay_records_go_only_after_the_request_validity_window(world: World) -> None:
    assert world.prune_after(POLICY.replay_window - timedelta(minutes=1)).requests == 0
    assert world.replay_refused("a" * 32)
    result = world.prune_after(POLICY.replay_window + timedelta(minutes=1))
    assert result.requests == 2  # the two finished claims
    assert [c.request_id for c in world.db.requests.unfinished()] == ["d" * 32]
    assert world.replay_refused("d" * 32)  # an unfinished claim is never pruned


def test_unsent_replies_and_unfinished_claims_survive_any_age(world: World) -> None:
    world.prune_after(timedelta(days=3650))
    assert [o.spool_id for o in world.queued()] == [world.unsent.id]
    assert [c.request_id for c in world.db.requests.unfinished()] == ["d" * 32]


def test_files_with_foreign_names_in_done_are_left_alone(world: World) -> None:
    stray = world.spool.done / "notes.txt"
    stray.write_text("mine")
    world.prune_after(timedelta(days=3650))
    assert stray.read_text() == "mine"


def test_policy_keeps_replay_records_for_the_whole_validity_window(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path, retention="1d", discard_retention="30d", clock_skew=600, max_request_age=7200
    )
    policy = RetentionPolicy.from_settings(settings)
    assert policy.replay_window == MAX_REQUEST_LIFETIME + timedelta(seconds=600 + 7200)
    assert policy.discard_retention == timedelta(days=1)  # never longer than retention
    long = RetentionPolicy.from_settings(load_settings(home=tmp_path, retention="60d"))
    assert long.replay_window == timedelta(days=60)  # and never shorter than retention


def test_pruner_thread_sweeps_at_start(world: World, tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, retention="0", discard_retention="0")
    pruner = Pruner(settings, world.spool, world.db, interval=3600)
    pruner.start()
    pruner.stop()
    assert not world.in_done(world.sent)
    assert not world.in_done(world.discarded)


def test_small_batches_prune_the_same_rows(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deletes go in short transactions; a batch of 1 row must still reach every row."""
    monkeypatch.setattr(world.db.prune, "batch", 1)
    result = world.prune_after(timedelta(days=3650))
    assert (result.messages, result.requests, result.outbound) == (2, 2, 1)
    assert world.db.messages.get(world.unsent.id) is not None


def test_sweep_removes_stale_tmp_leftovers(world: World) -> None:
    stale = world.spool.tmp / "00000000000000000001.1.0000000000000000.smtp"
    fresh = world.spool.tmp / "00000000000000000002.1.0000000000000000.smtp"
    stale.write_bytes(b"half a message")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 2 * 86_400,) * 2)
    world.prune_after(timedelta(0))
    assert not stale.exists()
    assert fresh.exists()  # another process may be writing it right now
