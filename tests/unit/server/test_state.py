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
from mailsh.server.state import (
    MIGRATIONS,
    SCHEMA_VERSION,
    STATE_FILE,
    MessageState,
    StateDB,
    next_backoff,
)

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
    state = StateDB.open(tmp_path, clock=clock)
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
    return db.claim_request(
        signer=signer,
        request_id=request_id,
        signature_id=sig,
        issued_at=T0,
        request_sha256="ab" * 32,
        spool_id=spool_id,
    )


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


def test_commits_are_fsynced(db: StateDB) -> None:
    conn = db._conn()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopening_keeps_data_and_version(tmp_path: Path) -> None:
    with StateDB.open(tmp_path) as first:
        first.record_message("m1", "mbox", 10, "h")
    with StateDB.open(tmp_path) as second:
        assert second.message_state("m1") == MessageState.RECEIVED


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    StateDB.open(tmp_path).close()
    raw = sqlite3.connect(tmp_path / STATE_FILE)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StateError, match="newer") as info:
        StateDB.open(tmp_path)
    assert info.value.hint and "upgrade" in info.value.hint


def test_closed_database_raises_state_error(tmp_path: Path) -> None:
    state = StateDB.open(tmp_path)
    state.close()
    with pytest.raises(StateError, match="closed"):
        state.message_state("m1")


# -- replay record (P5) -----------------------------------------------------------------


def test_second_claim_of_a_request_is_a_replay(db: StateDB) -> None:
    assert claim(db, "r1", sig="s1")
    assert not claim(db, "r1", sig="s2")  # same signer and request id, re-signed
    assert not claim(db, "r2", sig="s1")  # same signature, different request id
    assert claim(db, "r1", signer="FPR2", sig="s3")  # request ids are per signer
    assert claim(db, "r3") and claim(db, "r4")  # no signature id: only the pair counts
    assert not claim(db, "r3")


