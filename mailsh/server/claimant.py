"""Who holds a claim: a name for this process, and whether a named process is gone.

A claim (the replay record of a request, :mod:`mailsh.server.state`) names the serve
process that took it as ``host:pid:start``, where ``start`` is the process's start time
in clock ticks since boot (field 22 of ``/proc/PID/stat``). The start time makes the name
unique across pid reuse: a pid that now belongs to another process (even another mailsh)
does not keep a dead process's claim alive. Claims written by older versions are
``host:pid``; for those a live pid counts only if its command line mentions mailsh.

Only a claim whose process is gone may be settled by someone else ("outcome unknown",
docs/protocol.md section 9): a live process's claim is never answered by another.

:func:`pid_exists` is the plain check, for names that hold only a pid (serve's cgroups,
dotlocks): whether a pid is in use at all, whoever runs it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _start_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def this_process() -> str:
    """``host:pid:start`` of the calling process."""
    pid = os.getpid()
    start = _start_ticks(pid)
    return f"{socket.gethostname()}:{pid}:{start if start is not None else 0}"


def _parse(claimed_by: str) -> tuple[str, int, int | None] | None:
    """(host, pid, start ticks or None for the older ``host:pid`` form)."""
    host, _, rest = claimed_by.partition(":")
    pid_text, _, start_text = rest.partition(":")
    if not pid_text.isdigit() or (start_text and not start_text.isdigit()):
        return None
    start = int(start_text) if start_text and start_text != "0" else None
    return host, int(pid_text), start


def is_gone(claimed_by: str) -> bool:
    """True when the process named ``claimed_by`` no longer runs on this host.

    A claim made on another host (a home on shared storage, which mailsh does not
    support) counts as gone: nobody else would ever settle it. The calling process is
    not gone; the caller decides what its own claims mean.
    """
    parsed = _parse(claimed_by)
    if parsed is None or parsed[0] != socket.gethostname():
        return True
    _, pid, start = parsed
    if pid == os.getpid():
        return False
    now_start = _start_ticks(pid)
    if now_start is None or (start is not None and now_start != start):
        return True  # no such process, or the pid now belongs to a newer process
    if start is not None:
        return False
    try:  # the older form: a live pid holds the claim only if it is a mailsh process
        return b"mailsh" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def is_me(claimed_by: str) -> bool:
    """True when ``claimed_by`` names the calling process."""
    return claimed_by == this_process() or claimed_by == f"{socket.gethostname()}:{os.getpid()}"


def pid_exists(pid: int) -> bool:
    """True while some process on this host has ``pid`` (it may be owned by another user,
    or be another program that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True
