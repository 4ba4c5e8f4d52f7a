"""The imap_* settings reach the IMAP watcher that wait-reply reads replies with."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsh.client.imap import ImapWatcher
from mailsh.client.imap_url import parse_imap_url
from mailsh.client.sources import open_imap
from mailsh.settings import load_settings

URL = "imaps://alice@127.0.0.1/INBOX"


def test_open_imap_passes_the_imap_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImapWatcher, "connect", lambda self: None)  # no server needed
    monkeypatch.setenv("MAILSH_IMAP_PASSWORD", "pw")
    monkeypatch.setenv("MAILSH_IMAP_TIMEOUT", "12.5")
    monkeypatch.setenv("MAILSH_IMAP_POLL_INTERVAL", "0.75")
    monkeypatch.setenv("MAILSH_IMAP_MAX_RECONNECTS", "2")
    settings = load_settings(home=tmp_path)
    source = open_imap(settings, URL)
    watcher = source._watcher
    assert (watcher.timeout, watcher.poll_interval, watcher.max_reconnects) == (12.5, 0.75, 2)


def test_the_imap_settings_default_to_the_watcher_defaults(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    watcher = ImapWatcher(parse_imap_url(URL), "pw")
    assert (settings.imap_timeout, settings.imap_poll_interval, settings.imap_max_reconnects) == (
        watcher.timeout,
        watcher.poll_interval,
        watcher.max_reconnects,
    )
