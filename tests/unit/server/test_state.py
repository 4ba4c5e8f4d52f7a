"""Tests for mailsh.server.state: replay record (P5), final states (P9), poison counter (P11)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailsh.errors import StateError
from mailsh.protocol import ReplyStatus
from mailsh.server.state import (
    MIGRATIONS,
    SCHEMA_VERSION,
    MailToQueue,
    MessageState,
    QueuedReply,
    StateDB,
    next_backoff,
)

STATE_FILE = "state.db"
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path, clock: Clock) -> Iterator[StateDB]:
    state = StateDB(tmp_path / STATE_FILE, clock=clock)
    yield state
    state.close()


def claim(
    db: StateDB,
    request_id: str,
    *,
    signer: str = "FPR1",
    sig: str | None = None,
    spool_id: str = "m1",
) -> bool:
    return db.requests.claim(
        signer=signer,
        request_id=request_id,
        signature_id=sig,
        issued_at=T0,
        request_sha256="ab" * 32,
        spool_id=spool_id,
    )


def mail(body: bytes = b"reply", to_addr: str = "a@x") -> MailToQueue:
    return MailToQueue(to_addr=to_addr, from_addr="s@x", message=body)


def settle(
    db: StateDB, request_id: str, state: MessageState, *, signer: str = "FPR1", reply: bool = True
) -> bool:
    """End a claim the way the processor does: its outcome, its reply queued."""
    return db.requests.settle(
        signer=signer,
        request_id=request_id,
        status=ReplyStatus.OK,
        message_state=state,
        reason=None,
        reply=mail() if reply else None,
    )


def reject(db: StateDB, spool_id: str, request_id: str, body: bytes = b"rejected") -> bool:
    """Queue a reply the way the processor does for a refused request."""
    db.messages.record(spool_id, "mbox", 1, "h")
    return db.requests.record_rejection(
        spool_id=spool_id,
        signer="FPR1",
        request_id=request_id,
        issued_at=T0,
        request_sha256="ab" * 32,
        reason="audience",
        reply=mail(body, to_addr=f"{spool_id}@x"),
    )


def look(db: StateDB, now: datetime) -> list[QueuedReply]:
    """The replies due at ``now``, without taking them (a lease of zero)."""
    return db.outbox.lease(now, lease=timedelta(0))


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# -- schema ---------------------------------------------------------------------------


def test_schema_version_is_stamped_and_file_is_private(db: StateDB, tmp_path: Path) -> None:
    raw = sqlite3.connect(tmp_path / STATE_FILE)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    assert (tmp_path / STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def test_a_version_2_file_is_migrated_to_one_spelling_of_outcome_unknown(
    tmp_path: Path,
) -> None:
    """v3 spells the state of an interrupted message as the wire does; request statuses
    written by v2 read as reply statuses, "(unreported)" as not reported."""
    path = tmp_path / STATE_FILE
    raw = sqlite3.connect(path, isolation_level=None)
    for version in (1, 2):
        for statement in MIGRATIONS[version]:
            raw.execute(statement)
    raw.execute("PRAGMA user_version = 2")
    at = "2030-01-02T03:04:05.000000Z"
    for spool_id, old in (("m1", "outcome_unknown"), ("m2", "replied"), ("m3", "received")):
        raw.execute(
            "INSERT INTO messages (spool_id, source, size, state, received_at, updated_at)"
            " VALUES (?, 'mbox', 1, ?, ?, ?)",
            (spool_id, old, at, at),
        )
    for request_id, status in (("r1", "outcome-unknown (unreported)"), ("r2", "ok")):
        raw.execute(
            "INSERT INTO requests (signer, request_id, issued_at, request_sha256, spool_id,"
            " claimed_at, claimed_by, finished_at, status)"
            " VALUES ('FPR', ?, ?, 'h', 'm', ?, 'host:1', ?, ?)",
            (request_id, at, at, at, status),
        )
    raw.close()

    with StateDB(path) as state:
        assert state.messages.state("m1") is MessageState.OUTCOME_UNKNOWN
        assert state.messages.state("m2") is MessageState.REPLIED
        counts = state.report.counts()
        assert (counts["outcome-unknown"], counts["replied"], counts["received"]) == (1, 1, 1)
        interrupted = state.requests.find("FPR", "r1")
        assert interrupted is not None
        assert (interrupted.status, interrupted.reported) == (ReplyStatus.OUTCOME_UNKNOWN, False)
        answered = state.requests.find("FPR", "r2")
        assert answered is not None and (answered.status, answered.reported) == (
            ReplyStatus.OK,
            True,
        )
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert raw.execute(
            "SELECT count(*) FROM messages WHERE state = 'outcome_unknown'"
        ).fetchone() == (0,)
    finally:
        raw.close()


def test_an_unreported_outcome_is_recorded_as_such(db: StateDB) -> None:
    assert claim(db, "r1") and claim(db, "r2")
    assert settle(db, "r1", MessageState.UNREPORTED, reply=False)
    assert settle(db, "r2", MessageState.REPLIED)
    r1, r2 = db.requests.find("FPR1", "r1"), db.requests.find("FPR1", "r2")
    assert r1 is not None and (r1.status, r1.reported) == (ReplyStatus.OK, False)
    assert r2 is not None and (r2.status, r2.reported) == (ReplyStatus.OK, True)
    with db.store.read() as conn:  # stored as v2 wrote it: no migration of requests
        rows = conn.execute("SELECT request_id, status FROM requests ORDER BY 1").fetchall()
    assert rows == [("r1", "ok (unreported)"), ("r2", "ok")]


def test_commits_are_fsynced(db: StateDB) -> None:
    with db.store.read() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopening_keeps_data_and_version(tmp_path: Path) -> None:
    with StateDB(tmp_path / STATE_FILE) as first:
        first.messages.record("m1", "mbox", 10, "h")
    with StateDB(tmp_path / STATE_FILE) as second:
        assert second.messages.state("m1") == MessageState.RECEIVED


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    StateDB(tmp_path / STATE_FILE).close()
    raw = sqlite3.connect(tmp_path / STATE_FILE)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StateError, match="newer") as info:
        StateDB(tmp_path / STATE_FILE)
    assert info.value.hint and "upgrade" in info.value.hint


def test_closed_database_raises_state_error(tmp_path: Path) -> None:
    state = StateDB(tmp_path / STATE_FILE)
    state.close()
    with pytest.raises(StateError, match="closed"):
        state.messages.state("m1")


def test_the_audit_table_is_append_only(db: StateDB) -> None:
    with db.store.write() as conn:
        conn.execute("INSERT INTO audit (at, event, fields) VALUES ('t', 'started', '{}')")
    with db.store.read() as conn:
        for forgery in ("UPDATE audit SET event = 'forged'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(forgery)
        assert conn.execute("SELECT event FROM audit").fetchall() == [("started",)]


# -- replay record (P5) -----------------------------------------------------------------


def test_second_claim_of_a_request_is_a_replay(db: StateDB) -> None:
    assert claim(db, "r1", sig="s1")
    assert not claim(db, "r1", sig="s2")  # same signer and request id, re-signed
    assert not claim(db, "r2", sig="s1")  # same signature, different request id
    assert claim(db, "r1", signer="FPR2", sig="s3")  # request ids are per signer
    assert claim(db, "r3") and claim(db, "r4")  # no signature id: only the pair counts
    assert not claim(db, "r3")


def test_claim_marks_the_message_executing(db: StateDB) -> None:
    db.messages.record("m1", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    record = db.messages.get("m1")
    assert record is not None
    assert (record.state, record.signer, record.request_id) == (
        MessageState.EXECUTING,
        "FPR1",
        "r1",
    )


def test_claim_requires_an_aware_issue_time(db: StateDB) -> None:
    with pytest.raises(ValueError, match="naive"):
        db.requests.claim(
            signer="F",
            request_id="r",
            signature_id=None,
            issued_at=datetime(2030, 1, 1),  # naive: the point of the test
            request_sha256="h",
            spool_id="m",
        )


RACE_CHILD = """
import random, sys
from datetime import UTC, datetime
from pathlib import Path
from mailsh.server.state import StateDB
db = StateDB(Path(sys.argv[1]))
k = int(sys.argv[2])
ids = list(range(50))
random.shuffle(ids)
sys.stdin.readline()  # start together
won = []
for i in ids:
    # Even children race on (signer, request id), odd ones on the signature id alone.
    rid = f"r{i}" if k % 2 == 0 else f"r{i}-alt{k}"
    if db.requests.claim(signer="FPR", request_id=rid, signature_id=f"sig{i}",
                        issued_at=datetime.now(UTC), request_sha256="h", spool_id=f"m{i}-{k}"):
        won.append(i)
