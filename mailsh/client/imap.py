"""Reading replies over IMAP for ``mailsh wait-reply --imap URL``.

URLs are parsed by :func:`parse_imap_url` (``mailsh.client.imap_url``, re-exported here).
A CA file may be given for a private CA, e.g. a test rig's self-signed certificate; it
then replaces the system CAs.

:class:`ImapWatcher` only reads: the mailbox is opened with EXAMINE (read-only) and
messages are fetched with ``BODY.PEEK[]``, so nothing is flagged, moved or deleted and
unrelated mail stays unread. IMAP IDLE (RFC 2177) is spoken by hand on top of imaplib
(Python 3.11 has none); servers without IDLE are polled with NOOP.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import select
import socket
import ssl
import time
import types
from pathlib import Path
from typing import BinaryIO, cast

from mailsh.client.imap_url import ImapTarget, TlsMode, parse_imap_url
from mailsh.errors import TransportError
from mailsh.text import printable_line

#: Re-issue IDLE before servers drop it (RFC 2177: at least every 29 minutes).
IDLE_RENEW_SECONDS = 25 * 60
#: Messages larger than this are skipped (never fetched), see ``ImapWatcher.skipped``.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")

__all__ = [
    "ImapLoginError",
    "ImapTarget",
    "ImapWatcher",
    "TlsMode",
    "parse_imap_url",
]


class ImapLoginError(TransportError):
    """The server refused the user name or password (retrying will not help)."""


class _DroppedError(Exception):
    """The connection went away (EOF, BYE, socket error); reconnecting may help."""


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    _DroppedError,
    imaplib.IMAP4.abort,
    OSError,  # includes ssl.SSLError, socket.timeout, ConnectionResetError
    EOFError,
)


class ImapWatcher:
    """Watch one mailbox for new messages, read-only.

    ``since_uid`` chooses where the first :meth:`fetch_new` starts: an int returns the
    messages with a larger UID (``0``: everything in the mailbox); ``None`` returns only
    messages that arrive after the first connection. If the server's UIDVALIDITY changes
    across a reconnect, UIDs restart: everything is returned again (duplicates are
    possible, a loss is not).

    Connection drops are retried ``max_reconnects`` times in a row with exponential
    backoff, then :class:`TransportError` is raised. A refused login is never retried.
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
        backoff: float = 0.5,
        idle_renew: float = IDLE_RENEW_SECONDS,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
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
        #: UIDs skipped because they exceeded ``max_message_bytes``.
        self.skipped: list[int] = []
        #: How many times the connection was re-established (for tests and diagnostics).
        self.reconnects = 0
        self._imap: imaplib.IMAP4 | None = None
        self._tag_counter = 0

    def __repr__(self) -> str:
        return f"ImapWatcher({self.target}, last_uid={self.last_uid})"

    # ------------------------------------------------------------------ connection

    def __enter__(self) -> ImapWatcher:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    @property
    def idle_supported(self) -> bool:
        """True when IDLE will be used (server offers it and ``use_idle`` is set)."""
        return self.use_idle and "IDLE" in self._conn().capabilities

    def connect(self) -> None:
        """Connect, log in and EXAMINE the mailbox; raise :class:`TransportError` if not."""
        self.close()
        target = self.target
        where = f"{target.host}:{target.port}"
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
        except OSError as exc:  # missing file, or not PEM (ssl.SSLError)
            raise TransportError(
                f"cannot load the IMAP CA file {self.ca_file}: {exc}",
                hint="pass a PEM file of CA certificates (--imap-ca-file / MAILSH_IMAP_CA_FILE)",
            ) from exc
        imap: imaplib.IMAP4
        try:
            if target.tls is TlsMode.IMPLICIT:
                imap = imaplib.IMAP4_SSL(
                    target.host, target.port, ssl_context=context, timeout=self.timeout
                )
            else:
                imap = imaplib.IMAP4(target.host, target.port, timeout=self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise self._tls_error(where, exc) from exc
        except (OSError, imaplib.IMAP4.error) as exc:
            raise TransportError(
                f"cannot connect to IMAP server {where}: {_text(exc)}",
                hint=f"check host and port in {target} and that the server is running",
            ) from exc
        try:
            if target.tls is TlsMode.STARTTLS:
                if "STARTTLS" not in imap.capabilities:
                    raise TransportError(
                        f"IMAP server {where} does not offer STARTTLS; "
                        "refusing to send the password in clear",
                        hint="use imaps:// if the server has a TLS port",
                    )
                try:
                    imap.starttls(ssl_context=context)
                except ssl.SSLCertVerificationError as exc:
                    raise self._tls_error(where, exc) from exc
            try:
                imap.login(target.user, self._password)
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as exc:
                raise ImapLoginError(
                    f"IMAP login as {target.user!r} on {where} failed: {_text(exc)}",
                    hint="check the user in the URL and MAILSH_IMAP_PASSWORD",
                ) from exc
            self._imap = imap
            self._refresh_capabilities()
            self._select()
        except BaseException:
            self._imap = None
            _shutdown(imap)
            raise

    def _tls_error(self, where: str, exc: ssl.SSLCertVerificationError) -> TransportError:
        return TransportError(
            f"TLS certificate of IMAP server {where} not trusted: {exc.verify_message}",
            hint="for a private CA or self-signed server pass its certificate as the CA file "
            "(--imap-ca-file / MAILSH_IMAP_CA_FILE)",
        )

    def _refresh_capabilities(self) -> None:
        # Servers may announce more (IDLE) after login; imaplib keeps the pre-login list.
        imap = self._conn()
        status, data = imap.capability()
        if status == "OK" and data and isinstance(data[0], bytes):
            imap.capabilities = tuple(data[0].decode("ascii", "replace").upper().split())

    def _select(self) -> None:
        imap = self._conn()
        status, data = imap.select(_quote_mailbox(self.target.mailbox), readonly=True)
        if status != "OK":
            raise TransportError(
                f"cannot open IMAP mailbox {self.target.mailbox!r}: {_text(data)}",
                hint="check the mailbox name in the URL (default INBOX)",
            )
        validity = _int_response(imap, "UIDVALIDITY")
        uidnext = _int_response(imap, "UIDNEXT")
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
            raise _DroppedError(f"UID SEARCH failed: {_text(data)}")
        words = data[0].split() if data and isinstance(data[0], bytes) else []
        return max((int(w) for w in words), default=0)

    def close(self) -> None:
        """Log out (best effort) and close the connection."""
        imap, self._imap = self._imap, None
        if imap is None:
            return
        # Best effort: the socket is closed below either way.
        with contextlib.suppress(imaplib.IMAP4.error, OSError, EOFError, _DroppedError):
            imap.logout()
        _shutdown(imap)

    def _conn(self) -> imaplib.IMAP4:
        if self._imap is None:
            raise _DroppedError("not connected")
        return self._imap

    def _reconnect(self, attempt: int, cause: BaseException) -> None:
        if attempt > self.max_reconnects:
            raise TransportError(
                f"lost the IMAP connection to {self.target.host}:{self.target.port} "
                f"and {self.max_reconnects} reconnects failed: {_text(cause)}",
                hint="check the network and the server, then run the command again",
            ) from cause
        self.close()
        time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
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
            except _CONNECTION_ERRORS as exc:
                attempt += 1
                self._reconnect(attempt, exc)
            except imaplib.IMAP4.error as exc:
                raise _protocol_error(self.target, exc) from exc

    def _fetch_new(self) -> list[bytes]:
        imap = self._conn()
        start = (self.last_uid or 0) + 1
        status, data = imap.uid("FETCH", f"{start}:*", "(UID RFC822.SIZE)")
        if status != "OK":
            raise _DroppedError(f"UID FETCH failed: {_text(data)}")
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
            if sizes[uid] > self.max_message_bytes:
                self.skipped.append(uid)
            else:
                messages.append(self._fetch_one(uid))
            self.last_uid = uid
        return messages

    def _fetch_one(self, uid: int) -> bytes:
        status, data = self._conn().uid("FETCH", str(uid), "(BODY.PEEK[])")
        if status != "OK":
            raise _DroppedError(f"UID FETCH {uid} failed: {_text(data)}")
        for item in data:
            if (
                isinstance(item, tuple)
                and b"BODY[]" in item[0]
                and (m := _FETCH_UID.search(item[0])) is not None
                and int(m.group(1)) == uid
            ):
                return bytes(item[1])
        raise _DroppedError(f"server returned no body for UID {uid}")

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
                if _take_new_mail(imap):  # announced while we were fetching
                    return True
                if self.idle_supported:
                    return self._idle_until(deadline)
                return self._poll_until(deadline)
            except _CONNECTION_ERRORS as exc:
                attempt += 1
                self._reconnect(attempt, exc)
                if self._imap is not None:
                    return True
            except imaplib.IMAP4.error as exc:
                raise _protocol_error(self.target, exc) from exc

    def _poll_until(self, deadline: float) -> bool:
        imap = self._conn()
        while True:
            status, data = imap.noop()
            if status != "OK":
                raise _DroppedError(f"NOOP failed: {_text(data)}")
            if _take_new_mail(imap):
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
        """One IDLE ... DONE exchange (RFC 2177), read by hand beside imaplib."""
        imap = self._conn()
        self._tag_counter += 1
        tag = b"MSH%d" % self._tag_counter  # distinct from imaplib's own tags
        imap.send(tag + b" IDLE\r\n")
        woken = False
        while True:  # until the continuation request
            line = _readline(imap)
            if line.startswith(b"+"):
                break
            if line.startswith(tag + b" "):
                raise TransportError(
                    f"IMAP server refused IDLE: {line.decode('ascii', 'replace').strip()}",
                    hint="retry; servers without IDLE are polled with NOOP automatically",
                )
            woken = woken or _announces_new_mail(line)
        while not woken:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            if not _has_buffered(imap):
                ready, _, _ = select.select([imap.sock], [], [], remaining)
                if not ready:
                    continue
            woken = _announces_new_mail(_readline(imap))
        imap.send(b"DONE\r\n")
        while True:
            line = _readline(imap)
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1 :].upper().startswith(b"OK"):
                    raise _DroppedError(f"IDLE ended with {_text(line)}")
                return woken
            woken = woken or _announces_new_mail(line)


