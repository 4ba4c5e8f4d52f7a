"""A cgroup v2 per command: contain everything it starts, however it detaches (P10).

Session and process-group membership is voluntary (``setsid``, a double fork), so the
session kill of :mod:`mailsh.server.execute` misses processes that left. A cgroup is not
voluntary: every process forked inside it stays inside, and ``cgroup.kill`` kills all of
them at once. When serve may create cgroups, :func:`set_up` makes one parent cgroup for
this serve process beside itself (``mailsh-serve-PID``) and each command runs in a child
of it (``cmd-N``), killed as a whole at the timeout or when the command's shell exits, and
removed afterwards. Where the kernel keeps them (the memory and pids controllers enabled
for our cgroup), ``memory.peak`` and ``pids.peak`` are read for the reply, and
``pids.max`` is set to the command's process limit.

When is it available? serve needs a cgroup v2 hierarchy (found in
``/proc/self/mountinfo``, never assumed at ``/sys/fs/cgroup``: hybrid systems mount it
beside the v1 controllers, e.g. at ``/sys/fs/cgroup/unified``) in which it may create a
cgroup next to its own: as root, or under systemd with ``Delegate=yes``. Elsewhere serve
falls back to the session kill and says so (log at start, ``mailsh status``,
docs/server.md "Execution").

Commands enter their cgroup before they run a single instruction of their own: the
command is started behind a gate (a shell that waits to read one line from a pipe), serve
writes the gate's pid into ``cgroup.procs`` and only then opens the gate, which execs the
command. Everything it forks afterwards is born inside.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from mailsh.fsio import atomic_write
from mailsh.server.claimant import pid_exists

log = logging.getLogger(__name__)

PARENT_PREFIX = "mailsh-serve-"
"""Name of serve's parent cgroup, followed by ``PID-N`` (N counts set-ups in a process)."""
PEAK_CONTROLLERS = ("memory", "pids")
"""Controllers enabled for the commands' cgroups when the kernel offers them."""
KILL_ROUNDS = 50
"""Rounds of kill-and-check (``KILL_PAUSE`` apart) before a cgroup is declared stuck."""
KILL_PAUSE = 0.02
RECORD_NAME = "containment.json"
"""File in the home where serve records the containment mode in force (``mailsh status``)."""


def _unescape(field: str) -> str:
    """Undo the octal escapes of /proc/self/mountinfo (``\\040`` for a space, ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mounts(mountinfo: str) -> list[tuple[str, Path]]:
    """``(root, mount point)`` of every cgroup2 mount in /proc/self/mountinfo text.

    Each line is ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
    SUPEROPTIONS``; ROOT is the directory of the hierarchy seen at MOUNTPOINT.
    """
    found = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or tail.split()[:1] != ["cgroup2"]:
            continue
        found.append((_unescape(fields[3]), Path(_unescape(fields[4]))))
    return found


def own_cgroup(proc_cgroup: str) -> str | None:
    """The cgroup v2 path (``/a/b``) of a /proc/PID/cgroup text: its ``0::PATH`` line."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].removesuffix(" (deleted)") or "/"
    return None


def locate(mountinfo: str, proc_cgroup: str) -> tuple[Path, str] | str:
    """The directory of this process's own cgroup v2 and its path as /proc shows it, or
    the reason there is none."""
    mine = own_cgroup(proc_cgroup)
    if mine is None:
        return "this process is in no cgroup v2 hierarchy"
    mounts = cgroup2_mounts(mountinfo)
    if not mounts:
        return "no cgroup2 file system is mounted"
    for root, point in mounts:
        if mine == root or mine.startswith(root.rstrip("/") + "/"):
            directory = point / mine[len(root.rstrip("/")) :].lstrip("/")
            if (directory / "cgroup.procs").exists():
                return directory, mine
    return f"this process's cgroup {mine} is not visible in a cgroup2 mount"


