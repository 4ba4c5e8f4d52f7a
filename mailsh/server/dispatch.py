"""Handing spooled messages to worker threads: one worker per message, never more.

A message is taken by locking its spool file (an exclusive ``flock``: it keeps this
process's workers apart, and also several serve processes sharing a home) and only when
a worker is free to start on it at once: a lock held while queued behind a long command
would keep another serve process sharing the home (and idle) from taking it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from mailsh.mail.watch import Watcher
from mailsh.server.logs import describe_error
from mailsh.server.spool import Spool, SpooledMessage
from mailsh.server.state import MessageState

log = logging.getLogger("mailsh.server")

WAKE_INTERVAL = 1.0
"""The longest the serve loop sleeps between two looks (stop requested? claims to sweep?).
Internal, not a setting: new mail and finished workers wake it at once anyway."""


class Dispatcher:
    """Runs ``work(message)`` for pending spool messages on ``workers`` threads."""

    def __init__(
        self, spool: Spool, workers: int, work: Callable[[SpooledMessage], MessageState]
    ) -> None:
        self.spool = spool
        self.workers = workers
        self._work = work
        self.inflight: dict[str, Future[MessageState]] = {}
        self._locks: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mailsh-worker")
        self.backlogged = False  # the last dispatch left work for busy workers
        self._queue: deque[SpooledMessage] = deque()  # listed, not yet dispatched

    def running(self) -> list[Future[MessageState]]:
        """The workers still busy."""
        return [f for f in self.inflight.values() if not f.done()]

    def running_ids(self) -> set[str]:
        """The spool ids of the messages whose worker is still busy."""
        return {mid for mid, fut in self.inflight.items() if not fut.done()}

    def dispatch(self) -> int:
        """Lock and start as many pending messages as there are idle workers; returns
        how many were started.

        The spool is listed again only when the messages of its last listing are used
        up, so draining N messages costs N, not N squared.
        """
        self.reap()
        free = self.workers - len(self.inflight)
        started = 0
        listed = False
        while started < free:
            if not self._queue:
                if listed:
                    break
                self._queue.extend(m for m in self.spool.pending() if m.id not in self.inflight)
                listed = True
                continue
            msg = self._queue.popleft()
            if msg.id in self.inflight or not self._lock(msg):
                continue  # taken by another serve process, or already gone
            self.inflight[msg.id] = self._pool.submit(self._process, msg)
            started += 1
        self.backlogged = bool(self._queue)  # more work waits for a worker of ours
        return started

    def wait_for_work(self, watcher: Watcher, timeout: float = WAKE_INTERVAL) -> None:
        """Sleep until there may be something to do: a worker finished while messages wait
        for one, or (otherwise) the watcher saw a mailbox or the spool change."""
        running = self.running()
        if self.backlogged and running:
            futures_wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
        else:
            watcher.wait(timeout=timeout)

    def wait_for_one(self) -> None:
        """Block until a busy worker finishes (at once when none is busy)."""
        running = self.running()
        if running:
            futures_wait(running, return_when=FIRST_COMPLETED)

    def raise_failures(self) -> None:
        """Raise the error of a finished worker that failed (``--once`` ends on it)."""
        for fut in [f for f in self.inflight.values() if f.done()]:
            fut.result()

    def reap(self) -> None:
        """Forget finished workers; log a worker's failure (the next dispatch retries)."""
        for mid, fut in list(self.inflight.items()):
            if fut.done():
                del self.inflight[mid]
                error = None if fut.cancelled() else fut.exception()
                if error is not None:  # the spool still holds it: the next dispatch retries
                    log.error("message %s: processing failed: %s", mid, describe_error(error))

    def stop(self, grace: float) -> None:
        """Start nothing more; give each running worker up to ``grace`` seconds."""
        running = self.running()
        if running:
            log.info("waiting up to %ss for %d running command(s)", grace, len(running))
        self._pool.shutdown(wait=False, cancel_futures=True)
        for fut in running:
            with contextlib.suppress(Exception):
                fut.result(timeout=grace)

    def _process(self, msg: SpooledMessage) -> MessageState:
        try:
            return self._work(msg)
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
