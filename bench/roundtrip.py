"""1a. Round trip: ``mailsh send --wait 'uname -a'`` against ``ssh host 'uname -a'``.

Both run as fresh processes from the bench, paired and alternated (A/B, B/A, ...) so
that load on the shared machine hits both sides alike. The ratio is the median of the
per-pair ratios.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.context import Ctx
from bench.core import Section, median
from bench.sshd import ThrowawaySshd, unavailable_reason
from bench.world import CLIENTS_POLLED, SERVER, Serve, Sink, free_port, mailsh_argv, polled

COMMAND = "uname -a"


def timed(argv: list[str], expect: bytes) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    elapsed = time.perf_counter() - started
    if polled(done.stderr):
        CLIENTS_POLLED.append(argv[0])
    if done.returncode != 0 or done.stdout != expect:
        raise RuntimeError(
            f"{argv[0]} exited {done.returncode} with {done.stdout[:200]!r}, expected {expect!r}:"
            f" {done.stderr.decode(errors='replace')[-500:]}"
        )
    return elapsed


def send_argv(client_home: Path, server_port: int, maildir: Path) -> list[str]:
    return [
        *mailsh_argv(),
        "--home",
        str(client_home),
        "send",
        COMMAND,
        "--to",
        SERVER,
        "--smtp",
        f"smtp://127.0.0.1:{server_port}",
        "--maildir",
        str(maildir),
        "--wait",
        "--wait-timeout",
        "60",
    ]


def run(ctx: Ctx) -> Section:
    sec = Section("roundtrip", "1a. Round trip: mailsh send --wait vs a fresh ssh connection")
    expect = subprocess.run(["bash", "-c", COMMAND], capture_output=True, check=True).stdout
    reason = unavailable_reason()
    sshd = None
    if reason is None:
        ctx.say("starting a throwaway sshd on 127.0.0.1")
        sshd = ThrowawaySshd(ctx.scratch("sshd")).start()
    else:
        sec.note(f"ssh baseline unavailable: {reason}")
    try:
        for algo in ctx.sizes.algos:
            client, server = ctx.pair(algo)
            home = ctx.server_copy(server, f"roundtrip-{algo}")
            maildir = home.parent / "client-Maildir"
            port = free_port()
            args = ["--smtp-listen", f"127.0.0.1:{port}", "--smtp", "", "--address", SERVER]
            with Sink(maildir) as sink:
                args[3] = sink.url
                with Serve(home, args) as serve:
                    serve.wait_listening(port)
                    argv = send_argv(client.path, port, maildir)
                    ctx.say(f"round trips with {algo} keys ({ctx.sizes.roundtrip_pairs} pairs)")
                    timed(argv, expect)  # warm-up: page cache, gpg-agents
                    if sshd is not None:
                        timed(sshd.argv(COMMAND), expect)
                    ms, ss, ratios = [], [], []
                    for i in range(ctx.sizes.roundtrip_pairs):
                        if sshd is None:
                            ms.append(timed(argv, expect))
                            continue
                        if i % 2:
                            s = timed(sshd.argv(COMMAND), expect)
                            m = timed(argv, expect)
                        else:
                            m = timed(argv, expect)
                            s = timed(sshd.argv(COMMAND), expect)
                        ms.append(m)
                        ss.append(s)
                        ratios.append(m / s)
                    serve.check_alive()
            n = len(ms)
            sec.add(f"mailsh send --wait ({algo})", median(ms) * 1000, "ms", n=n)
            if sshd is not None:
                sec.add(f"ssh, paired with {algo} runs", median(ss) * 1000, "ms", n=n)
                r = median(ratios)
                sec.add(
                    f"ratio mailsh/ssh ({algo})",
                    r,
                    "x",
                    n=n,
                    target="<= 0.8 (milestone <= 1.0)",
                    met=r <= 0.8,
                )
                sec.extra.setdefault("samples", {})[algo] = {"mailsh_s": ms, "ssh_s": ss}
    finally:
        if sshd is not None:
            sshd.stop()
    return sec
