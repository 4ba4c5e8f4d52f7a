"""The world a benchmark runs in: homes with keys, mail sinks, a ``mailsh serve``.

Everything is real: gpg homes with fresh keys, SMTP on 127.0.0.1, ``mailsh`` started as
a subprocess exactly as an operator would start it. Set-up (key generation, sealing
requests) uses the library, since its cost is not what is measured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from bench.core import wait_until
from mailsh import protocol, seal
from mailsh.home import ensure_home
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import Algo, new_identity
from mailsh.keys.trust import TrustStore, add_trusted_key
from mailsh.mail.message import read_mail
from mailsh.settings import Settings, load_settings

CLIENT = "operator@client.bench.test"
SERVER = "root@server.bench.test"
JUNK = (
    b"From: someone@elsewhere.test\nTo: root@server.bench.test\nSubject: not a request\n"
    b"Message-ID: <junk@elsewhere.test>\n\nThis is not a mailsh request; serve discards it.\n"
)


#: What mailsh logs when inotify is unavailable and it polls instead (server/watch.py).
POLLING_MARKERS = (b"inotify unavailable", b"polling it")
#: Every serve this process started, and the client runs that fell back to polling:
#: run.py notes it on a section, since its wake-up figures then include polling delays.
SERVES: list[Serve] = []
CLIENTS_POLLED: list[str] = []


def polled(output: bytes) -> bool:
    return any(marker in output for marker in POLLING_MARKERS)


def mailsh_argv() -> list[str]:
    """How an operator starts mailsh from this virtualenv: its console script."""
    script = Path(sys.executable).with_name("mailsh")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mailsh"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Home:
    path: Path
    email: str
    settings: Settings
    gpg: Gpg
    fingerprint: str
    pubkey: Path


def make_home(path: Path, email: str, algo: Algo) -> Home:
    settings = load_settings(home=path)
    ensure_home(settings)
    gpg = Gpg.for_settings(settings)
    pubkey = path / f"{email}.asc"
    ident = new_identity(gpg, email, algo=algo, expire="1d", pubkey=pubkey)
    return Home(path, email, settings, gpg, ident.fingerprint, pubkey)


def pair(client: Home, server: Home) -> None:
    add_trusted_key(server.gpg, server.settings.trust_file, client.pubkey, reply_to=None)
    add_trusted_key(client.gpg, client.settings.trust_file, server.pubkey, reply_to=None)


def kill_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"],
        check=False,
        capture_output=True,
        timeout=30,
    )


def clone_home(src: Home, dst: Path) -> Path:
    """A fresh copy of a server home: same key and trust, no state, no spool.

    Lets several runs replay the same sealed requests (the replay record lives in the
    state database, which the copy does not have).
    """
    shutil.copytree(
        src.path,
        dst,
        ignore=shutil.ignore_patterns("S.*", "state.db*", "spool", "*.lock"),
    )
    return dst


def sealed_request(client: Home, server: Home, command: str, **fields: Any) -> seal.SealedRequest:
    now = datetime.now(UTC)
    req = protocol.Request(
        request_id=protocol.new_request_id(),
        audience=protocol.Audience(address=server.email, fingerprint=server.fingerprint),
        reply_to=client.email,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        command=command,
        **fields,
    )
    return seal.seal_request(
        client.gpg,
        req,
        signer=client.fingerprint,
        recipient=server.fingerprint,
        from_addr=client.email,
        passphrase=None,
    )


def open_request(server: Home, trust: TrustStore, mail: bytes) -> seal.VerifiedRequest:
    """What serve does with a request mail once it is spooled: read it, then open it."""
    policy = seal.OpenPolicy.from_settings(
        server.settings, addresses=[SERVER], fingerprint=server.fingerprint
    )
    return seal.open_request(
        server.gpg,
        read_mail(mail, max_bytes=policy.max_bytes),
        policy,
        trust=trust,
        now=datetime.now(UTC),
    )


def mbox_entry(mail: bytes) -> bytes:
    """One message as Postfix local(8) appends it to an mbox."""
    body = mail.replace(b"\r\n", b"\n").replace(b"\nFrom ", b"\n>From ")
    if not body.endswith(b"\n"):
        body += b"\n"
    return b"From bench@client.bench.test Fri Dec  4 00:00:00 2026\n" + body + b"\n"


def write_mbox(path: Path, mails: Sequence[bytes], *, append: bool = False) -> None:
    with path.open("ab" if append else "wb") as fh:
        for mail in mails:
            fh.write(mbox_entry(mail))


def fill_mbox(path: Path, mail: bytes, count: int) -> None:
    """``count`` copies of one message, written in large blocks (cheap for 100,000)."""
    entry = mbox_entry(mail)
    per_block = max(1, (1 << 20) // len(entry))
    with path.open("wb") as fh:
        left = count
        while left:
            n = min(left, per_block)
            fh.write(entry * n)
            left -= n


def fill_maildir(path: Path, mail: bytes, count: int, *, sub: str = "new") -> None:
    for d in ("tmp", "new", "cur"):
        (path / d).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for i in range(count):
        name = f"{stamp}.M{i}P{os.getpid()}.bench"
        if sub == "cur":
            name += ":2,S"
        with open(path / sub / name, "wb") as fh:
            fh.write(mail)


def maildir_deliver(path: Path, mail: bytes, tag: str) -> Path:
    """Deliver like an MDA: write in tmp/, rename into new/."""
    tmp = path / "tmp" / f"{time.time_ns()}.{tag}.bench"
    tmp.write_bytes(mail)
    final = path / "new" / tmp.name
    os.rename(tmp, final)
    return final


# -- SMTP sinks -----------------------------------------------------------------------


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, env: Any) -> str:  # noqa: N802
        self.sink.received(bytes(env.original_content))
        return "250 OK"


class Sink:
    """The client's mail server: SMTP on 127.0.0.1 that counts what it receives and,
    given a Maildir, delivers each message there (tmp/ then new/, like an MDA)."""

    def __init__(self, maildir: Path | None = None) -> None:
        self.maildir = maildir
        if maildir is not None:
            for d in ("tmp", "new", "cur"):
                (maildir / d).mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.arrivals: list[float] = []  # wall-clock seconds (time.time())
        self._cond = threading.Condition()
        self._ctl = Controller(_Handler(self), hostname="127.0.0.1", port=free_port())

    def received(self, data: bytes) -> None:
        if self.maildir is not None:
            maildir_deliver(self.maildir, data, "reply")
        with self._cond:
            self.count += 1
            self.arrivals.append(time.time())
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink got {self.count} of {count} messages")
                self._cond.wait(left)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self._ctl.port}"

    def __enter__(self) -> Sink:
        self._ctl.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctl.stop()


# -- mailsh serve as a subprocess -------------------------------------------------------


@dataclass
class Serve:
    """``mailsh --home HOME serve ARGS`` as a subprocess, logging to ``HOME/serve.log``."""

    home: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home / "serve.log"

    def start(self) -> Serve:
        SERVES.append(self)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*mailsh_argv(), "--home", str(self.home), "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None  # noqa: S101 - started before use
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mailsh serve exited {self.proc.returncode}: {self.tail()}")

    def polled(self) -> bool:
        """True if serve said inotify was unavailable and it polled instead."""
        try:
            return polled(self.log.read_bytes())
        except OSError:
            return False

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_listening(self, port: int, timeout: float = 60.0) -> None:
        def up() -> bool:
            self.check_alive()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, timeout, interval=0.02)

    def stop(self) -> int:
        """Stop serve, then the gpg-agent it started: each agent holds two inotify
        instances, and a full run makes ~25 server homes (the per-user limit is 128)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_agent(self.home)
        return self.proc.returncode

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_once(home: Path, args: list[str], timeout: float = 1800.0) -> tuple[float, int, Serve]:
    """``serve --once``: wall seconds and the kernel's peak RSS of serve itself (bytes)."""
    serve = Serve(home, ["--once", *args]).start()
    assert serve.proc is not None  # noqa: S101
    started = time.monotonic()
    _, status, usage = os.wait4(serve.proc.pid, 0)
    elapsed = time.monotonic() - started
    serve.proc.returncode = os.waitstatus_to_exitcode(status)
    kill_agent(home)
    if serve.proc.returncode != 0:
        raise RuntimeError(f"serve --once exited {serve.proc.returncode}: {serve.tail()}")
    return elapsed, usage.ru_maxrss * 1024, serve


def spool_count(home: Path, sub: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(1 for _ in os.scandir(home / "spool" / sub))
    return 0


@contextlib.contextmanager
def agents_killed(homes: list[Path]) -> Iterator[list[Path]]:
    """Stop every gpg-agent of the homes listed (filled in by the caller) on exit."""
    try:
        yield homes
    finally:
        for h in homes:
            kill_agent(h)
