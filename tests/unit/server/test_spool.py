"""The spool: durable before put() returns, one directory per state, nothing lost."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsh.server.spool import MessageTooLarge, Spool, SpooledMessage, SpoolError


def test_put_stores_bytes_in_new_with_source_and_private_modes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    msg = spool.put(b"Subject: hi\n\nbody\n", source="smtp")
    assert msg.path.parent == spool.new
    assert msg.path.read_bytes() == b"Subject: hi\n\nbody\n"
    assert (msg.source, msg.size) == ("smtp", 18)
    assert os.listdir(spool.tmp) == []
    for d in (spool.root, spool.tmp, spool.new, spool.done, spool.quarantine_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(msg.path.stat().st_mode) == 0o600


def test_existing_root_with_loose_mode_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    Spool(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_pending_is_in_arrival_order_and_survives_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    sent = [spool.put(f"m{i}".encode(), source="mbox" if i % 2 else "maildir") for i in range(6)]
    again = Spool(tmp_path).pending()
    assert [m.id for m in again] == [m.id for m in sent]
    assert [m.source for m in again] == [m.source for m in sent]
    assert [m.path.read_bytes() for m in again] == [f"m{i}".encode() for i in range(6)]


_PUTTER = """
import sys
from pathlib import Path
from mailsh.server.spool import Spool
spool = Spool(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    spool.put(f"{sys.argv[3]}-{i}".encode(), source="smtp")
"""


def test_ids_are_unique_across_concurrent_processes(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _PUTTER, str(tmp_path), "50", f"p{n}"])
        for n in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    pending = Spool(tmp_path).pending()
    assert len({m.id for m in pending}) == 200
    assert sorted(m.path.read_bytes() for m in pending) == sorted(
        f"p{n}-{i}".encode() for n in range(4) for i in range(50)
    )


def test_put_fsyncs_file_before_rename_and_directory_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    msg = spool.put(b"x", source="smtp")
    events.append(("returned", ""))
    assert events == [
        ("fsync", str(spool.tmp / msg.name)),
        ("rename", str(spool.new / msg.name)),
        ("fsync", str(spool.new)),
        ("returned", ""),
    ]


def test_failing_stream_stores_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    def chunks() -> Iterator[bytes]:
        yield b"first part"
        raise RuntimeError("sender went away")

    with pytest.raises(RuntimeError):
        spool.put_stream(chunks(), source="smtp")
    assert spool.pending() == []
    assert os.listdir(spool.tmp) == []


def test_os_errors_become_spool_errors_and_store_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)

    def no_space(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(SpoolError):
        spool.put(b"x", source="smtp")
    monkeypatch.undo()
    assert spool.pending() == []
    assert os.listdir(spool.tmp) == []


def test_put_stream_joins_chunks(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    msg = spool.put_stream(iter([b"a" * 70000, b"", b"b" * 3]), source="mbox")
    assert msg.size == 70003
    assert spool.read(msg, 10**6) == b"a" * 70000 + b"bbb"


def test_bad_source_names_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for bad in ("", "../x", "a.b", "A", "x" * 40):
        with pytest.raises(ValueError, match="source"):
            spool.put(b"x", source=bad)


def test_read_enforces_max_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    msg = spool.put(b"12345", source="smtp")
    assert spool.read(msg, 5) == b"12345"
    with pytest.raises(MessageTooLarge) as info:
        spool.read(msg, 4)
    assert info.value.spooled == msg


def test_finish_moves_to_done_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a, b = spool.put(b"a", source="smtp"), spool.put(b"b", source="smtp")
    done = spool.finish(a)
    assert done == spool.done / a.name and done.read_bytes() == b"a"
    assert [m.id for m in spool.pending()] == [b.id]
    assert spool.finish(a) == done  # a second finish (e.g. a concurrent consumer) is harmless
    ghost_name = "00000000000000000001.1.0123456789abcdef.smtp"
    ghost = SpooledMessage(ghost_name[:-5], spool.new / ghost_name, "smtp", 1)
    with pytest.raises(SpoolError, match="vanished"):
        spool.finish(ghost)


def test_quarantine_keeps_message_and_a_one_line_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    msg = spool.put(b"evil", source="smtp")
    where = spool.quarantine(msg, "too big\nBcc: victim@example.org")
    assert where.read_bytes() == b"evil"
    reason = (spool.quarantine_dir / f"{msg.name}.reason").read_text()
    assert reason == "too big\\nBcc: victim@example.org\n"
    assert spool.pending() == []


def test_unexpected_files_in_new_are_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.new / "garbage").write_bytes(b"x")
    (spool.new / ".hidden").write_bytes(b"x")
    msg = spool.put(b"ok", source="smtp")
    assert spool.pending() == [msg]


def test_clean_tmp_removes_only_old_leftovers(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old, young = spool.tmp / "old", spool.tmp / "young"
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    past = time.time() - 3 * 24 * 3600
    os.utime(old, (past, past))
    assert spool.clean_tmp() == 1
    assert os.listdir(spool.tmp) == ["young"]


_CRASH_IN_PUT = """
import os, signal, sys
from pathlib import Path
from mailsh.server.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.put(b"accepted", source="smtp")
os.rename = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
spool.put(b"never acknowledged", source="smtp")
"""


def test_crash_inside_put_never_shows_a_half_message(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CRASH_IN_PUT, str(tmp_path)], check=False)
    assert proc.returncode == -9
    spool = Spool(tmp_path)
    assert [spool.read(m, 100) for m in spool.pending()] == [b"accepted"]
    # The unacknowledged copy is only a tmp/ leftover, which clean_tmp may remove.
    assert [p.read_bytes() for p in spool.tmp.iterdir()] == [b"never acknowledged"]
