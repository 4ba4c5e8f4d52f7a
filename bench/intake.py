"""1c. Intake scaling: how long a running serve takes to pick up one new message.

For each size N, the mailbox starts with N copies of one junk message (not a request,
so serve discards it without gpg; copies are cheap to make). A long-running ``serve``
drains them (timed: the drain figure, with serve's peak RSS), then a new message is
appended ``probes`` times and the time until serve took it is measured:

* mbox: until the mbox is emptied again (serve copied it to its spool and truncated);
* Maildir: until the file left ``new/`` (moved to ``cur/``, where the N stay).

The ratio to the smallest N shows whether intake cost grows with what the mailbox (and
serve's own history of N processed messages) holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.context import Ctx
from bench.core import RssSampler, Section, median, wait_until
from bench.world import (
    JUNK,
    SERVER,
    Serve,
    Sink,
    fill_maildir,
    fill_mbox,
    maildir_deliver,
    mbox_entry,
    spool_count,
)

PROBE_TIMEOUT = 60.0


def _drained(home: Path, total: int, serve: Serve) -> bool:
    serve.check_alive()
    return spool_count(home, "new") == 0 and spool_count(home, "done") >= total


def _done(home: Path, total: int, serve: Serve) -> Callable[[], bool]:
    return lambda: _drained(home, total, serve)


def _gone(path: Path) -> Callable[[], bool]:
    return lambda: not path.exists()


def measure(ctx: Ctx, kind: str, size: int) -> tuple[float, float, list[float]]:
    """(drain seconds, drain peak RSS bytes, pick-up seconds per probe)."""
    _, server = ctx.pair("ed25519")
    home = ctx.server_copy(server, f"intake-{kind}-{size}")
    box = home.parent / kind
    if kind == "mbox":
        fill_mbox(box, JUNK, size)
        source = ["--mbox", str(box)]
    else:
        fill_maildir(box, JUNK, size)
        source = ["--maildir", str(box)]
    entry = mbox_entry(JUNK)
    pickups: list[float] = []
    with Sink() as sink:
        serve = Serve(home, [*source, "--smtp", sink.url, "--address", SERVER])
        started = time.monotonic()
        with serve, RssSampler(serve.pid, interval=0.05) as sampler:
            timeout = 120 + size * 0.05
            wait_until(_done(home, size, serve), timeout, interval=0.02)
            drain = time.monotonic() - started
            drain_peak = sampler.peak
            for i in range(ctx.sizes.intake_probes):
                if kind == "mbox":
                    with box.open("ab") as fh:
                        t0 = time.monotonic()
                        fh.write(entry)
                    done = wait_until(lambda: box.stat().st_size == 0, PROBE_TIMEOUT)
                else:
                    t0 = time.monotonic()
                    path = maildir_deliver(box, JUNK, f"probe{i}")
                    done = wait_until(_gone(path), PROBE_TIMEOUT)
                pickups.append(done - t0)
                # let serve finish processing it before the next probe
                wait_until(_done(home, size + i + 1, serve), PROBE_TIMEOUT)
                time.sleep(0.05)
    return drain, float(drain_peak), pickups


def run(ctx: Ctx) -> Section:
    sec = Section("intake", "1c. Intake scaling: pick-up of one new message, by mailbox size")
    sizes = ctx.sizes.intake_sizes
    drain_peaks: dict[str, float] = {}
    for kind in ("mbox", "maildir"):
        base = None
        for size in sizes:
            ctx.say(f"intake: {kind} of {size:,} messages")
            drain, peak, pickups = measure(ctx, kind, size)
            pick = median(pickups)
            sec.add(f"{kind} {size:,}: pick-up", pick * 1000, "ms", n=len(pickups))
            if base is None:
                base = pick
            else:
                ratio = pick / base
                sec.add(
                    f"{kind} {size:,}: ratio to {sizes[0]:,}",
                    ratio,
                    "x",
                    target="<= 1.2" if size == sizes[-1] else "",
                    met=ratio <= 1.2 if size == sizes[-1] else None,
                )
            sec.add(
                f"{kind} {size:,}: initial drain",
                size / drain,
                "msg/s",
                note=f"{drain:.1f} s, peak RSS {peak / 1e6:.0f} MB",
            )
            drain_peaks[f"{kind} {size}"] = peak
    sec.extra["drain_peak_rss"] = drain_peaks
    if os.environ.get("MAILSH_BENCH_INTAKE_SIZES") is None and ctx.sizes.name == "full":
        sec.note(
            "the largest size is scaled down from the issue's 100,000: draining costs "
            "~9 ms per message here, so 100,000 would take ~15 minutes per mailbox kind "
            "(set MAILSH_BENCH_INTAKE_SIZES=10,10000,100000 to run it)"
        )
    return sec
