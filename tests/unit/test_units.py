"""mailsh.units: the documented duration and size syntax."""

from __future__ import annotations

import pytest

from mailsh.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 604_800),
        ("12h", 43_200),
        ("90m", 5400),
        ("1d12h", 129_600),
        ("3600", 3600),
        ("0", 0),
        ("2w", 1_209_600),
        (" 45S ", 45),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7 days", "d", "1.5h", "-1h", "7d junk", "1y"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration like 7d"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100M", 100 << 20),
        ("100MiB", 100 << 20),
        ("100MB", 100 << 20),
        ("512k", 512 << 10),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("4096", 4096),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "100 megabytes", "-5M", "1P", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size like 100M"):
        parse_size(text)


def test_format() -> None:
    assert format_size(512) == "512 B"
    assert format_size(100 << 20) == "100.0 MiB"
    assert format_duration(604_800) == "7d"
    assert format_duration(129_600 + 61) == "1d12h1m1s"
    assert format_duration(0) == "0s"
