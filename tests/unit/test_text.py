"""mailsh.text (the one sanitiser) and the serve log formats that use it (P14)."""

from __future__ import annotations

import json
import logging

import pytest

from mailsh.server.logs import _JsonFormatter, _TextFormatter
from mailsh.text import escape, printable, printable_line

HOSTILE = "id@x\r\n2026-01-01 00:00:00,000 INFO executed decision=ok\x1b[2J\u202egnp\x00\\"


def test_printable_line_removes_every_control_and_bounds_the_length() -> None:
    assert printable_line("a\x1b[31m b\r\nc\u202ed\x00") == "a [31m b c d"
    assert printable_line("x" * 20, 10) == "x" * 7 + "..."
    assert printable_line("  plain  text ") == "plain text"


def test_printable_replaces_each_control_and_keeps_the_layout() -> None:
    assert printable("a\x1b[31m  b\r\n\u202e") == "a?[31m  b???"
    assert printable("a\tb", " ") == "a b"


def test_escape_is_one_line_and_shows_what_arrived() -> None:
    out = escape(HOSTILE)
    assert out.isprintable()
    assert "\\r\\n2026" in out
    assert "\\x1b[2J" in out
    assert "\\u202e" in out
    assert "\\x00" in out
    assert out.endswith("\\\\")  # a backslash that arrived cannot pose as an escape
    assert escape("plain ascii") == "plain ascii"
    assert escape("\U000e0001") == "\\U000e0001"


def _record(msg: str, fields: dict[str, object] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("mailsh.server", logging.INFO, __file__, 1, msg, None, None)
    if fields is not None:
        record.mailsh = fields
    return record


def test_text_log_line_cannot_be_forged_by_header_text() -> None:
    fmt = _TextFormatter("%(asctime)s %(levelname)s %(message)s")
    line = fmt.format(
        _record(
            "discarded %s",
            {"event": "discarded", "message": HOSTILE, "reason": "not a mailsh mail", "n": 3},
        )
    )
    # the record's args path is escaped too
    line2 = fmt.format(_record("intake " + HOSTILE))
    for out in (line, line2):
        assert "\n" not in out and "\r" not in out and "\x1b" not in out
        assert out.isprintable()
    assert 'reason="not a mailsh mail"' in line
    assert " n=3" in line
    # a value cannot pose as another field: it is quoted because it holds "=" and spaces
    assert 'message="id@x\\r\\n2026-01-01' in line


def test_text_log_traceback_lines_are_indented_and_escaped() -> None:
    fmt = _TextFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad\nINFO forged line\x1b[0m")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "mailsh", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    lines = fmt.format(record).split("\n")
    assert lines[0] == "ERROR failed"
    assert all(line.startswith("    ") for line in lines[1:])
    assert not any(line.startswith("INFO") for line in lines)
    assert "\x1b" not in "".join(lines)


@pytest.mark.parametrize("value", [HOSTILE, b"\x1b]0;title\x07"])
def test_json_log_fields_are_escaped_and_types_kept(value: object) -> None:
    raw = _JsonFormatter().format(
        _record(
            "executed " + HOSTILE,
            {"event": "executed", "message": value, "exit": 0, "to": [HOSTILE]},
        )
    )
    assert "\n" not in raw
    doc = json.loads(raw)
    for text in (doc["message"], doc["event"]):
        assert text.isprintable()
    assert "\x1b" not in json.dumps(doc, ensure_ascii=False)
    assert doc["exit"] == 0
    assert doc["to"] == [escape(HOSTILE)]
