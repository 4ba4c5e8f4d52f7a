"""Many requests while serve runs, and stopping serve with SIGTERM.

The writer appends to the mbox from another process, locking exactly like Postfix's
local(8) (dotlock, then fcntl), while serve keeps taking messages out of it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from mailsh.protocol import ReplyStatus
from mailsh.server.daemon import ServeOptions, Server
from mailsh.server.state import StateDB
from tests.kit.homes import Home
from tests.kit.serverkit import replies_for, request, server_settings
from tests.kit.smtp import Sink

N_REQUESTS = 500


def _postfix_like_append(mbox: str, mails: list[bytes], batch: int) -> None:
    """Append messages like Postfix local(8): PATH.lock (O_EXCL), then lockf, append."""
    for start in range(0, len(mails), batch):
        lock = mbox + ".lock"
        while True:
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                break
            except FileExistsError:
                time.sleep(0.001)
        try:
            fd = os.open(mbox, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                for mail in mails[start : start + batch]:
                    body = mail.replace(b"\r\n", b"\n")
                    os.write(
                        fd, b"From alice@example.org Wed Nov 25 00:00:00 2026\n" + body + b"\n"
                    )
                os.fsync(fd)
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            os.unlink(lock)
        time.sleep(0.01)


@pytest.mark.slow
def test_500_requests_while_serving_each_run_exactly_once(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    sealed = [request(alice, srv, f"echo {i} >> {marker}") for i in range(N_REQUESTS)]
    settings = server_settings(srv, sink, workdir=tmp_path, workers=2, poll_interval=0.5)
    server = Server(settings, ServeOptions(mboxes=[mbox]))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    writer = get_context("spawn").Process(
        target=_postfix_like_append, args=(str(mbox), [s.mail for s in sealed], 7)
    )
    writer.start()
    try:
        writer.join(120)
        assert writer.exitcode == 0
        got = sink.wait_for(N_REQUESTS, timeout=600)
    finally:
        server.request_stop()
        thread.join(60)
    assert len(got) == N_REQUESTS
    ran = marker.read_text().split()
    assert sorted(map(int, ran)) == list(range(N_REQUESTS))  # each exactly once
    counts = StateDB(srv.settings.state_db).report.counts()
    assert counts["replied"] == N_REQUESTS
    assert counts["outbound_pending"] == 0
    # spot-check that replies answer their own requests
    for s in (sealed[0], sealed[N_REQUESTS // 2], sealed[-1]):
        [reply] = replies_for(alice, srv, s, sink)
        assert reply.status is ReplyStatus.OK


def _serve(
    home: Home, sink: Sink, mbox: Path, workdir: Path, grace: float
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MAILSH_HOME": str(home.path), "MAILSH_SMTP": sink.url}
    return subprocess.Popen(
        [
            sys.executable, "-m", "mailsh", "serve", "--mbox", str(mbox),
            "--workdir", str(workdir), "--shutdown-grace", str(grace),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def test_sigterm_lets_running_command_finish_within_grace(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, f"touch {started}; sleep 1; echo done")
    from tests.kit.mailbox import mbox_append

    mbox_append(mbox, sealed.mail)
    proc = _serve(srv, sink, mbox, tmp_path, grace=30)
    _wait_for(started)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.status is ReplyStatus.OK
    assert reply.stdout == b"done\n"


def test_sigterm_past_grace_reports_outcome_unknown(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, f"touch {started}; sleep 60")
    from tests.kit.mailbox import mbox_append

    mbox_append(mbox, sealed.mail)
    proc = _serve(srv, sink, mbox, tmp_path, grace=0.5)
    _wait_for(started)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.status is ReplyStatus.OUTCOME_UNKNOWN
