"""Every shared fixture, registered once by ``tests/conftest.py`` (``pytest_plugins``).

Tests name a fixture as a parameter and never import it; the helpers behind the
fixtures live in the other modules of :mod:`tests.kit`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailsh.home import ensure_home
from mailsh.keys.gpg import Gpg
from mailsh.keys.identity import new_identity
from mailsh.server.spool import Spool
from mailsh.settings import load_settings
from tests.kit.clientkit import Rig, make_rig
from tests.kit.homes import Home, pair
from tests.kit.mailrig import MailRig, contains, remove_messages, start_rig
from tests.kit.smtp import Sink

# --------------------------------------------------------------------------- homes


@pytest.fixture(scope="session")
def _short_tmp() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="msh.", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def make_home(_short_tmp: Path) -> Iterator[Callable[..., Home]]:
    """Factory: ``make_home("alice@example.org")`` -> a Home with a fresh ed25519 key."""
    made: list[Gpg] = []
    counter = iter(range(10_000))

    def factory(email: str, *, expire: str = "2y", **settings: object) -> Home:
        home_dir = _short_tmp / f"h{next(counter)}"
        s = load_settings(home=home_dir, **settings)
        ensure_home(s)
        gpg = Gpg.for_settings(s)
        made.append(gpg)
        pubkey = home_dir / "public.asc"
        identity = new_identity(gpg, email, expire=expire, pubkey=pubkey, passphrase=s.passphrase())
        return Home(settings=s, gpg=gpg, identity=identity, email=email, pubkey=pubkey)

    yield factory
    for gpg in made:
        gpg.kill_agent()


@pytest.fixture(scope="session")
def alice(make_home: Callable[..., Home]) -> Home:
    """The operator (client side). Session-scoped: key generation is the slow part."""
    return make_home("alice@example.org")


@pytest.fixture(scope="session")
def server(make_home: Callable[..., Home]) -> Home:
    """The server identity (root@server.test)."""
    return make_home("root@server.test", address="root@server.test")


@pytest.fixture(scope="session")
def mallory(make_home: Callable[..., Home]) -> Home:
    """An attacker with a perfectly good key that nobody pinned."""
    return make_home("mallory@evil.test")


@pytest.fixture
def srv(make_home: Callable[..., Home], alice: Home) -> Home:
    """A fresh server home per test (its own state, spool and trust store), paired with
    alice."""
    home = make_home("root@server.test", address="root@server.test")
    pair(alice, home)
    return home


@pytest.fixture
def no_mailsh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: never the developer's MAILSH_* (or ~/.local/share/mailsh)."""
    for name in [n for n in os.environ if n.startswith("MAILSH_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch, no_mailsh_env: None) -> Iterator[Path]:
    """A short scratch directory, the working directory (gpg-agent socket paths are
    limited), no MAILSH_* set; the agents of the homes a test made keys in are stopped."""
    path = Path(tempfile.mkdtemp(prefix="mso.", dir="/tmp"))
    monkeypatch.chdir(path)
    yield path
    for gnupg in path.glob("*/gnupg"):
        subprocess.run(
            ["gpgconf", "--homedir", str(gnupg), "--kill", "all"], check=False, capture_output=True
        )
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- mail


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An empty spool in the test's temporary directory."""
    return Spool(tmp_path / "spool")


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A real SMTP server on 127.0.0.1 that records what it receives (tests.kit.smtp)."""
    with Sink() as s:
        yield s


@pytest.fixture(scope="module")
def rig(
    make_home: Callable[..., Home], server: Home, tmp_path_factory: pytest.TempPathFactory
) -> Rig:
    """The client rig (tests.kit.clientkit), one per module. tests/adversarial has a rig
    of its own (a running serve) under the same name."""
    return make_rig(make_home, server, tmp_path_factory.mktemp("rig"))


@pytest.fixture(scope="module")
def mallory_signs(rig: Rig, mallory: Home) -> Home:
    """Mallory, able to encrypt to the client (so only the signature can give her away)."""
    mallory.gpg.raw.import_keys(rig.client.pubkey.read_text())
    return mallory


# --------------------------------------------------------------------------- the mail rig
# The real Postfix + Dovecot rig (issue 5, tests.kit.mailrig): its fixtures, and one rig
# test at a time.


@pytest.fixture(scope="session")
def mailrig() -> MailRig:
    """The running rig (session-scoped). Tests using it carry ``@pytest.mark.mailrig``."""
    return start_rig()


@pytest.fixture
def cleanup_messages(mailrig: MailRig) -> Iterator[Callable[[Path, str], None]]:
    """Register (mailbox, token) pairs; matching messages are removed after the test."""
    registered: list[tuple[Path, str]] = []

    def register(location: Path, token: str) -> None:
        registered.append((location, token))

    yield register
    for location, token in registered:
        remove_messages(location, contains(token))


@pytest.fixture(autouse=True)
def _one_rig_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Serialise tests that use the real mail rig, across xdist workers and sessions.

    They share /var/mail/root and the daemons: a serve in one test would consume another
    test's mail. A file lock (rather than xdist_group, which pytest 9.2 with
    pytest-xdist 3.8 ignores: pytest-xdist#1386) also keeps two concurrent test runs on
    one machine apart.
    """
    if request.node.get_closest_marker("mailrig") is None:
        yield
        return
    import fcntl

    with open(Path(tempfile.gettempdir()) / "mailsh-rig-tests.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