print(" ".join(map(str, won)))
"""


def test_concurrent_processes_claim_each_request_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    StateDB(path).close()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_CHILD, str(path), str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(8)
    ]
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    wins: Counter[int] = Counter()
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        wins.update(int(i) for i in out.split())
    assert wins == Counter(range(50))  # every id once, none twice
    with StateDB(path) as state:
        assert state.report.counts()["requests_unfinished"] == 50


def test_concurrent_threads_claim_each_request_exactly_once(db: StateDB) -> None:
    wins: Counter[int] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for i in range(40):
            if claim(db, f"r{i}", sig=f"s{i}"):
                with lock:
                    wins[i] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == Counter(range(40))


CRASH_CHILD = """
import os, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from mailsh.protocol import ReplyStatus
from mailsh.server.state import MailToQueue, MessageState, StateDB
db = StateDB(Path(sys.argv[1]))
def claim(rid, spool):
    db.messages.record(spool, "mbox", 10, "h")
    assert db.requests.claim(signer="FPR", request_id=rid, signature_id="sig-" + rid,
                             issued_at=datetime.now(UTC), request_sha256="h", spool_id=spool)
if sys.argv[2] == "finish-one":
    claim("r0", "m0")
    assert db.requests.settle(signer="FPR", request_id="r0", status=ReplyStatus.OK, reason=None,
                              message_state=MessageState.REPLIED,
                              reply=MailToQueue(to_addr="a@x", from_addr="s@x", message=b"r"))
