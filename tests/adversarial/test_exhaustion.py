"""Resource exhaustion at the intakes (docs/security.md P10, P11; issue 9 point 1).

Nobody needs a key to open connections or to send mail. Whatever the volume, serve
stays up, nothing runs, nothing is mailed, and the next valid request is served.

The connection flood runs a real ``mailsh serve`` process under ``prlimit`` with a small
descriptor limit (its own process, so the flood cannot starve the test's descriptors),
and floods it from 127.0.0.2 while the valid request comes from 127.0.0.1. Its defence
(session limits, RLIMIT_NOFILE, a main loop that survives EMFILE) is docs/security.md
P11.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.kit import forge
from tests.kit.adversarial import Kit, Rig, marker_command, marker_runs
from tests.kit.cli import serve_argv
from tests.kit.homes import Home, pair
from tests.kit.serverkit import request
from tests.kit.smtp import Sink, free_port

NOFILE = 256  # serve's descriptor limit in the flood test
FLOOD = 400  # idle connections from one peer: more than serve could ever hold open


def _junk(i: int) -> bytes:
    return forge.mail_with_body(b"junk %d\r\n" % i, {"Message-ID": f"<junk.{i}@evil.test>"})


def test_many_messages_in_one_smtp_session(rig: Rig, tmp_path: Path) -> None:
    """A session may be cut short by a per-session limit (421), never by a crash."""
    accepted = 0
    assert rig.server.smtp_port is not None
    with smtplib.SMTP("127.0.0.1", rig.server.smtp_port, timeout=30) as smtp:
        for i in range(80):
            try:
                smtp.sendmail("mallory@evil.test", [rig.kit.server.email], _junk(i))
            except smtplib.SMTPServerDisconnected:
                break
            except smtplib.SMTPResponseException as exc:
                assert exc.smtp_code == 421, exc  # a limit: tell the client, then close
                break
            accepted += 1
    assert accepted > 0
    rig.fed += accepted
    before = len(rig.sink.messages)
    rig.feed_valid("smtp", tmp_path / "next")
    rig.settle()
    assert marker_runs(tmp_path / "next") == 1
    assert len(rig.mailed(before)) == 1


def test_a_burst_of_mail_in_the_mbox(rig: Rig, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = [rig.kit.request(marker_command(marker), by=rig.kit.mallory) for _ in range(3)]
    burst = [_junk(i) for i in range(60)] + hostile
    before = len(rig.sink.messages)
    rig.feed("mbox", burst)
    rig.feed_valid("mbox", tmp_path / "next")
    rig.settle()
    assert marker_runs(marker) == 0
    assert marker_runs(tmp_path / "next") == 1
    assert len(rig.mailed(before)) == 1


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited at start"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve did not listen")


def _flood(port: int, count: int) -> list[socket.socket]:
    """Idle connections from 127.0.0.2 (another peer than the valid client)."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", port))
        except OSError:  # the backlog is full: the flood is at its worst already
            s.close()
            break
        socks.append(s)
    return socks


def test_connection_flood_from_one_peer(
    kit: Kit, make_home: Callable[..., Home], tmp_path: Path
) -> None:
    # A server home of its own: the module's rig serves kit.server's home meanwhile.
    home = make_home("root@flood.test", address="root@flood.test")
    pair(kit.alice, home)
    marker, after = tmp_path / "ran", tmp_path / "next"
    port = free_port()
    env = {**os.environ, "MAILSH_HOME": str(home.settings.home)}
    cmd = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", *serve_argv(port, tmp_path)]
    with Sink() as sink:
        env["MAILSH_SMTP"] = sink.url
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        socks: list[socket.socket] = []
        try:
            _wait_listening(port, proc)
            socks = _flood(port, FLOOD)
            hostile = request(kit.mallory, home, marker_command(marker), encrypt=False).mail
            valid = request(kit.alice, home, marker_command(after)).mail
            with smtplib.SMTP(
                "127.0.0.1", port, timeout=30, source_address=("127.0.0.1", 0)
            ) as smtp:
                smtp.sendmail("mallory@evil.test", [home.email], hostile)
                smtp.sendmail(kit.alice.email, [home.email], valid)
            deadline = time.monotonic() + 60
            while (marker_runs(after) == 0 or not sink.messages) and time.monotonic() < deadline:
                assert proc.poll() is None, "serve died under the flood"
                time.sleep(0.05)
            assert proc.poll() is None, "serve died under the flood"
            assert marker_runs(after) == 1
            assert marker_runs(marker) == 0
            assert [m.rcpt_tos for m in sink.messages] == [[kit.alice.email]]
        finally:
            for s in socks:
                s.close()
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            if proc.stderr is not None:
                proc.stderr.close()
