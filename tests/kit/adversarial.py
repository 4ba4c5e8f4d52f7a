"""The adversarial rig: one long-running ``mailsh serve`` fed through every intake.

One :class:`Rig` per test module runs the real :class:`~mailsh.server.daemon.Server` in a
thread with all four intakes at once: an mbox, a Maildir, the embedded SMTP listener on
127.0.0.1 (fed by :mod:`smtplib`, a real SMTP client) and the spool that ``mailsh
deliver`` fills. Replies leave through a real SMTP sink on 127.0.0.1. ``deliver`` is run
in-process through click's test runner (the same command function, argument parsing and
settings as the installed ``mailsh deliver``): a fresh interpreter per message would cost
half a second each. A sample of the corpus also goes through the real process
(intake ``deliver-process``).

A test feeds hostile mail and, right behind it through the same intake, one valid
request; waits until the server has taken every message the intake accepted to a final
state and sent every reply it queued; then checks what ran and what was mailed.

The ``kit`` and ``rig`` fixtures of tests/adversarial (its conftest) make them.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mailsh.seal import SealedRequest
from mailsh.server.daemon import ServeOptions, Server
from mailsh.server.state import MessageState, StateDB
from mailsh.settings import load_settings
from tests.kit.homes import Home
from tests.kit.mailbox import drop_maildir, to_mbox
from tests.kit.serverkit import request
from tests.kit.smtp import Sink

INTAKES = ("mbox", "maildir", "smtp", "deliver")
MiB = 1 << 20
#: Small limits keep the bombs cheap; each is still far above a real request's size.
RIG_SETTINGS = {
    "max_message_bytes": 1 * MiB,
    "max_gpg_output": 4 * MiB,
    "max_output_bytes": 64 * 1024,
    "max_command_timeout": 1.0,
}
SETTLE_SECONDS = 60.0  # a pathological hang fails the test instead of blocking the run
_FINAL = {s.value for s in MessageState if s.is_final}


def marker_command(marker: Path) -> str:
    """A command with an observable side effect: one line appended to ``marker``."""
    return f"echo x >> {marker}"


def marker_runs(marker: Path) -> int:
    """How often the marker command ran."""
    return marker.read_text().count("x\n") if marker.exists() else 0


@dataclass
class Hostile:
    """What one corpus case feeds, and what its promises allow to happen."""

    mails: list[bytes]
    runs: int = 0  # how often the marker command may run (a replayed original: once)
    replies: int = 0  # replies the promises allow, always to the pinned address
    mail_from: str = "alice@example.org"  # the SMTP envelope sender
    # Called with every reply sent meanwhile (the next valid request's included), when
    # what a reply says matters.
    check: Callable[[list[bytes]], None] | None = None


@dataclass(frozen=True)
class Case:
    threat: str  # the class in docs/security.md
    name: str
    build: Callable[[Kit, Path], Hostile]

    @property
    def id(self) -> str:
        return f"{self.threat}/{self.name}"


@dataclass(frozen=True)
class PastKey:
    """A key made (faked clock) long ago with a one-day expiry: expired now."""

    home: Path
    fingerprint: str
    sign_time: str  # a --faked-system-time inside its day of validity


@dataclass
class Kit:
    """The actors: alice is pinned on the server, the others are whatever a case needs."""

    alice: Home
    server: Home
    mallory: Home  # a good key, known to the server's gpg, never pinned
    revoked: Home  # pinned on the server, then revoked there
    expired: PastKey  # pinned on the server, long expired
    scratch: Path  # a GnuPG home with alice's, mallory's and eve's secret keys
    eve: str  # a key the server's gpg has never seen
    cache: dict[str, bytes] = field(default_factory=dict)  # costly marker-free mails

    def sealed(
        self,
        command: str,
        *,
        by: Home | None = None,
        timeout: float | None = None,
        encrypt: bool = True,
    ) -> SealedRequest:
        """A request exactly as ``mailsh send`` seals it, for this server."""
        return request(by or self.alice, self.server, command, timeout=timeout, encrypt=encrypt)

    def request(self, command: str, *, by: Home | None = None) -> bytes:
        return self.sealed(command, by=by).mail


class Rig:
    """A running server with every intake, and the sink its replies go to."""

    def __init__(
        self,
        kit: Kit,
        sink: Sink,
        root: Path,
        *,
        mboxes: tuple[Path, ...] = (),
        maildirs: tuple[Path, ...] = (),
    ) -> None:
        self.kit = kit
        self.sink = sink
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.mbox = root / "root.mbox"
        self.mbox.touch()
        self.maildir = root / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True)
        home = kit.server.settings.home
        (home / "mailsh.toml").write_text(
            "".join(f"{k} = {v!r}\n" for k, v in RIG_SETTINGS.items()), encoding="utf-8"
        )
        self.settings = load_settings(
            home=home,
            address=kit.server.email,
            smtp=sink.url,
            workdir=root,
            poll_interval=0.2,
            shutdown_grace=5.0,
        )
        self.server = Server(
            self.settings,
            ServeOptions(
                mboxes=[self.mbox, *mboxes],
                maildirs=[self.maildir, *maildirs],
                smtp_listen=("127.0.0.1", 0),
            ),
        )
        self.state = StateDB(self.settings.state_db)
        self._thread = threading.Thread(target=self.server.run, name="adv-serve", daemon=True)
        counts = self.state.report.counts()  # the home may have served an earlier module's rig
        self.fed = sum(n for state, n in counts.items() if state in _FINAL)

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Rig:
        self._thread.start()
        deadline = time.monotonic() + 30
        while self.server.smtp_port is None and time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("serve died at start")
            time.sleep(0.02)
        if self.server.smtp_port is None:
            raise RuntimeError("the SMTP listener did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, unblock: Callable[[], None] | None = None) -> None:
        """Stop serve; ``unblock`` is called until it has (a hung intake needs help)."""
        self.server.request_stop()
        deadline = time.monotonic() + 30
        while self._thread.is_alive() and time.monotonic() < deadline:
            if unblock is not None:
                unblock()
            self._thread.join(0.1)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- intakes ----------------------------------------------------------------------

    def feed(self, intake: str, mails: list[bytes], *, mail_from: str = "alice@example.org") -> int:
        """Deliver ``mails`` through one intake; return how many it accepted."""
        accepted = getattr(self, "_feed_" + intake.replace("-", "_"))(mails, mail_from)
        self.fed += accepted
        return int(accepted)

    def _feed_mbox(self, mails: list[bytes], mail_from: str) -> int:
        import fcntl

        with self.mbox.open("ab") as fh:  # as Postfix does: under the mbox lock
            fcntl.lockf(fh, fcntl.LOCK_EX)
            fh.write(b"".join(to_mbox(m) for m in mails))
            fh.flush()
            os.fsync(fh.fileno())
        return len(mails)

    def _feed_maildir(self, mails: list[bytes], mail_from: str) -> int:
        for mail in mails:  # as an MDA does: write in tmp/, then rename into new/
            drop_maildir(self.maildir, mail)
        return len(mails)

    def _feed_smtp(self, mails: list[bytes], mail_from: str) -> int:
        accepted = 0
        assert self.server.smtp_port is not None
        with smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=30) as smtp:
            for mail in mails:
                try:
                    smtp.sendmail(mail_from, [self.kit.server.email], mail)
                except smtplib.SMTPResponseException as exc:
                    assert 500 <= exc.smtp_code < 600, exc  # refused for good, never lost
                    smtp.rset()
                    continue
                accepted += 1
        return accepted

    def _feed_deliver(self, mails: list[bytes], mail_from: str) -> int:
        from typer.testing import CliRunner

        from mailsh.cli import app

        accepted = 0
        runner = CliRunner()
        for mail in mails:
            result = runner.invoke(app, ["--home", str(self.settings.home), "deliver"], input=mail)
            # CliRunner runs the app without mailsh.cli.main, the funnel that turns a
            # MailshError into its exit code (DeliveryRefusedError: 73).
            code = getattr(result.exception, "exit_code", result.exit_code)
            assert code in (0, 73), (code, result.output, result.exception)
            accepted += code == 0
        return accepted

    def _feed_deliver_process(self, mails: list[bytes], mail_from: str) -> int:
        """The installed command in a process of its own, as Postfix runs it."""
        accepted = 0
        for mail in mails:
            proc = subprocess.run(
                [sys.executable, "-m", "mailsh", "--home", str(self.settings.home), "deliver"],
                input=mail,
                capture_output=True,
                check=False,
                timeout=60,
            )
            assert proc.returncode in (0, 73), (proc.returncode, proc.stderr)
            accepted += proc.returncode == 0
        return accepted

    # -- observing --------------------------------------------------------------------

    def settle(self, timeout: float = SETTLE_SECONDS) -> None:
        """Wait until every accepted message reached a final state and nothing is queued."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.state.report.counts()
            final = sum(n for state, n in counts.items() if state in _FINAL)
            busy = counts["received"] + counts["executing"] + counts["outbound_pending"]
            if final >= self.fed and busy == 0 and not self.server.spool.pending():
                assert final == self.fed, f"{final} messages for {self.fed} fed"
                return
            assert self.alive, "serve died"
            assert time.monotonic() < deadline, f"not settled: {counts}, fed {self.fed}"
            time.sleep(0.02)

    def wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait for ``done()``; fail after ``timeout`` seconds (a hung or dead serve)."""
        deadline = time.monotonic() + timeout
        while not done():
            assert self.alive, "serve died"
            assert time.monotonic() < deadline, "serve did not get there in time"
            time.sleep(0.02)

    def mailed(self, since: int) -> list[bytes]:
        """Every message the server sent since ``since``; all of it to the pinned address."""
        got = self.sink.messages[since:]
        for msg in got:
            assert msg.rcpt_tos == [self.kit.alice.email], msg.rcpt_tos
        return [m.data for m in got]

    def feed_valid(self, intake: str, marker: Path) -> None:
        """Queue the next valid request through ``intake`` (its command appends to
        ``marker``); after :meth:`settle` it must have run exactly once, and been answered."""
        assert self.feed(intake, [self.kit.request(marker_command(marker))]) == 1


@contextmanager
def serve_rig(kit: Kit, root: Path, **intakes: tuple[Path, ...]) -> Iterator[Rig]:
    """A running Rig (extra ``mboxes`` / ``maildirs`` beside its own clean ones)."""
    with Sink() as sink, Rig(kit, sink, root, **intakes) as rig:
        yield rig
