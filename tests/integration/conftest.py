"""Fixtures for server tests: a fresh server home per test and a real SMTP reply sink."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.integration.serverkit import Sink, pair
from tests.kit.homes import Home


@pytest.fixture
def srv(make_home: Callable[..., Home], alice: Home) -> Home:
    """A fresh server home per test (its own state, spool and trust store), paired with
    alice."""
    home = make_home("root@server.test", address="root@server.test")
    pair(alice, home)
    return home


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A real SMTP server on 127.0.0.1 that records the replies the server sends."""
    with Sink() as s:
        yield s
