"""Per-command cgroups (mailsh.server.cgroup, P10) with real processes on the real cgroup
v2 hierarchy of this machine, found through /proc/self/mountinfo.

The machines this project is tested on have a hybrid layout (the v1 controllers at
/sys/fs/cgroup/*, the writable cgroup2 hierarchy beside them at /sys/fs/cgroup/unified),
so these tests run for real there. Elsewhere, without a cgroup2 hierarchy serve may write
to, the tests that need one are skipped and say why; the fallback is tested everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsh.server import cgroup
from mailsh.server.cgroup import CommandCgroup, Containment
from mailsh.server.execute import ExecLimits, ExecResult, run_command

pytestmark = pytest.mark.timeout(120)

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
"""


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (pid 1 here may never reap orphans)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


@pytest.fixture(scope="module")
def containment() -> Iterator[Containment]:
    """This process's parent cgroup, removed afterwards (with any cgroup left in it)."""
    made = cgroup.set_up()
    if made.mode != "cgroup":
        pytest.skip(f"no writable cgroup v2 here: {made.detail}")
    yield made
    cgroup.tear_down(made)
    assert made.parent is not None
    left = list(made.parent.parent.glob(f"{cgroup.PARENT_PREFIX}{os.getpid()}-*"))
    assert left == []  # every cgroup these tests made is gone


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids a test started; SIGKILLed afterwards so a failing test leaves nothing."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run(
    command: str, tmp_path: Path, containment: Containment | None, **limits: float
) -> ExecResult:
    return run_command(
        command,
        stdin=None,
        limits=ExecLimits(**{"timeout": 60, "kill_grace": 0.5, **limits}),  # type: ignore[arg-type]
        cwd=tmp_path,
        containment=containment,
    )


# The ways out of a session: setsid, the daemonizing fork/setsid/fork, nohup setsid.
# Each escapee writes its pid only once it has left, so nothing races with the kill.
ESCAPES = (
    "setsid sh -c 'echo $$ >> {pids}; exec sleep 1000' &",
    "( setsid sh -c '( echo $$ >> {pids}; exec sleep 1000 ) &' & ) ;",
    "nohup setsid sh -c 'echo $$ >> {pids}; exec sleep 1000' >/dev/null 2>&1 &",
)
WAIT = "while [ $(wc -l < {pids} 2>/dev/null || echo 0) -lt 3 ]; do sleep 0.05; done;"


def test_escapees_do_not_survive_the_timeout(
    tmp_path: Path, containment: Containment, pids: list[int]
) -> None:
    pidfile = tmp_path / "pids"
    command = " ".join(e.format(pids=pidfile) for e in ESCAPES) + WAIT.format(pids=pidfile)
    result = _run(command + " echo ready; sleep 1000", tmp_path, containment, timeout=1.5)
    started = [int(line) for line in pidfile.read_text().split()]
    pids.extend(started)
    assert result.timed_out and result.containment == "cgroup"
    assert result.stdout == b"ready\n"
    assert len(started) == 3
    assert [pid for pid in started if _alive(pid)] == []
    assert containment.parent is not None
    assert [p for p in containment.parent.iterdir() if p.is_dir()] == []  # cgroup removed


def test_escapees_are_killed_when_the_command_exits(
    tmp_path: Path, containment: Containment, pids: list[int]
) -> None:
    pidfile = tmp_path / "pids"
    command = " ".join(e.format(pids=pidfile) for e in ESCAPES) + WAIT.format(pids=pidfile)
    result = _run(command + " echo done", tmp_path, containment)
    started = [int(line) for line in pidfile.read_text().split()]
    pids.extend(started)
    assert not result.timed_out
    assert (result.exit_code, result.stdout) == (0, b"done\n")
    assert [pid for pid in started if _alive(pid)] == []


def test_commands_run_inside_their_own_cgroup(tmp_path: Path, containment: Containment) -> None:
    result = _run("cat /proc/self/cgroup", tmp_path, containment)
    line = next(x for x in result.stdout.decode().splitlines() if x.startswith("0::"))
    assert containment.parent_path is not None
    assert line.startswith(f"0::{containment.parent_path}/cmd-")


def test_session_mode_is_the_fallback(tmp_path: Path, pids: list[int]) -> None:
    """Without cgroups: the session kill, which a setsid escapee leaves (documented)."""
    fallback = cgroup.set_up(mountinfo=HYBRID_MOUNTINFO.replace("cgroup2", "tmpfs"))
    assert fallback.mode == "session" and "no cgroup2" in fallback.detail
    pidfile = tmp_path / "pids"
    command = ESCAPES[0].format(pids=pidfile) + f" while [ ! -s {pidfile} ]; do sleep 0.05; done"
    result = _run(command, tmp_path, fallback)
    (pid,) = [int(line) for line in pidfile.read_text().split()]
    pids.append(pid)
    assert result.containment == "session"
    assert _alive(pid)


