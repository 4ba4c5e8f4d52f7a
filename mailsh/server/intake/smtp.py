"""The embedded SMTP listener of ``mailsh serve --smtp-listen HOST:PORT``.

A small aiosmtpd server that accepts mail for mailsh's own addresses and stores each
message in the spool before saying so:

- ``RCPT TO`` an address ``accept`` does not claim gets ``550 5.1.1``: it never relays.
- Any ``MAIL FROM`` is taken, including the null sender: bounces must reach the daemon
  so that it can log and discard them.
- While ``accepting()`` says no (free space below ``--min-free-space``, see
  :mod:`mailsh.server.diskspace`), MAIL, RCPT and DATA get ``452 4.3.1``: the client
  keeps the message and retries later.
- Messages over ``max_message_bytes`` get ``552`` (aiosmtpd's ``data_size_limit``, also
  advertised as ``SIZE``).
- ``250 2.0.0 queued as ID`` is answered only after ``spool.put`` returned, i.e. after
  the message is durable (docs/security.md P9). If the spool fails the client gets
  ``451 4.3.0`` and keeps the message to retry. ``put`` runs in a worker thread so a slow
  disk does not stall other sessions.
- The bytes stored are exactly what the client sent between ``DATA`` and the final dot
  (minus dot-stuffing): aiosmtpd's ``envelope.original_content``, no trace header added.
- No exception ends the server (P11): a failing session is logged and answered with a
  4xx reply by :meth:`_Handler.handle_exception`.
- No peer can take the listener for itself (P11): sessions are capped in total and per
  peer, idle and slow clients are closed with ``421``
  (:mod:`mailsh.server.intake.smtp_limits`).

Line endings: aiosmtpd 1.4.6 reads DATA lines up to CRLF only (its SMTP-smuggling fix)
and refuses any "line" longer than 1001 bytes. A client sending bare-LF line endings
therefore gets ``500 Line too long`` once the message is longer than about 1000 bytes, and
keeps the message (nothing lost). A shorter bare-LF message is taken as one "line": it is
stored with its bare LFs, but dot-stuffing the client applied after a bare LF is not
undone (``.x`` arrives as ``..x``) and the CRLF the client added before the final dot
stays. Harmless for OpenPGP armor (no armor line starts with a dot). RFC 5321 requires
CRLF, so aiosmtpd's defence is kept rather than loosened; mailsh's own sender normalises
to CRLF (:func:`mailsh.mail.transport.to_crlf`), and so do Postfix and other MTAs.

If a client disconnects while ``put`` is running, the message is still stored but the
client never saw ``250`` and will send it again: a duplicate, never a loss (duplicates
are caught by the replay record).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailsh.errors import TransportError
from mailsh.resources import Closing
from mailsh.server.diskspace import SMTP_PAUSED
from mailsh.server.intake.smtp_limits import MAX_RECIPIENTS, Admission, LimitedSMTP, SmtpLimits

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 10_000_000
"""Largest message accepted (DATA bytes) when the caller names no limit; bigger ones get
552. serve always passes its ``max_message_bytes`` setting; this default serves others."""
SPOOL_WORKERS = 4
"""Threads running ``spool.put`` at the same time; further messages wait for one.
Internal tuning, not a setting: the disk, not this, bounds how fast mail is stored."""
LOOP_ERROR_LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same listener error (an EMFILE flood).
Internal, not a setting: it only thins out the log."""
STOP_TIMEOUT = 30.0
"""Seconds :meth:`SmtpListener.stop` waits for sessions to end. Internal, not a setting:
sessions are cancelled at once and only unwind here; serve's ``shutdown_grace`` is for
commands."""
SPOOL_SOURCE = "smtp"
"""Intake name given to ``spool.put`` (the spool records where a message came from)."""


class SpoolLike(Protocol):
    """What the listener needs from :class:`mailsh.server.spool.Spool`."""

    def put(self, data: bytes, *, source: str) -> object:
        """Store ``data`` durably (file and directory fsynced), then return."""
        ...


