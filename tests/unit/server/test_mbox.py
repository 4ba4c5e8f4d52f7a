"""Mbox intake and scanning against real files, real locks and real writer processes.

The writer processes lock exactly like Postfix local(8) (dotlock with O_EXCL, then an
fcntl lock on the whole file, append, fsync, unlock), so these tests show that the
intake and Postfix exclude each other and that mail is duplicated at worst, never lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsh.errors import TransportError
from mailsh.mail.mbox import scan_mbox
from mailsh.server.intake.mbox import MboxIntake
from mailsh.server.spool import Spool, SpooledMessage
from tests.kit.serverkit import fail_second_put, spooled

SEP = b"From sender@example.org  Mon Jan  1 00:00:00 2024\n"


def message(n: int | str, body: bytes = b"hello\n") -> bytes:
    """A message as stored in the spool: headers and body, no separator."""
    return b"Message-ID: <%s@test>\nSubject: m\n\n%s" % (str(n).encode(), body)


def mboxed(*messages: bytes) -> bytes:
    """What Postfix appends for each message: separator, message, blank line."""
    return b"".join(SEP + m + b"\n" for m in messages)


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    (tmp_path / "mail").mkdir()
    return tmp_path / "mail" / "user"


def fast(mbox: Path, spool: Spool, **kwargs: object) -> MboxIntake:
    options: dict[str, object] = {"lock_attempts": 3, "lock_interval": 0.05}
    options.update(kwargs)
    return MboxIntake(mbox, spool, **options)  # type: ignore[arg-type]


# -- splitting -----------------------------------------------------------------------


def test_collect_spools_each_message_without_separator_and_empties_mbox(
    mbox: Path, spool: Spool
) -> None:
    msgs = [message(i) for i in range(3)]
    mbox.write_bytes(mboxed(*msgs))
    inode = mbox.stat().st_ino
    got = fast(mbox, spool).collect()
    assert [m.source for m in got] == ["mbox"] * 3
    assert spooled(spool) == msgs
    assert mbox.read_bytes() == b""
    assert mbox.stat().st_ino == inode  # emptied in place: Postfix keeps appending to it
    assert not mbox.with_name("user.lock").exists()


def test_quoted_from_lines_and_unquoted_mid_paragraph_from_stay_in_message(
    mbox: Path, spool: Spool
) -> None:
    tricky = message(1, b"para\n\n>From the quoted line\nFrom not after a blank line\n\n")
    mbox.write_bytes(mboxed(tricky, message(2)))
    fast(mbox, spool).collect()
    assert spooled(spool) == [tricky, message(2)]


def test_truncated_tail_is_still_taken_as_last_message(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(mboxed(message(1)) + SEP + b"Subject: cut\n\nhalf a li")
    fast(mbox, spool).collect()
    assert spooled(spool) == [message(1), b"Subject: cut\n\nhalf a li"]
    assert mbox.read_bytes() == b""


def test_bytes_before_first_separator_are_kept(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(b"garbage line\n\n" + mboxed(message(1)))
    fast(mbox, spool).collect()
    assert spooled(spool) == [b"garbage line\n", message(1)]


def test_missing_or_empty_mbox_is_nothing_to_do(mbox: Path, spool: Spool) -> None:
    assert fast(mbox, spool).collect() == []
    assert not mbox.exists() and not mbox.with_name("user.lock").exists()
    mbox.write_bytes(b"")
    assert fast(mbox, spool).collect() == []
    assert spool.pending() == []


def test_oversized_message_is_spooled_whole_but_streamed(
    mbox: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    big = message("big", b"x" * (3 << 20) + b"\n")
    mbox.write_bytes(mboxed(message(1), big))
    largest: list[int] = []
    real = Spool.put_stream

    def spy(self: Spool, chunks: Iterator[bytes], *, source: str) -> SpooledMessage:
        def watched() -> Iterator[bytes]:
            for chunk in chunks:
                largest.append(len(chunk))
                yield chunk

        return real(self, watched(), source=source)

    monkeypatch.setattr(Spool, "put_stream", spy)
    fast(mbox, spool, max_message_bytes=1000).collect()
    assert spooled(spool) == [message(1), big]
    assert max(largest) <= 1 << 20  # never held whole in memory
    assert "exceeds 1000" in caplog.text


# -- crashes and failures: duplicate, never lose ---------------------------------------


def test_spool_failure_midway_leaves_mbox_intact_then_duplicates(
    mbox: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    msgs = [message(i) for i in range(3)]
    mbox.write_bytes(mboxed(*msgs))
    before = mbox.read_bytes()
    fail_second_put(monkeypatch)
    with pytest.raises(TransportError, match="disk full"):
        fast(mbox, spool).collect()
    assert mbox.read_bytes() == before
    assert not mbox.with_name("user.lock").exists()
    monkeypatch.undo()
    fast(mbox, spool).collect()
    assert Counter(spooled(spool)) == Counter([msgs[0], msgs[0], msgs[1], msgs[2]])
    assert mbox.read_bytes() == b""


_KILLED_BEFORE_TRUNCATE = """
import os, signal, sys
from pathlib import Path
from mailsh.server.intake.mbox import MboxIntake
from mailsh.server.spool import Spool
os.ftruncate = lambda fd, n: os.kill(os.getpid(), signal.SIGKILL)
MboxIntake(Path(sys.argv[1]), Spool(Path(sys.argv[2]))).collect()
"""


def test_process_killed_between_spool_and_truncate_duplicates_not_loses(
    mbox: Path, spool: Spool
) -> None:
    msgs = [message(i) for i in range(3)]
    mbox.write_bytes(mboxed(*msgs))
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_TRUNCATE, str(mbox), str(spool.root)], check=False
    )
    assert proc.returncode == -signal.SIGKILL
    assert spooled(spool) == msgs
    assert mbox.read_bytes() == mboxed(*msgs)
    # The dead process's dotlock names it, so it is broken at once, not after 500 s.
    assert mbox.with_name("user.lock").exists()
    fast(mbox, spool).collect()
    assert Counter(spooled(spool)) == Counter(msgs + msgs)
    assert mbox.read_bytes() == b""


_NON_LOCKING_APPEND = """
import sys
with open(sys.argv[1], "ab") as fh:
    fh.write(sys.stdin.buffer.read())
