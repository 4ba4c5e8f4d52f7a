"""The harness itself: sizes, medians, figures, the report, and process-tree RSS."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailsh.keys.identity import Algo

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1_000_000


@dataclass(frozen=True)
class Sizes:
    """How big each case is. ``full`` is what docs/performance.md reports."""

    name: str
    algos: tuple[Algo, ...]  # key types of the round trip
    roundtrip_pairs: int  # A/B pairs (mailsh, ssh) per key type
    throughput_requests: int  # requests queued in the mbox for serve --once
    throughput_repeats: int  # runs per worker count
    floor_requests: int  # iterations of the in-process floor loop
    intake_sizes: tuple[int, ...]  # mailbox sizes; the first is the baseline
    intake_probes: int  # new messages appended (and timed) per size
    stdout_bytes: int  # what the memory case's command writes to stdout
    bomb_bytes: int  # uncompressed size of the compression bomb
    startup_runs: int  # runs per start-up command
    breakdown_runs: int  # instrumented round trips


BOTH: tuple[Algo, ...] = ("ed25519", "rsa3072")
SIZES = {
    # full: the sizes, except intake (see docs/performance.md "Budget")
    "full": Sizes("full", BOTH, 15, 500, 1, 100, (10, 1_000, 10_000), 7, 10**9, 10**9, 15, 5),
    "quick": Sizes("quick", BOTH, 5, 100, 1, 30, (10, 100, 1_000), 5, 10**8, 10**8, 7, 3),
    # the smoke test's size: every section runs, each in a few seconds
    "tiny": Sizes("tiny", ("ed25519",), 1, 3, 1, 2, (1, 5), 1, 10**6, 10**6, 1, 1),
}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class Figure:
    """One line of the table: a median (or a single measurement, ``n`` = 1)."""

    name: str
    value: float
    unit: str
    n: int = 1
    note: str = ""
    target: str = ""
    met: bool | None = None


@dataclass
class Section:
    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float, unit: str, **kw: Any) -> Figure:
        fig = Figure(name, float(value), unit, **kw)
        self.figures.append(fig)
        return fig

    def note(self, text: str) -> None:
        self.notes.append(text)


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpg = subprocess.run(["gpg", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),  # at the end of the run
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "gnupg": gpg.stdout.splitlines()[0] if gpg.stdout else "",
        "hostname": os.uname().nodename,
    }


def render(sections: Sequence[Section]) -> str:
    """The human table: one block per section."""
    out: list[str] = []
    for sec in sections:
        out.append(f"\n== {sec.title}")
        width = max((len(f.name) for f in sec.figures), default=10)
        for f in sec.figures:
            value = f"{f.value:,.1f}" if abs(f.value) >= 100 else f"{f.value:.3g}"
            line = f"  {f.name:<{width}}  {value:>10} {f.unit:<6}"
            if f.n > 1:
                line += f" (median of {f.n})"
            if f.target:
                verdict = {True: "met", False: "NOT met", None: ""}[f.met]
                line += f"  target {f.target} {verdict}".rstrip()
            if f.note:
                line += f"  [{f.note}]"
            out.append(line)
        out.extend(f"  note: {n}" for n in sec.notes)
    return "\n".join(out)


def as_json(
    sections: Sequence[Section], *, size: str, started: float, load_at_start: Sequence[float]
) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "size": size,
        "machine": {**machine(), "load_average_at_start": list(load_at_start)},
        "sections": {
            s.key: {
                "title": s.title,
                "figures": [asdict(f) for f in s.figures],
                "notes": s.notes,
                **s.extra,
            }
            for s in sections
        },
    }


# -- process-tree memory ------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, now."""
    tree = _children()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class RssSampler:
    """Samples the RSS of a process tree every ``interval`` seconds; keeps the peak.

    Sampling can miss a peak shorter than the interval, so callers also look at the
    kernel's own high-water mark of the root process (``ru_maxrss`` of the child).
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.001) -> float:
    """Poll ``cond`` until true; return when it became true (monotonic). Raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f}s")
        time.sleep(interval)
