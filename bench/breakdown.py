"""1f. Break-down: where one ``mailsh send --wait`` round trip spends its time.

Timestamps on one wall clock, per round trip (median over several):

* bench starts the client process .................. t0
* the request is durable in serve's spool .......... the spool file name (ns)
* serve starts the command ("executing" log line) .. JSON log (ms)
* serve queued the sealed reply ("executed") ....... JSON log (ms)
* the reply reached the client's mail server ....... the sink (time.time())
* the client process exited ........................ bench

Each segment is split further by in-process measurements of the known steps (imports,
seal, verify, ...); what is left is named as the residual of that segment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.context import Ctx
from bench.core import Section, median
from bench.roundtrip import COMMAND, send_argv
from bench.world import (
    CLIENTS_POLLED,
    SERVER,
    Home,
    Serve,
    Sink,
    free_port,
    open_request,
    polled,
    sealed_request,
)
from mailsh import protocol
from mailsh.keys.crypto import seal as pgp_seal
from mailsh.keys.crypto import verify
from mailsh.keys.trust import load_trust
from mailsh.mail.message import read_mail

CLIENT_IMPORTS = "import mailsh.cli, mailsh.settings, mailsh.client.send, mailsh.client.wait"


def _log_times(log: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or "time" not in doc:
            continue
        when = datetime.fromisoformat(doc["time"]).timestamp()
        msg = str(doc.get("message", ""))
        key = "sent" if msg.startswith("reply ") and " sent to " in msg else doc.get("event")
        if isinstance(key, str):
            out.setdefault(key, []).append(when)
        if doc.get("event") == "executed" and isinstance(doc.get("seconds"), float | int):
            out.setdefault("run seconds", []).append(float(doc["seconds"]))
    return out


def _spooled_at(home: Path) -> list[float]:
    names = sorted(p.name for p in (home / "spool" / "done").iterdir())
    return [int(n.split(".", 1)[0]) / 1e9 for n in names]


def _proc_ms(argv: list[str], runs: int) -> float:
    values = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        values.append(time.perf_counter() - t0)
    return median(values) * 1000


def _steps(ctx: Ctx, client: Home, server: Home, reply_mail: bytes) -> dict[str, float]:
    """Median ms of the known steps, each in this (warm) process."""
    runs = max(3, ctx.sizes.breakdown_runs)
    trust_s = load_trust(server.settings.trust_file)
    trust_c = load_trust(client.settings.trust_file)
    out: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        out.setdefault(name, []).append(time.perf_counter() - t0)
        return result

    for _ in range(runs):
        sealed = timed("seal request (client)", lambda: sealed_request(client, server, COMMAND))
        timed(
            "decrypt+verify request (server)",
            lambda s=sealed: open_request(server, trust_s, s.mail),
        )
        timed(
            "spawn bash -c (server)",
            lambda: subprocess.run(["bash", "-c", COMMAND], capture_output=True, check=True),
        )
        timed(
            "seal reply (server)",
            lambda: pgp_seal(
                server.gpg, b"x" * 600, signer=server.fingerprint, recipient=client.fingerprint
            ),
        )
        armored = protocol.extract_armor(read_mail(reply_mail, max_bytes=10 << 20).body)
        timed(
            "decrypt+verify reply (client)",
            lambda a=armored: verify(
                client.gpg,
                a,
                is_pinned=trust_c.is_pinned,
                now=datetime.now(UTC),
                max_age=timedelta(days=1),
                max_skew=timedelta(seconds=client.settings.reply_clock_skew),
            ),
        )
    steps = {k: median(v) * 1000 for k, v in out.items()}
    base = _proc_ms([sys.executable, "-c", "pass"], runs)
    steps["client imports (above python -c pass)"] = (
        _proc_ms([sys.executable, "-c", CLIENT_IMPORTS], runs) - base
    )
    steps["python interpreter start"] = base
    return steps


def run(ctx: Ctx) -> Section:
    sec = Section("breakdown", "1f. Break-down of one round trip (ed25519)")
    client, server = ctx.pair("ed25519")
    home = ctx.server_copy(server, "breakdown")
    maildir = home.parent / "client-Maildir"
    port = free_port()
    segs: dict[str, list[float]] = {}
    runs = ctx.sizes.breakdown_runs
    with Sink(maildir) as sink:
        args = ["--smtp-listen", f"127.0.0.1:{port}", "--smtp", sink.url, "--address", SERVER]
        with Serve(home, [*args, "--log-format", "json"]) as serve:
            serve.wait_listening(port)
            argv = send_argv(client.path, port, maildir)
            ctx.say(f"break-down: {runs} instrumented round trips")
            subprocess.run(argv, capture_output=True, check=True)  # warm-up
            for i in range(runs):
                t0 = time.time()
                done = subprocess.run(argv, capture_output=True, check=True)
                t_end = time.time()
                if polled(done.stderr):
                    CLIENTS_POLLED.append(argv[0])
                k = i + 1  # the warm-up was message 0
                wait_deadline = time.monotonic() + 5
                while time.monotonic() < wait_deadline:
                    logs = _log_times(serve.log)
                    if len(logs.get("sent", [])) > k and len(_spooled_at(home)) > k:
                        break
                    time.sleep(0.01)
                spooled = _spooled_at(home)
                points: list[tuple[str, float | str, float | str]] = [
                    ("client: start-up, seal, submit (until spooled)", t0, spooled[k]),
                    ("server: wake, verify, claim (until executing)", spooled[k], "executing"),
                    ("server: run, seal reply, queue (until executed)", "executing", "executed"),
                    (
                        "server: outbound wake, SMTP submit (until delivered)",
                        "executed",
                        sink.arrivals[k],
                    ),
                    ("client: wake, decrypt+verify, print, exit", sink.arrivals[k], t_end),
                ]
                for name, a, b in points:
                    ta = a if isinstance(a, float) else logs[a][k]
                    tb = b if isinstance(b, float) else logs[b][k]
                    segs.setdefault(name, []).append(tb - ta)
                segs.setdefault("total", []).append(t_end - t0)
                segs.setdefault("of which the command ran (serve's own clock)", []).append(
                    logs["run seconds"][k]
                )
            serve.check_alive()
    reply_mail = sorted((maildir / "new").iterdir())[-1].read_bytes()
    ctx.say("break-down: timing the known steps in-process")
    steps = _steps(ctx, client, server, reply_mail)
    for name, values in segs.items():
        sec.add(name, median(values) * 1000, "ms", n=len(values))
    for name, ms in steps.items():
        sec.add(f"step: {name}", ms, "ms", n=max(3, runs))
    sec.note(
        "server log times have millisecond resolution; segments are medians of each "
        "segment separately, so they need not add up to the median total"
    )
    return sec