def spool_id(stored: object) -> str:
    """A short name for what ``spool.put`` returned, for the 250 reply and logs.

    Uses its ``id`` (or ``name``) attribute, else ``str()``; made printable and short.
    """
    value = getattr(stored, "id", None) or getattr(stored, "name", None) or stored
    text = "".join(ch for ch in str(value) if ch.isascii() and ch.isprintable() and ch != " ")
    return text[:64] or "-"


class _Handler:
    """aiosmtpd handler hooks; one instance shared by every session."""

    def __init__(
        self,
        *,
        spool: SpoolLike,
        accept: Callable[[str], bool],
        executor: concurrent.futures.Executor,
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        self._spool = spool
        self._accept = accept
        self._executor = executor
        self._accepting = accepting

    def _paused(self) -> bool:
        """True while intake must refuse mail for now (the free-space floor)."""
        return self._accepting is not None and not self._accepting()

    async def handle_MAIL(  # noqa: N802 - aiosmtpd hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self._paused():
            return SMTP_PAUSED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook name
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        if self._paused():
            return SMTP_PAUSED
        try:
            ours = self._accept(address)
        except Exception:
            log.exception("smtp %s: accept(%r) failed", _peer(session), address)
            return "451 4.3.0 try again later"
        if not ours:
            log.info("smtp %s: refused RCPT TO %r", _peer(session), address)
            return "550 5.1.1 not a mailsh address here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook name
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):  # decode_data is off, so never; be sure anyway
            log.error("smtp %s: message content is not bytes", _peer(session))
            return "451 4.3.0 try again later"
        if self._paused():
            return SMTP_PAUSED
        if envelope.mail_from in (None, "", "<>"):
            # A null sender marks a bounce (RFC 5321 4.5.5). Record it the way a local
            # delivery agent does, so the processor discards it as it does from an mbox.
            data = b"Return-Path: <>\r\n" + data
        loop = asyncio.get_running_loop()
        try:
            stored = await loop.run_in_executor(
                self._executor, lambda: self._spool.put(data, source=SPOOL_SOURCE)
            )
        except Exception:
            log.exception("smtp %s: spooling %d bytes failed", _peer(session), len(data))
            return "451 4.3.0 try again later"
        ident = spool_id(stored)
        log.info(
            "smtp %s: queued %d bytes as %s (MAIL FROM %r, RCPT TO %r)",
            _peer(session),
            len(data),
            ident,
            envelope.mail_from,
            envelope.rcpt_tos,
        )
        return f"250 2.0.0 queued as {ident}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp: session error", exc_info=error)
        return "451 4.3.0 internal error, try again later"


def _peer(session: Session) -> str:
    peer: Any = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


@dataclass(frozen=True)
class _Running:
    loop: asyncio.AbstractEventLoop
    server: asyncio.AbstractServer
    thread: threading.Thread
    executor: concurrent.futures.ThreadPoolExecutor


class _LoopErrors:
    """The listener loop's exception handler: one log line per kind of error, at most
    every :data:`LOOP_ERROR_LOG_INTERVAL` seconds, instead of asyncio's traceback for
    each. Out of descriptors, asyncio logs every failed ``accept()`` and pauses accepting
    for a second; a flood would fill the log (and the disk) with identical tracebacks."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "error")
        now = loop.time()
        if now - self._last.get(message, -LOOP_ERROR_LOG_INTERVAL) < LOOP_ERROR_LOG_INTERVAL:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        self._last[message] = now
        error = context.get("exception")
        more = self._suppressed.pop(message, 0)
        log.error(
            "smtp listener: %s%s%s",
            message,
            f": {error}" if error is not None else "",
            f" (and {more} more since last said)" if more else "",
        )


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _shutdown(server: asyncio.AbstractServer) -> None:
    """Close the listening socket and cancel every session (they close their transports)."""
    server.close()
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


def listen_error(host: str, port: int, exc: OSError) -> TransportError:
    """Why the listener cannot bind to HOST:PORT, and what to do, in the user's terms."""
    why: object
    if isinstance(exc, socket.gaierror):
        why = f"the host name {host!r} does not resolve ({exc.strerror})"
        hint = "give an address of this machine, e.g. --smtp-listen 127.0.0.1:2525"
    elif exc.errno == errno.EADDRINUSE:
        why = "the port is already in use"
        hint = f"choose another port, or find what uses it: ss -ltnp 'sport = :{port}'"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"{host} is not an address of this machine"
        hint = "use one of `ip -brief address`, 127.0.0.1, or 0.0.0.0 for all"
    elif exc.errno == errno.EACCES:
        why = "permission denied"
        hint = (
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; use e.g. port 2525 behind your MTA"
        )
    else:
        why = exc.strerror or exc
        hint = "check --smtp-listen HOST:PORT"
    return TransportError(f"cannot listen on {host}:{port}: {why}", hint=hint)


