"""mailsh end to end through the rig's real Postfix and Dovecot (issue 5, item 2).

Every path a user takes on a real mail system: ``mailsh send`` submits on 587 with
STARTTLS + AUTH, Postfix delivers to /var/mail/root, a real ``mailsh serve`` subprocess
(``--once`` or long-running while Postfix keeps appending) runs the command and replies
through ``/usr/sbin/sendmail`` or SMTP on port 25, Postfix delivers the reply to alice's
mbox or bob's Maildir, and ``mailsh wait-reply`` reads it there, or over IMAP from
Dovecot with IDLE.

/var/mail/root is shared with the other rig tests (all rig tests run on one xdist worker,
one after another): serve takes everything out of it, and mail that no key of the fresh
server home signed is discarded without a reply. Every test makes fresh homes (a client
trusts the first key it has for root@mailsh.test, so a client home is never reused with
another server), and no serve process outlives its test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from mailsh import seal
from mailsh.client.pending import PendingRequest, PendingStore
from mailsh.client.send import prepare_request, submit_request
from mailsh.keys.trust import load_trust
from mailsh.protocol import Reply, ReplyStatus
from mailsh.settings import load_settings
from tests.kit.cli import run_main
from tests.kit.homes import Home, pair
from tests.kit.mailrig import (
    MailRig,
    MailUser,
    contains,
    mbox_messages,
    read_mailbox,
    remove_messages,
    wait_for_message,
)

pytestmark = [pytest.mark.mailrig, pytest.mark.usefixtures("no_mailsh_env")]

MAILSH = [sys.executable, "-m", "mailsh"]
SENDMAIL = Path("/usr/sbin/sendmail")
COMMAND = "echo out; echo err >&2; exit 7"
ROUND_TRIP_TIMEOUT = 120.0
BURST = 200
BURST_TIMEOUT = 600.0
REPLY_ID = re.compile(rb"^Subject: mailsh reply ([0-9a-f]{32})\b", re.MULTILINE)

Cleanup = Callable[[Path, str], None]
Run = Callable[..., tuple[int, bytes, bytes]]


@dataclass
class Homes:
    """Fresh, cross-trusted homes: server root@mailsh.test, clients alice and bob."""

    server: Home
    alice: Home
    bob: Home


@pytest.fixture
def homes(make_home: Callable[..., Home], mailrig: MailRig) -> Homes:
    server = make_home(mailrig.root_address, address=mailrig.root_address)
    alice = make_home(mailrig.alice.address)
    bob = make_home(mailrig.bob.address)
    pair(alice, server)
    pair(bob, server)
    return Homes(server=server, alice=alice, bob=bob)


@pytest.fixture
def run(capsysbinary: pytest.CaptureFixture[bytes]) -> Run:
    """``mailsh ARGS...`` in-process through the CLI's error funnel: (status, out, err)."""

    def call(*args: str) -> tuple[int, bytes, bytes]:
        return run_main(capsysbinary, args)

    return call


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    env.update(extra)
    return env


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def diagnostics(
    rig: MailRig, serve_log: Path | None = None, *, stderr: bytes = b"", imap: bool = False
) -> str:
    """Where to look when a reply does not come: mailsh's stderr, serve's log, Postfix's
    (bounces) and, for IMAP, Dovecot's."""
    parts = [f"--- mailsh stderr\n{stderr.decode(errors='replace')}"] if stderr else []
    if imap:
        parts.append(f"--- {rig.log_dir / 'dovecot.log'}\n{tail(rig.log_dir / 'dovecot.log')}")
    if serve_log is not None:
        parts.append(f"--- {serve_log}\n{tail(serve_log)}")
    parts.append(f"--- {rig.log_dir / 'postfix.log'}\n{tail(rig.log_dir / 'postfix.log')}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- client side


def submission_args(rig: MailRig, user: MailUser) -> list[str]:
    return [
        "--smtp",
        f"smtp://{user.name}@{rig.host}:{rig.submission_port}",
        "--require-tls",
        "--ca-file",
        str(rig.ca_file),
    ]


def send(
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    rig: MailRig,
    client: Home,
    user: MailUser,
    command: str = COMMAND,
    *extra: str,
) -> str:
    """``mailsh send`` via 587 (STARTTLS + AUTH); returns the request id it printed."""
    monkeypatch.setenv("MAILSH_SMTP_PASSWORD", user.password)
    code, out, err = run(
        "--home",
        str(client.path),
        "send",
        command,
        "--to",
        rig.root_address,
        *submission_args(rig, user),
        *extra,
    )
    monkeypatch.delenv("MAILSH_SMTP_PASSWORD")
    assert code == 0, err.decode(errors="replace")
    return out.decode().strip()


def wait_request_delivered(rig: MailRig, request_id: str) -> None:
    """Wait until Postfix has put the request into /var/mail/root (serve --once needs it)."""
    try:
        wait_for_message(rig.root_mbox, contains(request_id), timeout=ROUND_TRIP_TIMEOUT)
    except pytest.fail.Exception:
        pytest.fail(f"request {request_id} never reached {rig.root_mbox}\n{diagnostics(rig)}")


# --------------------------------------------------------------------------- server side


def serve_args(rig: MailRig, server: Home, workdir: Path, transport: str, *extra: str) -> list[str]:
    out = [
        *MAILSH,
        "--home",
        str(server.path),
        "serve",
        "--mbox",
        str(rig.root_mbox),
        "--address",
        rig.root_address,
        "--workdir",
        str(workdir),
        "--poll-interval",
        "0.5",
    ]
    if transport == "sendmail":
        out += ["--sendmail", str(SENDMAIL)]
    else:
        out += ["--smtp", f"smtp://{rig.host}:{rig.smtp_port}", "--ca-file", str(rig.ca_file)]
    return out + list(extra)


def serve_once(
    rig: MailRig, server: Home, tmp_path: Path, request_id: str, transport: str = "sendmail"
) -> None:
    """``mailsh serve --once`` over /var/mail/root; fails unless it ran ``request_id``."""
    log = tmp_path / "serve-once.log"
    with log.open("ab") as fh:
        done = subprocess.run(
            serve_args(rig, server, tmp_path, transport, "--once"),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(),
            timeout=ROUND_TRIP_TIMEOUT,
            check=False,
        )
    assert done.returncode == 0, diagnostics(rig, log)
    # Another process taking mail out of /var/mail/root (a second test session run by
    # hand at the same time) would make the reply never come: say so here instead.
    assert f"request={request_id}".encode() in log.read_bytes(), (
        f"serve --once did not see request {request_id}: did another process take it "
        f"out of {rig.root_mbox}?\n{diagnostics(rig, log)}"
    )


@dataclass
class Serving:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (fails the test if serve does not stop)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not stop {timeout:g} s after SIGTERM\n{tail(self.log)}")


@contextmanager
def serving(
    rig: MailRig, server: Home, tmp_path: Path, *extra: str, transport: str = "sendmail"
) -> Iterator[Serving]:
    """A long-running ``mailsh serve`` subprocess, killed if the test leaves it running."""
    log = tmp_path / "serve.log"
    with log.open("ab") as fh:
        process = subprocess.Popen(
            serve_args(rig, server, tmp_path, transport, *extra),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    try:
        yield Serving(process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


# --------------------------------------------------------------------------- the paths


@pytest.mark.parametrize("transport", ["sendmail", "smtp"])
def test_once_round_trip_via_postfix_to_alices_mbox(
    mailrig: MailRig,
    homes: Homes,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    cleanup_messages: Cleanup,
    tmp_path: Path,
    transport: str,
) -> None:
    """587 -> /var/mail/root -> serve --once -> sendmail or SMTP :25 -> /var/mail/alice."""
    rid = send(
        run, monkeypatch, mailrig, homes.alice, mailrig.alice, COMMAND,
        "--mbox", str(mailrig.alice_mbox),
    )  # fmt: skip
    cleanup_messages(mailrig.root_mbox, rid)
    cleanup_messages(mailrig.alice_mbox, rid)
    wait_request_delivered(mailrig, rid)

    serve_once(mailrig, homes.server, tmp_path, rid, transport)

    code, out, err = run(
        "--home", str(homes.alice.path), "wait-reply", rid,
        "--mbox", str(mailrig.alice_mbox), "--timeout", str(ROUND_TRIP_TIMEOUT),
    )  # fmt: skip
    assert (code, out, err) == (7, b"out\n", b"err\n"), diagnostics(mailrig, stderr=err)
    assert not contains(rid)(mailrig.root_mbox.read_bytes())  # serve took the request
    assert PendingStore(homes.alice.path).load(rid).answered_at is not None


def test_maildir_user_gets_the_reply_in_his_maildir(
    mailrig: MailRig,
    homes: Homes,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    rid = send(run, monkeypatch, mailrig, homes.bob, mailrig.bob, "printf bob; exit 3")
    cleanup_messages(mailrig.root_mbox, rid)
    cleanup_messages(mailrig.bob_maildir, rid)
    wait_request_delivered(mailrig, rid)

    serve_once(mailrig, homes.server, tmp_path, rid)

    code, out, err = run(
        "--home", str(homes.bob.path), "wait-reply", rid,
        "--maildir", str(mailrig.bob_maildir), "--timeout", str(ROUND_TRIP_TIMEOUT),
    )  # fmt: skip
    assert (code, out, err) == (3, b"bob", b""), diagnostics(mailrig, stderr=err)
    assert any(contains(rid)(m) for m in read_mailbox(mailrig.bob_maildir))  # left in place


@pytest.mark.timeout(3 * ROUND_TRIP_TIMEOUT + 120)
def test_long_running_serve_answers_one_request_after_another(
    mailrig: MailRig,
    homes: Homes,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    """serve keeps reading /var/mail/root while Postfix appends; SIGTERM stops it with 0.

    Each request is ``send --wait``: the last one waits over IMAP instead of the mbox.
    """
    monkeypatch.setenv("MAILSH_IMAP_PASSWORD", mailrig.alice.password)
    waits = [
        ["--mbox", str(mailrig.alice_mbox)],
        ["--mbox", str(mailrig.alice_mbox)],
        [
            "--imap",
            f"imap://{mailrig.alice.name}@{mailrig.host}:{mailrig.imap_port}",
            "--imap-ca-file",
            str(mailrig.ca_file),
        ],
    ]
    with serving(mailrig, homes.server, tmp_path) as serve:
        for n, wait in enumerate(waits):
            monkeypatch.setenv("MAILSH_SMTP_PASSWORD", mailrig.alice.password)
            code, out, err = run(
                "--home", str(homes.alice.path), "send", f"echo request {n}; exit {n + 1}",
                "--to", mailrig.root_address, *submission_args(mailrig, mailrig.alice),
                "--wait", *wait, "--wait-timeout", str(ROUND_TRIP_TIMEOUT),
            )  # fmt: skip
            assert (code, out, err) == (n + 1, f"request {n}\n".encode(), b""), (
                f"request {n}\n{diagnostics(mailrig, serve.log, stderr=err, imap=n == 2)}"
            )
        for record in PendingStore(homes.alice.path).all():
            cleanup_messages(mailrig.alice_mbox, record.request_id)
            cleanup_messages(mailrig.root_mbox, record.request_id)
        assert serve.process.poll() is None, tail(serve.log)
        assert serve.stop() == 0, tail(serve.log)


def test_wait_reply_over_imap_is_woken_by_idle(
    mailrig: MailRig,
    homes: Homes,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    """wait-reply --imap (STARTTLS, rig CA) is waiting in IDLE before the reply exists."""
    rid = send(run, monkeypatch, mailrig, homes.alice, mailrig.alice)
    cleanup_messages(mailrig.root_mbox, rid)
    cleanup_messages(mailrig.alice_mbox, rid)
    wait_request_delivered(mailrig, rid)
    dovecot_log = mailrig.log_dir / "dovecot.log"
    log_start = dovecot_log.stat().st_size

    waiter = subprocess.Popen(
        [
            *MAILSH, "--home", str(homes.alice.path), "wait-reply", rid,
            "--imap", f"imap://{mailrig.alice.name}@{mailrig.host}:{mailrig.imap_port}",
            "--imap-ca-file", str(mailrig.ca_file), "--timeout", str(ROUND_TRIP_TIMEOUT),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(MAILSH_IMAP_PASSWORD=mailrig.alice.password),
    )  # fmt: skip
    try:
        _await_imap_login(dovecot_log, log_start, mailrig.alice.name, waiter)
        time.sleep(1.0)  # its first scan (SEARCH, FETCH) is done, it sits in IDLE
        assert waiter.poll() is None, waiter.communicate()
        serve_once(mailrig, homes.server, tmp_path, rid)
        out, err = waiter.communicate(timeout=ROUND_TRIP_TIMEOUT + 30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(30)
    assert (waiter.returncode, out, err) == (7, b"out\n", b"err\n"), diagnostics(
        mailrig, stderr=err, imap=True
    )


def _await_imap_login(
    log: Path, start: int, user: str, process: subprocess.Popen[bytes], timeout: float = 60
) -> None:
    needle = f"Login: user=<{user}>".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as fh:
            fh.seek(start)
            if needle in fh.read():
                return
        if process.poll() is not None:
            pytest.fail(f"wait-reply --imap exited {process.returncode}: {process.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"wait-reply --imap never logged in to Dovecot\n{tail(log)}")


def test_wait_reply_over_imap_finds_a_reply_that_arrived_before_it_started(
    mailrig: MailRig,
    homes: Homes,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    """The first IMAP scan starts before the request was sent (UID SEARCH SINCE)."""
    rid = send(run, monkeypatch, mailrig, homes.alice, mailrig.alice, "echo early; exit 0")
    cleanup_messages(mailrig.root_mbox, rid)
    cleanup_messages(mailrig.alice_mbox, rid)
    wait_request_delivered(mailrig, rid)
    serve_once(mailrig, homes.server, tmp_path, rid)
    wait_for_message(mailrig.alice_mbox, contains(f"mailsh reply {rid}"))
    before = len(mbox_messages(mailrig.alice_mbox))

    monkeypatch.setenv("MAILSH_IMAP_PASSWORD", mailrig.alice.password)
    code, out, err = run(
        "--home", str(homes.alice.path), "wait-reply", rid,
        "--imap", f"imaps://{mailrig.alice.name}@{mailrig.host}:{mailrig.imaps_port}",
        "--imap-ca-file", str(mailrig.ca_file), "--timeout", "30",
    )  # fmt: skip
    assert (code, out, err) == (0, b"early\n", b""), diagnostics(mailrig, stderr=err)
    # Read-only (EXAMINE, BODY.PEEK): nothing removed, nothing marked \Seen. Dovecot does
    # write its own UID bookkeeping (X-IMAPbase, X-UID, Status: O) into the mbox.
    after = mailrig.alice_mbox.read_bytes()
    assert len(mbox_messages(mailrig.alice_mbox)) == before
    assert contains(f"mailsh reply {rid}")(after)
    assert not re.search(rb"^Status: \w*R", after, re.MULTILINE), "marked as read"


def test_wait_reply_over_imap_without_or_with_a_wrong_password_says_what_to_do(
    mailrig: MailRig,
    homes: Homes,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    cleanup_messages: Cleanup,
) -> None:
    rid = send(run, monkeypatch, mailrig, homes.alice, mailrig.alice, "true")
    cleanup_messages(mailrig.root_mbox, rid)
    code, out, err = run(
        "--home", str(homes.alice.path), "wait-reply", rid,
        "--imap", f"imap://{mailrig.alice.name}@{mailrig.host}", "--timeout", "5",
    )  # fmt: skip
    assert code == 255
    assert out == b""
    assert b"needs the password of 'alice'" in err
    assert b"next: export MAILSH_IMAP_PASSWORD=" in err

    monkeypatch.setenv("MAILSH_IMAP_PASSWORD", "not-" + mailrig.alice.password)
    code, out, err = run(
        "--home", str(homes.alice.path), "wait-reply", rid,
        "--imap", f"imap://{mailrig.alice.name}@{mailrig.host}",
        "--imap-ca-file", str(mailrig.ca_file), "--timeout", "5",
    )  # fmt: skip
    assert (code, out) == (255, b"")
    # the server's own words, not a Python bytes repr (b'[AUTHENTICATIONFAILED] ...')
    assert err.startswith(b"mailsh: IMAP login as 'alice' on 127.0.0.1:143 failed: ["), err
    assert b"next: check the user in the URL and MAILSH_IMAP_PASSWORD" in err


# --------------------------------------------------------------------------- the burst


@pytest.mark.timeout(BURST_TIMEOUT + 300)  # the bound is BURST_TIMEOUT, not pytest's 300 s
def test_burst_of_200_requests_through_postfix_each_run_once_each_answered(
    mailrig: MailRig,
    homes: Homes,
    tmp_path: Path,
) -> None:
    """200 requests through 587 while serve (2 workers) runs: ran once, answered once.

    The library sends (one SMTP session each, like 200 ``mailsh send``) and verifies the
    replies with ``seal.open_answer``; 200 CLI processes would only add start-up time.
    """
    marker = tmp_path / "ran"
    alice = homes.alice
    settings = load_settings(
        home=alice.path,
        smtp=f"smtp://{mailrig.alice.name}@{mailrig.host}:{mailrig.submission_port}",
        smtp_password=SecretStr(mailrig.alice.password),
        smtp_ca_file=mailrig.ca_file,
        require_tls=True,
    )
    pending: dict[str, PendingRequest] = {}
    started = time.monotonic()
    try:
        with serving(mailrig, homes.server, tmp_path, "--workers", "2") as serve:
            for i in range(BURST):
                sent = submit_request(
                    settings,
                    prepare_request(
                        settings,
                        alice.gpg,
                        command=f"echo {i} >> {marker}",
                        to=mailrig.root_address,
                    ),
                )
                pending[sent.request_id] = sent.pending
            answered = _collect_replies(mailrig, alice, homes.server, pending, started, serve)
            status = serve.stop()
        lines = marker.read_text().split()
        assert sorted(int(x) for x in lines) == list(range(BURST)), "each ran exactly once"
        missing = sorted(set(pending) - set(answered))
        assert not missing, f"{len(missing)} unanswered\n{diagnostics(mailrig, serve.log)}"
        twice = {rid: n for rid, n in answered.items() if n != 1}
        assert not twice, f"replies delivered more than once: {twice}"
        assert status == 0, tail(serve.log)
    finally:
        ids = {rid.encode() for rid in pending}
        for box in (mailrig.alice_mbox, mailrig.root_mbox):
            remove_messages(box, lambda m: bool(_ids_in(m) & ids))


def _ids_in(message: bytes) -> set[bytes]:
    return set(re.findall(rb"mailsh (?:reply|request) ([0-9a-f]{32})", message[:8192]))


def _collect_replies(
    rig: MailRig,
    client: Home,
    server: Home,
    pending: dict[str, PendingRequest],
    started: float,
    serve: Serving,
) -> dict[str, int]:
    """Poll alice's mbox until every request has a verified OK reply; count replies per id.

    Each reply is verified once (``seal.open_answer``); a message that fails to open
    is only tolerated as the mbox's last one (Postfix may still be writing it).
    """
    trust = load_trust(client.settings.trust_file)
    verified: set[str] = set()
    while True:
        messages = mbox_messages(rig.alice_mbox)
        counts: dict[str, int] = {}
        for index, raw in enumerate(messages):
            match = REPLY_ID.search(raw)
            rid = match.group(1).decode() if match else ""
            if rid not in pending:
                continue
            counts[rid] = counts.get(rid, 0) + 1
            if rid in verified:
                continue
            try:
                reply = seal.open_answer(
                    client.gpg,
                    raw,
                    trust=trust,
                    server_fingerprint=server.fingerprint,
                    request_id=rid,
                    request_sha256=pending[rid].payload_sha256,
                    now=datetime.now(UTC),
                    max_skew=timedelta(seconds=client.settings.reply_clock_skew),
                    max_bytes=10_000_000,
                )
                assert isinstance(reply, Reply), reply  # a notice is never the outcome
            except Exception:
                if index == len(messages) - 1:
                    counts[rid] -= 1
                    continue
                raise
            assert reply.status is ReplyStatus.OK, (rid, reply.status, reply.reason)
            assert reply.exit_code == 0, (rid, reply.stderr)
            verified.add(rid)
        if len(verified) == len(pending):
            time.sleep(2)  # a duplicate, if any, would be counted now
            for raw in mbox_messages(rig.alice_mbox)[len(messages) :]:
                match = REPLY_ID.search(raw)
                if match and match.group(1).decode() in pending:
                    counts[match.group(1).decode()] += 1
            return counts
        if serve.process.poll() is not None:
            pytest.fail(f"serve exited {serve.process.returncode}\n{tail(serve.log)}")
        if time.monotonic() - started > BURST_TIMEOUT:
            return {rid: counts[rid] for rid in verified}
        time.sleep(0.5)
