"""Feeding a command's stdin and draining its stdout and stderr, each capped, never blocking.

:class:`Pump` multiplexes the three pipes and the leader's pidfd with one selector, so
a command that neither reads its input nor stops writing cannot stall the server, and
output past the cap is read and thrown away (the command never blocks on a full pipe).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Callable

# Internal tuning, not settings: they trade system calls against latency, and no limit
# an operator sets depends on them.
READ_CHUNK = 65536
WRITE_CHUNK = 65536
TICK = 0.05  # seconds between liveness checks when no fd is ready


class Pump:
    """Feeds stdin and drains stdout/stderr of one process without blocking on any."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes | None, cap: int) -> None:
        self.proc = proc
        self.cap = cap
        self.sel = selectors.DefaultSelector()
        self.out: dict[int, bytearray] = {}
        self.truncated: dict[int, bool] = {}
        self.out_open: set[int] = set()
        self.stdin_view = memoryview(stdin or b"")
        self.pidfd: int | None = None
        self.exited = False
        for stream in (proc.stdout, proc.stderr):
            if stream is None:
                raise TypeError("stdout and stderr must be pipes")
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self.out[fd] = bytearray()
            self.truncated[fd] = False
            self.out_open.add(fd)
            self.sel.register(fd, selectors.EVENT_READ, "out")
        self.fds = tuple(self.out)
        if proc.stdin is not None:
            fd = proc.stdin.fileno()
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_WRITE, "in")
        try:
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except OSError:  # old kernel: poll with waitid instead
            self.pidfd = None

    def leader_exited(self) -> bool:
        """Whether the leader has exited, without reaping it (its pid stays reserved)."""
        if not self.exited:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            self.exited = os.waitid(os.P_PID, self.proc.pid, flags) is not None
        return self.exited

    def pipes_open(self) -> bool:
        return self.fds[0] in self.out_open or self.fds[1] in self.out_open

    def run(self, until: float, stop: Callable[[], bool]) -> None:
        """Feed and drain until ``stop()`` is true or the monotonic clock reaches ``until``."""
        while not stop():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            if not self.sel.get_map():  # nothing to watch (no pidfd): poll the predicate
                time.sleep(min(remaining, TICK))
                continue
            for key, _ in self.sel.select(min(remaining, TICK)):
                if key.data == "out":
                    self._read(key.fd)
                elif key.data == "in":
                    self._write(key.fd)
                else:  # the pidfd stays readable once the leader exited: stop watching it
                    self._drop(key.fd)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self._drop(fd)
            return
        buf = self.out[fd]
        room = self.cap - len(buf)
        if len(chunk) > room:
            self.truncated[fd] = True
            chunk = chunk[: max(room, 0)]
        buf += chunk

    def _write(self, fd: int) -> None:
        try:
            written = os.write(fd, self.stdin_view[:WRITE_CHUNK])
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):  # it stopped reading: fine
            written = len(self.stdin_view)
        self.stdin_view = self.stdin_view[written:]
        if not self.stdin_view:
            self.close_stdin()

    def close_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(KeyError):
                self.sel.unregister(stdin.fileno())
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def _drop(self, fd: int) -> None:
        self.out_open.discard(fd)
        with contextlib.suppress(KeyError):
            self.sel.unregister(fd)

    def close(self) -> None:
        self.close_stdin()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.sel.close()

    def stream(self, index: int) -> tuple[bytes, bool]:
        fd = self.fds[index]
        return bytes(self.out[fd]), self.truncated[fd]