claim("r1", "m1")
os.kill(os.getpid(), signal.SIGKILL)  # right after claim returned: nothing else ran
"""


def test_claim_is_durable_when_the_process_dies_right_after(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    child = run_child(CRASH_CHILD, str(path), "claim-only")
    assert child.returncode == -signal.SIGKILL, child.stderr
    with StateDB(path) as state:
        assert not claim(state, "r1", signer="FPR")  # still a replay after the crash
        assert not claim(state, "other", signer="FPR", sig="sig-r1")
        assert state.messages.state("m1") == MessageState.EXECUTING


def test_unfinished_requests_after_a_crash(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / STATE_FILE
    child = run_child(CRASH_CHILD, str(path), "finish-one")
    assert child.returncode == -signal.SIGKILL, child.stderr
    with StateDB(path, clock=clock) as state:
        (unfinished,) = state.requests.unfinished()
        assert (unfinished.signer, unfinished.request_id, unfinished.spool_id) == (
            "FPR",
            "r1",
            "m1",
        )
        assert unfinished.signature_id == "sig-r1"
        host, pid = unfinished.claimed_by.rsplit(":", 1)
        assert host and int(pid) != os.getpid()  # the dead child, for multi-process recovery
        assert state.messages.state("m0") == MessageState.REPLIED
        # Recovery reports it and never re-runs it.
        assert settle(state, "r1", MessageState.OUTCOME_UNKNOWN, signer="FPR")
        assert state.requests.unfinished() == []
        assert state.messages.state("m1") == MessageState.OUTCOME_UNKNOWN
        assert not claim(state, "r1", signer="FPR")


def test_a_claim_is_settled_once_and_only_if_taken(db: StateDB) -> None:
    assert claim(db, "r1")
    assert settle(db, "r1", MessageState.REPLIED)
    assert db.requests.unfinished() == []
    assert not settle(db, "r1", MessageState.REPLIED)
    assert not settle(db, "never-claimed", MessageState.REPLIED)
    assert len(look(db, T0)) == 1  # the first settlement's reply, nothing else


# -- message states (P9) and the poison counter (P11) -------------------------------


def test_begin_processing_counts_attempts_across_reopen(tmp_path: Path) -> None:
    with StateDB(tmp_path / STATE_FILE) as state:
        state.messages.record("m1", "mbox", 10, "h")
        assert state.messages.begin_processing("m1") == 1
    with StateDB(tmp_path / STATE_FILE) as state:
        assert state.messages.begin_processing("m1") == 2
    with StateDB(tmp_path / STATE_FILE) as state:
        assert state.messages.begin_processing("m1") == 3


def test_begin_processing_can_record_first(db: StateDB) -> None:
    with pytest.raises(StateError, match="never recorded"):
        db.messages.begin_processing("m1")
    assert db.messages.begin_processing("m1", source="smtp", size=5) == 1
    db.messages.record("m1", "smtp", 7, "hash")  # fills in what was not known yet
    record = db.messages.get("m1")
    assert record is not None
    assert (record.size, record.sha256, record.attempts) == (7, "hash", 1)
    db.messages.record("m1", "smtp", 9, "other")  # recording again changes nothing
    assert db.messages.get("m1") == record


def test_a_final_state_is_final(db: StateDB) -> None:
    db.messages.record("m1", "mbox", 10, "h")
    assert db.messages.state("m1") == MessageState.RECEIVED
    assert not MessageState.RECEIVED.is_final
    db.messages.set_state("m1", MessageState.DISCARDED, reason="unsigned")
    assert MessageState.DISCARDED.is_final
    db.messages.set_state("m1", MessageState.DISCARDED)  # idempotent
    for other in (MessageState.QUARANTINED, MessageState.EXECUTING, MessageState.RECEIVED):
        with pytest.raises(StateError, match="already discarded"):
            db.messages.set_state("m1", other)
    record = db.messages.get("m1")
    assert record is not None and record.reason == "unsigned"


def test_no_way_back_to_received(db: StateDB) -> None:
    db.messages.record("m1", "mbox", 10, "h")
    db.messages.set_state("m1", MessageState.EXECUTING)
    with pytest.raises(StateError, match="back to received"):
        db.messages.set_state("m1", MessageState.RECEIVED)


def test_unknown_message_state_is_none(db: StateDB) -> None:
    assert db.messages.state("nope") is None
    with pytest.raises(StateError):
        db.messages.set_state("nope", MessageState.DISCARDED)


def test_a_settled_claim_queues_exactly_one_reply(db: StateDB) -> None:
    db.messages.record("m1", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    assert settle(db, "r1", MessageState.REPLIED)
    assert not settle(db, "r1", MessageState.REJECTED)  # already finished: nothing written
    (queued,) = look(db, T0)
    assert (queued.spool_id, queued.request_id, queued.message) == ("m1", "r1", b"reply")
    assert db.messages.state("m1") == MessageState.REPLIED
    assert db.requests.unfinished() == []


def test_racing_workers_report_a_claim_once(db: StateDB) -> None:
    db.messages.record("m1", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    barrier = threading.Barrier(8)
    outcomes: list[bool] = []

    def worker() -> None:
        barrier.wait()
        outcomes.append(settle(db, "r1", MessageState.REPLIED))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    assert len(look(db, T0)) == 1


def test_a_copy_does_not_finish_the_original_claim(db: StateDB) -> None:
    db.messages.record("m1", "mbox", 10, "h")
    db.messages.record("m2", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    assert not claim(db, "r1", spool_id="m2")
    assert db.requests.finish_duplicate(
        spool_id="m2", signer="FPR1", request_id="r1", reason="copy", notice=mail(b"notice")
    )
    assert [r.spool_id for r in db.requests.unfinished()] == ["m1"]
    assert db.messages.state("m1") == MessageState.EXECUTING
    assert db.messages.state("m2") == MessageState.DUPLICATE
    db.messages.record("m3", "mbox", 10, "h")  # a second copy: no second notice
    assert not db.requests.finish_duplicate(
        spool_id="m3", signer="FPR1", request_id="r1", reason="copy", notice=mail(b"notice")
    )
    assert [o.spool_id for o in look(db, T0)] == ["m2"]


def test_an_outcome_rolls_back_as_a_whole(db: StateDB) -> None:
    with pytest.raises(StateError, match="never recorded"):
        db.requests.record_rejection(
            spool_id="ghost",
            signer="FPR1",
            request_id="r1",
            issued_at=T0,
            request_sha256="h",
            reason="audience",
            reply=mail(),
        )
    assert db.requests.find("FPR1", "r1") is None
    assert look(db, T0 + timedelta(days=1)) == []


def test_message_states_of_some_ids(db: StateDB, clock: Clock) -> None:
    for name in ("m1", "m2", "m3"):
        db.messages.record(name, "mbox", 1, "h")
        clock.advance(seconds=1)
    db.messages.set_state("m2", MessageState.EXECUTING)
    db.messages.set_state("m3", MessageState.QUARANTINED, reason="crashed twice")
    assert db.messages.states(["m1", "m2", "m3", "never"]) == {
        "m1": MessageState.RECEIVED,
        "m2": MessageState.EXECUTING,
        "m3": MessageState.QUARANTINED,
    }


# -- outbound queue -------------------------------------------------------------------


def test_next_backoff_doubles_and_caps_at_one_hour() -> None:
    minutes = [next_backoff(n) / timedelta(minutes=1) for n in range(1, 9)]
    assert minutes == [1, 2, 4, 8, 16, 32, 60, 60]
    assert next_backoff(0) == timedelta(minutes=1)
    assert next_backoff(10**9) == timedelta(hours=1)


def test_outbound_retry_order_and_backoff(db: StateDB, clock: Clock) -> None:
    for i in range(3):
        assert reject(db, f"m{i}", f"r{i}")
        clock.advance(seconds=1)
    assert db.outbox.next_due() == T0
    assert [o.spool_id for o in look(db, T0 + timedelta(seconds=1))] == ["m0", "m1"]
    queued = look(db, clock.now)  # from here on all due at clock.now: by id
    assert [(o.spool_id, o.to_addr) for o in queued] == [
        ("m0", "m0@x"),
        ("m1", "m1@x"),
        ("m2", "m2@x"),
    ]
    a, b, c = (o.id for o in queued)

    retry_at = clock.now + next_backoff(1)
    assert db.outbox.mark_failed(a, "421 try later", retry_at) == 1
    assert [o.id for o in look(db, clock.now)] == [b, c]
    db.outbox.mark_sent(b)
    db.outbox.mark_sent(b)  # a duplicate confirmation is harmless
    assert [o.id for o in look(db, clock.now)] == [c]
    assert db.outbox.next_due() == clock.now

    # Once due again, the retried one sorts by its new due time, after older work.
    later = look(db, retry_at)
    assert [o.id for o in later] == [c, a]
    assert (later[1].attempts, later[1].last_error, later[1].next_attempt_at) == (
        1,
        "421 try later",
        retry_at,
    )
    assert db.outbox.mark_failed(a, "421 again", retry_at + next_backoff(2)) == 2

    # Permanent failure: abandoned, never due again, counted.
    assert db.outbox.mark_failed(c, "550 no such user", None) == 1
    assert [o.id for o in look(db, T0 + timedelta(days=365))] == [a]
    with pytest.raises(StateError):
        db.outbox.mark_failed(c, "again", retry_at)
    with pytest.raises(StateError):
        db.outbox.mark_failed(b, "already sent", retry_at)
    with pytest.raises(StateError):
        db.outbox.mark_sent(999)
    counts = db.report.counts()
    assert (counts["outbound_pending"], counts["outbound_failing"]) == (1, 1)
    assert counts["outbound_abandoned"] == 1


# -- status ---------------------------------------------------------------------------


def test_counts_and_last_errors(db: StateDB, clock: Clock) -> None:
    for i, state in enumerate(
        [MessageState.DISCARDED, MessageState.DISCARDED, MessageState.QUARANTINED]
    ):
        db.messages.record(f"m{i}", "mbox", 1, "h")
        clock.advance(seconds=1)
        db.messages.set_state(f"m{i}", state, reason=f"why-{i}")
    db.messages.record("m9", "mbox", 1, "h")
    assert claim(db, "r9", spool_id="m9")
    db.messages.record("m8", "mbox", 1, "h")  # a copy of r9 while it runs: one notice
    clock.advance(seconds=1)
    assert db.requests.finish_duplicate(
        spool_id="m8", signer="FPR1", request_id="r9", reason="copy of r9", notice=mail()
    )
    (out,) = (o.id for o in look(db, clock.now))
    clock.advance(seconds=1)
    db.outbox.mark_failed(out, "connection refused", clock.now + timedelta(minutes=1))

    assert db.report.counts() == {
        "received": 0,
        "executing": 1,
        "replied": 0,
        "rejected": 0,
        "outcome-unknown": 0,
        "duplicate": 1,
        "unreported": 0,
        "discarded": 2,
        "quarantined": 1,
        "outbound_pending": 1,
        "outbound_failing": 1,
        "outbound_abandoned": 0,
        "requests_unfinished": 1,
    }
    errors = db.report.last_errors()
    assert [(e.kind, e.ref, e.error) for e in errors] == [
        ("outbound", f"reply {out}", "connection refused"),  # not "outbound outbound N"
        ("duplicate", "m8", "copy of r9"),
        ("quarantined", "m2", "why-2"),
        ("discarded", "m1", "why-1"),  # discards count as problems too (issue 12)
        ("discarded", "m0", "why-0"),
    ]
    assert [(c.state, c.reason, c.count) for c in db.report.problem_counts()] == [
        (MessageState.DUPLICATE, "copy of r9", 1),
        (MessageState.QUARANTINED, "why-2", 1),
        (MessageState.DISCARDED, "why-1", 1),
        (MessageState.DISCARDED, "why-0", 1),
    ]
    assert [m.spool_id for m in db.report.recent_decisions()] == ["m8", "m2", "m1", "m0"]
    assert db.outbox.next_due() == clock.now + timedelta(minutes=1)


def test_leased_replies_are_taken_once_by_racing_senders(tmp_path: Path, clock: Clock) -> None:
    """Two serve processes (here: 8 threads, each its own connection and StateDB) never
    take the same reply at once; a lease that runs out makes it due again."""
    path = tmp_path / STATE_FILE
    first = StateDB(path, clock=clock)
    for i in range(40):
        assert reject(first, f"m{i}", f"r{i}")
    ids = sorted(o.id for o in look(first, clock.now))
    assert len(ids) == 40
    taken: list[int] = []
    lock = threading.Lock()
    lease = timedelta(minutes=5)

    def sender() -> None:
        with StateDB(path, clock=clock) as db:
            while True:
                batch = db.outbox.lease(clock.now, lease=lease, limit=3)
                if not batch:
                    return
                with lock:
                    taken.extend(o.id for o in batch)

    threads = [threading.Thread(target=sender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == ids  # each exactly once
    assert first.outbox.lease(clock.now, lease=lease) == []
    # nobody confirmed them: after the lease they are due again (at least once, never lost)
    again = first.outbox.lease(clock.now + timedelta(minutes=6), lease=lease, limit=100)
    assert sorted(o.id for o in again) == ids
    first.close()