def test_claim_marks_the_message_executing(db: StateDB) -> None:
    db.record_message("m1", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    record = db.message("m1")
    assert record is not None
    assert (record.state, record.signer, record.request_id) == (
        MessageState.EXECUTING,
        "FPR1",
        "r1",
    )


def test_claim_requires_an_aware_issue_time(db: StateDB) -> None:
    with pytest.raises(ValueError, match="naive"):
        db.claim_request(
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
    if db.claim_request(signer="FPR", request_id=rid, signature_id=f"sig{i}",
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
        assert state.counts()["requests_unfinished"] == 50


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
from mailsh.server.state import MessageState, StateDB
db = StateDB(Path(sys.argv[1]))
def claim(rid, spool):
    db.record_message(spool, "mbox", 10, "h")
    assert db.claim_request(signer="FPR", request_id=rid, signature_id="sig-" + rid,
                            issued_at=datetime.now(UTC), request_sha256="h", spool_id=spool)
if sys.argv[2] == "finish-one":
    claim("r0", "m0")
    db.finish_with_reply(spool_id="m0", state=MessageState.REPLIED, to_addr="a@x",
                         from_addr="s@x", message=b"reply", request_status="exit 0")
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
        assert state.message_state("m1") == MessageState.EXECUTING


def test_unfinished_requests_after_a_crash(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / STATE_FILE
    child = run_child(CRASH_CHILD, str(path), "finish-one")
    assert child.returncode == -signal.SIGKILL, child.stderr
    with StateDB(path, clock=clock) as state:
        (unfinished,) = state.unfinished_requests()
        assert (unfinished.signer, unfinished.request_id, unfinished.spool_id) == (
            "FPR",
            "r1",
            "m1",
        )
        assert unfinished.signature_id == "sig-r1"
        host, pid = unfinished.claimed_by.rsplit(":", 1)
        assert host and int(pid) != os.getpid()  # the dead child, for multi-process recovery
        assert state.message_state("m0") == MessageState.REPLIED
        # Recovery reports it and never re-runs it.
        state.finish_with_reply(
            spool_id="m1",
            state=MessageState.OUTCOME_UNKNOWN,
            to_addr="a@x",
            from_addr="s@x",
            message=b"outcome unknown",
        )
        assert state.unfinished_requests() == []
        assert state.message_state("m1") == MessageState.OUTCOME_UNKNOWN
        assert not claim(state, "r1", signer="FPR")


def test_finish_request_twice_or_unknown_is_an_error(db: StateDB) -> None:
    assert claim(db, "r1")
    db.finish_request("FPR1", "r1", "exit 0")
    assert db.unfinished_requests() == []
    with pytest.raises(StateError):
        db.finish_request("FPR1", "r1", "exit 0")
    with pytest.raises(StateError):
        db.finish_request("FPR1", "never-claimed", "exit 0")


# -- message states (P9) and the poison counter (P11) -------------------------------


def test_begin_processing_counts_attempts_across_reopen(tmp_path: Path) -> None:
    with StateDB.open(tmp_path) as state:
        state.record_message("m1", "mbox", 10, "h")
        assert state.begin_processing("m1") == 1
    with StateDB.open(tmp_path) as state:
        assert state.begin_processing("m1") == 2
    with StateDB.open(tmp_path) as state:
        assert state.begin_processing("m1") == 3


def test_begin_processing_can_record_first(db: StateDB) -> None:
    with pytest.raises(StateError, match="never recorded"):
        db.begin_processing("m1")
    assert db.begin_processing("m1", source="smtp", size=5) == 1
    db.record_message("m1", "smtp", 7, "hash")  # fills in what was not known yet
    record = db.message("m1")
    assert record is not None
    assert (record.size, record.sha256, record.attempts) == (7, "hash", 1)
    db.record_message("m1", "smtp", 9, "other")  # recording again changes nothing
    assert db.message("m1") == record


def test_a_final_state_is_final(db: StateDB) -> None:
    db.record_message("m1", "mbox", 10, "h")
    assert db.message_state("m1") == MessageState.RECEIVED
    assert not MessageState.RECEIVED.is_final
    db.set_message_state("m1", MessageState.DISCARDED, reason="unsigned")
    assert MessageState.DISCARDED.is_final
    db.set_message_state("m1", MessageState.DISCARDED)  # idempotent
    for other in (MessageState.QUARANTINED, MessageState.EXECUTING, MessageState.RECEIVED):
        with pytest.raises(StateError, match="already discarded"):
            db.set_message_state("m1", other)
    record = db.message("m1")
    assert record is not None and record.reason == "unsigned"


def test_no_way_back_to_received(db: StateDB) -> None:
    db.record_message("m1", "mbox", 10, "h")
    db.set_message_state("m1", MessageState.EXECUTING)
    with pytest.raises(StateError, match="back to received"):
        db.set_message_state("m1", MessageState.RECEIVED)


def test_unknown_message_state_is_none(db: StateDB) -> None:
    assert db.message_state("nope") is None
    with pytest.raises(StateError):
        db.set_message_state("nope", MessageState.DISCARDED)


def reply(db: StateDB, spool_id: str, state: MessageState, status: str | None = None) -> int:
    return db.finish_with_reply(
        spool_id=spool_id,
        state=state,
        to_addr="a@x",
        from_addr="s@x",
        message=b"reply",
        request_status=status,
    )


def test_finish_with_reply_queues_exactly_one_reply(db: StateDB) -> None:
    db.record_message("m1", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    out_id = reply(db, "m1", MessageState.REPLIED, "exit 0")
    with pytest.raises(StateError, match="already replied"):
        reply(db, "m1", MessageState.REJECTED)
    (queued,) = db.due_outbound(T0)
    assert (queued.id, queued.request_id, queued.message) == (out_id, "r1", b"reply")
    assert db.message_state("m1") == MessageState.REPLIED
    assert db.unfinished_requests() == []
    with pytest.raises(ValueError, match="not a reported state"):
        reply(db, "m1", MessageState.DISCARDED)


def test_racing_workers_report_a_message_once(db: StateDB) -> None:
    db.record_message("m1", "mbox", 10, "h")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        try:
            reply(db, "m1", MessageState.REPLIED)
            outcomes.append("queued")
        except StateError as exc:
            outcomes.append(exc.message)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[-1] == "queued" and outcomes.count("queued") == 1
    assert all("already replied" in o for o in outcomes if o != "queued")
    assert len(db.due_outbound(T0)) == 1


def test_replayed_message_does_not_finish_the_original_claim(db: StateDB) -> None:
    db.record_message("m1", "mbox", 10, "h")
    db.record_message("m2", "mbox", 10, "h")
    assert claim(db, "r1", spool_id="m1")
    assert not claim(db, "r1", spool_id="m2")
    db.finish_with_reply(
        spool_id="m2",
        state=MessageState.REJECTED,
        reason="replay",
        signer="FPR1",
        request_id="r1",
        to_addr="a@x",
        from_addr="s@x",
        message=b"rejected",
    )
    assert [r.spool_id for r in db.unfinished_requests()] == ["m1"]
    assert db.message_state("m1") == MessageState.EXECUTING


def test_finish_with_reply_rolls_back_as_a_whole(db: StateDB) -> None:
    with pytest.raises(StateError, match="never recorded"):
        db.finish_with_reply(
            spool_id="ghost",
            state=MessageState.REPLIED,
            to_addr="a@x",
            from_addr="s@x",
            message=b"r",
        )
    assert db.due_outbound(T0 + timedelta(days=1)) == []


def test_messages_in_state(db: StateDB, clock: Clock) -> None:
    for name in ("m1", "m2", "m3"):
        db.record_message(name, "mbox", 1, "h")
        clock.advance(seconds=1)
    db.set_message_state("m2", MessageState.EXECUTING)
    db.set_message_state("m3", MessageState.QUARANTINED, reason="crashed twice")
    assert db.messages_in_state(MessageState.RECEIVED, MessageState.EXECUTING) == ["m1", "m2"]


# -- outbound queue -------------------------------------------------------------------


def test_next_backoff_doubles_and_caps_at_one_hour() -> None:
    minutes = [next_backoff(n) / timedelta(minutes=1) for n in range(1, 9)]
    assert minutes == [1, 2, 4, 8, 16, 32, 60, 60]
    assert next_backoff(0) == timedelta(minutes=1)
    assert next_backoff(10**9) == timedelta(hours=1)


def test_outbound_retry_order_and_backoff(db: StateDB, clock: Clock) -> None:
    ids = []
    for i in range(3):
        ids.append(
            db.enqueue_reply(
                to_addr=f"u{i}@x",
                from_addr="s@x",
                message=b"m%d" % i,
                spool_id=f"m{i}",
                request_id=None,
            )
        )
        clock.advance(seconds=1)
    a, b, c = ids
    assert [o.id for o in db.due_outbound(clock.now)] == [a, b, c]
    assert db.next_outbound_due() == T0

    retry_at = clock.now + next_backoff(1)
    assert db.mark_failed(a, "421 try later", retry_at) == 1
    assert [o.id for o in db.due_outbound(clock.now)] == [b, c]
    db.mark_sent(b)
    db.mark_sent(b)  # a duplicate confirmation is harmless
    assert [o.id for o in db.due_outbound(clock.now)] == [c]
    assert db.next_outbound_due() == T0 + timedelta(seconds=2)

    # Once due again, the retried one sorts by its new due time, after older work.
    later = db.due_outbound(retry_at)
    assert [o.id for o in later] == [c, a]
    assert (later[1].attempts, later[1].last_error, later[1].next_attempt_at) == (
        1,
        "421 try later",
        retry_at,
    )
    assert db.mark_failed(a, "421 again", retry_at + next_backoff(2)) == 2

    # Permanent failure: abandoned, never due again, counted.
    assert db.mark_failed(c, "550 no such user", None) == 1
    assert [o.id for o in db.due_outbound(T0 + timedelta(days=365))] == [a]
    with pytest.raises(StateError):
        db.mark_failed(c, "again", retry_at)
    with pytest.raises(StateError):
        db.mark_failed(b, "already sent", retry_at)
    with pytest.raises(StateError):
        db.mark_sent(999)
    counts = db.counts()
    assert (counts["outbound_pending"], counts["outbound_failing"]) == (1, 1)
    assert counts["outbound_abandoned"] == 1


# -- audit and status -----------------------------------------------------------------


def test_audit_is_append_only_and_newest_first(db: StateDB, clock: Clock) -> None:
    db.audit("started", version="0.1.0")
    clock.advance(seconds=1)
    db.audit("executed", message="m1", exit_code=0, signal=None)
    newest, oldest = db.recent_audit(2)
    assert (newest.event, newest.fields) == (
        "executed",
        {"message": "m1", "exit_code": 0, "signal": None},
    )
    assert (oldest.event, oldest.at) == ("started", T0)
    assert db.recent_audit(1) == [newest]
    conn = db._conn()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET event = 'forged'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")
    with pytest.raises(TypeError):
        db.audit("bad", blob=b"bytes")  # type: ignore[arg-type]


def test_counts_and_last_errors(db: StateDB, clock: Clock) -> None:
    for i, state in enumerate(
        [MessageState.DISCARDED, MessageState.DISCARDED, MessageState.QUARANTINED]
    ):
        db.record_message(f"m{i}", "mbox", 1, "h")
        clock.advance(seconds=1)
        db.set_message_state(f"m{i}", state, reason=f"why-{i}")
    db.record_message("m9", "mbox", 1, "h")
    assert claim(db, "r9", spool_id="m9")
    out = db.enqueue_reply(
        to_addr="a@x", from_addr="s@x", message=b"x", spool_id="m9", request_id="r9"
    )
    clock.advance(seconds=1)
    db.mark_failed(out, "connection refused", clock.now + timedelta(minutes=1))

    assert db.counts() == {
        "received": 0,
        "executing": 1,
        "replied": 0,
        "rejected": 0,
        "outcome_unknown": 0,
        "duplicate": 0,
        "unreported": 0,
        "discarded": 2,
        "quarantined": 1,
        "outbound_pending": 1,
        "outbound_failing": 1,
        "outbound_abandoned": 0,
        "requests_unfinished": 1,
    }
    errors = db.last_errors()
    assert [(e.kind, e.error) for e in errors] == [
        ("outbound", "connection refused"),
        ("quarantined", "why-2"),
    ]
    report = db.status_report()
    assert report["discarded"] == 2
    last = report["last_errors"]
    assert isinstance(last, list) and "connection refused" in last[0]


def test_leased_replies_are_taken_once_by_racing_senders(tmp_path: Path, clock: Clock) -> None:
    """Two serve processes (here: 8 threads, each its own connection and StateDB) never
    take the same reply at once; a lease that runs out makes it due again."""
    path = tmp_path / "state.db"
    first = StateDB(path, clock=clock)
    ids = [
        first.enqueue_reply(
            to_addr="a@x", from_addr="s@x", message=b"m", spool_id=f"m{i}", request_id=None
        )
        for i in range(40)
    ]
    taken: list[int] = []
    lock = threading.Lock()

    def sender() -> None:
        with StateDB(path, clock=clock) as db:
            while True:
                batch = db.lease_outbound(clock.now, limit=3)
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
    assert first.lease_outbound(clock.now) == []
    # nobody confirmed them: after the lease they are due again (at least once, never lost)
    again = first.lease_outbound(clock.now + timedelta(minutes=6), limit=100)
    assert sorted(o.id for o in again) == ids
    first.close()
