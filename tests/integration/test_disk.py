"""Bounded disk in `mailsh serve`, `deliver` and `status` (docs/security.md P16).

A full disk is simulated without mocks: ``--min-free-space`` is set above the real free
space of the test's file system. Real gpg, real mbox, real SMTP, real subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import smtplib
import threading
import time
from pathlib import Path

import pytest

from mailsh.cli import main
from mailsh.errors import ExitCode
from mailsh.server.daemon import ServeOptions, Server
from mailsh.server.diskspace import free_bytes
from mailsh.server.spool import Spool
from mailsh.server.state import StateDB
from tests.kit.cli import mailsh_process
from tests.kit.homes import Home
from tests.kit.mailbox import mbox_append
from tests.kit.serverkit import listening_port, replies_for, request, server_settings
from tests.kit.smtp import Sink


def _above_free(path: Path) -> str:
    """A --min-free-space that the real file system of ``path`` cannot meet."""
    return str(free_bytes(path) + (1 << 40))


def test_deliver_below_the_floor_exits_75_and_stores_nothing(srv: Home) -> None:
    full = mailsh_process(
        "deliver", home=srv.path, stdin=b"Subject: x\r\n\r\nbody\r\n",
        MAILSH_MIN_FREE_SPACE=_above_free(srv.path),
    )  # fmt: skip
    assert full.returncode == int(ExitCode.TEMPFAIL), full.stderr
    assert b"below --min-free-space" in full.stderr
    assert not list((srv.path / "spool" / "new").glob("*"))


def test_status_shows_spool_size_and_free_space(
    srv: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Spool(srv.settings.spool_dir).put(b"x" * 5000, source="pipe")
    StateDB(srv.settings.state_db).close()  # as the first serve would create it
    monkeypatch.setenv("MAILSH_MIN_FREE_SPACE", _above_free(srv.path))
    with pytest.raises(SystemExit) as done:
        main(["--home", str(srv.path), "status", "--json"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)["disk"]
    assert report["spool_bytes"] >= 5000
    assert 0 < report["free_bytes"] < report["min_free_bytes"]
    assert report["intake"] == "paused (below --min-free-space)"


def test_serve_below_the_floor_leaves_the_mbox_untouched_then_resumes(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, "echo resumed")
    mbox_append(mbox, sealed.mail)
    before = mbox.read_bytes()
    caplog.set_level(logging.INFO, logger="mailsh.server")
    full = server_settings(
        srv, sink, workdir=tmp_path, min_free_space=_above_free(tmp_path), poll_interval=0.2
    )
    Server(full, ServeOptions(mboxes=[mbox], once=True)).run()
    assert mbox.read_bytes() == before  # not read, not locked away, not truncated
    assert sink.messages == []
    assert sum("intake paused" in r.getMessage() for r in caplog.records) == 1

    roomy = server_settings(srv, sink, workdir=tmp_path, poll_interval=0.2)
    Server(roomy, ServeOptions(mboxes=[mbox], once=True)).run()
    assert mbox.read_bytes() == b""
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.stdout == b"resumed\n"


def test_serve_smtp_listener_answers_452_below_the_floor(
    srv: Home, sink: Sink, tmp_path: Path
) -> None:
    full = server_settings(
        srv, sink, workdir=tmp_path, min_free_space=_above_free(tmp_path), poll_interval=0.2
    )
    server = Server(full, ServeOptions(smtp_listen=("127.0.0.1", 0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        port = listening_port(server)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            code, text = smtp.mail("alice@example.org")
        assert (code, text[:5]) == (452, b"4.3.1")
    finally:
        server.request_stop()
        thread.join(60)
    assert not thread.is_alive()


def test_serve_prunes_old_spool_files_at_start(srv: Home, sink: Sink, tmp_path: Path) -> None:
    done = srv.path / "spool" / "done"
    done.mkdir(parents=True, exist_ok=True)
    eight_days_ago = time.time_ns() - 8 * 86_400 * 10**9
    old = done / f"{eight_days_ago:020d}.{os.getpid()}.{secrets.token_hex(8)}.smtp"
    young = done / f"{time.time_ns():020d}.{os.getpid()}.{secrets.token_hex(8)}.smtp"
    old.write_bytes(b"old mail")
    young.write_bytes(b"young mail")
    settings = server_settings(srv, sink, workdir=tmp_path, retention="7d")
    Server(settings, ServeOptions(mboxes=[tmp_path / "none"], once=True)).run()
    assert not old.exists()
    assert young.read_bytes() == b"young mail"
