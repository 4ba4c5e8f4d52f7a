"""One IMAP connection's plumbing: opening it (TLS, STARTTLS, login) and the wire beside imaplib.

:func:`open_connection` returns a logged-in ``imaplib.IMAP4`` or raises
:class:`~mailsh.errors.TransportError` (:class:`ImapLoginError` for a refused login).
IMAP IDLE (RFC 2177) is spoken by hand on top of imaplib (Python 3.11 has none):
:func:`idle_once`. Everything the server writes reaches a person only through
:func:`server_text`, as one printable line (docs/security.md P14).
:class:`~mailsh.client.imap.ImapWatcher` builds the read-only mailbox watch on these.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import select
import socket
import ssl
import time
from pathlib import Path
from typing import BinaryIO, cast

from mailsh.client.imap_url import ImapTarget, TlsMode
from mailsh.errors import TransportError
from mailsh.text import printable_line


class ImapLoginError(TransportError):
    """The server refused the user name or password (retrying will not help)."""


class DroppedError(Exception):
    """The connection went away (EOF, BYE, socket error); reconnecting may help."""


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    DroppedError,
    imaplib.IMAP4.abort,
    OSError,  # includes ssl.SSLError, socket.timeout, ConnectionResetError
    EOFError,
)
"""What a dropped connection raises (as opposed to a server's unexpected answer)."""


def open_connection(
    target: ImapTarget, password: str, *, ca_file: Path | None, timeout: float
) -> imaplib.IMAP4:
    """Connect to ``target``, secure the connection as its URL says, and log in."""
    where = f"{target.host}:{target.port}"
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except OSError as exc:  # missing file, or not PEM (ssl.SSLError)
        raise TransportError(
            f"cannot load the IMAP CA file {ca_file}: {exc}",
            hint="pass a PEM file of CA certificates (--imap-ca-file / MAILSH_IMAP_CA_FILE)",
        ) from exc
    imap: imaplib.IMAP4
    try:
        if target.tls is TlsMode.IMPLICIT:
            imap = imaplib.IMAP4_SSL(target.host, target.port, ssl_context=context, timeout=timeout)
        else:
            imap = imaplib.IMAP4(target.host, target.port, timeout=timeout)
    except ssl.SSLCertVerificationError as exc:
        raise _tls_error(where, exc) from exc
    except (OSError, imaplib.IMAP4.error) as exc:
        raise TransportError(
            f"cannot connect to IMAP server {where}: {server_text(exc)}",
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
                raise _tls_error(where, exc) from exc
        try:
            imap.login(target.user, password)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            raise ImapLoginError(
                f"IMAP login as {target.user!r} on {where} failed: {server_text(exc)}",
                hint="check the user in the URL and MAILSH_IMAP_PASSWORD",
            ) from exc
    except BaseException:
        shutdown(imap)
        raise
    return imap


def _tls_error(where: str, exc: ssl.SSLCertVerificationError) -> TransportError:
    return TransportError(
        f"TLS certificate of IMAP server {where} not trusted: {exc.verify_message}",
        hint="for a private CA or self-signed server pass its certificate as the CA file "
        "(--imap-ca-file / MAILSH_IMAP_CA_FILE)",
    )


def idle_once(imap: imaplib.IMAP4, tag: bytes, until: float) -> bool:
    """One IDLE ... DONE exchange (RFC 2177) under ``tag``, read by hand beside imaplib.

    True when the server announced new mail before the monotonic time ``until``.
    """
    imap.send(tag + b" IDLE\r\n")
    woken = False
    while True:  # until the continuation request
        line = readline(imap)
        if line.startswith(b"+"):
            break
        if line.startswith(tag + b" "):
            raise TransportError(
                f"IMAP server refused IDLE: {line.decode('ascii', 'replace').strip()}",
                hint="retry; servers without IDLE are polled with NOOP automatically",
            )
        woken = woken or announces_new_mail(line)
    while not woken:
        remaining = until - time.monotonic()
        if remaining <= 0:
            break
        if not _has_buffered(imap):
            ready, _, _ = select.select([imap.sock], [], [], remaining)
            if not ready:
                continue
        woken = announces_new_mail(readline(imap))
    imap.send(b"DONE\r\n")
    while True:
        line = readline(imap)
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1 :].upper().startswith(b"OK"):
                raise DroppedError(f"IDLE ended with {server_text(line)}")
            return woken
        woken = woken or announces_new_mail(line)


def protocol_error(target: ImapTarget, exc: imaplib.IMAP4.error) -> TransportError:
    """A server answer imaplib could not make sense of, for a person."""
    return TransportError(
        f"IMAP server {target.host}:{target.port} answered unexpectedly: {server_text(exc)}",
        hint="run again with --debug and report the server software if it repeats",
    )


def readline(imap: imaplib.IMAP4) -> bytes:
    """One line from the server; :class:`DroppedError` at EOF or BYE."""
    line = imap.readline()
    if not line:
        raise DroppedError("server closed the connection")
    if line.startswith(b"* BYE"):
        raise DroppedError(f"server said {server_text(line)}")
    return line


def announces_new_mail(line: bytes) -> bool:
    """Whether ``line`` is an untagged EXISTS or RECENT."""
    words = line.split()
    return len(words) >= 3 and words[0] == b"*" and words[2].upper() in (b"EXISTS", b"RECENT")


def take_new_mail(imap: imaplib.IMAP4) -> bool:
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


def int_response(imap: imaplib.IMAP4, name: str) -> int | None:
    """The last untagged ``name`` response (UIDVALIDITY, UIDNEXT) as an int, if any."""
    values = imap.untagged_responses.get(name)
    if not values:
        return None
    try:
        return int(cast(bytes, values[-1]))
    except (TypeError, ValueError):
        return None


def quote_mailbox(name: str) -> str:
    """A mailbox name as an IMAP astring (quoted unless plainly safe)."""
    if re.fullmatch(r"[A-Za-z0-9._/-]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_text(value: object) -> str:
    """Server-written text (an answer, an error) as one printable line for a person."""
    if isinstance(value, BaseException) and len(value.args) == 1:
        value = value.args[0]  # imaplib puts the server's bytes in args: not "b'...'"
    if isinstance(value, list):
        value = b" ".join(v for v in value if isinstance(v, bytes))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return printable_line(str(value))


def shutdown(imap: imaplib.IMAP4) -> None:
    """Close the socket; a connection already gone is fine."""
    with contextlib.suppress(OSError):
        imap.shutdown()
