"""1b. Server throughput: N requests queued in an mbox, ``serve --once``, and its floor.

The same sealed requests are replayed into a fresh copy of the server home for each run
(the replay record lives in the state database, which the copy does not have). The
floor is the work no server can skip, measured in this process in the same run:
decrypt+verify each request, sign+encrypt a reply of the same size, spawn
``bash -c COMMAND``, one request after the other.
"""

from __future__ import annotations

import json
import subprocess
import time

from bench.context import Ctx
from bench.core import Section, median
from bench.world import SERVER, Home, Sink, open_request, run_once, sealed_request, write_mbox
from mailsh.keys.crypto import seal as pgp_seal
from mailsh.keys.trust import load_trust

COMMAND = "uname -a"


def floor(
    ctx: Ctx, client: Home, server: Home, mails: list[bytes]
) -> tuple[float, dict[str, list[float]]]:
    """Requests/s of the unavoidable work, one request after the other, and its parts."""
    sizes = ctx.sizes
    ctx.say(f"floor: {sizes.floor_requests} x (decrypt+verify, sign+encrypt, spawn)")
    trust = load_trust(server.settings.trust_file)
    output = subprocess.run(["bash", "-c", COMMAND], capture_output=True, check=True).stdout
    reply_like = json.dumps({"v": 1, "stdout": output.hex(), "pad": "x" * 300}).encode()
    parts: dict[str, list[float]] = {"decrypt+verify": [], "sign+encrypt": [], "spawn": []}
    loop_started = time.perf_counter()
    for i in range(sizes.floor_requests):
        t0 = time.perf_counter()
        open_request(server, trust, mails[i % len(mails)])
        t1 = time.perf_counter()
        pgp_seal(server.gpg, reply_like, signer=server.fingerprint, recipient=client.fingerprint)
        t2 = time.perf_counter()
        subprocess.run(["bash", "-c", COMMAND], capture_output=True, check=True)
        t3 = time.perf_counter()
        parts["decrypt+verify"].append(t1 - t0)
        parts["sign+encrypt"].append(t2 - t1)
        parts["spawn"].append(t3 - t2)
    floor_rate = sizes.floor_requests / (time.perf_counter() - loop_started)

    return floor_rate, parts


def run(ctx: Ctx) -> Section:
    sec = Section("throughput", "1b. Server throughput: serve --once on a queued mbox")
    sizes = ctx.sizes
    client, server = ctx.pair("ed25519")
    n = sizes.throughput_requests
    ctx.say(f"sealing {n} requests")
    sealed = [sealed_request(client, server, COMMAND) for _ in range(n)]
    mails = [s.mail for s in sealed]

    floor_rate, parts = floor(ctx, client, server, mails)

    # -- serve --once ------------------------------------------------------------------------
    rates: dict[int, list[float]] = {1: [], 2: []}
    fixed: list[float] = []
    rss: list[int] = []
    with Sink() as sink:
        base = ["--smtp", sink.url, "--address", SERVER]
        for rep in range(max(1, sizes.throughput_repeats)):
            home = ctx.server_copy(server, f"throughput-empty-{rep}")
            (home.parent / "mbox").touch()
            t, _, _ = run_once(home, ["--mbox", str(home.parent / "mbox"), *base])
            fixed.append(t)
        for workers in (1, 2):
            for rep in range(sizes.throughput_repeats):
                home = ctx.server_copy(server, f"throughput-w{workers}-{rep}")
                mbox = home.parent / "mbox"
                write_mbox(mbox, mails)
                ctx.say(f"serve --once --workers {workers}: {n} requests (run {rep + 1})")
                before = sink.count
                t, peak, _ = run_once(home, ["--mbox", str(mbox), "--workers", str(workers), *base])
                answered = sink.count - before
                if answered != n:
                    raise RuntimeError(f"serve --once answered {answered} of {n} requests")
                rates[workers].append(n / t)
                rss.append(peak)
    r1, r2 = median(rates[1]), median(rates[2])
    runs = sizes.throughput_repeats
    sec.add("serve --once, 1 worker", r1, "req/s", n=runs, note=f"{n} requests")
    sec.add("serve --once, 2 workers", r2, "req/s", n=runs, note=f"{n} requests")
    sec.add("floor (same work, tight loop)", floor_rate, "req/s", note="1 worker's ceiling")
    sec.add("1 worker / floor", r1 / floor_rate, "x", target=">= 0.8", met=r1 / floor_rate >= 0.8)
    sec.add("2 workers / 1 worker", r2 / r1, "x", target=">= 1.6", met=r2 / r1 >= 1.6)
    sec.add("server time per request, 1 worker", 1000 / r1, "ms")
    for name, values in parts.items():
        sec.add(f"floor: {name}", median(values) * 1000, "ms", n=len(values))
    sec.add("serve --once start+stop, no mail", median(fixed) * 1000, "ms", n=len(fixed))
    sec.add("peak RSS of serve itself", max(rss) / 1e6, "MB", note="kernel high-water mark")
    sec.note(
        "rates include serve's start-up and shutdown (the 'start+stop' line); "
        "the floor runs in one already-started process"
    )
    return sec
