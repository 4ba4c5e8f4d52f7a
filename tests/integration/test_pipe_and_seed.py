"""Pipe delivery and the original proof of concept's client, through real Postfix (issue 5).

* Pipe delivery (item 3): Postfix local(8) runs ``~mailshd/.forward``'s command
  ``mailsh deliver`` as the ``mailshd`` user; ``mailsh serve --spool-only --once`` on that
  home runs the request and replies through ``/usr/sbin/sendmail``. When ``mailsh
  deliver`` cannot store the message it exits 75 and Postfix keeps it deferred, then
  delivers it once the home is fixed and the queue flushed.
* The seed's client (item 4): a script signed with plain ``gpg --armor --sign``,
  uuencoded with the real ``uuencode`` and sent by s-nail over 587 STARTTLS + AUTH runs
  only when the key was trusted with ``--allow-plain-scripts``, runs once (replay), and
  the signer is told why otherwise.
* Readable replies (item 5): every reply here is taken from alice's Postfix-delivered
  mbox, saved to a file and read with the plain ``gpg --decrypt`` CLI; its preamble shows
  request id, status and exit code and none of the command's output.

The ``.forward`` is written by the test, not the rig: it must name the mailsh of the
checkout under test. When ``mailshd`` cannot run the checkout's interpreter (e.g. a
pyenv Python under /root), a two-line shim runs the checkout's site-packages with the
system Python of the same version.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from mailsh import seal
from mailsh.keys.gpg import Gpg
from mailsh.keys.trust import add_trusted_key, load_trust
from mailsh.protocol import Reply, ReplyStatus
from tests.kit.homes import Home
from tests.kit.mailrig import (
    SCRIPT,
    MailRig,
    contains,
    parse_env,
    submit,
    unique_token,
    wait_for_message,
)
from tests.kit.serverkit import request_to

pytestmark = pytest.mark.mailrig

Cleanup = Callable[[Path, str], None]
SENDMAIL = "/usr/sbin/sendmail"
CHECKOUT_MAILSH = Path(sys.prefix) / "bin" / "mailsh"
RUN_TIMEOUT = 120
ROOT_MBOX_LOCK = Path("/run/lock/mailsh-rig-root-mbox.lock")
GPG_CLI = ["gpg", "--batch", "--no-tty"]  # the plain gpg CLI a person (or the seed) uses


# --------------------------------------------------------------------------- helpers


def run(
    argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (as ``user`` when given) and fail the test with its output if it fails."""
    extra: dict[str, Any] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        extra = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    proc = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL if "input" not in kw else None,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        **extra,
        **kw,
    )
    if proc.returncode != 0:
        pytest.fail(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def header(raw: bytes, name: str) -> str:
    value = BytesParser(policy=compat32).parsebytes(raw, headersonly=True).get(name)
    assert value is not None, f"no {name} header"
    return str(value).strip()


@dataclass(frozen=True)
class GpgReading:
    """What a person with only gpg learns from a reply mail."""

    preamble: str
    reply: dict[str, Any]
    status_lines: list[str]


def gpg_read_reply(alice: Home, mail: bytes, path: Path, server_fpr: str) -> GpgReading:
    """Save ``mail`` to ``path`` and read it like a person: ``gpg --decrypt FILE``."""
    path.write_bytes(mail)
    gnupg_home = str(alice.settings.gnupg_home)
    proc = subprocess.run(
        [*GPG_CLI, "--homedir", gnupg_home, "--status-fd", "2", "--decrypt", str(path)],
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    status = [
        line.removeprefix("[GNUPG:] ")
        for line in proc.stderr.decode(errors="replace").splitlines()
        if line.startswith("[GNUPG:] ")
    ]
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "DECRYPTION_OKAY" in status
    assert any(s.startswith("GOODSIG ") for s in status)
    [validsig] = [s for s in status if s.startswith("VALIDSIG ")]
    assert validsig.split()[-1] == server_fpr  # the primary key's fingerprint comes last
    text = mail.decode("ascii").replace("\r\n", "\n")
    body = text.partition("\n\n")[2]
    preamble = body.partition("-----BEGIN PGP MESSAGE-----")[0]
    return GpgReading(preamble=preamble, reply=json.loads(proc.stdout), status_lines=status)


def assert_preamble(reading: GpgReading, *, status: str, exit_code: int | None) -> None:
    """The clear text names only the request (private replies, docs/security.md P17);
    status and exit code are read from the decrypted reply."""
    rid = reading.reply["request_id"] or "unknown"
    assert f"request: {rid}\n" in reading.preamble
    assert "status:" not in reading.preamble
    assert "exit code:" not in reading.preamble
    assert (reading.reply["status"], reading.reply["exit_code"]) == (status, exit_code)
    assert "gpg --decrypt" in reading.preamble


def gpg_import(alice: Home, key_file: Path) -> None:
    """Plain ``gpg --import`` into alice's GNUPGHOME (to verify the server's signature)."""
    run([*GPG_CLI, "--homedir", str(alice.settings.gnupg_home), "--import", str(key_file)])


def postqueue_entries() -> list[dict[str, Any]]:
    out = run(["postqueue", "-j"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def queued_for(address: str) -> list[dict[str, Any]]:
    return [e for e in postqueue_entries() if any(r["address"] == address for r in e["recipients"])]


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rig_env(mailrig: MailRig) -> dict[str, str]:
    proc = subprocess.run(
        [str(SCRIPT), "env"], capture_output=True, text=True, check=True, timeout=30
    )
    return parse_env(proc.stdout)


@pytest.fixture(scope="module")
def rig_alice(make_home: Callable[..., Home], mailrig: MailRig) -> Home:
    """alice@mailsh.test: her key's address is her rig mailbox, so replies reach her."""
    return make_home(mailrig.alice.address)


def _mailsh_launcher(user: str, workspace: Path) -> list[str]:
    """A command ``user`` can run that is the mailsh of this checkout."""
    try:
        probe = subprocess.run(
            [str(CHECKOUT_MAILSH), "--help"],
            capture_output=True,
            timeout=60,
            check=False,
            user=pwd.getpwnam(user).pw_uid,
            group=pwd.getpwnam(user).pw_gid,
            extra_groups=[],
            cwd="/",
        )
        usable = probe.returncode == 0
    except PermissionError:  # the script or its interpreter is out of the user's reach
        usable = False
    if usable:
        return [str(CHECKOUT_MAILSH)]
    # The interpreter is out of reach (e.g. under /root): the system Python of the same
    # version runs the checkout's site-packages (readable by all) instead.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = shutil.which(f"python{version}", path="/usr/bin:/usr/local/bin")
    if system_python is None:
        pytest.skip(
            f"{user} cannot run {CHECKOUT_MAILSH} and there is no system python{version} "
            "to run this checkout with"
        )
    site_dir = sysconfig.get_paths()["purelib"]
    code = (
        f"import site, sys; site.addsitedir({site_dir!r}); sys.argv[0] = 'mailsh'; "
        "from mailsh.cli import main; sys.exit(main())"
    )
    shim = workspace / "mailsh"
    shim.write_text(
        "#!/bin/sh\n# mailsh of the checkout under test, for a user who cannot run its "
        f'interpreter\nexec {shlex.quote(system_python)} -I -S -c {shlex.quote(code)} "$@"\n',
        encoding="utf-8",
    )
    shim.chmod(0o755)
    return [str(shim)]


@dataclass
class PipeServer:
    """A mailsh home owned by the rig's mailshd user, fed by ``~mailshd/.forward``."""

    user: str
    address: str
    workspace: Path
    home: Path
    mailsh: list[str]
    fingerprint: str
    pubkey: Path

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(self.workspace),
            "LANG": "C.UTF-8",
            "MAILSH_HOME": str(self.home),
        }

    def mailsh_run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run([*self.mailsh, *argv], user=self.user, env=self.env(), cwd=self.workspace)

    def make_spool(self) -> Path:
        """Create the spool as ``mailsh deliver`` would (owned by the user, 0700)."""
        pw = pwd.getpwnam(self.user)
        spool = self.home / "spool"
        for path in (spool, *(spool / sub for sub in ("tmp", "new", "done", "quarantine"))):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return spool

    def spooled(self, sub: str = "new") -> list[Path]:
        d = self.home / "spool" / sub
        return sorted(d.iterdir()) if d.is_dir() else []


@pytest.fixture
def pipe_server(rig_env: dict[str, str], rig_alice: Home) -> Iterator[PipeServer]:
    user = rig_env["MAILRIG_MAILSHD_USER"]
    user_home = Path(rig_env["MAILRIG_MAILSHD_HOME"])
    pw = pwd.getpwnam(user)
    workspace = user_home / f"t-{secrets.token_hex(6)}"
    workspace.mkdir(mode=0o700)
    os.chown(workspace, pw.pw_uid, pw.pw_gid)
    forward = user_home / ".forward"
    home = workspace / "home"
    try:
        mailsh = _mailsh_launcher(user, workspace)
        address = f"{user}@{rig_env['MAILRIG_DOMAIN']}"
        alice_key = workspace / "alice.asc"
        shutil.copyfile(rig_alice.pubkey, alice_key)
        for path in workspace.iterdir():
            os.chown(path, pw.pw_uid, pw.pw_gid)
        server = PipeServer(user, address, workspace, home, mailsh, "", workspace / "server.asc")
        server.mailsh_run("keygen", "--email", address)
        server.mailsh_run("keys", "export", "--output", str(server.pubkey))
        server.mailsh_run("trust", "add", str(alice_key))
        entry = add_trusted_key(
            rig_alice.gpg, rig_alice.settings.trust_file, server.pubkey, reply_to=None
        )
        server.fingerprint = entry.fingerprint
        # What an admin writes: local(8) runs it as mailshd, in mailshd's home.
        command = shlex.join(["/usr/bin/env", f"MAILSH_HOME={home}", *mailsh, "deliver"])
        forward.write_text(f'"|{command}"\n', encoding="utf-8")
        os.chown(forward, pw.pw_uid, pw.pw_gid)
        forward.chmod(0o644)
        yield server
    finally:
        if forward.exists() and str(workspace) in forward.read_text(encoding="utf-8"):
            forward.unlink()
        for entry_ in queued_for(f"{user}@{rig_env['MAILRIG_DOMAIN']}"):
            subprocess.run(
                ["postsuper", "-d", entry_["queue_id"]], capture_output=True, check=False
            )
        if (home / "gnupg").is_dir():
            Gpg(home / "gnupg", max_output=1 << 20).kill_agent()
        shutil.rmtree(workspace, ignore_errors=True)


def seal_for(client: Home, server: PipeServer, command: str) -> seal.SealedRequest:
    return request_to(client, server.address, server.fingerprint, command)


def open_reply(client: Home, server_fpr: str, sealed: seal.SealedRequest, raw: bytes) -> Reply:
    found = seal.open_answer(
        client.gpg,
        raw,
        trust=load_trust(client.settings.trust_file),
        server_fingerprint=server_fpr,
        request_id=sealed.request.request_id,
        request_sha256=sealed.payload_sha256,
        now=datetime.now(UTC),
        max_skew=timedelta(seconds=client.settings.reply_clock_skew),
        max_bytes=50_000_000,
    )
    assert isinstance(found, Reply), found  # a notice is never the outcome
    return found


# --------------------------------------------------------------------------- pipe delivery


def test_postfix_permits_forward_commands_run_as_the_user(rig_env: dict[str, str]) -> None:
    """The pipe set-up relies on Postfix defaults the rig does not override."""
    allowed = run(["postconf", "-h", "allow_mail_to_commands"]).stdout
    assert "forward" in re.split(r"[,\s]+", allowed.strip())
    user = pwd.getpwnam(rig_env["MAILRIG_MAILSHD_USER"])
    assert user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_dir == rig_env["MAILRIG_MAILSHD_HOME"]
    shadow = run(["passwd", "-S", user.pw_name]).stdout.split()
    assert shadow[1] == "L"  # locked: no password login


def test_pipe_delivery_spools_runs_and_replies_readably(
    mailrig: MailRig,
    pipe_server: PipeServer,
    rig_alice: Home,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    secret = unique_token()
    sealed = seal_for(rig_alice, pipe_server, f"id -un; echo {secret}; echo {secret} >&2; exit 3")
    rid = sealed.request.request_id
    cleanup_messages(mailrig.alice_mbox, rid)

    submit(mailrig, sealed.mail, to=[pipe_server.address], user=mailrig.alice)
    [spooled] = wait_until("the pipe delivery in the spool", pipe_server.spooled)
    assert spooled.name.endswith(".pipe")  # stored by `mailsh deliver`
    assert spooled.stat().st_uid == pwd.getpwnam(pipe_server.user).pw_uid  # ran as mailshd
    raw = spooled.read_bytes()
    assert f"Delivered-To: {pipe_server.address}".encode() in raw
    assert rid.encode() in raw

    served = pipe_server.mailsh_run("serve", "--spool-only", "--once", "--sendmail", SENDMAIL)
    assert "executed" in served.stderr
    assert pipe_server.spooled() == []
    assert len(pipe_server.spooled("done")) == 1

    mail = wait_for_message(mailrig.alice_mbox, contains(f"mailsh reply {rid}"))
    assert secret.encode() not in mail  # encrypted: no output in clear
    reply = open_reply(rig_alice, pipe_server.fingerprint, sealed, mail)
    assert reply.status is ReplyStatus.OK
    assert reply.exit_code == 3
    assert reply.stdout == f"{pipe_server.user}\n{secret}\n".encode()
    assert reply.stderr == f"{secret}\n".encode()

    # The same mail read by a person with only gpg (item 5).
    gpg_import(rig_alice, pipe_server.pubkey)
    reading = gpg_read_reply(rig_alice, mail, tmp_path / "reply.eml", pipe_server.fingerprint)
    assert reading.reply["request_id"] == rid
    assert reading.reply["status"] == "ok"
    assert reading.reply["exit_code"] == 3
    assert_preamble(reading, status="ok", exit_code=3)
    assert secret not in reading.preamble


def test_serve_needs_a_source_and_spool_only_stands_alone(tmp_path: Path) -> None:
    env = {**os.environ, "MAILSH_HOME": str(tmp_path / "home")}
    for argv, says in (
        (["serve", "--once"], "--spool-only"),
        (["serve", "--once", "--spool-only", "--mbox", str(tmp_path / "mbox")], "excludes"),
    ):
        proc = subprocess.run(
            [str(CHECKOUT_MAILSH), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr


def test_deliver_failure_keeps_the_mail_deferred_until_fixed(
    mailrig: MailRig,
    pipe_server: PipeServer,
    rig_alice: Home,
    cleanup_messages: Cleanup,
) -> None:
    sealed = seal_for(rig_alice, pipe_server, "echo late but once")
    rid = sealed.request.request_id
    cleanup_messages(mailrig.alice_mbox, rid)
    spool_tmp = pipe_server.make_spool() / "tmp"

    # The contract first: an unwritable spool makes `mailsh deliver` exit 75.
    spool_tmp.chmod(0o500)
    try:
        direct = subprocess.run(
            [*pipe_server.mailsh, "deliver"],
            input=sealed.mail,
            env=pipe_server.env(),
            capture_output=True,
            timeout=RUN_TIMEOUT,
            check=False,
            user=pwd.getpwnam(pipe_server.user).pw_uid,
            cwd=pipe_server.workspace,
        )
        assert direct.returncode == 75, direct.stderr
        assert pipe_server.spooled() == []

        # Through Postfix: local(8) maps 75 to "deferred" and keeps the message queued.
        submit(mailrig, sealed.mail, to=[pipe_server.address], user=mailrig.alice)

        def deferred() -> list[dict[str, Any]]:
            return [
                e
                for e in queued_for(pipe_server.address)
                if e["queue_name"] == "deferred"
                and "could not store the message" in e["recipients"][0].get("delay_reason", "")
            ]

        [entry] = wait_until("a deferred queue entry for mailshd", deferred)
        assert pipe_server.spooled() == []
        mailq = run(["mailq"]).stdout
        assert entry["queue_id"] in mailq
    finally:
        spool_tmp.chmod(0o700)

    run(["postqueue", "-f"])
    [spooled] = wait_until("the retried delivery in the spool", pipe_server.spooled)
    assert rid.encode() in spooled.read_bytes()
    wait_until("an empty queue for mailshd", lambda: not queued_for(pipe_server.address))

    pipe_server.mailsh_run("serve", "--spool-only", "--once", "--sendmail", SENDMAIL)
    mail = wait_for_message(mailrig.alice_mbox, contains(f"mailsh reply {rid}"))
    reply = open_reply(rig_alice, pipe_server.fingerprint, sealed, mail)
    assert reply.status is ReplyStatus.OK
    assert reply.stdout == b"late but once\n"


# --------------------------------------------------------------------------- the seed's client


@pytest.fixture
def root_mbox_exclusive() -> Iterator[None]:
    """Hold the host-wide lock for consumers of /var/mail/root while the test runs.

    Within one test run the mailrig xdist group keeps consumers apart; this lock is for
    concurrent runs from other checkouts on the same machine, whose ``serve --mbox
    /var/mail/root`` would otherwise take (and discard) this test's mail. It only helps
    against runs that take it too.
    """
    ROOT_MBOX_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with ROOT_MBOX_LOCK.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture
def root_server(
    make_home: Callable[..., Home],
    rig_alice: Home,
    mailrig: MailRig,
    root_mbox_exclusive: None,
) -> Home:
    """A fresh server home for root@mailsh.test; alice's gpg knows its public key."""
    server = make_home(mailrig.root_address, address=mailrig.root_address)
    gpg_import(rig_alice, server.pubkey)
    return server


def checkout_mailsh(server: Home, *argv: str) -> subprocess.CompletedProcess[str]:
    """The real CLI of this checkout, as root, on the server's home."""
    env = {**os.environ, "MAILSH_HOME": str(server.path)}
    return run([str(CHECKOUT_MAILSH), *argv], env=env)


def seed_sign(alice: Home, script: str, workdir: Path) -> Path:
    """The seed's request: ``gpg --local-user ME --armor --sign request.txt``."""
    request = workdir / "request.txt"
    request.write_text(script, encoding="utf-8")
    signed = workdir / "request.txt.asc"
    signed.unlink(missing_ok=True)
    home = str(alice.settings.gnupg_home)
    who = ["--local-user", alice.fingerprint]
    run(
        [
            *GPG_CLI,
            "--homedir",
            home,
            *who,
            "--armor",
            "--output",
            str(signed),
            "--sign",
            str(request),
        ]
    )
    return signed


def seed_send(
    rig: MailRig, signed: Path, subject: str, *, preamble: str = "Please run me :)"
) -> bytes:
    """``preamble`` + ``uuencode FILE NAME`` as the body, sent by s-nail as alice over 587.

    Returns the request as Postfix delivered it to root's mbox.
    """
    uu = run(["uuencode", str(signed), signed.name], cwd=signed.parent).stdout
    body = f"{preamble}\n\n{uu}"
    account = rig.alice
    # s-nail checks the certificate against the host name, not an IP SAN: use localhost.
    settings = [
        "v15-compat",
        f"mta=smtp://{account.name}:{account.password}@localhost:{rig.submission_port}",
        "smtp-use-starttls",
        "smtp-auth=plain",
        f"tls-ca-file={rig.ca_file}",
        "tls-ca-no-defaults",
        f"hostname=client.{rig.domain}",
        f"from={account.address}",
        "ttycharset=utf-8",  # a non-ASCII body goes out as UTF-8 quoted-printable
    ]
    argv = ["s-nail", "-n", "-#"]
    for setting in settings:
        argv += ["-S", setting]
    run([*argv, "-s", subject, rig.root_address], input=body)
    return wait_for_message(rig.root_mbox, contains(subject))


def serve_root_mbox(rig: MailRig, server: Home) -> subprocess.CompletedProcess[str]:
    return checkout_mailsh(
        server, "serve", "--mbox", str(rig.root_mbox), "--once", "--sendmail", SENDMAIL
    )


def reply_to_mail(rig: MailRig, request: bytes, cleanup: Cleanup) -> bytes:
    """The reply in alice's mbox that answers ``request`` (In-Reply-To its Message-ID)."""
    message_id = header(request, "Message-ID")
    cleanup(rig.alice_mbox, message_id)
    return wait_for_message(rig.alice_mbox, contains(f"In-Reply-To: {message_id}"))


def test_seed_client_runs_when_allowed_once_and_reply_reads_with_gpg(
    mailrig: MailRig,
    rig_alice: Home,
    root_server: Home,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    checkout_mailsh(root_server, "trust", "add", str(rig_alice.pubkey), "--allow-plain-scripts")
    marker = tmp_path / "ran"
    secret = unique_token()
    signed = seed_sign(rig_alice, f"echo ran >> {marker}\necho {secret}\n", tmp_path)
    subject = f"Test {unique_token()}"
    cleanup_messages(mailrig.root_mbox, subject)

    request = seed_send(mailrig, signed, subject)
    assert b"\nbegin 644 request.txt.asc\n" in request  # uuencode's mode and name line
    served = serve_root_mbox(mailrig, root_server)
    assert "executed" in served.stderr, served.stderr
    assert marker.read_text() == "ran\n"

    mail = reply_to_mail(mailrig, request, cleanup_messages)
    assert header(mail, "To") == mailrig.alice.address  # the key's pinned address
    assert secret.encode() not in mail
    reading = gpg_read_reply(rig_alice, mail, tmp_path / "reply.eml", root_server.fingerprint)
    assert reading.reply["status"] == "ok"
    assert reading.reply["exit_code"] == 0
    assert base64.b64decode(reading.reply["stdout"]) == f"{secret}\n".encode()
    assert re.fullmatch(r"[0-9a-f]{32}", reading.reply["request_id"])
    assert_preamble(reading, status="ok", exit_code=0)
    assert secret not in reading.preamble

    # Replay: the same signed file, mailed again (new headers, new Message-ID).
    subject2 = f"Test {unique_token()}"
    cleanup_messages(mailrig.root_mbox, subject2)
    replayed = seed_send(mailrig, signed, subject2)
    served = serve_root_mbox(mailrig, root_server)
    # If this fails, another consumer of /var/mail/root (a concurrent test run from
    # another checkout) took the mail first; see root_mbox_exclusive.
    assert "original=finished notice=True" in served.stderr, served.stderr
    assert marker.read_text() == "ran\n"  # not run again
    again = gpg_read_reply(
        rig_alice,
        reply_to_mail(mailrig, replayed, cleanup_messages),
        tmp_path / "replay.eml",
        root_server.fingerprint,
    )
    # A copy gets one notice, never a second outcome (docs/protocol.md section 9a).
    assert again.reply["kind"] == "mailsh.notice.v1"
    assert again.reply["original"] == "finished"
    assert again.reply["request_id"] == reading.reply["request_id"]  # what was signed
    assert f"request: {again.reply['request_id']}\n" in again.preamble
    assert "status:" not in again.preamble


def test_seed_client_without_the_flag_is_refused_and_told_why(
    mailrig: MailRig,
    rig_alice: Home,
    root_server: Home,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    checkout_mailsh(root_server, "trust", "add", str(rig_alice.pubkey))
    marker = tmp_path / "ran"
    signed = seed_sign(rig_alice, f"echo ran >> {marker}\n", tmp_path)
    subject = f"Test {unique_token()}"
    cleanup_messages(mailrig.root_mbox, subject)

    request = seed_send(mailrig, signed, subject)
    served = serve_root_mbox(mailrig, root_server)
    assert "rejected" in served.stderr
    assert not marker.exists()

    mail = reply_to_mail(mailrig, request, cleanup_messages)
    reading = gpg_read_reply(rig_alice, mail, tmp_path / "reply.eml", root_server.fingerprint)
    assert reading.reply["status"] == "rejected"
    assert reading.reply["reason"].startswith("plain-script-not-allowed")
    assert "--allow-plain-scripts" not in reading.preamble  # the why is inside, encrypted
    assert_preamble(reading, status="rejected", exit_code=None)


def test_seed_client_quoted_printable_body_still_runs(
    mailrig: MailRig,
    rig_alice: Home,
    root_server: Home,
    cleanup_messages: Cleanup,
    tmp_path: Path,
) -> None:
    """A mail client encodes a non-ASCII note as quoted-printable: the uu lines' "=" too."""
    checkout_mailsh(root_server, "trust", "add", str(rig_alice.pubkey), "--allow-plain-scripts")
    marker = tmp_path / "ran"
    signed = seed_sign(rig_alice, f"echo ran >> {marker}\n", tmp_path)
    subject = f"Test {unique_token()}"
    cleanup_messages(mailrig.root_mbox, subject)

    request = seed_send(mailrig, signed, subject, preamble="Bitte ausführen — alice")
    assert b"Content-Transfer-Encoding: quoted-printable" in request
    served = serve_root_mbox(mailrig, root_server)
    assert "executed" in served.stderr, served.stderr
    assert marker.read_text() == "ran\n"
    reply = reply_to_mail(mailrig, request, cleanup_messages)
    reading = gpg_read_reply(rig_alice, reply, tmp_path / "reply.eml", root_server.fingerprint)
    assert reading.reply["status"] == "ok"
