"""A planted mailbox is refused by a real `mailsh serve`, logged and shown by `status` (P13)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.kit.cli import mailsh_process
from tests.kit.homes import Home
from tests.kit.smtp import Sink


def test_serve_refuses_a_symlinked_mbox_keeps_serving_and_status_shows_it(
    srv: Home, sink: Sink, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"From x  Mon Jan  1 00:00:00 2024\nSubject: s\n\nsecret\n\n")
    (tmp_path / "mail").mkdir()
    mbox = tmp_path / "mail" / "root"
    mbox.symlink_to(victim)
    served = mailsh_process(
        "serve", "--once", "--smtp", sink.url, "--workdir", str(tmp_path),
        "--mbox", str(mbox), "--log-format", "json", home=srv.path,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    logged = [json.loads(line) for line in served.stderr.splitlines() if line.startswith(b"{")]
    assert any(d["level"] == "error" and str(mbox) in d["message"] for d in logged), logged
    assert victim.read_bytes().endswith(b"secret\n\n")  # neither copied away nor truncated

    status = mailsh_process("status", "--json", home=srv.path)
    assert status.returncode == 0, status.stderr
    [entry] = json.loads(status.stdout)["refused_mailboxes"]
    assert entry["mailbox"] == str(mbox)
    assert entry["reason"].startswith(f"{mbox} is a symbolic link, not a regular file")
