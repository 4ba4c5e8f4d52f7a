"""A request runs once and its sender learns exactly what happened (issue 8).

Each test drives the real paths: real gpg, real ``mailsh`` subprocesses (client and
serve), real SMTP on 127.0.0.1 (serve's embedded listener, a relay that delivers every
message twice as an MTA retrying after a lost 250 would, and a sink that files replies
into the client's mbox), and real SIGKILL. Each fails when its fix is removed:

1. ``send --wait`` checks the reply mailbox before anything leaves, and a request that
   may have left is never forgotten;
2. a duplicate delivery never reports anything but the real outcome;
3. a claim of a live serve is never answered by another; a dead one's is settled
   outcome-unknown, once;
4. a failure after the claim ends it, and serve still starts;
5. re-encoding a plain script's signature does not make it run again.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailsh.keys.trust import add_trusted_key
from mailsh.protocol import Notice, OriginalState, ReplyStatus
from mailsh.server.daemon import ServeOptions, Server
from mailsh.server.state import MessageState, StateDB
from tests.kit import forge
from tests.kit.homes import Home, pair
from tests.kit.mailbox import mbox_append
from tests.kit.malleate import reencode_eddsa_signature
from tests.kit.serverkit import notices_for, open_answer, replies_for, request, server_settings
from tests.kit.smtp import Sink, free_port

MAILSH = [sys.executable, "-m", "mailsh"]


# --------------------------------------------------------------------------- kit


@pytest.fixture
def carol(make_home: Callable[..., Home], srv: Home) -> Home:
    """An operator home of this test alone, paired with this test's server (the shared
    ``alice`` pins every test's server key under the same address)."""
    home = make_home("carol@example.org")
    pair(home, srv)
    return home


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    env.update(extra)
    return env


def mailsh(
    home: Home, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*MAILSH, "--home", str(home.path), *args],
        env=env or clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


class _MboxFiler:
    """SMTP handler that files every message into an mbox, as local delivery would."""

    def __init__(self, mbox: Path) -> None:
        self.mbox = mbox
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, env: Any) -> str:  # noqa: N802
        with self.lock:
            mbox_append(self.mbox, bytes(env.original_content))
            self.count += 1
        return "250 OK"


class _Duplicator:
    """SMTP handler that passes every message on twice, the second copy ``delay`` later:
    an MTA that retries because the first 250 was lost."""

    def __init__(self, port: int, delay: float) -> None:
        self.port, self.delay = port, delay

    def _forward(self, env: Any) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.sendmail(env.mail_from, env.rcpt_tos, env.original_content)

    async def handle_DATA(self, server: Any, session: Any, env: Any) -> str:  # noqa: N802
        self._forward(env)

        def again() -> None:
            time.sleep(self.delay)
            self._forward(env)

        threading.Thread(target=again, daemon=True).start()
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[Callable[[Any], str]]:
    """Start aiosmtpd controllers with a handler on 127.0.0.1; returns their smtp:// URL."""
    started: list[Controller] = []

    def start(handler: Any) -> str:
        port = free_port()
        ctl = Controller(handler, hostname="127.0.0.1", port=port)
        ctl.start()
        started.append(ctl)
        return f"smtp://127.0.0.1:{port}"

    yield start
    for ctl in started:
        ctl.stop()


@pytest.fixture
def serve_procs(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``mailsh serve`` subprocesses (their logs go to files, shown on failure)."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(home: Home, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = tmp_path / f"serve-{len(logs)}.log"
        logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*MAILSH, "--home", str(home.path), "serve", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    for log in logs:
        sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}\n")


def outbound_for(home: Home, request_id: str) -> int:
    with sqlite3.connect(home.settings.state_db) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM outbound WHERE request_id = ?", (request_id,)
        ).fetchone()
    return int(count)


def claimed_ids(home: Home) -> list[str]:
    """The request ids in ``home``'s replay record."""
    with sqlite3.connect(home.settings.state_db) as db:
        return [r[0] for r in db.execute("SELECT request_id FROM requests")]


