"""Run one authorized shell command with bounded time, output and processes (P10).

:func:`run_command` starts ``[shell, "-c", command]`` as the leader of a new session (and
so of a new process group), with a scrubbed environment, stdin fed from bytes or
``/dev/null``, stdout and stderr captured separately and each capped. When the wall-clock
timeout expires, or when the leader exits while other members are still alive, everything
left in the session is sent SIGTERM, given ``kill_grace`` seconds, then SIGKILL. The call
never waits forever on a pipe held open by an escaped process: after the kill, pipes are
drained for at most ``kill_grace`` seconds and then closed. It is safe to call from
several threads at once: there is no ``preexec_fn``; resource limits are set by util-linux
``prlimit`` exec'd in front of the shell (see :func:`_limited`).

Two modes of containment (docs/server.md "Execution"). With a ``containment`` from
:func:`mailsh.server.cgroup.set_up` in ``cgroup`` mode, each command runs in a cgroup v2
of its own, entered before the command runs (:mod:`mailsh.server.cgroup`), and "everything
left" is everything in that cgroup: a process that left the session (``setsid cmd &``, the
daemonizing fork/setsid/fork) is still in it and is killed too. The result then carries the
cgroup's memory and pids peaks where the kernel keeps them.

Otherwise (``session`` mode) what this does NOT contain (docs/security.md P10, "Known limits"):
session and process-group membership is voluntary. A plain double fork stays in the group
and is killed, but a process that calls ``setsid()`` leaves both, and neither ``killpg``
nor the session sweep here can see it: it survives the timeout, keeps running as the
target user and may hold the output pipes open (we close our ends after the grace period,
so its next write to them gets SIGPIPE/EPIPE). In both modes a command can start work
outside its own descendants altogether (``at``, ``cron``, ``systemd-run --user``, an
existing ``tmux``/``screen`` server) and signal or ptrace any other process of the same
user: only a dedicated ``--run-as`` user bounds that.

For a real boundary, run commands as a dedicated unprivileged user that cannot read the
server's home or keys, and run ``mailsh serve`` under a systemd unit (or another cgroup
manager): ``KillMode=control-group`` kills every process left in the unit's cgroup,
however it detached, when the service stops or restarts; with ``Delegate=yes`` serve
may also create the per-command cgroups above. ``TasksMax=`` bounds processes via the pids
controller (counted per cgroup, not per user, and not raceable like RLIMIT_NPROC);
``MemoryMax=``/``CPUQuota=`` bound the rest; ``NoNewPrivileges=yes`` stops setuid binaries
from gaining privilege; ``PrivateTmp=yes``, ``ProtectSystem=strict`` and ``ProtectHome=``
limit what commands can touch.

Linux only: the session sweep reads ``/proc`` and exit detection uses ``pidfd_open(2)``
(falling back to polling).

This module starts the command and puts the pieces together; each other job has a module
of its own: the account it runs as (:mod:`mailsh.server.account`), its pipes
(:mod:`mailsh.server.pump`), stopping what it left running (:mod:`mailsh.server.kill`)
and its cgroup (:mod:`mailsh.server.cgroup`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailsh.errors import ConfigError, DependencyError
from mailsh.server.account import (
    SAFE_PATH,
    Target,
    check_cwd,
    current_user_is_root,
    resolve_target,
    scrubbed_env,
)
from mailsh.server.cgroup import CommandCgroup, Containment
from mailsh.server.kill import signal_session, stop_cgroup, stop_session
from mailsh.server.pump import Pump

__all__ = ["ExecLimits", "ExecResult", "run_command"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecLimits:
    """Bounds for one command (P10).

    ``timeout``: wall-clock seconds before the session is terminated. ``max_output_bytes``:
    bytes kept per stream (the rest is read and discarded so the command never blocks).
    ``kill_grace``: seconds between SIGTERM and SIGKILL, and the longest we keep draining
    pipes held open by processes we could not kill. ``max_processes``: RLIMIT_NPROC for
    the command (per *user*, not per command; ignored by the kernel for root).
    """

    timeout: float = 60.0
    max_output_bytes: int = 1_048_576
    kill_grace: float = 2.0
    max_processes: int | None = None

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"command timeout must be positive, not {self.timeout!r}")
        if self.max_output_bytes < 0:
            raise ConfigError(f"max output bytes must be >= 0, not {self.max_output_bytes!r}")
        if not self.kill_grace >= 0:
            raise ConfigError(f"kill grace must be >= 0, not {self.kill_grace!r}")
        if self.max_processes is not None and self.max_processes < 1:
            raise ConfigError(f"max processes must be >= 1, not {self.max_processes!r}")


@dataclass(frozen=True)
class ExecResult:
    """What happened to one command.

    Exactly one of ``exit_code`` and ``signal`` is set: the shell's exit status, or the
    number of the signal that killed it. ``timed_out`` says we killed it. Times are UTC.
    """

    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    started_at: datetime
    finished_at: datetime
    containment: str = "session"  # "cgroup" when the command ran in a cgroup of its own
    memory_peak_bytes: int | None = None  # the cgroup's memory.peak, where the kernel has it
    pids_peak: int | None = None  # the cgroup's pids.peak, where the kernel has it


@functools.cache
def _prlimit_binary() -> str:
    found = shutil.which("prlimit", path=SAFE_PATH)
    if found is None:
        raise DependencyError(
            "prlimit (util-linux) not found: cannot bound command resources",
            hint="install util-linux (apt-get install util-linux)",
        )
    return found


def _limited(argv: list[str], limits: ExecLimits) -> list[str]:
    """Prefix ``argv`` with util-linux ``prlimit`` so the command starts already limited.

    How the limits are set, and why this way: ``prlimit --core=0:0 --nproc=N:N -- argv``
    runs *after* Popen switched to the target user, lowers its own soft and hard limits
    (always allowed, no privilege needed) and execs the shell, so the shell and all its
    children inherit them from their first instruction. It is not a shell: argv is passed
    through untouched after ``--``. The alternatives are worse: ``preexec_fn`` runs Python
    between fork and exec and can deadlock when other threads hold locks (run_command runs
    in worker threads); changing our own limits before spawning leaks into every thread's
    children; ``resource.prlimit(pid)`` after spawn races with the command's first forks
    and needs CAP_SYS_RESOURCE for a process of another user (often dropped in containers).

    What it does not cover: RLIMIT_NPROC counts *all* processes of the user (other
    commands running as the same user share the budget), the kernel ignores it for root
    and for holders of CAP_SYS_ADMIN/CAP_SYS_RESOURCE, and it bounds processes, not memory
    or CPU. Use a cgroup (systemd ``TasksMax=``, ``MemoryMax=``) for real bounds; see the
    module docstring.
    """
    options = ["--core=0:0"]
    if limits.max_processes is not None:
        options.append(f"--nproc={limits.max_processes}:{limits.max_processes}")
    return [_prlimit_binary(), *options, "--", *argv]


@functools.cache
def _gate_shell() -> str | None:
    return shutil.which("bash", path=SAFE_PATH)


def _gated(argv: list[str], fd: int) -> list[str]:
    """``argv`` behind a gate: bash waits for one line on ``fd`` (serve writes it once the
    process is in its cgroup), closes ``fd`` and execs ``argv``; nothing runs if serve
    closes the pipe without writing. bash, not sh: dash cannot redirect from fd >= 10."""
    gate = f'read -r _ <&{fd} || exit 125; exec {fd}<&-; exec "$@"'
    shell = _gate_shell()
    if shell is None:
        raise DependencyError("bash not found: cannot start commands in a cgroup")
    return [shell, "-c", gate, "mailsh-gate", *argv]


def _open_cgroup(
    containment: Containment | None, limits: ExecLimits
) -> tuple[CommandCgroup | None, tuple[int, int] | None]:
    """A fresh cgroup and the gate pipe, or (None, None) for the session mode."""
    if containment is None or containment.mode != "cgroup" or _gate_shell() is None:
        return None, None
    try:
        cgroup = CommandCgroup.create(containment, max_processes=limits.max_processes)
    except OSError as exc:
        log.warning("cannot create a cgroup (%s): this command runs in session mode", exc)
        return None, None
    return cgroup, os.pipe()


def _enter_cgroup(cgroup: CommandCgroup, pid: int, gate: int) -> bool:
    """Move ``pid`` (waiting at the gate) into ``cgroup``, then open the gate."""
    try:
        cgroup.add(pid)
        entered = True
    except OSError as exc:
        log.warning("cannot move command %d into %s (%s): session mode", pid, cgroup.path, exc)
        entered = False
    try:
        os.write(gate, b"go\n")
    except OSError:  # the gate is gone (killed before it read): the pump sees it exit
        pass
    finally:
        os.close(gate)
    return entered


def _spawn(
    argv: list[str],
    *,
    stdin: bytes | None,
    cwd: Path,
    target: Target,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    switch = target.switch
    try:
        return subprocess.Popen(
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=scrubbed_env(target),
            start_new_session=True,
            close_fds=True,
            user=target.uid if switch else None,
            group=target.gid if switch else None,
            extra_groups=list(target.groups) if switch else None,
        )
    except OSError as exc:
        hint = None
        if switch and not current_user_is_root():
            hint = "only root can run commands as another user: drop the run-as setting"
        raise ConfigError(
            f"cannot start a command as {target.name} in {cwd}: {exc}", hint=hint
        ) from exc


def _start(
    argv: list[str],
    *,
    stdin: bytes | None,
    cwd: Path,
    target: Target,
    cgroup_of: Containment | None,
    limits: ExecLimits,
) -> tuple[subprocess.Popen[bytes], CommandCgroup | None]:
    """Spawn ``argv``: in a cgroup of its own when ``cgroup_of`` allows it, else plainly."""
    cgroup, gate = _open_cgroup(cgroup_of, limits)
    if cgroup is None or gate is None:
        return _spawn(argv, stdin=stdin, cwd=cwd, target=target), None
    try:
        proc = _spawn(_gated(argv, gate[0]), stdin=stdin, cwd=cwd, target=target, pass_fds=gate[:1])
    except BaseException:
        os.close(gate[1])
        cgroup.remove()
        raise
    finally:
        os.close(gate[0])
    if not _enter_cgroup(cgroup, proc.pid, gate[1]):
        cgroup.remove()
        return proc, None
    return proc, cgroup


def _close_cgroup(cgroup: CommandCgroup | None) -> tuple[int | None, int | None]:
    """Read the cgroup's (memory, pids) peaks and remove it."""
    if cgroup is None:
        return None, None
    peaks = cgroup.peaks()
    cgroup.remove()
    return peaks


