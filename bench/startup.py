"""1e. Start-up: mailsh commands that do no mail work, against ``python -c pass``.

The commands run round-robin (one of each, then again), so load drifts hit all alike.
``-X importtime`` of the client's imports names what the start-up pays for.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from bench.context import Ctx
from bench.core import Section, median
from bench.world import mailsh_argv

#: Modules whose cumulative import time the report shows (the usual suspects).
WATCHED = (
    "mailsh.cli",
    "mailsh.settings",
    "pydantic_settings",
    "pydantic",
    "typer",
    "rich",
    "gnupg",
    "mailsh.client.send",
    "mailsh.client.wait",
)


def importtime(statement: str) -> dict[str, float]:
    """Cumulative import time (ms) per top-level module name, from ``-X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
    )
    out: dict[str, float] = {}
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            out.setdefault(m.group(3), int(m.group(1)) / 1000)
    return out


def run(ctx: Ctx) -> Section:
    sec = Section("startup", "1e. Start-up: commands that send no mail")
    client, _ = ctx.pair("ed25519")
    mailsh = mailsh_argv()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "mailsh --help": [*mailsh, "--help"],
        "mailsh send --help": [*mailsh, "send", "--help"],
        "mailsh trust list": [*mailsh, "--home", str(client.path), "trust", "list"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    ctx.say(f"start-up: {ctx.sizes.startup_runs} runs of each command")
    for argv in commands.values():  # warm-up
        subprocess.run(argv, capture_output=True, check=True)
    for _ in range(ctx.sizes.startup_runs):
        for name, argv in commands.items():
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    base = median(times["python -c pass"])
    n = ctx.sizes.startup_runs
    for name, values in times.items():
        ms = median(values) * 1000
        if name == "python -c pass":
            sec.add(name, ms, "ms", n=n)
            continue
        above = ms - base * 1000
        sec.add(name, ms, "ms", n=n)
        sec.add(
            f"{name}: above python -c pass",
            above,
            "ms",
            n=n,
            target="<= 100" if name == "mailsh --help" else "",
            met=above <= 100 if name == "mailsh --help" else None,
        )
    imports = importtime(
        "import mailsh.cli, mailsh.settings, mailsh.client.send, mailsh.client.wait, gnupg"
    )
    for mod in WATCHED:
        if mod in imports:
            sec.add(f"import {mod} (cumulative, -X importtime)", imports[mod], "ms")
    sec.note("import times are one -X importtime run of the client's imports, in import order")
    return sec
