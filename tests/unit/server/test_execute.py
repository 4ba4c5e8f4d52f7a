"""Tests for mailsh.server.execute with real subprocesses (docs/security.md P10)."""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailsh.errors import ConfigError
from mailsh.server.account import SAFE_PATH, current_user_is_root
from mailsh.server.execute import ExecLimits, ExecResult, run_command

pytestmark = pytest.mark.timeout(120)

# Generous backstop: a broken feature shows up as timed_out=True, never as a slow test.
LIMITS = ExecLimits(timeout=60, kill_grace=1)
NOBODY = "nobody"


def run(command: str, cwd: Path, stdin: bytes | None = None, **kw: object) -> ExecResult:
    limits = kw.pop("limits", LIMITS)
    assert isinstance(limits, ExecLimits)
    return run_command(command, stdin=stdin, limits=limits, cwd=cwd, **kw)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    """A process exists and is not a zombie (pid 1 here may never reap orphans)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return raw[raw.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def read_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids a test started; killed afterwards so a failing test leaves nothing running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


needs_root = pytest.mark.skipif(not current_user_is_root(), reason="switching users needs root")


@pytest.mark.parametrize("status", [0, 3])
def test_exit_status_passes_through(tmp_path: Path, status: int) -> None:
    result = run(f"exit {status}", tmp_path)
    assert (result.exit_code, result.signal, result.timed_out) == (status, None, False)
    assert result.started_at.tzinfo is not None
    assert result.started_at <= result.finished_at


def test_killing_signal_is_reported(tmp_path: Path) -> None:
    result = run("kill -KILL $$", tmp_path)
    assert (result.exit_code, result.signal, result.timed_out) == (None, 9, False)


def test_stdout_and_stderr_are_separate_and_byte_exact(tmp_path: Path) -> None:
    result = run(r"printf '\x00\xff\r\n'; printf 'e\x01\x80' >&2", tmp_path)
    assert result.stdout == b"\x00\xff\r\n"
    assert result.stderr == b"e\x01\x80"
    assert not result.stdout_truncated and not result.stderr_truncated


def test_stdin_bytes_are_delivered_exactly(tmp_path: Path) -> None:
    data = bytes(range(256)) * 3 + b"\r\n\x00no newline"
    result = run("cat", tmp_path, stdin=data)
    assert result.stdout == data


def test_large_stdin_does_not_deadlock(tmp_path: Path) -> None:
    # cat writes back while we still write: feeding stdin before reading would deadlock.
    data = os.urandom(8 * 1024 * 1024)
    limits = ExecLimits(timeout=60, max_output_bytes=len(data))
    result = run("cat; cat >&2 </dev/null", tmp_path, stdin=data, limits=limits)
    assert not result.timed_out
    assert result.stdout == data
    assert not result.stdout_truncated


def test_no_stdin_reads_eof_from_dev_null(tmp_path: Path) -> None:
    result = run("readlink /proc/$$/fd/0; cat; read -r line; echo read=$?", tmp_path)
    assert not result.timed_out
    assert result.stdout == b"/dev/null\nread=1\n"


def test_empty_stdin_is_eof_on_a_pipe(tmp_path: Path) -> None:
    result = run("wc -c", tmp_path, stdin=b"")
    assert not result.timed_out
    assert result.stdout.strip() == b"0"


def test_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSH_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    result = run("env -0", tmp_path)
    env = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if item)
    assert b"hunter2" not in result.stdout
    assert "LD_PRELOAD" not in env
    assert env["PATH"] == SAFE_PATH
    assert env["LANG"] == env["LC_ALL"] == "C.UTF-8"
    me = pwd.getpwuid(os.geteuid())
    assert (env["USER"], env["LOGNAME"], env["HOME"]) == (me.pw_name, me.pw_name, me.pw_dir)
    bash_adds = {"PWD", "SHLVL", "_"}
    assert set(env) - bash_adds == {"PATH", "LANG", "LC_ALL", "HOME", "USER", "LOGNAME", "SHELL"}


def test_timeout_kills_the_whole_group(tmp_path: Path, reaper: list[int]) -> None:
    pids = tmp_path / "pids"
    command = (
        f"for i in 1 2 3; do sleep 300 & echo $! >> {pids}; done; "
        f"( sleep 300 & echo $! >> {pids}; wait ) & "  # a grandchild, via a subshell
        f"while [ $(wc -l < {pids}) -lt 4 ]; do sleep 0.05; done; echo ready; sleep 300"
    )
    result = run(command, tmp_path, limits=ExecLimits(timeout=2, kill_grace=1))
    started = read_pids(pids)
    reaper.extend(started)
    assert result.timed_out
    assert result.exit_code is None and result.signal in (signal.SIGTERM, signal.SIGKILL)
    assert result.stdout == b"ready\n"  # output produced before the timeout is kept
    assert len(started) == 4
    assert [pid for pid in started if alive(pid)] == []


def test_timeout_escalates_to_sigkill(tmp_path: Path, reaper: list[int]) -> None:
    # SIG_IGN survives exec, so the sleeper ignores SIGTERM too.
    pidfile = tmp_path / "pid"
    command = f"trap '' TERM; sleep 300 & echo $! > {pidfile}; while :; do sleep 1; done"
    result = run(command, tmp_path, limits=ExecLimits(timeout=1, kill_grace=0.5))
    reaper.extend(read_pids(pidfile))
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert not alive(read_pids(pidfile)[0])


def test_output_flood_is_capped_and_drained(tmp_path: Path) -> None:
    limits = ExecLimits(timeout=60, max_output_bytes=1_000_000)
    result = run("yes | head -c 50000000; echo tail >&2", tmp_path, limits=limits)
    assert not result.timed_out  # head got all 50 MB through: we kept draining
    assert result.exit_code == 0
    assert result.stdout == b"y\n" * 500_000
    assert result.stdout_truncated
    assert result.stderr == b"tail\n" and not result.stderr_truncated


def test_endless_output_stops_at_the_timeout(tmp_path: Path) -> None:
    limits = ExecLimits(timeout=2, max_output_bytes=4096, kill_grace=1)
    result = run("yes >&2", tmp_path, limits=limits)
    assert result.timed_out
    assert len(result.stderr) == 4096 and result.stderr_truncated
    assert result.stdout == b"" and not result.stdout_truncated


@pytest.mark.parametrize(
    "background",
    [
        "sleep 300 &",  # holds our stdout/stderr pipes open
        "sleep 300 >/dev/null 2>&1 </dev/null &",  # holds nothing: would linger silently
        "set -m; sleep 300 &",  # job control: own process group, same session
    ],
)
def test_leftover_background_jobs_are_killed_after_normal_exit(
    tmp_path: Path, reaper: list[int], background: str
) -> None:
    pidfile = tmp_path / "pid"
    result = run(f"{background} echo $! > {pidfile}; echo done", tmp_path)
    (pid,) = read_pids(pidfile)
    reaper.append(pid)
    assert not result.timed_out
    assert (result.exit_code, result.stdout) == (0, b"done\n")
    assert not alive(pid)


def test_setsid_escapee_is_not_contained_but_does_not_hang_the_call(
    tmp_path: Path, reaper: list[int]
) -> None:
    """Session mode (no containment given) keeps the limit stated in the module docstring:
    setsid leaves the session. Cgroup mode kills it: tests/unit/server/test_cgroup.py."""
    pidfile = tmp_path / "pid"
    # The escapee writes its pid only once it has left: no race with our sweep.
    escape = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' &"
    command = f"{escape} while [ ! -s {pidfile} ]; do sleep 0.05; done; echo done"
    result = run(command, tmp_path)
    (pid,) = read_pids(pidfile)
    reaper.append(pid)
    assert not result.timed_out  # we stopped waiting for the pipe it holds
    assert (result.exit_code, result.stdout) == (0, b"done\n")
    assert result.containment == "session"
    assert alive(pid)  # escaped: only a cgroup gets it


def test_run_as_unknown_user_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no-such-mailsh-user.*no such user") as info:
        run("true", tmp_path, run_as="no-such-mailsh-user")
    assert info.value.hint and "useradd" in info.value.hint


@needs_root
def test_run_as_unprivileged_user(tmp_path: Path) -> None:
    me = pwd.getpwnam(NOBODY)
    result = run('id -u; id -g; echo "$USER $HOME"', Path("/"), run_as=NOBODY)
    assert result.exit_code == 0, result.stderr
    uid, gid, names = result.stdout.decode().splitlines()
    assert (int(uid), int(gid)) == (me.pw_uid, me.pw_gid)
    assert names == f"{NOBODY} {me.pw_dir}"


@needs_root
def test_run_as_user_who_cannot_enter_cwd_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="cannot"):
        run("true", private, run_as=NOBODY)


def test_run_as_self_needs_no_privilege(tmp_path: Path) -> None:
    result = run("id -u", tmp_path, run_as=getpass.getuser())
    assert result.stdout == f"{os.geteuid()}\n".encode()


def test_missing_cwd_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unusable"):
        run("true", tmp_path / "missing")


def test_unusable_shell_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shell"):
        run("true", tmp_path, shell="/nonexistent/bash")  # noqa: S604 - a path, not shell=True


def test_concurrent_calls_from_threads_do_not_mix(tmp_path: Path, reaper: list[int]) -> None:
    def one(i: int) -> tuple[int, ExecResult]:
        data = f"input-{i}-".encode() * 50_000
        cmd = f"sleep 300 & echo $! >> {tmp_path}/pids; cat; echo err-{i} >&2; exit {i}"
        return i, run(cmd, tmp_path, stdin=data)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, range(8)))
    reaper.extend(read_pids(tmp_path / "pids"))
    for i, result in results:
        assert not result.timed_out
        assert result.exit_code == i
        assert result.stdout == f"input-{i}-".encode() * 50_000
        assert result.stderr == f"err-{i}\n".encode()
    assert [pid for pid in read_pids(tmp_path / "pids") if alive(pid)] == []


FORK_PROBE = """
import os, time
ok = failed = 0
for _ in range(20):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    ok += 1
print(ok, failed)
"""


def test_max_processes_is_enforced(tmp_path: Path) -> None:
    # RLIMIT_NPROC does not bind root, so as root test it on an unprivileged user.
    run_as, cwd = (NOBODY, Path("/")) if current_user_is_root() else (None, tmp_path)
    # "read" waits for stdin, which is written only after the limits were applied.
    command = f"read -r go; grep 'Max processes' /proc/self/limits; exec python3 -c '{FORK_PROBE}'"
    limits = ExecLimits(timeout=60, max_processes=4)
    result = run(command, cwd, stdin=b"go\n", run_as=run_as, limits=limits)
    assert result.exit_code == 0, result.stderr
    limit_line, counts = result.stdout.decode().splitlines()
    assert limit_line.split()[2:4] == ["4", "4"]
    ok, failed = map(int, counts.split())
    assert ok < 4 and failed == 20 - ok


def test_core_dumps_are_disabled(tmp_path: Path) -> None:
    result = run("read -r go; grep 'Max core file size' /proc/self/limits", tmp_path, stdin=b"\n")
    assert result.stdout.split()[4:6] == [b"0", b"0"]


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"max_output_bytes": -1}, {"kill_grace": -1}, {"max_processes": 0}],
)
def test_limits_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ExecLimits(**kwargs)  # type: ignore[arg-type]


def test_current_user_is_root_matches_euid() -> None:
    assert current_user_is_root() is (os.geteuid() == 0)


def test_kill_grace_setting_defaults_to_the_exec_limits_default(tmp_path: Path) -> None:
    from mailsh.settings import load_settings

    assert load_settings(home=tmp_path).kill_grace == ExecLimits().kill_grace == 2.0