def test_the_cgroup2_mount_is_found_in_mountinfo_not_assumed(tmp_path: Path) -> None:
    assert cgroup.cgroup2_mounts(HYBRID_MOUNTINFO) == [("/", Path("/sys/fs/cgroup/unified"))]
    # A hierarchy mounted from a sub-cgroup (a container): paths are relative to its root.
    (tmp_path / "mailsh.service").mkdir()
    (tmp_path / "mailsh.service" / "cgroup.procs").write_text("")
    mountinfo = f"60 1 0:50 /system.slice {tmp_path} rw - cgroup2 cgroup2 rw\n"
    own = "0::/system.slice/mailsh.service\n"
    assert cgroup.locate(mountinfo, own) == (
        tmp_path / "mailsh.service",
        "/system.slice/mailsh.service",
    )


def test_mountinfo_parsing() -> None:
    spaced = "50 1 0:40 /serve /run/my\\040cgroups rw - cgroup2 none rw\n"
    assert cgroup.cgroup2_mounts(spaced) == [("/serve", Path("/run/my cgroups"))]
    assert cgroup.own_cgroup("12:pids:/\n0::/system.slice/mailsh.service\n") == (
        "/system.slice/mailsh.service"
    )
    assert cgroup.own_cgroup("12:pids:/\n") is None
    assert cgroup.locate("", "0::/\n") == "no cgroup2 file system is mounted"
    assert cgroup.locate(spaced, "4:memory:/x\n") == "this process is in no cgroup v2 hierarchy"


def test_this_machine_uses_the_mount_from_mountinfo(containment: Containment) -> None:
    mounts = cgroup.cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    assert containment.parent is not None
    assert any(containment.parent.is_relative_to(point) for _, point in mounts)


def test_peaks_and_pids_max(tmp_path: Path) -> None:
    """The memory and pids controllers are bound to cgroup v1 on the test machines, so the
    kernel keeps no memory.peak or pids.peak in cgroup v2 there: these files are written
    by the test, in a plain directory standing in for the cgroup."""
    fake = Containment(
        "cgroup", "test", parent=tmp_path, parent_path="/t", controllers=frozenset({"pids"})
    )
    group = CommandCgroup.create(fake, max_processes=7)
    assert (group.path / "pids.max").read_text() == "7"
    assert group.peaks() == (None, None)
    (group.path / "memory.peak").write_text("123456\n")
    (group.path / "pids.peak").write_text("3\n")
    assert group.peaks() == (123456, 3)


def test_status_record_round_trip(tmp_path: Path) -> None:
    assert cgroup.recorded(tmp_path).startswith("unknown: no serve has started")
    cgroup.record(tmp_path, Containment("session", "because"))
    line = cgroup.recorded(tmp_path)
    assert line.startswith("session: because (serve pid ")


def test_start_up_kills_and_removes_what_a_dead_serve_left(
    containment: Containment, pids: list[int]
) -> None:
    import subprocess

    assert containment.parent is not None
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists: the "serve" that died
    stale = containment.parent.parent / f"{cgroup.PARENT_PREFIX}{gone.pid}"
    (stale / "cmd-1").mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "1000"])
    pids.append(sleeper.pid)
    try:
        (stale / "cmd-1" / "cgroup.procs").write_text(str(sleeper.pid))
        again = cgroup.set_up()  # what serve does at start
        cgroup.tear_down(again)
        assert again.mode == "cgroup"
        assert not stale.exists()
        assert sleeper.wait(30) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        with contextlib.suppress(OSError):
            (stale / "cmd-1").rmdir()
            stale.rmdir()


def test_tear_down_kills_commands_that_outran_the_shutdown(tmp_path: Path) -> None:
    """serve reports a command still running after the shutdown grace "outcome unknown";
    then nothing it started may live on."""
    from concurrent.futures import ThreadPoolExecutor

    mine = cgroup.set_up()
    if mine.mode != "cgroup":
        pytest.skip(f"no writable cgroup v2 here: {mine.detail}")
    assert mine.parent is not None
    started = tmp_path / "started"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_run, f"touch {started}; exec sleep 1000", tmp_path, mine)
        while not started.exists():
            assert not running.done(), running.result()
            time.sleep(0.02)
        cgroup.tear_down(mine)
        result = running.result(timeout=60)
    assert result.signal == signal.SIGKILL
    assert not mine.parent.exists()
