"""Validating the mail addresses mailsh puts on the wire, and telling loopback hosts.

An address reaches SMTP commands (``MAIL FROM``/``RCPT TO``), sendmail's argument vector
and reply headers, so one stray CR/LF, NUL, space or angle bracket could inject a
command or a header. :func:`validate_address` accepts only a plain RFC 5322 ``addr-spec``
in its common, unambiguous form:

- ``local@domain``, exactly one ``@``;
- the local part is a dot-atom of ASCII ``atext`` (no quoted strings, no comments);
- the domain is a dot-separated list of letter/digit/hyphen labels (IDNs in their
  ``xn--`` form) or an address literal in brackets (``[192.0.2.1]``, ``[IPv6:...]``);
- lengths within RFC 5321 limits: local part <= 64, domain <= 255, whole <= 254.

It does not lower-case or otherwise change the address: comparing addresses is the
caller's business.

:func:`is_loopback` says whether a host (of an SMTP or IMAP URL) is this machine, the one
place a password or mail may go without TLS.
"""

from __future__ import annotations

import ipaddress
import re

from mailsh.errors import UsageError

MAX_LOCAL_PART_LENGTH = 64
"""RFC 5321 s 4.5.3.1.1."""
MAX_DOMAIN_LENGTH = 255
"""RFC 5321 s 4.5.3.1.2."""
MAX_ADDRESS_LENGTH = 254
"""RFC 5321 path limit (256) minus the angle brackets."""

# RFC 5322 s 3.2.3 atext, ASCII only.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_RE = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_HINT = "give a plain address like alice@example.org (no name, no angle brackets)"


class InvalidAddressError(UsageError, ValueError):
    """An address is not a single plain ``local@domain``.

    It is also a :class:`ValueError` so that pydantic validators can call
    :func:`validate_address` directly.
    """


def validate_address(addr: str) -> str:
    """Return ``addr`` unchanged if it is a safe single ``local@domain``; else raise.

    Raises :class:`InvalidAddressError` (a :class:`~mailsh.errors.UsageError`).
    """
    shown = _shown(addr)
    if not addr:
        raise InvalidAddressError("empty mail address", hint=_HINT)
    if any(ord(ch) < 0x21 or ord(ch) > 0x7E for ch in addr):
        raise InvalidAddressError(
            f"mail address {shown} contains spaces, control or non-ASCII characters",
            hint=_HINT,
        )
    if len(addr) > MAX_ADDRESS_LENGTH:
        raise InvalidAddressError(
            f"mail address {shown} is longer than {MAX_ADDRESS_LENGTH} characters", hint=_HINT
        )
    local, at, domain = addr.rpartition("@")
    if not at or not local:
        raise InvalidAddressError(
            f"mail address {shown} is not of the form local@domain", hint=_HINT
        )
    if len(local) > MAX_LOCAL_PART_LENGTH or _LOCAL_RE.fullmatch(local) is None:
        raise InvalidAddressError(f"mail address {shown} has an invalid local part", hint=_HINT)
    if len(domain) > MAX_DOMAIN_LENGTH or not _valid_domain(domain):
        raise InvalidAddressError(f"mail address {shown} has an invalid domain", hint=_HINT)
    return addr


def _valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            try:
                return ipaddress.ip_address(literal[5:]).version == 6
            except ValueError:
                return False
        try:
            return ipaddress.ip_address(literal).version == 4
        except ValueError:
            return False
    labels = domain.split(".")
    return all(_LABEL_RE.fullmatch(label) for label in labels)


def _shown(addr: object) -> str:
    """A short, printable rendering of an untrusted address for error messages."""
    text = repr(addr)
    return text if len(text) <= 80 else text[:77] + "..."


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ``::1``): the hosts
    a password or plain text may go to unencrypted."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
