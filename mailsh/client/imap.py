"""Reading replies over IMAP for ``mailsh wait-reply --imap URL``: watching one mailbox.

URLs are parsed by :func:`parse_imap_url` (``mailsh.client.imap_url``, re-exported here).
A CA file may be given for a private CA, e.g. a test rig's self-signed certificate; it
then replaces the system CAs.

:class:`ImapWatcher` only reads: the mailbox is opened with EXAMINE (read-only) and
messages are fetched with ``BODY.PEEK[]``, so nothing is flagged, moved or deleted and
unrelated mail stays unread. It waits with IMAP IDLE where the server has it, and polls
with NOOP elsewhere. Opening a connection and speaking IDLE by hand live in
:mod:`mailsh.client.imap_conn`.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import time
from pathlib import Path
from typing import Self

from mailsh.client.imap_conn import (
    CONNECTION_ERRORS,
    DroppedError,
    ImapLoginError,
    idle_once,
    int_response,
    open_connection,
    protocol_error,
    quote_mailbox,
    server_text,
    shutdown,
    take_new_mail,
)
from mailsh.client.imap_url import ImapTarget, TlsMode, parse_imap_url
from mailsh.errors import TransportError
from mailsh.resources import Closing

IDLE_RENEW_SECONDS = 25 * 60
"""Re-issue IDLE before servers drop it. A protocol constant, not a setting: RFC 2177
asks clients to re-issue IDLE at least every 29 minutes, so any value must stay below."""
RECONNECT_BACKOFF = 0.5
"""Seconds before the first reconnect, doubled for each further one in a row."""
RECONNECT_BACKOFF_MAX = 30.0
"""The longest wait before a reconnect. The backoff is internal tuning, not a setting:
``imap_max_reconnects`` (a setting) already bounds how long reconnecting goes on."""

_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")

__all__ = [
    "ImapLoginError",
    "ImapTarget",
    "ImapWatcher",
    "TlsMode",
    "parse_imap_url",
]


class ImapWatcher(Closing):
    """Watch one mailbox for new messages, read-only.

    ``since_uid`` chooses where the first :meth:`fetch_new` starts: an int returns the
    messages with a larger UID (``0``: everything in the mailbox); ``None`` returns only
    messages that arrive after the first connection. If the server's UIDVALIDITY changes
    across a reconnect, UIDs restart: everything is returned again (duplicates are
    possible, a loss is not).

    Messages larger than ``max_message_bytes`` are skipped, never fetched (``wait-reply``
    passes the ``max_reply_bytes`` setting); None reads every message.

    Connection drops are retried ``max_reconnects`` times in a row with exponential
    backoff, then :class:`TransportError` is raised. A refused login is never retried.

    ``timeout``, ``poll_interval`` and ``max_reconnects`` are the ``imap_*`` settings
    (docs/client.md), and default to the same values; ``wait-reply`` passes the settings.
    """

    def __init__(
        self,
        target: ImapTarget,
        password: str,
        *,
        ca_file: Path | None = None,
        since_uid: int | None = 0,
        use_idle: bool = True,
        timeout: float = 30.0,
        poll_interval: float = 5.0,
        max_reconnects: int = 5,
        backoff: float = RECONNECT_BACKOFF,
        idle_renew: float = IDLE_RENEW_SECONDS,
        max_message_bytes: int | None = None,
    ) -> None:
        self.target = target
        self._password = password
        self.ca_file = ca_file
        self.use_idle = use_idle
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_reconnects = max_reconnects
        self.backoff = backoff
        self.idle_renew = idle_renew
        self.max_message_bytes = max_message_bytes
        self.last_uid: int | None = since_uid
        self.uidvalidity: int | None = None
        #: UIDs skipped because they exceeded ``max_message_bytes`` (None: no limit).
        self.skipped: list[int] = []
        #: How many times the connection was re-established (for tests and diagnostics).
        self.reconnects = 0
        self._imap: imaplib.IMAP4 | None = None
        self._tag_counter = 0

    def __repr__(self) -> str:
        return f"ImapWatcher({self.target}, last_uid={self.last_uid})"

    # ------------------------------------------------------------------ connection

    def __enter__(self) -> Self:
        self.connect()
        return self

    @property
    def idle_supported(self) -> bool:
        """True when IDLE will be used (server offers it and ``use_idle`` is set)."""
        return self.use_idle and "IDLE" in self._conn().capabilities

    def connect(self) -> None:
        """Connect, log in and EXAMINE the mailbox; raise :class:`TransportError` if not."""
        self.close()
        imap = open_connection(
            self.target, self._password, ca_file=self.ca_file, timeout=self.timeout
        )
        try:
            self._imap = imap
            self._refresh_capabilities()
            self._select()
        except BaseException:
            self._imap = None
            shutdown(imap)
            raise

    def _refresh_capabilities(self) -> None:
        # Servers may announce more (IDLE) after login; imaplib keeps the pre-login list.
        imap = self._conn()
        status, data = imap.capability()
        if status == "OK" and data and isinstance(data[0], bytes):
            imap.capabilities = tuple(data[0].decode("ascii", "replace").upper().split())

    def _select(self) -> None:
        imap = self._conn()
        status, data = imap.select(quote_mailbox(self.target.mailbox), readonly=True)
        if status != "OK":
            raise TransportError(
                f"cannot open IMAP mailbox {self.target.mailbox!r}: {server_text(data)}",
                hint="check the mailbox name in the URL (default INBOX)",
            )
        validity = int_response(imap, "UIDVALIDITY")
        uidnext = int_response(imap, "UIDNEXT")
        if self.uidvalidity is not None and validity != self.uidvalidity:
            self.last_uid = 0  # UIDs were reassigned: start over (duplicates, no loss)
        self.uidvalidity = validity
        if self.last_uid is None:
            self.last_uid = uidnext - 1 if uidnext is not None else self._max_uid()
        imap.untagged_responses.clear()

    def uids_since(self, day: str) -> list[int] | None:
        """UIDs of messages received on or after ``day`` (IMAP date, e.g. ``7-Mar-2026``).

        None when the server refuses the search (callers then scan from the start).
        """
        try:
            status, data = self._conn().uid("SEARCH", "SINCE", day)
        except (imaplib.IMAP4.error, OSError, EOFError):
            return None
        if status != "OK":
            return None
        words = data[0].split() if data and isinstance(data[0], bytes) else []
        return [int(w) for w in words if w.isdigit()]

    def _max_uid(self) -> int:
        status, data = self._conn().uid("SEARCH", "ALL")
        if status != "OK":
            raise DroppedError(f"UID SEARCH failed: {server_text(data)}")
        words = data[0].split() if data and isinstance(data[0], bytes) else []
        return max((int(w) for w in words), default=0)

    def close(self) -> None:
        """Log out (best effort) and close the connection."""
        imap, self._imap = self._imap, None
        if imap is None:
            return
        # Best effort: the socket is closed below either way.
        with contextlib.suppress(imaplib.IMAP4.error, OSError, EOFError, DroppedError):
            imap.logout()
        shutdown(imap)

    def _conn(self) -> imaplib.IMAP4:
        if self._imap is None:
            raise DroppedError("not connected")
        return self._imap

    def _reconnect(self, attempt: int, cause: BaseException) -> None:
        if attempt > self.max_reconnects:
            raise TransportError(
                f"lost the IMAP connection to {self.target.host}:{self.target.port} "
                f"and {self.max_reconnects} reconnects failed: {server_text(cause)}",
                hint="check the network and the server, then run the command again",
            ) from cause
        self.close()
        time.sleep(min(self.backoff * 2 ** (attempt - 1), RECONNECT_BACKOFF_MAX))
        try:
            self.connect()
        except ImapLoginError:
            raise
        except TransportError:
            return  # counted as a failed attempt by the caller's next operation
        self.reconnects += 1

    # ------------------------------------------------------------------ reading

    def fetch_new(self) -> list[bytes]:
        """Full raw messages (as the server sends them, CRLF) with UID > last seen."""
        attempt = 0
        while True:
            try:
                return self._fetch_new()
            except CONNECTION_ERRORS as exc:
                attempt += 1
                self._reconnect(attempt, exc)
            except imaplib.IMAP4.error as exc:
                raise protocol_error(self.target, exc) from exc

    def _fetch_new(self) -> list[bytes]:
        imap = self._conn()
        start = (self.last_uid or 0) + 1
        status, data = imap.uid("FETCH", f"{start}:*", "(UID RFC822.SIZE)")
        if status != "OK":
            raise DroppedError(f"UID FETCH failed: {server_text(data)}")
        sizes: dict[int, int] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes):
                continue
            m_uid, m_size = _FETCH_UID.search(line), _FETCH_SIZE.search(line)
            if m_uid and m_size and int(m_uid.group(1)) >= start:  # "n:*" has the last UID
                sizes[int(m_uid.group(1))] = int(m_size.group(1))
        messages: list[bytes] = []
        for uid in sorted(sizes):
            if self.max_message_bytes is not None and sizes[uid] > self.max_message_bytes:
                self.skipped.append(uid)
            else:
                messages.append(self._fetch_one(uid))
            self.last_uid = uid
        return messages

    def _fetch_one(self, uid: int) -> bytes:
        status, data = self._conn().uid("FETCH", str(uid), "(BODY.PEEK[])")
        if status != "OK":
            raise DroppedError(f"UID FETCH {uid} failed: {server_text(data)}")
        for item in data:
            if (
                isinstance(item, tuple)
                and b"BODY[]" in item[0]
                and (m := _FETCH_UID.search(item[0])) is not None
                and int(m.group(1)) == uid
            ):
                return bytes(item[1])
        raise DroppedError(f"server returned no body for UID {uid}")

    # ------------------------------------------------------------------ waiting

    def wait(self, timeout: float) -> bool:
        """Block until the server announces new mail or ``timeout`` seconds pass.

        Returns True when woken by the server (or after a reconnect, when something may
        have arrived meanwhile), False on timeout. Call :meth:`fetch_new` afterwards.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        attempt = 0
        while True:
            try:
                imap = self._conn()
                if take_new_mail(imap):  # announced while we were fetching
                    return True
                if self.idle_supported:
                    return self._idle_until(deadline)
                return self._poll_until(deadline)
            except CONNECTION_ERRORS as exc:
                attempt += 1
                self._reconnect(attempt, exc)
                if self._imap is not None:
                    return True
            except imaplib.IMAP4.error as exc:
                raise protocol_error(self.target, exc) from exc

    def _poll_until(self, deadline: float) -> bool:
        imap = self._conn()
        while True:
            status, data = imap.noop()
            if status != "OK":
                raise DroppedError(f"NOOP failed: {server_text(data)}")
            if take_new_mail(imap):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.poll_interval, remaining))

    def _idle_until(self, deadline: float) -> bool:
        while True:
            renew_at = time.monotonic() + self.idle_renew
            woken = self._idle_once(min(deadline, renew_at))
            if woken:
                return True
            if time.monotonic() >= deadline:
                return False

    def _idle_once(self, until: float) -> bool:
        self._tag_counter += 1
        return idle_once(self._conn(), b"MSH%d" % self._tag_counter, until)  # not imaplib's tags