def run_command(
    command: str,
    *,
    stdin: bytes | None,
    limits: ExecLimits,
    cwd: Path,
    run_as: str | None = None,
    shell: str = "/bin/bash",
    containment: Containment | None = None,
) -> ExecResult:
    """Run ``[shell, "-c", command]`` within ``limits`` and return what happened.

    ``stdin`` bytes are fed to the command (``None``: it reads ``/dev/null``). The command
    runs as ``run_as`` (resolved with pwd, with that user's supplementary groups) or as
    this process's user, in ``cwd``, with only the environment of
    :func:`~mailsh.server.account.scrubbed_env`.
    With a ``containment`` in cgroup mode it runs in a cgroup of its own (module
    docstring); else, or if that cgroup cannot be made, in session mode.
    Raises :class:`~mailsh.errors.ConfigError` when the user, directory or shell is
    unusable (:class:`~mailsh.errors.DependencyError` without util-linux ``prlimit``);
    the command's own failures are reported in the result, never raised.
    """
    target = resolve_target(run_as)
    check_cwd(cwd, target)
    if not (os.path.isabs(shell) and os.access(shell, os.X_OK)):
        raise ConfigError(f"command shell {shell!r} is not an executable absolute path")
    started_at = datetime.now(UTC)
    deadline = time.monotonic() + limits.timeout
    argv = _limited([shell, "-c", command], limits)
    proc, cgroup = _start(
        argv, stdin=stdin, cwd=cwd, target=target, cgroup_of=containment, limits=limits
    )
    sid = proc.pid  # start_new_session: the leader's pid is its session and group id
    pump = Pump(proc, stdin, limits.max_output_bytes)
    try:
        pump.run(deadline, pump.leader_exited)
        timed_out = not pump.leader_exited()
        if timed_out:
            log.info("command in session %d timed out after %ss", sid, limits.timeout)
        pump.close_stdin()
        if cgroup is not None:
            stop_cgroup(pump, cgroup, limits.kill_grace)
        else:
            stop_session(pump, sid, limits.kill_grace)
        returncode = proc.wait()  # after every killpg: the pid may be reused once reaped
        # Only escaped processes can hold the pipes now; do not wait for them forever.
        pump.run(time.monotonic() + limits.kill_grace, lambda: not pump.pipes_open())
    finally:
        if proc.returncode is None:  # an exception above: never leave the session behind
            if cgroup is not None:
                cgroup.kill()
            signal_session(sid, signal.SIGKILL)
            proc.wait()
        pump.close()
        peaks = _close_cgroup(cgroup)
    stdout, stdout_truncated = pump.stream(0)
    stderr, stderr_truncated = pump.stream(1)
    return ExecResult(
        exit_code=returncode if returncode >= 0 else None,
        signal=-returncode if returncode < 0 else None,
        timed_out=timed_out,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=stdout_truncated,
        stderr_truncated=stderr_truncated,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        containment="cgroup" if cgroup is not None else "session",
        memory_peak_bytes=peaks[0],
        pids_peak=peaks[1],
    )
