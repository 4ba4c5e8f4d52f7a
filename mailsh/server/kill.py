"""Stopping what a command left running: SIGTERM, a grace period spent draining, SIGKILL.

Two ways to find "what is left" (docs/server.md "Execution"): the processes of the
command's session and process group, swept from ``/proc`` (:func:`stop_session`), or
everything in the command's own cgroup (:func:`stop_cgroup`). Either way the output
pipes keep being drained during the grace period, so a process that writes while it
shuts down is not blocked by us.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from mailsh.server.cgroup import KILL_PAUSE, KILL_ROUNDS, CommandCgroup
from mailsh.server.pump import TICK, Pump

log = logging.getLogger("mailsh.server.execute")  # its lines are part of running a command


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, session) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[2]), int(fields[3])


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session or process group is ``sid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        info = _proc_stat(int(entry.name))
        if info and info[0] not in ("Z", "X") and sid in (info[1], info[2]):
            members.append(int(entry.name))
    return members


def signal_session(sid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``sid`` and to every process in session ``sid``.

    Only call while the leader is unreaped: its pid cannot be reused until then, so the
    group and session ids are still ours. Members that moved to another group inside the
    session (``set -m`` job control) are signalled through a pidfd, after re-checking
    their session, so a recycled pid is never hit.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, sig)
    for pid in _session_members(sid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            info = _proc_stat(pid)
            if info and info[2] == sid:
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)


def _drain_until_gone(pump: Pump, grace: float, gone: Callable[[], bool]) -> None:
    """Drain ``pump`` for up to ``grace`` seconds or until ``gone()``, which reads /proc
    or the cgroup and so is asked at most once per :data:`~mailsh.server.pump.TICK`."""
    last = 0.0

    def checked() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < TICK:
            return False
        last = now
        return gone()

    pump.run(time.monotonic() + grace, checked)


def stop_session(pump: Pump, sid: int, grace: float) -> None:
    """TERM everything left in the session, wait up to ``grace`` while draining, then KILL."""
    if not _session_members(sid):
        return
    signal_session(sid, signal.SIGTERM)
    _drain_until_gone(pump, grace, lambda: not _session_members(sid))
    for _ in range(KILL_ROUNDS):  # a fork racing one sweep is caught by the next
        if not _session_members(sid):
            return
        signal_session(sid, signal.SIGKILL)
        time.sleep(KILL_PAUSE)
    log.warning("processes of session %d survived SIGKILL", sid)


def stop_cgroup(pump: Pump, cgroup: CommandCgroup, grace: float) -> None:
    """TERM everything left in the cgroup, wait up to ``grace`` while draining, then KILL
    the whole cgroup (``cgroup.kill``: forks racing the kill are caught too)."""
    if not cgroup.populated():
        return
    cgroup.signal(signal.SIGTERM)
    _drain_until_gone(pump, grace, lambda: not cgroup.populated())
    if not cgroup.kill():
        log.warning("processes of cgroup %s survived SIGKILL", cgroup.path)
