"""``mailsh serve``: intake sources -> durable spool -> processor workers -> outbound.

The loop: collect new mail from every intake into the spool, hand each pending spool
message to a worker (at most one worker per message: an exclusive ``lockf`` on the
spool file also keeps several serve processes sharing a home apart), then sleep until
inotify (or the polling fallback) says something changed. The embedded SMTP listener
writes straight into the spool, which the same watcher observes.

Start-up first settles what a crash left behind: requests that were claimed but never
finished are reported "outcome unknown" and never re-run (P5), and messages whose final
state was recorded are moved out of the spool.

SIGTERM/SIGINT stop intake, let running commands finish for ``shutdown_grace`` seconds,
and report whatever is still running as outcome unknown.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from mailsh import envelope
from mailsh.errors import ConfigError, DependencyError
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import require_identity
from mailsh.keys.trust import load_trust
from mailsh.protocol import Reply, ReplyStatus
from mailsh.server.diskspace import SpaceGuard
from mailsh.server.maildir import MaildirIntake
from mailsh.server.mbox import MboxIntake
from mailsh.server.outbound import Mailer, OutboundWorker, mailer_from_settings
from mailsh.server.processor import Processor, ServerIdentity, decision
from mailsh.server.retention import Pruner
from mailsh.server.spool import Spool, SpooledMessage
from mailsh.server.state import MessageState, StateDB
from mailsh.server.watch import Watcher
from mailsh.settings import Settings

log = logging.getLogger("mailsh.server")


@dataclass
class ServeOptions:
    mboxes: list[Path] = field(default_factory=list)
    maildirs: list[Path] = field(default_factory=list)
    smtp_listen: tuple[str, int] | None = None
    once: bool = False
    poll_interval: float = 2.0
    shutdown_grace: float = 30.0


MIN_AIOSMTPD = (1, 4, 6)


def check_dependencies(*, smtp_listener: bool) -> None:
    """P12: refuse to serve on a dependency floor we know to be unsafe.

    GnuPG's own floor is checked by :class:`~mailsh.keys.gpg.Gpg`.
    """
    import shutil
    from importlib.metadata import PackageNotFoundError, version

    if smtp_listener:
        try:
            found = version("aiosmtpd")
        except PackageNotFoundError as exc:
            raise DependencyError(
                "aiosmtpd is not installed", hint="pip install 'aiosmtpd>=1.4.6'"
            ) from exc
        parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
        if parts < MIN_AIOSMTPD:
            raise DependencyError(
                f"aiosmtpd {found} is too old: --smtp-listen needs >= 1.4.6 (SMTP smuggling fix)",
                hint="pip install --upgrade 'aiosmtpd>=1.4.6'",
            )
    if shutil.which("prlimit") is None:
        raise DependencyError(
            "prlimit (util-linux) is missing: commands could not be resource-limited",
            hint="apt-get install -y util-linux",
        )


def server_identity(settings: Settings, gpg: Gpg) -> ServerIdentity:
    from mailsh.addresses import validate_address

    identity = require_identity(gpg)
    addresses = [validate_address(a) for a in settings.address]
    if not addresses:
        if identity.email is None:
            raise ConfigError(
                "the server key has no email address and no --address was given",
                hint="mailsh serve --address root@host.example ...",
            )
        addresses = [identity.email]
    return ServerIdentity(fingerprint=identity.fingerprint, addresses=addresses)


def _claimant_gone_or_me(claimed_by: str) -> bool:
    host, _, pid_text = claimed_by.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another host's claim in a shared home: nobody else will settle it
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # The pid exists; it is a live claimant only if it is a mailsh serve process.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"mailsh" not in cmdline


class Server:
    def __init__(
        self, settings: Settings, options: ServeOptions, *, mailer: Mailer | None = None
    ) -> None:
        check_dependencies(smtp_listener=options.smtp_listen is not None)
        self.settings = settings
        self.options = options
        self.gpg = Gpg(
            settings.gnupg_home, binary=settings.gpg_binary, max_output=settings.max_gpg_output
        )
        self.identity = server_identity(settings, self.gpg)
        self.state = StateDB(settings.state_db)
        self.spool = Spool(settings.spool_dir)
        self.outbound = OutboundWorker(self.state, mailer or mailer_from_settings(settings))
        # Bounded disk (retention.py, diskspace.py): prune in the background; pause intake
        # below the free-space floor, and prune early when that happens.
        self.pruner = Pruner(settings, self.spool, self.state)
        self.space = SpaceGuard(self.spool.root, settings.min_free_space, on_low=self.pruner.kick)
        self.processor = Processor(
            settings,
            gpg=self.gpg,
            state=self.state,
            spool=self.spool,
            identity=self.identity,
            on_reply_queued=self.outbound.kick,
        )
        self.intakes: list[MboxIntake | MaildirIntake] = [
            *(MboxIntake(p, self.spool) for p in options.mboxes),
            *(MaildirIntake(p, self.spool) for p in options.maildirs),
        ]
        self.listener: object | None = None
        self._stop = threading.Event()
        self._inflight: dict[str, Future[MessageState]] = {}
        self._locks: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="mailsh-worker"
        )
        self.smtp_port: int | None = None
        self.abandoned = 0  # commands still running when shutdown gave up on them

    # -- lifecycle ------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received signal %d: stopping intake", signum)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def start_listener(self) -> None:
        if self.options.smtp_listen is None:
            return
        from mailsh.server.smtp_listener import SmtpListener

        host, port = self.options.smtp_listen
        wanted = {a.lower() for a in self.identity.addresses}
        listener = SmtpListener(
            host=host,
            port=port,
            spool=self.spool,
            accept=lambda rcpt: rcpt.lower() in wanted,
            max_message_bytes=self.settings.max_message_bytes,
            accepting=self.space.accepting,
        )
        listener.start()
        self.listener = listener
        self.smtp_port = listener.port
        log.info("SMTP listener on %s:%s for %s", host, listener.port, ", ".join(sorted(wanted)))

    def run(self) -> None:
        """Serve until stopped (or, with ``once``, until nothing is pending)."""
        from mailsh.server.execute import current_user_is_root

        if current_user_is_root() and not self.settings.run_as:
            log.warning(
                "commands run as ROOT: any pinned key has full control of this machine; "
                "use --run-as USER for an unprivileged account"
            )
        self.recover()
        self.pruner.start()
        if not self.options.once:
            self.outbound.start()
        watch_paths = [*self.options.mboxes, *self.options.maildirs, self.spool.root]
        try:
            self.start_listener()
            with Watcher(watch_paths, poll_interval=self.options.poll_interval) as watcher:
                while not self._stop.is_set():
                    self.collect()
                    self.dispatch()
                    if self.options.once:
                        self.drain()
                        self.collect()
                        if not self.spool.pending():
                            break
                        continue
                    watcher.wait(timeout=1.0)
                    self.reap()
        finally:
            self.shutdown()

    def collect(self) -> None:
        if self.intakes and not self.space.accepting():
            return  # below --min-free-space: mailboxes stay untouched until space returns
        for intake in self.intakes:
            try:
                intake.collect()
            except Exception as exc:  # a locked or missing mailbox must not stop serving
                log.warning("intake %s: %s", getattr(intake, "path", intake), exc)

    def dispatch(self) -> None:
        self.reap()
        for msg in self.spool.pending():
            if msg.id in self._inflight or not self._lock(msg):
                continue
            self._inflight[msg.id] = self._pool.submit(self._process, msg)

    def _process(self, msg: SpooledMessage) -> MessageState:
        try:
            return self.processor.process(msg)
        finally:
            self._unlock(msg)

    def _lock(self, msg: SpooledMessage) -> bool:
        try:
            fd = os.open(msg.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:  # flock is per open file: it also keeps this process's workers apart
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        if not msg.path.exists():  # finished by another process meanwhile
            os.close(fd)
            return False
        self._locks[msg.id] = fd
        return True

    def _unlock(self, msg: SpooledMessage) -> None:
        fd = self._locks.pop(msg.id, None)
        if fd is not None:
            os.close(fd)

    def reap(self) -> None:
        for mid, fut in list(self._inflight.items()):
            if fut.done():
                del self._inflight[mid]

    def drain(self) -> None:
        for fut in list(self._inflight.values()):
            fut.result()
        self.reap()
        self.outbound.flush()

    def shutdown(self) -> None:
        running = [f for f in self._inflight.values() if not f.done()]
        if running:
            log.info(
                "waiting up to %ss for %d running command(s)",
                self.options.shutdown_grace,
                len(running),
            )
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = self.options.shutdown_grace
        for fut in running:
            with contextlib.suppress(Exception):
                fut.result(timeout=deadline)
        self.report_unfinished()
        self.pruner.stop()
        if self.listener is not None:
            self.listener.stop()  # type: ignore[attr-defined]
        self.outbound.flush()
        self.outbound.stop()

    # -- crash recovery ---------------------------------------------------------------

    def recover(self) -> None:
        self.spool.clean_tmp()
        self.report_unfinished()

    def report_unfinished(self) -> None:
        """Claimed requests that never finished: report outcome unknown, never re-run.

        Only claims of this process or of a process that no longer exists on this host
        are settled: another live serve sharing the home is still running its command.
        """
        trust = load_trust(self.settings.trust_file)
        for claimed in self.state.unfinished_requests():
            if not _claimant_gone_or_me(claimed.claimed_by):
                continue
            fut = self._inflight.get(claimed.spool_id)
            if fut is not None and not fut.done():
                self.abandoned += 1  # still running after the grace period
            entry = trust.get(claimed.signer)
            reply = Reply(
                request_id=claimed.request_id if len(claimed.request_id) == 32 else None,
                request_sha256=claimed.request_sha256,
                server=self.identity.address,
                status=ReplyStatus.OUTCOME_UNKNOWN,
                reason="the server stopped while the command was running; it may or may not "
                "have completed, and it will not be run again",
            )
            if entry is None:
                self.state.finish_request(claimed.signer, claimed.request_id, "outcome-unknown")
                continue
            mail = envelope.seal_reply(
                self.gpg,
                reply,
                signer=self.identity.fingerprint,
                recipient=claimed.signer,
                to_addr=entry.reply_to,
                in_reply_to=None,
                passphrase=self.settings.passphrase(),
                summary=self.settings.reply_summary,
            )
            self.state.finish_with_reply(
                spool_id=claimed.spool_id,
                state=MessageState.OUTCOME_UNKNOWN,
                reason="interrupted",
                signer=claimed.signer,
                request_id=claimed.request_id,
                request_status="outcome-unknown",
                to_addr=entry.reply_to,
                from_addr=self.identity.address,
                message=mail,
            )
            decision(
                "outcome-unknown",
                message=claimed.spool_id,
                signer=claimed.signer,
                request=claimed.request_id,
                at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
