"""Which ``mailsh serve`` processes are running on a home: one locked file per process.

While it runs, each serve process holds an exclusive ``flock`` on
``HOME/run/serve.PID.json`` (format ``mailsh.serve.v1``: pid, host, start time, mail
sources). ``mailsh status`` lists the files whose lock is held: the kernel drops the lock
when the process ends however it ends (even SIGKILL), so a leftover file is never taken
for a live server and a reused pid cannot fool the check. Leftovers are removed by the
next serve that starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RUN_DIR = "run"
SERVE_FORMAT = "mailsh.serve.v1"


@dataclass(frozen=True)
class ServeProcess:
    """A running serve process, as it described itself when it started."""

    pid: int
    host: str
    started_at: str
    sources: tuple[str, ...]


def _held(path: Path) -> bool | None:
    """True if some process holds the lock on ``path``, False if not, None if unknown."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def _files(home: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(home / RUN_DIR))
    except OSError:
        return []
    return [home / RUN_DIR / n for n in names if n.startswith("serve.") and n.endswith(".json")]


def running_servers(home: Path) -> list[ServeProcess]:
    """The serve processes running on ``home`` now (their lock is held), oldest first."""
    out: list[ServeProcess] = []
    for path in _files(home):
        if not _held(path):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != SERVE_FORMAT:
                continue
            out.append(
                ServeProcess(
                    pid=int(doc["pid"]),
                    host=str(doc["host"]),
                    started_at=str(doc["started_at"]),
                    sources=tuple(str(s) for s in doc.get("sources", ())),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # half-written by a starting serve, or not ours: not proof of life
    return sorted(out, key=lambda p: p.started_at)


@contextlib.contextmanager
def serving(home: Path, *, sources: list[str]) -> Iterator[Path]:
    """Mark this process as a running serve of ``home`` until the block ends.

    Never stops serve: if the mark cannot be written, status simply cannot show it.
    """
    directory = home / RUN_DIR
    target = directory / f"serve.{os.getpid()}.json"
    fd, tmp = -1, ""
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        for stale in _files(home):
            if _held(stale) is False:
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".serve.", dir=directory)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before the name is visible
        doc = {
            "format": SERVE_FORMAT,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sources": sources,
        }
        os.write(fd, (json.dumps(doc, sort_keys=True) + "\n").encode())
        os.replace(tmp, target)
    except OSError:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if fd >= 0:
            os.close(fd)
            fd = -1
    try:
        yield target
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                target.unlink()
            os.close(fd)
