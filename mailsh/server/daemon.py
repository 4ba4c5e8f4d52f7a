"""``mailsh serve``: intake sources -> durable spool -> processor workers -> outbound.

The loop: collect new mail from every intake into the spool, hand each pending spool
message to a worker (:mod:`mailsh.server.dispatch`: at most one worker per message,
also across serve processes sharing a home), then sleep until
inotify (or the polling fallback) says something changed. The embedded SMTP listener
writes straight into the spool, which the same watcher observes.

Start-up first settles what a crash left behind: requests that were claimed but never
finished are reported "outcome unknown" and never re-run (P5), and messages whose final
state was recorded are moved out of the spool.

SIGTERM/SIGINT stop intake, let running commands finish for ``shutdown_grace`` seconds,
and report whatever is still running as outcome unknown.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from mailsh.errors import ConfigError, DependencyError
from mailsh.home import check_serve_home
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import require_identity
from mailsh.mail.watch import Watcher
from mailsh.server.cgroup import Containment
from mailsh.server.diskspace import SpaceGuard
from mailsh.server.dispatch import Dispatcher
from mailsh.server.intake.maildir import MaildirIntake
from mailsh.server.intake.mbox import MboxIntake
from mailsh.server.logs import describe_error
from mailsh.server.outbound import ReplySender, SendMail, send_mail_from_settings
from mailsh.server.processor import Processor, ServerIdentity
from mailsh.server.retention import Pruner
from mailsh.server.spool import Spool
from mailsh.server.state import StateDB
from mailsh.settings import Settings

log = logging.getLogger("mailsh.server")


@dataclass
class ServeOptions:
    mboxes: list[Path] = field(default_factory=list)
    maildirs: list[Path] = field(default_factory=list)
    smtp_listen: tuple[str, int] | None = None
    once: bool = False


MIN_AIOSMTPD = (1, 4, 6)
"""The oldest aiosmtpd --smtp-listen runs on (its SMTP smuggling fix); a floor, not a setting."""
LOOP_BACKOFF_START = 0.5
"""Seconds the main loop waits after a failed iteration (doubled while failures repeat)."""
LOOP_BACKOFF_MAX = 30.0
"""The longest wait between retries of a failing main loop. The backoff is internal
tuning, not a setting: it only spaces out retries of errors of the system (P11), and
nothing waiting in the spool or the mailboxes is lost meanwhile."""


def raise_open_files_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; return the new soft
    limit. Sessions, spool files and gpg pipes all take descriptors: the usual soft limit
    of 1024 is the first thing a flood of connections exhausts. (An unlimited hard limit
    is capped at the kernel's ``fs.nr_open``, the most a process may have.)"""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
            return soft
        log.info("open files limit raised from %d to %d", soft, target)
        return target
    return soft


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


