"""`mailsh serve`, `status` and `deliver` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailsh.cli import main
from mailsh.errors import ExitCode
from tests.conftest import Home
from tests.integration.serverkit import Sink, mbox_append, replies_for, request


def _mailsh(
    *args: str, home: Path, stdin: bytes = b"", **env: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def test_deliver_then_serve_once_then_status(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    sealed = request(alice, srv, "echo piped")
    delivered = _mailsh("deliver", home=srv.path, stdin=sealed.mail)
    assert delivered.returncode == 0, delivered.stderr
    assert len(list((srv.path / "spool" / "new").iterdir())) == 1

    served = _mailsh(
        "serve", "--once", "--smtp", sink.url, "--workdir", str(tmp_path),
        "--mbox", str(tmp_path / "empty-mbox"), "--log-format", "json", home=srv.path,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    decisions = [json.loads(line) for line in served.stderr.splitlines() if line.startswith(b"{")]
    assert any(d.get("event") == "executed" and d.get("exit_code") == 0 for d in decisions)
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.stdout == b"piped\n"

    status = _mailsh("status", "--json", home=srv.path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["replied"] == 1
    assert report["spool_pending"] == 0


def test_deliver_failure_is_tempfail_so_the_mta_retries(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = _mailsh("deliver", home=blocker / "home", stdin=b"Subject: x\r\n\r\nbody\r\n")
    assert result.returncode == int(ExitCode.TEMPFAIL)
    assert b"mailsh:" in result.stderr


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
    served = _mailsh("serve", "--once", "--mbox", str(mbox), "--smtp", sink.url, home=srv.path)
    assert served.returncode == 0, served.stderr
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.exit_code == 9


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from mailsh import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mailsh {__version__}"