"""


def test_data_appended_by_a_writer_ignoring_locks_is_not_truncated_away(
    mbox: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    mbox.write_bytes(mboxed(message(1)))
    real = Spool.put_stream

    def append_meanwhile(self: Spool, chunks: Iterator[bytes], *, source: str) -> SpooledMessage:
        if not spool.pending():
            subprocess.run(
                [sys.executable, "-c", _NON_LOCKING_APPEND, str(mbox)],
                input=mboxed(message("late")),
                check=True,
            )
        return real(self, chunks, source=source)

    monkeypatch.setattr(Spool, "put_stream", append_meanwhile)
    fast(mbox, spool).collect()
    assert spooled(spool) == [message(1), message("late")]
    assert mbox.read_bytes() == b""


# -- locking ---------------------------------------------------------------------------


def test_foreign_dotlock_makes_collect_wait_then_fail_clearly(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(mboxed(message(1)))
    lock = mbox.with_name("user.lock")
    lock.write_bytes(b"")  # Postfix's dotlocks are empty
    start = time.monotonic()
    with pytest.raises(TransportError, match="stayed locked") as info:
        fast(mbox, spool, lock_attempts=4, lock_interval=0.1).collect()
    assert time.monotonic() - start >= 0.3  # it retried instead of giving up at once
    assert info.value.hint and "user.lock" in info.value.hint
    assert lock.exists()  # never remove someone else's fresh lock
    assert mbox.read_bytes() == mboxed(message(1))
    assert spool.pending() == []


_HOLD_DOTLOCK = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.close(fd)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
os.unlink(sys.argv[1])
"""


def test_collect_waits_for_a_dotlock_released_by_another_process(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(mboxed(message(1)))
    lock = mbox.with_name("user.lock")
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_DOTLOCK, str(lock), "0.5"], stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        fast(mbox, spool, lock_attempts=400, lock_interval=0.02).collect()
    assert spooled(spool) == [message(1)]


