"""The SMTP sink: a real aiosmtpd server on 127.0.0.1 that keeps what it receives.

Tests observe mail exactly as a mail server would receive it: the client's requests
(``mailsh send``) and the server's replies. ``on_message`` lets the sink act as the other
side (answer a request). The ``sink`` fixture (:mod:`tests.kit.fixtures`) starts one per
test.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from aiosmtpd.controller import Controller


class Received(NamedTuple):
    """One message as the sink got it: the SMTP envelope, the bytes, the connection."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: object = None


class PortZeroController(Controller):
    """aiosmtpd's Controller bound to port 0; ``port`` is the real port once started."""

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        create = super()._create_server()

        async def bind() -> asyncio.AbstractServer:
            server = await create
            assert isinstance(server, asyncio.Server)
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind()


class _Recorder:
    """The aiosmtpd handler behind a :class:`Sink`."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.messages: list[Received] = []
        self.cond = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, env: Any) -> str:  # noqa: N802
        content = env.original_content
        assert isinstance(content, bytes)
        assert env.mail_from is not None
        with self.cond:
            self.messages.append(Received(env.mail_from, list(env.rcpt_tos), content, session.peer))
            self.cond.notify_all()
        callback = self.sink.on_message
        if callback is not None:
            threading.Thread(target=callback, args=(content,), daemon=True).start()
        return "250 OK"


class Sink:
    """A real SMTP server on 127.0.0.1 (ephemeral port) that keeps what it receives.

    ``on_message``, when set, is called (in a thread of its own) with every message's
    bytes: the sink then also acts as the other side.
    """

    def __init__(self) -> None:
        self.on_message: Callable[[bytes], None] | None = None
        self._rec = _Recorder(self)
        self._ctl = PortZeroController(
            self._rec, hostname="127.0.0.1", port=0, server_hostname="sink.test"
        )

    def __enter__(self) -> Sink:
        self._ctl.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctl.stop()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self._ctl.port}"

    @property
    def messages(self) -> list[Received]:
        with self._rec.cond:
            return list(self._rec.messages)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        """Every message so far, once there are at least ``count`` (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._rec.cond:
            while len(self._rec.messages) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self._rec.messages)} of {count} messages in {timeout} s"
                self._rec.cond.wait(left)
            return list(self._rec.messages)


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens now (a connection is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
