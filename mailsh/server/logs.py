"""Logging for ``mailsh serve``: one line per decision, as text or JSON lines.

Header text, reasons and file names reach these lines from senders and mailbox
owners, so both formats pass every string through :func:`mailsh.text.escape` (no raw
CR, LF, ESC or other control character, in the message or in any field). In the text
format a field value with a space, ``"`` or ``=`` is quoted, so no value can pose as
another field, and the lines of an exception's traceback are indented, so none of
them can pose as a log line of its own.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from mailsh.text import escape


def _field(value: object) -> object:
    """A field value for JSON: strings escaped (also inside lists and dicts); numbers,
    booleans and None as they are."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_field(v) for v in value]
    if isinstance(value, dict):
        return {escape(k): _field(v) for k, v in value.items()}
    return escape(value)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        fields = getattr(record, "mailsh", None)
        if isinstance(fields, dict):
            doc.update({escape(k): _field(v) for k, v in fields.items()})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _text_value(value: object) -> str:
    text = escape(value)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class _TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = getattr(record, "mailsh", None)
        if isinstance(fields, dict):
            extra = " ".join(
                f"{escape(k)}={_text_value(v)}" for k, v in fields.items() if k != "event"
            )
            line = f"{line} {extra}" if extra else line
        return line

    def format(self, record: logging.LogRecord) -> str:
        # Escape the message itself; the traceback (multi-line by nature) is indented.
        record.message = escape(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        tail = ""
        if record.exc_info:
            tail = self.formatException(record.exc_info)
        if record.stack_info:
            tail = f"{tail}\n{self.formatStack(record.stack_info)}".lstrip("\n")
        if tail:
            line += "".join(f"\n    {escape(part)}" for part in tail.splitlines())
        return line


def setup_logging(fmt: str, *, debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's chatty logger
    logging.getLogger("gnupg").setLevel(logging.WARNING)


def describe_error(exc: BaseException) -> str:
    """One line for a log: ``[Errno 24] Too many open files`` or ``Type: message``."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"[Errno {exc.errno}] {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"