def test_stale_dotlock_is_removed(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(mboxed(message(1)))
    lock = mbox.with_name("user.lock")
    lock.write_bytes(b"")
    past = time.time() - 600
    os.utime(lock, (past, past))
    fast(mbox, spool).collect()
    assert spooled(spool) == [message(1)]
    assert not lock.exists()


def test_dotlock_of_a_live_mailsh_process_is_respected(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(mboxed(message(1)))
    lock = mbox.with_name("user.lock")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        lock.write_bytes(f"mailsh {alive.pid} {socket.gethostname()}\n".encode())
        try:
            with pytest.raises(TransportError, match="stayed locked"):
                fast(mbox, spool).collect()
        finally:
            alive.kill()
    assert alive.wait() != 0
    fast(mbox, spool).collect()  # now it names a dead process: broken at once
    assert spooled(spool) == [message(1)]


_HOLD_LOCKF = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_fcntl_lock_held_by_another_process_blocks_collect(mbox: Path, spool: Spool) -> None:
    mbox.write_bytes(mboxed(message(1)))
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCKF, str(mbox)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(TransportError, match="fcntl"):
            fast(mbox, spool).collect()
        assert mbox.read_bytes() == mboxed(message(1))
        assert not mbox.with_name("user.lock").exists()  # our dotlock released on failure
        assert holder.stdin is not None
        holder.stdin.close()
    fast(mbox, spool).collect()
    assert spooled(spool) == [message(1)]


_COLLECT_REPORT = """
import json, logging, sys
from pathlib import Path
from mailsh.server.intake.mbox import MboxIntake
from mailsh.server.spool import Spool
logging.basicConfig(level=logging.WARNING)
got = MboxIntake(Path(sys.argv[1]), Spool(Path(sys.argv[2])), lock_attempts=3).collect()
print(json.dumps(len(got)))
"""


def test_unwritable_mail_directory_warns_and_uses_fcntl_only(tmp_path: Path) -> None:
    maildir, spool_root, mbox = tmp_path / "mail", tmp_path / "spool", tmp_path / "mail" / "user"
    maildir.mkdir()
    mbox.write_bytes(mboxed(message(1)))
    maildir.chmod(0o555)
    command = [sys.executable, "-c", _COLLECT_REPORT, str(mbox), str(spool_root)]
    if os.geteuid() == 0:  # root ignores modes unless it drops CAP_DAC_OVERRIDE
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv(1) is missing")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        proc = subprocess.run(command, capture_output=True, check=False)
    finally:
        maildir.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == 1
    assert b"relying on the fcntl lock only" in proc.stderr
    assert mbox.read_bytes() == b""
    assert spooled(Spool(spool_root)) == [message(1)]


# -- a real concurrent writer locking like Postfix ---------------------------------------

_POSTFIX_LIKE_WRITER = """
import fcntl, os, sys, time
path, count, tag, use_dotlock = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
lock = path + ".lock"
sep = b"From sender@example.org  Mon Jan  1 00:00:00 2024\\n"
for i in range(count):
    while use_dotlock:  # dotlock first, O_EXCL, retried
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            time.sleep(0.002)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            while True:  # then the fcntl lock, retried
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    time.sleep(0.002)
            body = b"Message-ID: <%s-%d@test>\\nSubject: m\\n\\n" % (tag.encode(), i)
            os.write(fd, sep + body)  # written in pieces, as a real delivery is,
            time.sleep(0.001)  # slowly, so that a reader ignoring the locks would see
            os.write(fd, b"line\\n\\n>From quoted\\n" * (i % 7))  # half messages
            time.sleep(0.001)
            os.write(fd, b"end\\n\\n")
            os.fsync(fd)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        if use_dotlock:
            os.unlink(lock)
"""


def expected_from_writer(tag: str, count: int) -> list[bytes]:
    return [
        b"Message-ID: <%s-%d@test>\nSubject: m\n\n" % (tag.encode(), i)
        + b"line\n\n>From quoted\n" * (i % 7)
        + b"end\n"
        for i in range(count)
    ]


@pytest.mark.parametrize("use_dotlock", [True, False], ids=["dotlock+fcntl", "fcntl-only"])
def test_concurrent_postfix_like_writer_loses_nothing(
    mbox: Path, spool: Spool, use_dotlock: bool
) -> None:
    """Postfix's default (dotlock, fcntl), and ``mailbox_delivery_lock = fcntl``."""
    count = 300
    intake = MboxIntake(mbox, spool, lock_attempts=1000, lock_interval=0.005)
    rounds = 0
    args = [str(mbox), str(count), "w", "1" if use_dotlock else "0"]
    with subprocess.Popen([sys.executable, "-c", _POSTFIX_LIKE_WRITER, *args]) as writer:
        while writer.poll() is None:
            intake.collect()
            rounds += 1
    assert writer.returncode == 0
    intake.collect()
    got = Counter(spooled(spool))
    expected = expected_from_writer("w", count)
    assert set(got) == set(expected)  # every message, each intact, nothing else
    assert sum(got.values()) == count  # no crash here, so not even a duplicate
    assert mbox.read_bytes() == b""
    assert rounds > 1


# -- scan_mbox: the client's read-only view --------------------------------------------


def fingerprint(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return (path.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def test_scan_is_incremental_and_never_modifies_the_file(mbox: Path) -> None:
    mbox.write_bytes(mboxed(message(1), message(2)))
    before = fingerprint(mbox)
    msgs, offset = scan_mbox(mbox)
    assert msgs == [message(1), message(2)]
    assert offset == mbox.stat().st_size
    assert fingerprint(mbox) == before
    assert not mbox.with_name("user.lock").exists()
    assert scan_mbox(mbox, offset) == ([], offset)
    with mbox.open("ab") as fh:
        fh.write(mboxed(message(3)))
    before = fingerprint(mbox)
    msgs, offset2 = scan_mbox(mbox, offset)
    assert msgs == [message(3)]
    assert offset2 == mbox.stat().st_size
    assert fingerprint(mbox) == before


def test_scan_waits_for_a_partially_written_last_message(mbox: Path) -> None:
    mbox.write_bytes(mboxed(message(1)) + SEP + b"Subject: p\n\nfirst half\n")
    msgs, offset = scan_mbox(mbox)
    assert msgs == [message(1)]
    assert scan_mbox(mbox, offset) == ([], offset)
    with mbox.open("ab") as fh:
        fh.write(b"second half\n\n")
    assert scan_mbox(mbox, offset) == (
        [b"Subject: p\n\nfirst half\nsecond half\n"],
        len(mbox.read_bytes()),
    )


def test_scan_restarts_when_the_file_shrank_or_was_replaced(mbox: Path) -> None:
    mbox.write_bytes(mboxed(message(1), message(2)))
    _, offset = scan_mbox(mbox)
    mbox.write_bytes(mboxed(message(3)))  # shrank (e.g. expunged by a mail program)
    assert scan_mbox(mbox, offset) == ([message(3)], mbox.stat().st_size)
    _, offset = scan_mbox(mbox)
    replacement = mbox.with_name("new")
    replacement.write_bytes(mboxed(message("long-" * 30), message(4)))
    replacement.rename(mbox)  # replaced by a bigger file: offset is not a boundary of it
    assert scan_mbox(mbox, offset)[0] == [message("long-" * 30), message(4)]


def test_scan_of_missing_file_is_empty(mbox: Path) -> None:
    assert scan_mbox(mbox, 1234) == ([], 0)


def test_scan_takes_a_shared_lock_and_backs_off_while_a_writer_holds_it(mbox: Path) -> None:
    mbox.write_bytes(mboxed(message(1)))
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCKF, str(mbox)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert scan_mbox(mbox, 0, lock_attempts=2, lock_interval=0.05) == ([], 0)
        assert holder.stdin is not None
        holder.stdin.close()
    assert scan_mbox(mbox, 0)[0] == [message(1)]