def _protocol_error(target: ImapTarget, exc: imaplib.IMAP4.error) -> TransportError:
    return TransportError(
        f"IMAP server {target.host}:{target.port} answered unexpectedly: {_text(exc)}",
        hint="run again with --debug and report the server software if it repeats",
    )


def _readline(imap: imaplib.IMAP4) -> bytes:
    line = imap.readline()
    if not line:
        raise _DroppedError("server closed the connection")
    if line.startswith(b"* BYE"):
        raise _DroppedError(f"server said {_text(line)}")
    return line


def _announces_new_mail(line: bytes) -> bool:
    words = line.split()
    return len(words) >= 3 and words[0] == b"*" and words[2].upper() in (b"EXISTS", b"RECENT")


def _take_new_mail(imap: imaplib.IMAP4) -> bool:
    """Consume EXISTS/RECENT that imaplib collected during earlier commands."""
    found = False
    for name in ("EXISTS", "RECENT"):
        if imap.untagged_responses.pop(name, None):
            found = True
    return found


def _has_buffered(imap: imaplib.IMAP4) -> bool:
    """Whether a read would return data now (buffered in Python or TLS, or on the wire).

    select() alone misses bytes already inside imaplib's buffered file object. A
    non-blocking peek fills that buffer from the socket without consuming anything.
    """
    file = cast(BinaryIO, imap.file)
    sock: socket.socket = imap.sock
    saved = sock.gettimeout()
    sock.setblocking(False)
    try:
        peek = getattr(file, "peek", None)
        return bool(peek(1)) if peek is not None else False
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    finally:
        sock.settimeout(saved)


def _int_response(imap: imaplib.IMAP4, name: str) -> int | None:
    values = imap.untagged_responses.get(name)
    if not values:
        return None
    try:
        return int(cast(bytes, values[-1]))
    except (TypeError, ValueError):
        return None


def _quote_mailbox(name: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9._/-]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(value: object) -> str:
    """Server-written text (an answer, an error) as one printable line for a person."""
    if isinstance(value, BaseException) and len(value.args) == 1:
        value = value.args[0]  # imaplib puts the server's bytes in args: not "b'...'"
    if isinstance(value, list):
        value = b" ".join(v for v in value if isinstance(v, bytes))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return printable_line(str(value))


def _shutdown(imap: imaplib.IMAP4) -> None:
    with contextlib.suppress(OSError):
        imap.shutdown()
