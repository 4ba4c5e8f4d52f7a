"""SMTP URLs for ``--smtp`` / ``MAILSH_SMTP``: where to submit, and how to talk there.

::

    smtp://[user@]host[:port]     STARTTLS whenever the server offers it (port 25; 587 to submit)
    smtps://[user@]host[:port]    TLS from the first byte (port 465)

A user may be percent-encoded; IPv6 literals go in brackets. A password in the URL is
refused (it would end up in shell history and ``ps``): it comes from
``MAILSH_SMTP_PASSWORD`` into :class:`SmtpOptions`. Parsing loads no network code.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from mailsh.errors import UsageError

SMTP_DEFAULT_PORT = 25
SMTPS_DEFAULT_PORT = 465
PASSWORD_ENV = "MAILSH_SMTP_PASSWORD"  # noqa: S105 - a variable name
PASSWORD_HINT = f"export {PASSWORD_ENV}=... (the SMTP password for the user in the URL)"
_URL_HINT = "use smtp://[user@]host[:port] (STARTTLS when offered) or smtps://[user@]host[:port]"


@dataclass(frozen=True)
class SmtpTarget:
    """Where to send: a parsed ``smtp://`` or ``smtps://`` URL."""

    scheme: Literal["smtp", "smtps"]
    host: str
    port: int
    user: str | None = None

    @property
    def implicit_tls(self) -> bool:
        """``smtps``: TLS from the first byte (no STARTTLS)."""
        return self.scheme == "smtps"

    @property
    def hostport(self) -> str:
        """``host:port`` with IPv6 literals in brackets, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}://{user}{self.hostport}"


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse ``smtp://[user@]host[:port]`` or ``smtps://[user@]host[:port]``.

    ``smtp`` defaults to port 25 (use ``:587`` for submission), ``smtps`` to 465. IPv6
    literals go in brackets. A user may be percent-encoded. Passwords, paths, queries and
    fragments are refused with a :class:`~mailsh.errors.UsageError`.
    """
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise UsageError(f"SMTP URL {url!r} contains spaces or control characters", hint=_URL_HINT)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid SMTP URL {url!r}: {exc}", hint=_URL_HINT) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps"):
        raise UsageError(
            f"unsupported URL scheme {parts.scheme + ':' if parts.scheme else '(none)'} in {url!r}",
            hint=_URL_HINT,
        )
    if parts.password is not None:
        raise UsageError(
            "the SMTP URL must not contain a password (it would show in process lists "
            "and shell history)",
            hint=f"remove it from the URL and {PASSWORD_HINT}",
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(
            f"SMTP URL {url!r} must not have a path, query or fragment", hint=_URL_HINT
        )
    host = _check_host(parts.hostname, url)
    if port == 0:
        raise UsageError(f"SMTP URL {url!r} has port 0", hint=_URL_HINT)
    if port is None:
        port = SMTPS_DEFAULT_PORT if scheme == "smtps" else SMTP_DEFAULT_PORT
    user = _check_user(parts.username, url)
    return SmtpTarget(
        scheme="smtps" if scheme == "smtps" else "smtp", host=host, port=port, user=user
    )


def _check_host(host: str | None, url: str) -> str:
    if not host:
        raise UsageError(f"SMTP URL {url!r} has no host", hint=_URL_HINT)
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UsageError(f"invalid IPv6 address {host!r} in SMTP URL", hint=_URL_HINT) from exc
    elif not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise UsageError(f"invalid host name {host!r} in SMTP URL", hint=_URL_HINT)
    return host


def _check_user(username: str | None, url: str) -> str | None:
    if username is None:
        return None
    user = unquote(username)
    if not user or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in user):
        raise UsageError(f"invalid user name in SMTP URL {url!r}", hint=_URL_HINT)
    return user


@dataclass(frozen=True)
class SmtpOptions:
    """How to talk to the SMTP server.

    ``require_tls``: refuse to send anything when the connection cannot be encrypted
    (``smtp://`` to a server not offering STARTTLS). ``ca_file``: PEM file of the CA(s)
    to trust instead of the system store (private CAs, self-signed servers).
    ``password``: for the user in the URL. ``timeout``: seconds per network operation
    (the ``smtp_timeout`` setting).
    ``local_hostname``: name sent in EHLO (default: this host's FQDN).
    """

    require_tls: bool = False
    ca_file: Path | None = None
    password: SecretStr | None = None
    timeout: float = 30.0
    local_hostname: str | None = None