class Server:
    def __init__(
        self, settings: Settings, options: ServeOptions, *, mailer: SendMail | None = None
    ) -> None:
        check_dependencies(smtp_listener=options.smtp_listen is not None)
        check_serve_home(settings)  # P15: home, GnuPG home and trust store are ours alone
        self.settings = settings
        self.options = options
        self.gpg = Gpg.for_settings(settings)
        self.identity = server_identity(settings, self.gpg)
        self.state = StateDB(settings.state_db)
        self.spool = Spool(settings.spool_dir)
        self.outbound = ReplySender(
            self.state, mailer or send_mail_from_settings(settings), settings
        )
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
            # an oversize message is still spooled (nothing lost) and refused as
            # too-large by the processor; the intake logs it as it copies it
            *(
                MboxIntake(p, self.spool, max_message_bytes=settings.max_message_bytes)
                for p in options.mboxes
            ),
            *(MaildirIntake(p, self.spool) for p in options.maildirs),
        ]
        self.listener: object | None = None
        self._stop = threading.Event()
        self.dispatcher = Dispatcher(self.spool, settings.workers, self.processor.process)
        self.smtp_port: int | None = None
        self.abandoned = 0  # commands still running when shutdown gave up on them
        self._last_sweep = 0.0
        self.loop_errors = 0  # main-loop iterations that failed and were retried
        self.containment: Containment | None = None  # chosen when run() starts

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
        from mailsh.server.intake.smtp import SmtpListener
        from mailsh.server.intake.smtp_limits import SmtpLimits

        host, port = self.options.smtp_listen
        wanted = {a.lower() for a in self.identity.addresses}
        listener = SmtpListener(
            host=host,
            port=port,
            spool=self.spool,
            accept=lambda rcpt: rcpt.lower() in wanted,
            max_message_bytes=self.settings.max_message_bytes,
            limits=SmtpLimits.from_settings(self.settings),
            accepting=self.space.accepting,
        )
        listener.start()
        self.listener = listener
        self.smtp_port = listener.port
        log.info("SMTP listener on %s:%s for %s", host, listener.port, ", ".join(sorted(wanted)))

    def run(self) -> None:
        """Serve until stopped (or, with ``once``, until nothing is pending)."""
        from mailsh.server.account import current_user_is_root

        if current_user_is_root() and not self.settings.run_as:
            log.warning(
                "commands run as ROOT: any pinned key has full control of this machine; "
                "use --run-as USER for an unprivileged account"
            )
        raise_open_files_limit()
        self.contain_commands()
        self.recover()
        self.pruner.start()
        if not self.options.once:
            self.outbound.start()
        watch_paths = [*self.options.mboxes, *self.options.maildirs, self.spool.root]
        try:
            self.start_listener()
            with Watcher(watch_paths, poll_interval=self.settings.poll_interval) as watcher:
                if self.options.once:
                    self._run_once()
                else:
                    self._serve(watcher)
        finally:
            self.shutdown()

    def contain_commands(self) -> None:
        """Choose how commands are contained (a cgroup each, or the session kill), tell
        the processor, log it and record it for ``mailsh status``."""
        from mailsh.server import cgroup

        self.containment = cgroup.set_up()
        self.processor.containment = self.containment
        cgroup.record(self.settings.home, self.containment)
        if self.containment.mode == "cgroup":
            log.info("commands contained by %s", self.containment.describe())
        else:
            log.warning(
                "commands contained by session kill only (%s): a command that calls setsid "
                "can outlive its timeout; see docs/server.md",
                self.containment.detail,
            )

    def _run_once(self) -> None:
        """``--once``: process everything pending, then return; any error ends the run.

        Workers take messages as they free up (no barrier between batches), and the
        replies are sent once at the end.
        """
        dispatcher = self.dispatcher
        while not self._stop.is_set():
            if not dispatcher.backlogged:
                self.collect()
            started = dispatcher.dispatch()
            dispatcher.wait_for_one()
            dispatcher.raise_failures()  # a failure of the worker itself ends the run
            dispatcher.reap()
            if dispatcher.inflight or dispatcher.backlogged:
                continue
            self.collect()
            left = self.spool.pending()
            if not left:
                break
            if not started:  # the rest is locked by another serve process
                log.info("leaving %d message(s) to another serve process", len(left))
                break
        self.outbound.flush()

    def _serve(self, watcher: Watcher) -> None:
        """The main loop. It survives errors of the system (P11): EMFILE from a flood of
        connections, ENOSPC, EIO, a locked database. Each is logged, the loop waits
        (doubling from :data:`LOOP_BACKOFF_START` up to :data:`LOOP_BACKOFF_MAX` seconds
        while the error persists) and then tries again; nothing is lost, because the spool
        and the mailboxes still hold every message not yet taken."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                if not self.dispatcher.backlogged:  # spooled mail waits for a worker first
                    self.collect()
                self.dispatcher.dispatch()
                self.dispatcher.wait_for_work(watcher)
                self.dispatcher.reap()
                self.sweep_if_due()
            except Exception as exc:  # the daemon outlives any one failure (P11)
                backoff = min(max(backoff * 2, LOOP_BACKOFF_START), LOOP_BACKOFF_MAX)
                self.loop_errors += 1
                log.error(
                    "serve loop: %s; still serving, retrying in %.1fs", describe_error(exc), backoff
                )
                log.debug("serve loop error", exc_info=exc)
                self._stop.wait(backoff)
            else:
                backoff = 0.0

    def collect(self) -> None:
        if self.intakes and not self.space.accepting():
            return  # below --min-free-space: mailboxes stay untouched until space returns
        for intake in self.intakes:
            try:
                intake.collect()
            except Exception as exc:  # a locked or missing mailbox must not stop serving
                log.warning("intake %s: %s", getattr(intake, "path", intake), exc)

    def shutdown(self) -> None:
        self.dispatcher.stop(self.settings.shutdown_grace)
        self.report_unfinished(final=True)
        self.pruner.stop()
        if self.listener is not None:
            self.listener.stop()  # type: ignore[attr-defined]
        self.outbound.flush()
        self.outbound.stop()
        if self.containment is not None:
            from mailsh.server.cgroup import tear_down

            tear_down(self.containment)

    # -- crash recovery ---------------------------------------------------------------

    def recover(self) -> None:
        """Settle what a crash left behind. Errors are contained per item and logged:
        no message or claim can keep serve from starting."""
        try:
            self.spool.clean_tmp()
        except Exception:
            log.exception("cleaning the spool's tmp/ failed")
        self.report_unfinished()

    def report_unfinished(self, *, final: bool = False) -> None:
        """Claims whose process is gone: report outcome unknown, once; never re-run.

        A claim of another live serve sharing the home is left alone: that process is
        still running its command. This process's own claims count only when their
        worker is no longer running, or with ``final`` (shutdown after the grace period).
        """
        running = self.dispatcher.running_ids()
        if final:
            self.abandoned += len(running)
        self.processor.settle_abandoned(running, mine_too=final)
        self._last_sweep = time.monotonic()

    def sweep_if_due(self) -> None:
        """Notice claims of serve processes that died beside this one (about a minute)."""
        if time.monotonic() - self._last_sweep >= self.settings.claim_sweep_interval:
            try:
                self.report_unfinished()
            except Exception:
                log.exception("settling abandoned claims failed; retrying later")
                self._last_sweep = time.monotonic()