def claim_row(home: Home, request_id: str) -> tuple[str, str | None] | None:
    if not home.settings.state_db.exists():
        return None
    with sqlite3.connect(home.settings.state_db) as db:
        row = db.execute(
            "SELECT claimed_by, status FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
    return None if row is None else (row[0], row[1])


# --------------------------------------------------------------------------- 1


@pytest.mark.parametrize(
    "mailbox",
    [
        pytest.param({}, id="no-mailbox"),
        pytest.param({"MAILSH_REPLY_MAILDIR": "{tmp}/no-such-maildir"}, id="missing-maildir"),
        pytest.param(
            {"MAILSH_REPLY_MBOX": "{tmp}/mbox", "MAILSH_REPLY_MAILDIR": "{tmp}"},
            id="two-mailboxes",
        ),
    ],
)
def test_send_wait_checks_the_reply_mailbox_before_anything_leaves(
    carol: Home, srv: Home, sink: Sink, tmp_path: Path, mailbox: dict[str, str]
) -> None:
    env = clean_env(**{k: v.format(tmp=tmp_path) for k, v in mailbox.items()})
    proc = mailsh(carol, "send", "touch /tmp/never", "--to", srv.email, "--smtp", sink.url,
                  "--wait", env=env)  # fmt: skip
    assert proc.returncode == 255, proc.stderr
    assert b"next:" in proc.stderr
    assert sink.messages == []  # nothing left: the command cannot run
    pending = carol.path / "pending"
    assert not pending.exists() or not [p for p in pending.iterdir() if p.suffix == ".json"]


class _DropAfterData(threading.Thread):
    """An SMTP server that takes the whole message, then drops the connection instead of
    answering: the client cannot know whether it was accepted (a lost 250)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.got_message = False

    def run(self) -> None:
        with self.sock:
            conn, _ = self.sock.accept()
        with conn, conn.makefile("rwb") as io:
            io.write(b"220 test ESMTP\r\n")
            io.flush()
            while line := io.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    io.write(b"250 test\r\n")
                elif verb == b"DATA":
                    io.write(b"354 go on\r\n")
                    io.flush()
                    while io.readline() not in (b".\r\n", b""):
                        pass
                    self.got_message = True
                    return  # drop: no answer to the end of DATA
                else:
                    io.write(b"250 ok\r\n")
                io.flush()


def test_send_that_may_have_left_is_never_forgotten(carol: Home, srv: Home, tmp_path: Path) -> None:
    server = _DropAfterData()
    server.start()
    proc = mailsh(carol, "send", "echo hi", "--to", srv.email,
                  "--smtp", f"smtp://127.0.0.1:{server.port}")  # fmt: skip
    server.join(30)
    assert server.got_message
    assert proc.returncode == 255
    err = proc.stderr.decode()
    assert "may have been sent" in err and "may run" in err
    rid = err.split("request ", 1)[1].split()[0]
    assert f"mailsh wait-reply {rid}" in err
    # The request is still known here, so its reply can be waited for.
    mbox = tmp_path / "mbox"
    mbox.touch()
    later = mailsh(carol, "wait-reply", rid, "--mbox", str(mbox), "--wait-timeout", "0.1")
    assert later.returncode == 255
    assert f"no reply to request {rid}".encode() in later.stderr


# --------------------------------------------------------------------------- 2


def test_duplicate_delivery_while_running_reports_the_real_outcome(
    carol: Home,
    srv: Home,
    sink: Sink,
    tmp_path: Path,
    smtp_server: Callable[[Any], str],
    serve_procs: Callable[..., subprocess.Popen[bytes]],
) -> None:
    marker = tmp_path / "ran"
    mbox = tmp_path / "carol.mbox"
    port = free_port()
    filer = _MboxFiler(mbox)
    replies_url = smtp_server(filer)
    serve_procs(srv, "--smtp-listen", f"127.0.0.1:{port}", "--workers", "2",
                "--workdir", str(tmp_path), env=clean_env(MAILSH_SMTP=replies_url))  # fmt: skip
    wait_until(lambda: listening(port), 60, "serve's SMTP listener")
    relay = smtp_server(_Duplicator(port, delay=1.0))

    proc = mailsh(carol, "send", f"echo x >> {marker}; sleep 4; echo REAL", "--to", srv.email,
                  "--smtp", relay, "--wait", "--mbox", str(mbox), "--wait-timeout", "120",
                  timeout=180)  # fmt: skip

    assert (proc.returncode, proc.stdout) == (0, b"REAL\n"), proc.stderr
    assert marker.read_text() == "x\n"  # ran exactly once
    wait_until(lambda: filer.count >= 2, 60, "the notice and the reply")
    state = StateDB(srv.settings.state_db)
    assert state.report.counts()["duplicate"] == 1
    # A later wait-reply finds the same truth (the notice in the mailbox is not it).
    [rid] = claimed_ids(srv)
    again = mailsh(carol, "wait-reply", rid, "--mbox", str(mbox), "--wait-timeout", "30")
    assert (again.returncode, again.stdout) == (0, b"REAL\n"), again.stderr
    assert outbound_for(srv, rid) == 2  # the outcome and one notice, never more


def test_copies_after_the_end_get_no_mail(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    sealed = request(alice, srv, f"echo x >> {marker}")
    mbox_append(mbox, sealed.mail)
    settings = server_settings(srv, sink, workdir=tmp_path)
    Server(settings, ServeOptions(mboxes=[mbox], once=True)).run()
    mbox_append(mbox, sealed.mail, sealed.mail, sealed.mail)
    Server(settings, ServeOptions(mboxes=[mbox], once=True)).run()

    assert marker.read_text() == "x\n"
    [reply] = replies_for(alice, srv, sealed, sink)
    assert reply.status is ReplyStatus.OK
    [notice] = notices_for(alice, srv, sealed, sink)
    assert notice.original is OriginalState.FINISHED
    assert len(sink.messages) == 2  # three copies cost one notice, not three mails
    assert StateDB(settings.state_db).report.counts()["duplicate"] == 3


# --------------------------------------------------------------------------- 3


def test_a_live_claim_is_never_answered_by_another_serve_and_a_dead_one_once(
    alice: Home,
    srv: Home,
    sink: Sink,
    tmp_path: Path,
    serve_procs: Callable[..., subprocess.Popen[bytes]],
) -> None:
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    tag = f"mailsh-test-{os.getpid()}-{time.monotonic_ns()}"
    sealed = request(alice, srv, f"echo x >> {marker}; exec -a {tag} sleep 120")
    rid = sealed.request.request_id
    env = clean_env(MAILSH_SMTP=sink.url)
    args = ("--mbox", str(mbox), "--workdir", str(tmp_path), "--poll-interval", "0.2")
    first, second = serve_procs(srv, *args, env=env), serve_procs(srv, *args, env=env)
    try:
        mbox_append(mbox, sealed.mail)
        wait_until(marker.exists, 60, "the command to start")
        wait_until(lambda: claim_row(srv, rid) is not None, 30, "the claim")
        row = claim_row(srv, rid)
        assert row is not None
        holder_pid = int(row[0].split(":")[1])
        holder, other = (first, second) if first.pid == holder_pid else (second, first)
        assert holder.pid == holder_pid

        # A copy while it runs: whoever takes it sends a notice, never an outcome.
        mbox_append(mbox, sealed.mail)
        [mail] = sink.wait_for(1, timeout=60)
        notice = open_answer(alice, srv, sealed, mail.data)
        assert isinstance(notice, Notice)
        assert notice.original is OriginalState.RUNNING
        assert replies_for(alice, srv, sealed, sink) == []

        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        # The survivor settles the dead claim: outcome unknown, exactly once.
        sink.wait_for(2, timeout=90)
        [reply] = replies_for(alice, srv, sealed, sink)
        assert reply.status is ReplyStatus.OUTCOME_UNKNOWN
        assert other.poll() is None
        row = claim_row(srv, rid)
        assert row is not None and row[1] == "outcome-unknown"
    finally:
        subprocess.run(["pkill", "-KILL", "-f", tag], check=False)
    # A copy after the crash, and a restart: nothing runs, nothing more is said.
    mbox_append(mbox, sealed.mail)
    wait_until(
        lambda: StateDB(srv.settings.state_db).report.counts()["duplicate"] == 2, 60, "the copy"
    )
    done = mailsh(srv, "serve", "--once", "--mbox", str(mbox), env=env)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "x\n"
    assert outbound_for(srv, rid) == 2  # one notice, one outcome


# --------------------------------------------------------------------------- 4


def test_a_failure_after_the_claim_ends_it_and_serve_still_starts(
    make_home: Callable[..., Home], srv: Home, sink: Sink, tmp_path: Path
) -> None:
    """The reply cannot be encrypted (the operator's encryption subkey expired while the
    command ran): the claim still ends, ``unreported``; serve starts again; nothing
    re-runs. A request after the expiry is refused before anything runs."""
    bob = make_home("bob@example.org")
    sub = next(k for k in bob.gpg.raw.list_keys()[0]["subkeys"] if "e" in k[1])[2]
    forge.gpg(bob.settings.gnupg_home, "--quick-set-expire", bob.fingerprint, "seconds=6", sub)
    bob.pubkey.write_text(bob.gpg.raw.export_keys(bob.fingerprint, armor=True))
    pair(bob, srv)
    marker = tmp_path / "ran"
    mbox = tmp_path / "root.mbox"
    sealed = request(bob, srv, f"echo x >> {marker}; sleep 8")
    mbox_append(mbox, sealed.mail)
    settings = server_settings(srv, sink, workdir=tmp_path)

    Server(settings, ServeOptions(mboxes=[mbox], once=True)).run()
    assert marker.read_text() == "x\n"
    state = StateDB(settings.state_db)
    assert state.report.counts()["unreported"] == 1
    assert state.requests.unfinished() == []
    assert sink.messages == []

    late = request(bob, srv, f"echo late >> {marker}")
    mbox_append(mbox, sealed.mail, late.mail)
    Server(settings, ServeOptions(mboxes=[mbox], once=True)).run()  # starts; no crash loop
    assert marker.read_text() == "x\n"  # neither the copy nor the late request ran
    counts = state.report.counts()
    assert (counts["unreported"], counts["duplicate"]) == (2, 1)
    refused = [e for e in state.report.last_errors(10) if "no-encryption-key" in e.error]
    assert refused, state.report.last_errors(10)
    status = mailsh(srv, "status", env=clean_env())
    assert status.returncode == 0 and b"no-encryption-key" in status.stdout + status.stderr


# --------------------------------------------------------------------------- 5


def test_reencoded_plain_script_signature_does_not_run_again(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    add_trusted_key(srv.gpg, srv.settings.trust_file, alice.pubkey, reply_to=None,
                    allow_plain_scripts=True)  # fmt: skip
    marker = tmp_path / "ran"
    script = f"echo x >> {marker}\n".encode()
    signed = forge.gpg(alice.settings.gnupg_home, "--sign", "-z", "0", data=script)
    forged = reencode_eddsa_signature(signed)
    assert forged != signed
    mails = [
        forge.request_mail(forge.armor(packets), to_addr=srv.email) for packets in (signed, forged)
    ]
    mbox = tmp_path / "root.mbox"
    mbox_append(mbox, *mails)
    Server(
        server_settings(srv, sink, workdir=tmp_path), ServeOptions(mboxes=[mbox], once=True)
    ).run()

    assert marker.read_text() == "x\n"  # the re-encoded copy is the same request
    counts = StateDB(srv.settings.state_db).report.counts()
    assert (counts["replied"], counts["duplicate"]) == (1, 1)
    assert MessageState.DUPLICATE.value == "duplicate"