class SmtpListener(Closing):
    """An SMTP server on ``host:port`` feeding ``spool``, run in a background thread.

    ``accept(address)`` says which ``RCPT TO`` addresses are ours. Nothing is called
    after a message was spooled: the daemon's watcher sees it arrive in the spool.
    ``limits`` bound what clients may take (:class:`SmtpLimits`, defaults as the settings).
    With ``port=0`` the system picks a free port; after :meth:`start`, ``self.port`` is
    the bound one. ``hostname`` is the name in the greeting (default: this host's FQDN,
    looked up once). ``accepting()``, if given, is asked before MAIL, RCPT and DATA;
    while it returns False those get ``452 4.3.1`` (the free-space floor).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        spool: SpoolLike,
        accept: Callable[[str], bool],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        hostname: str | None = None,
        limits: SmtpLimits | None = None,
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._hostname = hostname
        self._spool = spool
        self._accept = accept
        self.limits = limits or SmtpLimits()
        self._accepting = accepting
        self._running: _Running | None = None

    # -- lifecycle

    def start(self) -> None:
        """Bind and start serving; raises :class:`TransportError` (one line and a next
        step, see :func:`listen_error`) if the address is unusable."""
        if self._running is not None:
            raise RuntimeError("SmtpListener already started")
        hostname = self._hostname or socket.getfqdn()
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=SPOOL_WORKERS, thread_name_prefix="mailsh-smtp-spool"
        )
        handler = _Handler(
            spool=self._spool,
            accept=self._accept,
            executor=executor,
            accepting=self._accepting,
        )
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_LoopErrors())
        admission = Admission(self.limits)

        def factory() -> SMTP:
            return LimitedSMTP(
                handler,
                admission=admission,
                limits=self.limits,
                data_size_limit=self.max_message_bytes,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=hostname,
                ident="mailsh",
                loop=loop,
            )

        try:
            server = loop.run_until_complete(
                loop.create_server(factory, host=self.host or None, port=self.port)
            )
        except BaseException as exc:
            loop.close()
            executor.shutdown(wait=False)
            if isinstance(exc, OSError):
                raise listen_error(self.host, self.port, exc) from exc
            raise
        self.port = server.sockets[0].getsockname()[1]
        thread = threading.Thread(
            target=_run_loop, args=(loop,), name=f"mailsh-smtp-{self.port}", daemon=True
        )
        self._running = _Running(loop=loop, server=server, thread=thread, executor=executor)
        thread.start()
        log.debug("smtp listener on %s port %d", self.host, self.port)  # serve logs it

    def stop(self) -> None:
        """Stop accepting, end open sessions, wait for running spool writes, release all."""
        running, self._running = self._running, None
        if running is None:
            return
        loop = running.loop
        try:
            asyncio.run_coroutine_threadsafe(_shutdown(running.server), loop).result(STOP_TIMEOUT)
        except Exception:
            log.exception("smtp listener: unclean shutdown")
        loop.call_soon_threadsafe(loop.stop)
        running.thread.join(STOP_TIMEOUT)
        if not running.thread.is_alive():
            loop.close()
        running.executor.shutdown(wait=True)
        log.info("smtp listener on %s port %d stopped", self.host, self.port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def close(self) -> None:
        """:meth:`stop`: what leaving a ``with`` block does (entering it starts)."""
        self.stop()
