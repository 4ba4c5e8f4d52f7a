"""`mailsh serve`, `status` and `deliver` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mailsh.cli import main
from mailsh.errors import ExitCode
from tests.kit.cli import mailsh_process
from tests.kit.homes import Home
from tests.kit.mailbox import mbox_append
from tests.kit.serverkit import replies_for, request
from tests.kit.smtp import Sink


def test_deliver_then_serve_once_then_status(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    sealed = request(alice, srv, "echo piped")
    delivered = mailsh_process("deliver", home=srv.path, stdin=sealed.mail)
    assert delivered.returncode == 0, delivered.stderr
    assert len(list((srv.path / "spool" / "new").iterdir())) == 1

    served = mailsh_process(
        "serve", "--once", "--smtp", sink.url, "--workdir", str(tmp_path),
        "--mbox", str(tmp_path / "empty-mbox"), "--log-format", "json", home=srv.path,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    decisions = [json.loads(line) for line in served.stderr.splitlines() if line.startswith(b"{")]
    assert any(d.get("event") == "executed" and d.get("exit_code") == 0 for d in decisions)
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.stdout == b"piped\n"

    status = mailsh_process("status", "--json", home=srv.path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["messages"]["replied"] == 1
    # v1 only gains keys: the old spelling of outcome-unknown is still there, same count
    assert report["messages"]["outcome-unknown"] == report["messages"]["outcome_unknown"] == 0
    assert report["queue"]["spool_pending"] == 0
    assert (report["serve"]["running"], report["serve"]["processes"]) == (False, [])  # ended


def test_deliver_failure_is_tempfail_so_the_mta_retries(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = mailsh_process("deliver", home=blocker / "home", stdin=b"Subject: x\r\n\r\nbody\r\n")
    assert result.returncode == int(ExitCode.TEMPFAIL)
    assert b"mailsh:" in result.stderr


def test_deliver_of_a_too_large_message_exits_73_so_the_mta_bounces_it(srv: Home) -> None:
    result = mailsh_process(
        "deliver", home=srv.path, stdin=b"Subject: x\r\n\r\n" + b"x" * 2000,
        MAILSH_MAX_MESSAGE_BYTES="1000",
    )  # fmt: skip
    assert result.returncode == int(ExitCode.CANTCREAT) == 73, result.stderr
    assert result.stderr.startswith(b"mailsh: message larger than 1000 bytes"), result.stderr
    assert not list((srv.path / "spool" / "new").glob("*"))


def test_serve_without_outbound_says_how_to_configure_it(srv: Home, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    result = subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(srv.path), "serve", "--once",
         "--mbox", str(tmp_path / "none")],
        capture_output=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == ExitCode.FAILURE
    assert b"--sendmail" in result.stderr


def test_status_before_any_serve(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path / "h"), "status"])
    assert exc.value.code == ExitCode.FAILURE  # documented codes only: 255, with a hint


def test_mbox_serve_once_subprocess(alice: Home, srv: Home, sink: Sink, tmp_path: Path) -> None:
    mbox = tmp_path / "root"
    sealed = request(alice, srv, "exit 9")
    mbox_append(mbox, sealed.mail)
    served = mailsh_process(
        "serve", "--once", "--mbox", str(mbox), "--smtp", sink.url, home=srv.path
    )
    assert served.returncode == 0, served.stderr
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.exit_code == 9


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from mailsh import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mailsh {__version__}"


def _status(home: Path) -> dict[str, Any]:
    result = mailsh_process("status", "--json", home=home)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_status_while_serving_shows_pid_unknown_key_and_decisions(
    alice: Home, srv: Home, mallory: Home, sink: Sink, tmp_path: Path
) -> None:
    """Issue 12 points 4 and 5: a request from a key the server never saw is discarded as
    unknown-key (not bad-signature, and without python-gnupg's warning), and status shows
    it with its count next to the running serve's pid and the queue."""
    mbox = tmp_path / "root"
    good = request(alice, srv, "echo fine")
    mbox_append(mbox, request(mallory, srv, "id", encrypt=False).mail, good.mail)
    serve = subprocess.Popen(
        [sys.executable, "-m", "mailsh", "--home", str(srv.path), "serve", "--mbox", str(mbox),
         "--smtp", sink.url, "--smtp-listen", "127.0.0.1:0", "--workdir", str(tmp_path),
         "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        sink.wait_for(1)
        report = _status(srv.path)
        for _ in range(600):  # the discard may be recorded after the reply left
            if report["messages"]["discarded"] == 1 and report["serve"]["running"]:
                break
            time.sleep(0.1)
            report = _status(srv.path)
        text = mailsh_process("status", home=srv.path)
    finally:
        serve.send_signal(signal.SIGTERM)
        _, log = serve.communicate(timeout=120)

    assert report["format"] == "mailsh.status.v1"
    assert report["role"] == "server"
    assert report["identity"]["fingerprint"] == srv.fingerprint
    assert report["identity"]["addresses"] == [srv.email]
    [proc] = report["serve"]["processes"]
    assert proc["pid"] == serve.pid
    assert f"mbox {mbox}" in proc["sources"]
    assert report["messages"]["replied"] == 1
    assert {"state": "discarded", "reason": "unknown-key", "count": 1} in [
        {k: p[k] for k in ("state", "reason", "count")} for p in report["problems"]
    ]
    assert [e["error"] for e in report["last_errors"]] == ["unknown-key"]
    assert {(d["state"], d["reason"] or "") for d in report["recent"]} == {
        ("replied", ""),
        ("discarded", "unknown-key"),
    }
    assert set(report["queue"]) >= {"spool_pending", "executing", "outbound_pending"}
    assert "next_retry_at" in report["queue"]
    assert report["spool"]["done_files"] == 2

    assert text.returncode == 0, text.stderr
    shown = text.stdout.decode()
    assert f"pid {serve.pid}" in shown
    assert "unknown-key" in shown
    assert srv.fingerprint in shown
    assert "outbound outbound" not in shown

    decisions = [json.loads(line) for line in log.splitlines() if line.startswith(b"{")]
    [discard] = [d for d in decisions if d.get("event") == "discarded"]
    assert discard["reason"] == "unknown-key"
    assert mallory.fingerprint in discard["detail"]
    assert b"non-zero error code" not in log  # python-gnupg's noise is gone
    starts = [ln for ln in log.lower().splitlines() if b"listener on" in ln]
    assert len([ln for ln in starts if b"stopped" not in ln]) == 1  # its start, logged once
    assert _status(srv.path)["serve"]["running"] is False  # the lock went with the process
