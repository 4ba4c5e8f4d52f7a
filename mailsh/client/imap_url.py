"""IMAP URLs for ``mailsh wait-reply --imap URL`` (an RFC 5092 subset).

::

    imap://USER@HOST[:PORT][/MAILBOX]            STARTTLS required (port 143)
    imap://USER@HOST[:PORT][/MAILBOX]?tls=none   no TLS: loopback hosts only (test rigs)
    imaps://USER@HOST[:PORT][/MAILBOX]           TLS from the first byte (port 993)

USER and MAILBOX are percent-decoded (``alice%40example.org``); MAILBOX defaults to INBOX.
A password in the URL is refused (it would end up in shell history and ``ps``): the caller
passes it (the CLI reads ``MAILSH_IMAP_PASSWORD``).
"""

from __future__ import annotations

import enum
import urllib.parse
from dataclasses import dataclass

from mailsh.addresses import is_loopback
from mailsh.errors import UsageError

DEFAULT_PORTS = {"imap": 143, "imaps": 993}


class TlsMode(enum.Enum):
    """How the connection is protected."""

    STARTTLS = "starttls"
    IMPLICIT = "implicit"
    NONE = "none"


@dataclass(frozen=True)
class ImapTarget:
    """Where to read replies. Holds no secret: the password is passed separately."""

    host: str
    port: int
    user: str
    mailbox: str = "INBOX"
    tls: TlsMode = TlsMode.STARTTLS

    def __str__(self) -> str:
        scheme = "imaps" if self.tls is TlsMode.IMPLICIT else "imap"
        user = urllib.parse.quote(self.user, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        box = urllib.parse.quote(self.mailbox, safe="/")
        query = "?tls=none" if self.tls is TlsMode.NONE else ""
        return f"{scheme}://{user}@{host}:{self.port}/{box}{query}"


def _bad_url(url: str, why: str) -> UsageError:
    return UsageError(
        f"bad IMAP URL {url!r}: {why}",
        hint="use imap://USER@HOST[:PORT][/MAILBOX] (STARTTLS) or imaps://USER@HOST[:PORT]",
    )


def parse_imap_url(url: str) -> ImapTarget:
    """Parse an ``imap://`` or ``imaps://`` URL; raise :class:`UsageError` when invalid."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise _bad_url(url, "contains spaces or control characters")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _bad_url(url, "scheme must be imap or imaps")
    if parts.password is not None:
        raise UsageError(
            "refusing a password inside the IMAP URL (it would leak into history and ps)",
            hint="remove ':PASSWORD' from the URL and set MAILSH_IMAP_PASSWORD instead",
        )
    if not parts.username:
        raise _bad_url(url, "a user is required (imap://USER@HOST)")
    user = urllib.parse.unquote(parts.username)
    host = parts.hostname
    if not host:
        raise _bad_url(url, "a host is required")
    try:
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
    except ValueError as exc:
        raise _bad_url(url, "port must be a number from 1 to 65535") from exc
    if port == 0:
        raise _bad_url(url, "port must be a number from 1 to 65535")
    if parts.fragment:
        raise _bad_url(url, "fragments (#...) are not allowed")
    mailbox = urllib.parse.unquote(parts.path.lstrip("/")) or "INBOX"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in mailbox + user):
        raise _bad_url(url, "user or mailbox contains control characters")
    tls = _tls_mode(url, scheme, host, parts.query)
    return ImapTarget(host=host, port=port, user=user, mailbox=mailbox, tls=tls)


def _tls_mode(url: str, scheme: str, host: str, query_string: str) -> TlsMode:
    query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
    unknown = set(query) - {"tls"}
    if unknown:
        raise _bad_url(url, f"unknown parameter(s) {', '.join(sorted(unknown))}")
    if "tls" not in query:
        return TlsMode.IMPLICIT if scheme == "imaps" else TlsMode.STARTTLS
    if scheme != "imap" or query["tls"] != ["none"]:
        raise _bad_url(url, "the only accepted parameter is ?tls=none on imap://")
    if not is_loopback(host):
        raise UsageError(
            f"refusing IMAP without TLS to {host}: only loopback hosts may use ?tls=none",
            hint="drop ?tls=none (STARTTLS is then required) or use imaps://",
        )
    return TlsMode.NONE
