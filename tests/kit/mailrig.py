"""The mail rig: a real Postfix + Dovecot on 127.0.0.1 (scripts/mailrig), and its helpers.

Its fixtures, ``mailrig`` and ``cleanup_messages``, are registered in
:mod:`tests.kit.fixtures`; mark tests that use them ``@pytest.mark.mailrig``. The
``mailrig`` fixture runs ``scripts/mailrig up`` once per session (once per xdist worker;
the script serialises concurrent runs) and returns a :class:`MailRig` with the facts
printed by ``scripts/mailrig env``. When the machine cannot run the rig (not root, no
apt-get, the script fails) the tests are skipped with the reason; set
``MAILSH_REQUIRE_MAILRIG=1`` (e.g. in CI) to make that a failure instead.

Helpers: :func:`build_message` (CRLF bytes), :func:`submit` (587, STARTTLS + AUTH),
:func:`wait_for_message` (mbox or Maildir, bounded), :func:`remove_messages` (cleanup).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import shutil
import smtplib
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "mailrig"
UP_TIMEOUT = 600.0
WAIT_TIMEOUT = 30.0

Predicate = Callable[[bytes], bool]


@dataclass(frozen=True)
class MailUser:
    """A rig account. Passwords are published test values, valid on 127.0.0.1 only."""

    name: str
    password: str
    address: str


@dataclass(frozen=True)
class MailRig:
    """Facts about the running rig, from ``scripts/mailrig env``."""

    domain: str
    host: str
    smtp_port: int
    submission_port: int
    imap_port: int
    imaps_port: int
    ca_file: Path
    alice: MailUser
    bob: MailUser
    root_address: str
    root_mbox: Path
    alice_mbox: Path
    bob_maildir: Path
    dovecot_conf: Path
    log_dir: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the rig's self-signed certificate."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def parse_env(text: str) -> dict[str, str]:
    """Parse ``export KEY=VALUE`` lines as printed by ``scripts/mailrig env``."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            values[key] = value
    return values


def rig_from_env(env: dict[str, str]) -> MailRig:
    domain = env["MAILRIG_DOMAIN"]
    return MailRig(
        domain=domain,
        host=env["MAILRIG_HOST"],
        smtp_port=int(env["MAILRIG_SMTP_PORT"]),
        submission_port=int(env["MAILRIG_SUBMISSION_PORT"]),
        imap_port=int(env["MAILRIG_IMAP_PORT"]),
        imaps_port=int(env["MAILRIG_IMAPS_PORT"]),
        ca_file=Path(env["MAILRIG_CA_FILE"]),
        alice=MailUser(
            env["MAILRIG_ALICE_USER"],
            env["MAILRIG_ALICE_PASSWORD"],
            f"{env['MAILRIG_ALICE_USER']}@{domain}",
        ),
        bob=MailUser(
            env["MAILRIG_BOB_USER"],
            env["MAILRIG_BOB_PASSWORD"],
            f"{env['MAILRIG_BOB_USER']}@{domain}",
        ),
        root_address=f"root@{domain}",
        root_mbox=Path(env["MAILRIG_ROOT_MBOX"]),
        alice_mbox=Path(env["MAILRIG_ALICE_MBOX"]),
        bob_maildir=Path(env["MAILRIG_BOB_MAILDIR"]),
        dovecot_conf=Path(env["MAILRIG_DOVECOT_CONF"]),
        log_dir=Path(env["MAILRIG_LOG_DIR"]),
    )