@dataclass(frozen=True)
class Containment:
    """How commands are contained: ``cgroup`` (``parent`` holds their cgroups) or
    ``session`` (the session kill of :mod:`mailsh.server.execute`); ``detail`` says why
    or how, for the log and ``mailsh status``."""

    mode: Literal["cgroup", "session"]
    detail: str
    parent: Path | None = None
    parent_path: str | None = None  # as /proc/PID/cgroup shows it
    controllers: frozenset[str] = frozenset()
    has_kill: bool = False  # cgroup.kill (Linux 5.14); else freeze and kill each
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1), compare=False)

    def describe(self) -> str:
        return f"{self.mode}: {self.detail}"

    def next_name(self) -> str:
        """A fresh child name (``next`` on ``itertools.count`` is atomic: thread-safe)."""
        return f"cmd-{next(self._names)}"


_SET_UPS = itertools.count(1)  # several servers in one process (tests) get their own


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as fh:
        return fh.read()


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(text)


def _remove_stale(directory: Path, path: str) -> None:
    """Remove the parent cgroups of serve processes that no longer exist, killing what
    their commands left running: the dead serve reported them "outcome unknown"
    (:meth:`mailsh.server.daemon.Server.report_unfinished`), and nothing a command
    started may outlive its server. (``path``: ``directory`` as /proc shows it.)"""
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            name = entry.name
            pid_text = name[len(PARENT_PREFIX) :].split("-", 1)[0]
            if not name.startswith(PARENT_PREFIX) or not pid_text.isdigit():
                continue
            if pid_exists(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                _remove_children(entry, f"{path.rstrip('/')}/{name}", "a dead serve")
                entry.rmdir()
                log.info("removed stale cgroup %s", entry)


def _remove_children(parent: Path, parent_path: str, whose: str) -> None:
    """Kill what is left in each command cgroup under ``parent`` and remove them."""
    for child in parent.iterdir():
        if child.is_dir():
            group = CommandCgroup(
                child,
                f"{parent_path}/{child.name}",
                has_kill=(child / "cgroup.kill").exists(),
            )
            if group.populated():
                log.warning("killing what a command of %s left in %s", whose, child)
            group.remove()


def set_up(*, mountinfo: str | None = None, proc_cgroup: str | None = None) -> Containment:
    """Create this serve's parent cgroup if the system allows it; else say why not."""
    try:
        mountinfo = mountinfo if mountinfo is not None else _read(Path("/proc/self/mountinfo"))
        proc_cgroup = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup"))
    except OSError as exc:
        return Containment("session", f"cannot read /proc: {exc.strerror}")
    found = locate(mountinfo, proc_cgroup)
    if isinstance(found, str):
        return Containment("session", found)
    directory, path = found
    _remove_stale(directory, path)
    parent = directory / f"{PARENT_PREFIX}{os.getpid()}-{next(_SET_UPS)}"
    try:
        parent.mkdir()
    except OSError as exc:
        return Containment(
            "session",
            f"cannot create a cgroup in {directory} ({exc.strerror}): serve needs root or "
            "systemd Delegate=yes",
        )
    has_kill = (parent / "cgroup.kill").exists()
    if not has_kill and not (parent / "cgroup.freeze").exists():
        with contextlib.suppress(OSError):
            parent.rmdir()
        return Containment("session", "the kernel has neither cgroup.kill nor cgroup.freeze")
    try:
        offered = set(_read(parent / "cgroup.controllers").split())
    except OSError:
        offered = set()
    enabled = set()
    for controller in PEAK_CONTROLLERS:
        if controller in offered:
            try:
                _write(parent / "cgroup.subtree_control", f"+{controller}")
                enabled.add(controller)
            except OSError as exc:
                log.info("cgroup %s: cannot enable %s: %s", parent, controller, exc.strerror)
    peaks = ", ".join(sorted(enabled)) or "none, no memory or pids controller in this hierarchy"
    return Containment(
        "cgroup",
        f"a cgroup per command under {parent} (killed as a whole; peaks: {peaks})",
        parent=parent,
        parent_path=f"{path.rstrip('/')}/{parent.name}",
        controllers=frozenset(enabled),
        has_kill=has_kill,
    )


def tear_down(containment: Containment) -> None:
    """Remove the parent cgroup. Commands' cgroups are removed as they finish; one still
    there belongs to a command that outran the shutdown grace, which serve has reported
    "outcome unknown": it is killed, so nothing a command started outlives serve."""
    if containment.parent is None or containment.parent_path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        _remove_children(containment.parent, containment.parent_path, "this serve")
    try:
        containment.parent.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove cgroup %s: %s", containment.parent, exc.strerror)


def record(home: Path, containment: Containment) -> None:
    """Write the mode in force to ``home/containment.json`` for ``mailsh status``."""
    doc = {
        "mode": containment.mode,
        "detail": containment.detail,
        "pid": os.getpid(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        atomic_write(
            home / RECORD_NAME, (json.dumps(doc) + "\n").encode(), prefix=f".{RECORD_NAME}."
        )
    except OSError as exc:
        log.warning("cannot record the containment mode in %s: %s", home, exc.strerror)


def recorded(home: Path) -> str:
    """The containment line for ``mailsh status``: what the last serve started with."""
    try:
        doc = json.loads((home / RECORD_NAME).read_text(encoding="utf-8"))
        return f"{doc['mode']}: {doc['detail']} (serve pid {doc['pid']}, since {doc['since']})"
    except FileNotFoundError:
        return "unknown: no serve has started with this home yet"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unknown: cannot read {home / RECORD_NAME}: {exc}"


class CommandCgroup:
    """The cgroup of one command (``path``; ``proc_path`` as /proc/PID/cgroup shows it)."""

    def __init__(self, path: Path, proc_path: str, *, has_kill: bool) -> None:
        self.path = path
        self.proc_path = proc_path
        self.has_kill = has_kill

    @classmethod
    def create(cls, containment: Containment, *, max_processes: int | None) -> CommandCgroup:
        """A new, empty ``containment.parent/cmd-N`` (``pids.max`` set where possible)."""
        if containment.parent is None or containment.parent_path is None:
            raise ValueError("a session-mode containment has no cgroups")
        name = containment.next_name()
        group = cls(
            containment.parent / name,
            f"{containment.parent_path}/{name}",
            has_kill=containment.has_kill,
        )
        group.path.mkdir()
        if max_processes is not None and "pids" in containment.controllers:
            try:
                _write(group.path / "pids.max", str(max_processes))
            except OSError as exc:
                log.warning("cgroup %s: cannot set pids.max: %s", group.path, exc.strerror)
        return group

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def populated(self) -> bool:
        """Whether a live process is left (zombies do not count)."""
        try:
            events = _read(self.path / "cgroup.events")
        except FileNotFoundError:
            return False
        return "populated 1" in events

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(self.path / "cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process in the cgroup, through a pidfd after checking
        the process is still a member (a pid read from cgroup.procs may be reused)."""
        for pid in self.pids():
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if own_cgroup(_read(Path(f"/proc/{pid}/cgroup"))) == self.proc_path:
                    signal.pidfd_send_signal(pidfd, sig)
            except OSError:
                pass
            finally:
                os.close(pidfd)

    def kill(self) -> bool:
        """SIGKILL everything in the cgroup, forks racing the kill included; return
        whether it is empty afterwards."""
        for _ in range(KILL_ROUNDS):
            if not self.populated():
                return True
            try:
                if self.has_kill:
                    _write(self.path / "cgroup.kill", "1")
                else:  # Linux < 5.14: freeze (no more forks), kill each, thaw
                    _write(self.path / "cgroup.freeze", "1")
                    self.signal(signal.SIGKILL)
                    _write(self.path / "cgroup.freeze", "0")
            except OSError as exc:  # still kill each one we can see
                log.warning("cgroup %s: %s; killing its processes one by one", self.path, exc)
                self.signal(signal.SIGKILL)
            time.sleep(KILL_PAUSE)
        return not self.populated()

    def peaks(self) -> tuple[int | None, int | None]:
        """(``memory.peak`` bytes, ``pids.peak``) where the kernel keeps them."""
        values: list[int | None] = []
        for name in ("memory.peak", "pids.peak"):
            try:
                values.append(int(_read(self.path / name).split()[0]))
            except (OSError, ValueError, IndexError):
                values.append(None)
        return values[0], values[1]

    def remove(self) -> None:
        """Kill what is left and remove the cgroup."""
        try:
            if self.populated():
                self.kill()
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", self.path, exc.strerror)
