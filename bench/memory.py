"""1d. Memory: peak RSS of serve's process tree in the three cases that could blow it up.

* a command that writes a lot to stdout (serve keeps only ``max_output_bytes``);
* draining a large mbox (taken from the intake section's largest mbox);
* a compression bomb: a small, validly signed and encrypted request whose compressed
  payload expands to ``bomb_bytes`` (gpg's ``--max-output`` must stop it).

The peak is the larger of the sampled process-tree RSS (serve, gpg, the command) and
the kernel's high-water mark of serve itself.
"""

from __future__ import annotations

import os
import subprocess
import threading
import uuid

from bench.context import Ctx
from bench.core import RssSampler, Section
from bench.world import SERVER, Home, Serve, Sink, sealed_request, write_mbox
from mailsh import protocol
from mailsh.mail.message import build_request_mail

LIMIT_MB = 100.0


def bomb_mail(client: Home, server: Home, size: int) -> bytes:
    """A request mail whose signed+encrypted payload is ``size`` zero bytes, compressed."""
    gpg = subprocess.Popen(
        [
            "gpg",
            "--homedir",
            str(client.settings.gnupg_home),
            "--batch",
            "--no-options",
            "--trust-model",
            "always",
            "--armor",
            "--compress-algo",
            "zlib",
            "-z",
            "9",
            "--local-user",
            client.fingerprint,
            "--recipient",
            server.fingerprint,
            "--sign",
            "--encrypt",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert gpg.stdin is not None  # noqa: S101
    assert gpg.stdout is not None  # noqa: S101
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(gpg.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    block = b"\0" * (1 << 20)
    left = size
    while left > 0:
        gpg.stdin.write(block[: min(left, len(block))])
        left -= len(block)
    gpg.stdin.close()
    reader.join()
    if gpg.wait() != 0:
        raise RuntimeError("gpg could not build the compression bomb")
    request_id = uuid.uuid4().hex
    mail, _ = build_request_mail(
        uu_block=protocol.uuencode(out[0]),
        from_addr=client.email,
        to_addr=server.email,
        request_id=request_id,
    )
    return mail


def peak_once(ctx: Ctx, server: Home, name: str, mails: list[bytes], sink: Sink) -> float:
    home = ctx.server_copy(server, f"memory-{name}")
    mbox = home.parent / "mbox"
    write_mbox(mbox, mails)
    serve = Serve(home, ["--once", "--mbox", str(mbox), "--smtp", sink.url, "--address", SERVER])
    with serve, RssSampler(serve.pid, interval=0.01) as sampler:
        assert serve.proc is not None  # noqa: S101
        _, status, usage = os.wait4(serve.proc.pid, 0)
        serve.proc.returncode = os.waitstatus_to_exitcode(status)
    if serve.proc.returncode != 0:
        raise RuntimeError(f"serve --once exited {serve.proc.returncode}: {serve.tail()}")
    return max(float(sampler.peak), usage.ru_maxrss * 1024.0)


def run(ctx: Ctx, drain_peaks: dict[str, float] | None = None) -> Section:
    sec = Section("memory", "1d. Memory: peak RSS of serve's process tree")
    sizes = ctx.sizes
    client, server = ctx.pair("ed25519")
    with Sink() as sink:
        ctx.say(f"memory: a command writing {sizes.stdout_bytes:,} bytes to stdout")
        command = f"head -c {sizes.stdout_bytes} /dev/zero"
        peak = peak_once(
            ctx, server, "stdout", [sealed_request(client, server, command).mail], sink
        )
        sec.add(
            f"command writes {sizes.stdout_bytes / 1e6:,.0f} MB to stdout",
            peak / 1e6,
            "MB",
            target=f"< {LIMIT_MB:.0f}",
            met=peak / 1e6 < LIMIT_MB,
        )
        ctx.say(f"memory: a compression bomb of {sizes.bomb_bytes:,} bytes")
        bomb = bomb_mail(client, server, sizes.bomb_bytes)
        peak = peak_once(ctx, server, "bomb", [bomb], sink)
        expands = f"{len(bomb) / 1e3:,.0f} kB mail -> {sizes.bomb_bytes / 1e6:,.0f} MB"
        sec.add(
            f"compression bomb ({expands})",
            peak / 1e6,
            "MB",
            target=f"< {LIMIT_MB:.0f}",
            met=peak / 1e6 < LIMIT_MB,
        )
    mboxes = {int(k.split()[1]): v for k, v in (drain_peaks or {}).items() if k.startswith("mbox")}
    if mboxes:
        count = max(mboxes)
        peak = mboxes[count]
        sec.add(
            f"draining an mbox of {count:,} messages",
            peak / 1e6,
            "MB",
            target=f"< {LIMIT_MB:.0f}",
            met=peak / 1e6 < LIMIT_MB,
            note="from the intake section, sampled every 50 ms",
        )
    else:
        sec.note("the drain case comes from the intake section, which did not run")
    return sec