def _unavailable(reason: str) -> None:
    if os.environ.get("MAILSH_REQUIRE_MAILRIG") == "1":
        pytest.fail(f"mail rig required (MAILSH_REQUIRE_MAILRIG=1) but {reason}")
    pytest.skip(f"mail rig unavailable: {reason}")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def start_rig() -> MailRig:
    """Run ``scripts/mailrig up`` and return the facts; skips (or fails) when impossible."""
    if os.geteuid() != 0:
        _unavailable("it needs root (installs packages, runs Postfix and Dovecot)")
    if shutil.which("apt-get") is None:
        _unavailable("apt-get not found (the rig needs Debian)")
    try:
        up = subprocess.run(
            [str(SCRIPT), "up"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/mailrig up did not run: {exc}")
    if up.returncode != 0:
        _unavailable(
            f"scripts/mailrig up exited {up.returncode}:\n{_tail(up.stdout)}\n{_tail(up.stderr)}"
        )
    env = subprocess.run(
        [str(SCRIPT), "env"], capture_output=True, text=True, check=True, timeout=30
    )
    return rig_from_env(parse_env(env.stdout))


# --------------------------------------------------------------------------- sending


def unique_token() -> str:
    """A token to put in a Subject/body and find the message again."""
    return f"mailrig-{uuid.uuid4().hex}"


def build_message(
    *, sender: str, to: str, subject: str, body: str, headers: dict[str, str] | None = None
) -> bytes:
    """A text/plain message serialized with CRLF line ends (``email.policy.SMTP``)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)  # else Postfix adds one
    msg["Message-ID"] = make_msgid(domain="mailsh.test")
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    return msg.as_bytes()


def submit(
    rig: MailRig,
    raw: bytes,
    *,
    to: list[str],
    user: MailUser | None = None,
    sender: str | None = None,
) -> None:
    """Send ``raw`` unchanged through submission (587) with STARTTLS + AUTH (default alice).

    ``sendmail(from, to, bytes)`` sends the bytes as they are (``send_message`` would
    re-serialize and mangle ``From `` lines).
    """
    account = user or rig.alice
    with smtplib.SMTP(rig.host, rig.submission_port, timeout=30) as smtp:
        smtp.starttls(context=rig.ssl_context())
        smtp.login(account.name, account.password)
        smtp.sendmail(sender or account.address, to, raw)


# --------------------------------------------------------------------------- reading


def mbox_messages(path: Path) -> list[bytes]:
    """Split an mboxo file into messages (the ``From `` envelope line removed), no lock.

    Good enough for tests watching a mailbox Postfix appends to: a message still being
    written may come back truncated, so poll again rather than trust a partial match.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    messages: list[bytes] = []
    current: list[bytes] | None = None
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From "):
            if current is not None:
                messages.append(_strip_mbox_trailer(b"".join(current)))
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        messages.append(_strip_mbox_trailer(b"".join(current)))
    return messages


def _strip_mbox_trailer(message: bytes) -> bytes:
    # Postfix ends every mbox message with one empty line.
    return message[:-1] if message.endswith(b"\n\n") else message


def maildir_files(maildir: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("new", "cur"):
        try:
            files.extend(p for p in (maildir / sub).iterdir() if p.is_file())
        except FileNotFoundError:
            continue
    return sorted(files)


def read_mailbox(location: Path) -> list[bytes]:
    """Messages in an mbox file or a Maildir directory (new/ and cur/)."""
    if location.is_dir():
        out: list[bytes] = []
        for path in maildir_files(location):
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:  # moved new/ -> cur/ meanwhile
                continue
        return out
    return mbox_messages(location)


def contains(token: str) -> Predicate:
    """Predicate: the message bytes contain ``token``."""
    needle = token.encode()
    return lambda message: needle in message


def wait_for_message(
    location: Path, predicate: Predicate, *, timeout: float = WAIT_TIMEOUT
) -> bytes:
    """Wait until a message matching ``predicate`` is in ``location`` (mbox or Maildir).

    Polls every 50 ms up to ``timeout`` seconds (generous: a deferred delivery is retried
    within a few seconds on the rig) and returns the first match; fails the test otherwise.
    """
    deadline = time.monotonic() + timeout
    while True:
        for message in read_mailbox(location):
            if predicate(message):
                return message
        if time.monotonic() >= deadline:
            pytest.fail(f"no matching message in {location} after {timeout:.0f} s")
        time.sleep(0.05)


def remove_messages(location: Path, predicate: Predicate) -> int:
    """Remove matching messages from a Maildir, or from an mbox under Postfix's locks.

    For an mbox: takes the dotlock (``USER.lock``) and an fcntl lock, like Postfix's
    ``mailbox_delivery_lock = fcntl, dotlock``, and rewrites the file in place (same inode).
    Returns how many messages were removed. Only use it for messages the test delivered.
    """
    if location.is_dir():
        removed = 0
        for path in maildir_files(location):
            try:
                if predicate(path.read_bytes()):
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
    if not location.exists():
        return 0
    with _mbox_locked(location) as fd:
        data = b""
        while chunk := os.pread(fd, 1 << 20, len(data)):
            data += chunk
        kept: list[bytes] = []
        removed = 0
        for entry in _mbox_entries(data):
            if predicate(entry):
                removed += 1
            else:
                kept.append(entry)
        if removed:
            new = b"".join(kept)
            os.pwrite(fd, new, 0)
            os.ftruncate(fd, len(new))
            os.fsync(fd)
        return removed


def _mbox_entries(data: bytes) -> list[bytes]:
    """Whole mbox entries, ``From `` line and trailing blank line included."""
    entries: list[bytes] = []
    current: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From ") and current:
            entries.append(b"".join(current))
            current = []
        current.append(line)
    if current:
        entries.append(b"".join(current))
    return entries


class _mbox_locked:  # noqa: N801 - used like a function-style context manager
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.fd = -1

    def __enter__(self) -> int:
        deadline = time.monotonic() + 15
        while True:
            try:
                os.close(os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            self.fd = os.open(self.path, os.O_RDWR)
            while True:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN) or (
                        time.monotonic() > deadline
                    ):
                        raise
                    time.sleep(0.05)
        except BaseException:
            self._release()
            raise
        return self.fd

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the fcntl lock
            self.fd = -1
        self.lock_path.unlink(missing_ok=True)
