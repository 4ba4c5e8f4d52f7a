"""Untrusted text made safe to show: the one place terminals and logs get it from.

Text that a sender, a mail server or a mailbox controls (headers, reasons, server
answers, file names) can carry CR and LF (forged log lines), ESC (terminal control
sequences), or invisible characters such as bidi overrides. Three forms, all built on
``str.isprintable`` (false for every control, format, separator-other-than-space,
private-use and unassigned character):

* :func:`printable` for a fixed layout (table cells): every non-printable character
  replaced by one given character, nothing else changed.
* :func:`printable_line` for people: one short line, every non-printable character a
  space, runs of whitespace collapsed. Lossy, easy to read (error messages, terminals).
* :func:`escape` for logs: every non-printable character written as ``\\n``, ``\\xNN``,
  ``\\uNNNN`` or ``\\UNNNNNNNN`` and a backslash doubled, so the log shows exactly what
  arrived and no input can start a line or a terminal sequence (docs/security.md P14).
"""

from __future__ import annotations

#: Longest untrusted text shown in one message to a person, characters.
MAX_SHOWN_CHARS = 500


def printable(text: str, replacement: str = "?") -> str:
    """``text`` with each non-printable character replaced by ``replacement``."""
    return "".join(ch if ch.isprintable() else replacement for ch in text)


def printable_line(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters (``...`` if cut)."""
    line = " ".join(printable(text, " ").split())
    if len(line) > limit:
        line = line[: max(0, limit - 3)] + "..."
    return line


_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: object) -> str:
    """``str(text)`` with every non-printable character escaped (lossless, one line)."""
    value = str(text)
    if value.isprintable() and "\\" not in value:
        return value  # the common case, without building a new string
    return "".join(_escape_char(ch) for ch in value)
