"""Command line of the benchmark: ``./dev bench [--quick | --size S] [--json PATH]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from bench import breakdown, intake, memory, roundtrip, startup, throughput, world
from bench.context import Ctx
from bench.core import SIZES, Section, as_json, render

SECTIONS = ("roundtrip", "throughput", "intake", "memory", "startup", "breakdown")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./dev bench",
        description="Race mailsh against ssh and measure throughput, intake scaling, "
        "memory, start-up and a round trip's break-down (docs/performance.md).",
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=os.environ.get("MAILSH_BENCH_SIZE", "full"),
        help="full (what docs/performance.md reports, ~10 min on 2 cores), quick (~2 min), "
        "tiny (the smoke test's; seconds) [env MAILSH_BENCH_SIZE, default full]",
    )
    p.add_argument(
        "--quick", action="store_const", dest="size", const="quick", help="same as --size quick"
    )
    p.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable); default: all",
    )
    p.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the JSON goes [{DEFAULT_JSON}]"
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    sizes = SIZES[args.size]
    if env := os.environ.get("MAILSH_BENCH_INTAKE_SIZES"):
        sizes = dataclasses.replace(sizes, intake_sizes=tuple(int(x) for x in env.split(",")))
    wanted = args.only or list(SECTIONS)
    ctx = Ctx(sizes=sizes, keep=args.keep, verbose=not args.quiet)
    started = time.time()
    load_at_start = os.getloadavg()
    done: list[Section] = []
    drain_peaks: dict[str, float] = {}
    steps: dict[str, Callable[[], Section]] = {
        "roundtrip": lambda: roundtrip.run(ctx),
        "throughput": lambda: throughput.run(ctx),
        "intake": lambda: intake.run(ctx),
        "memory": lambda: memory.run(ctx, drain_peaks),
        "startup": lambda: startup.run(ctx),
        "breakdown": lambda: breakdown.run(ctx),
    }
    ctx.say(f"mailsh bench, size {sizes.name}, scratch {ctx.root}")
    try:
        for key in SECTIONS:
            if key not in wanted:
                continue
            t0 = time.monotonic()
            serves, clients = len(world.SERVES), len(world.CLIENTS_POLLED)
            section = steps[key]()
            if any(s.polled() for s in world.SERVES[serves:]) or world.CLIENTS_POLLED[clients:]:
                section.note(
                    "WARNING: inotify was unavailable (see fs.inotify.max_user_instances), so "
                    "serve or the client polled every 2 s: wake-up and pick-up figures of "
                    "this section include polling delays"
                )
            section.extra["seconds"] = round(time.monotonic() - t0, 1)
            if key == "intake":
                drain_peaks.update(section.extra.get("drain_peak_rss", {}))
            done.append(section)
            print(render([section]), flush=True)
    finally:
        ctx.close()
    doc = as_json(done, size=sizes.name, started=started, load_at_start=load_at_start)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json} ({doc['duration_s']} s)", flush=True)
