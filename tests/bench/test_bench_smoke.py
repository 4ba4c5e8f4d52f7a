"""The benchmark at its tiny size, so that it cannot rot (docs/performance.md).

It runs the real harness end to end (real gpg, real serve, real SMTP on 127.0.0.1, and
the ssh race when sshd is there) and checks that every section produced its figures as
numbers. It asserts no timing: speed is what ``./dev bench`` reports, not a test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Figures each section must produce (name prefixes), whatever the machine.
EXPECTED = {
    "roundtrip": ["mailsh send --wait (ed25519)"],
    "throughput": [
        "serve --once, 1 worker",
        "serve --once, 2 workers",
        "floor (same work, tight loop)",
        "1 worker / floor",
        "2 workers / 1 worker",
        "floor: decrypt+verify",
        "floor: sign+encrypt",
        "floor: spawn",
    ],
    "intake": [
        "mbox 1: pick-up",
        "mbox 5: pick-up",
        "mbox 5: ratio to 1",
        "maildir 1: pick-up",
        "maildir 5: ratio to 1",
    ],
    "memory": ["command writes", "compression bomb", "draining an mbox of 5 messages"],
    "startup": [
        "python -c pass",
        "mailsh --help",
        "mailsh --help: above python -c pass",
        "mailsh send --help",
        "mailsh trust list",
    ],
    "breakdown": [
        "client: start-up, seal, submit",
        "server: wake, verify, claim",
        "server: run, seal reply, queue",
        "client: wake, decrypt+verify, print, exit",
        "total",
        "step: seal request (client)",
    ],
}


@pytest.mark.timeout(600)
def test_bench_tiny_produces_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--quiet", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["size"] == "tiny"
    assert doc["machine"]["cores"] >= 1
    sections = doc["sections"]
    assert set(sections) == set(EXPECTED)
    for key, wanted in EXPECTED.items():
        figures = sections[key]["figures"]
        for fig in figures:
            assert isinstance(fig["value"], float), (key, fig)
            assert math.isfinite(fig["value"]), (key, fig)
        names = [f["name"] for f in figures]
        for prefix in wanted:
            assert any(n.startswith(prefix) for n in names), (key, prefix, names)
        # the table printed on stdout carries the same section
        assert sections[key]["title"] in done.stdout
    # the race either ran against ssh or says why it could not
    rt = sections["roundtrip"]
    raced = any(f["name"] == "ratio mailsh/ssh (ed25519)" for f in rt["figures"])
    assert raced or any("ssh baseline unavailable" in n for n in rt["notes"])
    # targets carry a verdict
    targeted = [f for s in sections.values() for f in s["figures"] if f["target"]]
    assert targeted
    assert all(isinstance(f["met"], bool) for f in targeted)
