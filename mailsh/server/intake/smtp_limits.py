"""What one SMTP client may take from the listener: session caps, timeouts, budgets (P11).

No peer can take the listener for itself: sessions are capped in total and, well below
that, per peer address (:func:`peer_key`: an IPv6 peer counts per /64), so one flooding
host cannot lock the others out. A connection over a cap is answered ``421`` at once and
closed without starting a session (:class:`Admission`). A client silent for
``idle_timeout``, or taking more than ``command_timeout`` from one command to the next (a
slow DATA included), and a session past ``max_messages`` transactions, get ``421`` and
are closed (:class:`LimitedSMTP`). The limits are the ``smtp_*`` settings
(docs/server.md); :mod:`mailsh.server.intake.smtp` runs the sessions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Self

from aiosmtpd.smtp import SMTP

from mailsh.settings import Settings

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 100
"""RCPT TO commands accepted per message; more get 452 4.5.3. A protocol constant, not a
setting: RFC 5321 4.5.3.1.8 asks a server to take at least 100, and mailsh mail names one."""
OTHER_COMMANDS_SLACK = 20
"""Each command other than MAIL, RCPT and DATA (NOOP, RSET, EHLO, ...) is accepted
``max_messages + OTHER_COMMANDS_SLACK`` times per session, then 421 (no endless NOOPs).
Internal tuning, not a setting: ``smtp_max_messages`` already scales it."""


@dataclass(frozen=True)
class SmtpLimits:
    """What one SMTP client may take (the ``smtp_*`` settings; docs/server.md).

    ``max_sessions``: concurrent sessions in total. ``max_sessions_per_peer``: concurrent
    sessions from one peer address (IPv6: one /64), at most ``max_sessions``.
    ``idle_timeout``: seconds a client may send nothing at all. ``command_timeout``:
    seconds from one accepted command to the next, so it also bounds a whole DATA
    transfer (aiosmtpd's ``timeout``, RFC 5321 4.5.3.2). ``max_messages``: mail
    transactions (``MAIL FROM``) per session.
    """

    max_sessions: int = 100
    max_sessions_per_peer: int = 10
    idle_timeout: float = 60.0
    command_timeout: float = 300.0
    max_messages: int = 50

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_sessions_per_peer, self.max_messages) < 1:
            raise ValueError("SMTP session and message limits must be >= 1")
        if not (self.idle_timeout > 0 and self.command_timeout > 0):
            raise ValueError("SMTP timeouts must be positive")
        if self.max_sessions_per_peer > self.max_sessions:
            raise ValueError("max_sessions_per_peer must not exceed max_sessions")

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The limits of the ``smtp_*`` settings (each field is ``smtp_`` + its name)."""
        return cls(**{f.name: getattr(settings, f"smtp_{f.name}") for f in dataclasses.fields(cls)})

    def call_limits(self) -> dict[str, int]:
        """aiosmtpd's ``command_call_limit``: per-session budgets, 421 once spent."""
        return {
            "MAIL": self.max_messages,
            "DATA": self.max_messages,
            "RCPT": self.max_messages * MAX_RECIPIENTS,
            "*": self.max_messages + OTHER_COMMANDS_SLACK,
        }


def peer_key(peer: object) -> str:
    """The address a peer's sessions are counted under: the IPv4 address (also when
    IPv4-mapped), the /64 network of an IPv6 address (one host usually holds a whole /64),
    else the text of whatever the transport reported."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Admission:
    """Open sessions in total and per peer. Used only from the listener's event loop
    thread, so it needs no lock."""

    def __init__(self, limits: SmtpLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_peer: dict[str, int] = {}

    def admit(self, key: str) -> str | None:
        """Count a new session from ``key``; or say why not (nothing is counted then)."""
        if self.total >= self.limits.max_sessions:
            return "too many connections"
        if self.per_peer.get(key, 0) >= self.limits.max_sessions_per_peer:
            return "too many connections from your address"
        self.total += 1
        self.per_peer[key] = self.per_peer.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        left = self.per_peer[key] - 1
        if left:
            self.per_peer[key] = left
        else:
            del self.per_peer[key]


class LimitedSMTP(SMTP):
    """aiosmtpd's SMTP session with admission control and an idle timeout.

    ``connection_made`` admits the connection or answers 421 and closes it before any
    session exists; ``data_received`` records the last input for the idle timer; the
    command timeout is aiosmtpd's own ``timeout``, whose callback is extended to say 421.
    """

    def __init__(
        self, handler: object, *, admission: Admission, limits: SmtpLimits, **kwargs: Any
    ) -> None:
        super().__init__(
            handler,
            timeout=limits.command_timeout,
            command_call_limit=limits.call_limits(),
            **kwargs,
        )
        self._admission = admission
        self._idle_timeout = limits.idle_timeout
        self._peer_key: str | None = None  # set once admitted
        self._last_input = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._peer_key is not None:  # a second call (STARTTLS upgrade): no new session
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        key = peer_key(peer)
        refusal = self._admission.admit(key)
        if refusal is not None:
            log.warning("smtp %s: refused, %s (421)", key, refusal)
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(f"421 4.7.0 {self.hostname} {refusal}, try later\r\n".encode())
            transport.close()
            return
        self._peer_key = key
        super().connection_made(transport)
        self._last_input = self.loop.time()
        self._idle_handle = self.loop.call_later(self._idle_timeout, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self._peer_key is None:  # refused: there is no session to feed
            return
        self._last_input = self.loop.time()
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._peer_key is None:
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        key, self._peer_key = self._peer_key, None
        if key is None:  # refused at connection_made: aiosmtpd never set up
            return
        self._admission.release(key)
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        super().connection_lost(exc)

    def _idle_check(self) -> None:
        if self.transport is None:
            return
        left = self._last_input + self._idle_timeout - self.loop.time()
        if left > 0:
            self._idle_handle = self.loop.call_later(left, self._idle_check)
            return
        log.info("smtp %s: idle for %ss, closing (421)", self._peer_key, self._idle_timeout)
        self._say_and_close("421 4.4.2 idle too long, closing")

    def _timeout_cb(self) -> None:
        """aiosmtpd's command timeout (``timeout``): say 421 before it closes."""
        log.info(
            "smtp %s: no command for %ss, closing (421)", self._peer_key, self._timeout_duration
        )
        self._say_and_close("421 4.4.2 command timeout, closing")

    def _say_and_close(self, reply: str) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"{reply}\r\n".encode())
        if transport is not None:
            transport.close()
