"""The free-space floor (docs/security.md P16), with the real file system and real SMTP.

No mock: a floor above the real free space of tmp_path's file system is what a full disk
looks like to the guard, and a floor of 1 byte is a disk with room.
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailsh.server.diskspace import SpaceGuard, disk_status, free_bytes
from mailsh.server.intake.smtp import SmtpListener
from mailsh.server.spool import Spool

TiB = 1 << 40
OURS = "run@mailsh.test"
MESSAGE = b"From: a@b.test\r\nTo: run@mailsh.test\r\nSubject: x\r\n\r\nhello\r\n"


def _full(guard: SpaceGuard) -> None:
    guard.min_free = free_bytes(guard.path) + TiB


def _room(guard: SpaceGuard) -> None:
    guard.min_free = 1


def test_transitions_are_logged_once_and_kick_pruning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kicks: list[int] = []
    guard = SpaceGuard(tmp_path, 1, on_low=lambda: kicks.append(1))
    caplog.set_level(logging.INFO, logger="mailsh.server")
    assert all(guard.accepting() for _ in range(3))
    _full(guard)
    assert not any(guard.accepting() for _ in range(5))
    _room(guard)
    assert all(guard.accepting() for _ in range(5))
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in messages] == ["intake paused", "intake resumed"]
    assert "below --min-free-space" in messages[0]
    assert kicks == [1]


def test_floor_zero_is_off(tmp_path: Path) -> None:
    assert SpaceGuard(tmp_path, 0).accepting()


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[SmtpListener, SpaceGuard, Spool]]:
    spool = Spool(tmp_path / "spool")
    guard = SpaceGuard(spool.root, 1)
    with SmtpListener(
        host="127.0.0.1",
        port=0,
        spool=spool,
        accept=lambda rcpt: rcpt == OURS,
        hostname="mx.mailsh.test",
        accepting=guard.accepting,
    ) as listener:
        yield listener, guard, spool


def _client(listener: SmtpListener) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", listener.port, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def test_smtp_answers_452_to_mail_rcpt_and_data_below_the_floor(
    guarded: tuple[SmtpListener, SpaceGuard, Spool],
) -> None:
    listener, guard, spool = guarded
    with _client(listener) as client:
        _full(guard)
        code, text = client.mail("a@b.test")
        assert (code, text[:5]) == (452, b"4.3.1")
        _room(guard)
        assert client.mail("a@b.test")[0] == 250
        _full(guard)
        assert client.rcpt(OURS)[0] == 452
        _room(guard)
        assert client.rcpt(OURS)[0] == 250
        _full(guard)
        assert client.data(MESSAGE)[0] == 452  # after the content: DATA has no earlier hook
        assert spool.pending() == []  # nothing taken: the client still has the message
        _room(guard)  # space is back: the same session delivers
        client.rset()
        client.sendmail("a@b.test", [OURS], MESSAGE)
    [msg] = spool.pending()
    assert spool.read(msg, 10_000) == MESSAGE


def test_disk_status_reports_sizes_and_intake(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.put(b"x" * 3000, source="pipe")
    (tmp_path / "state.db").write_bytes(b"y" * 100)
    report = disk_status(spool.root, tmp_path / "state.db", 1)
    assert report["spool_bytes"] == 3000
    assert report["state_db_bytes"] == 100
    assert 0 < int(report["free_bytes"]) < free_bytes(tmp_path) + TiB
    assert report["intake"] == "accepting"
    full = disk_status(spool.root, tmp_path / "state.db", free_bytes(tmp_path) + TiB)
    assert full["intake"] == "paused (below --min-free-space)"
