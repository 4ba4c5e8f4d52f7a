"""Durations and sizes as people write them: ``7d``, ``1h30m``, ``100M``, ``1.5GiB``.

Durations: one or more NUMBER UNIT groups, unit ``s`` (seconds), ``m`` (minutes), ``h``
(hours), ``d`` (days) or ``w`` (weeks); a bare number is seconds. ``7d``, ``1d12h``,
``90m``, ``3600`` and ``0`` are valid.

Sizes: a NUMBER, optionally followed by ``K``, ``M``, ``G`` or ``T`` (powers of 1024),
optionally followed by ``B`` or ``iB``; a bare number is bytes. ``100M``, ``100MiB``,
``1.5G``, ``512k`` and ``0`` are valid.
"""

from __future__ import annotations

import re

DURATION_SYNTAX = "a duration like 7d, 12h, 90m, 1d12h or seconds"
SIZE_SYNTAX = "a size like 100M, 1G, 512K (powers of 1024) or bytes"

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> int:
    """Seconds in ``text`` (see the module docstring); ValueError if it is not one."""
    value = text.strip().lower()
    if value.isdigit():
        return int(value)
    if not value or _DURATION_PART.sub("", value):
        raise ValueError(f"{text!r} is not {DURATION_SYNTAX}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))


def parse_size(text: str) -> int:
    """Bytes in ``text`` (see the module docstring); ValueError if it is not one."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not {SIZE_SYNTAX}")
    return int(float(match[1]) * _SIZE_UNITS[match[2].lower()])


def format_size(n: int, *, byte_unit: str = "B") -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB``, ``100.0 MiB`` (``byte_unit`` names
    the unit below 1 KiB: ``mailsh status`` says ``512 bytes``)."""
    size = float(n)
    for unit in (byte_unit, "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{n} {byte_unit}" if unit == byte_unit else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def format_duration(seconds: int) -> str:
    """``seconds`` in the largest exact units: ``7d``, ``1d12h``, ``90s``, ``0s``."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _DURATION_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
