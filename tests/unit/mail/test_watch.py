"""Watcher: wakes on every change made by another process, in inotify and polling mode.

Only correctness is asserted (woke or not), never speed: timeouts are generous.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mailsh.mail.watch as watch_mod
from mailsh.mail.watch import Watcher
from mailsh.server.intake.mbox import MboxIntake
from mailsh.server.spool import Spool

MakeWatcher = Callable[..., Watcher]
SEP = b"From sender@example.org  Mon Jan  1 00:00:00 2024\n"

_LATER = """
import os, sys, time
time.sleep(0.3)
action, path = sys.argv[1], sys.argv[2]
if action == "append":
    with open(path, "ab") as fh:
        fh.write(b"From a@b  Mon Jan  1 00:00:00 2024\\nSubject: x\\n\\nhi\\n\\n")
elif action == "deliver":
    tmp = os.path.join(path, "tmp", "123.M1.host")
    with open(tmp, "wb") as fh:
        fh.write(b"Subject: x\\n\\nhi\\n")
    os.rename(tmp, os.path.join(path, "new", "123.M1.host"))
elif action == "mkdirs":
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as fh:
        fh.write(b"x")
"""


def later(action: str, path: Path) -> subprocess.Popen[bytes]:
    """Another process changes ``path`` in 0.3 s, i.e. while we are waiting."""
    return subprocess.Popen([sys.executable, "-c", _LATER, action, str(path)])


@pytest.fixture(params=["inotify", "polling"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_watcher(mode: str) -> Iterator[MakeWatcher]:
    watchers: list[Watcher] = []

    def make(*paths: Path) -> Watcher:
        w = Watcher(list(paths), poll_interval=0.05, use_inotify=mode == "inotify")
        watchers.append(w)
        return w

    yield make
    for w in watchers:
        w.close()


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    (tmp_path / "mail").mkdir()
    path = tmp_path / "mail" / "user"
    path.write_bytes(b"")
    return path


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "Maildir" / sub).mkdir(parents=True)
    return tmp_path / "Maildir"


def test_times_out_with_false_when_nothing_happens(
    make_watcher: MakeWatcher, mbox: Path, maildir: Path
) -> None:
    w = make_watcher(mbox, maildir)
    assert w.wait(0.5) is False
    assert w.wait(0) is False


def test_wakes_on_append_by_another_process(make_watcher: MakeWatcher, mbox: Path) -> None:
    w = make_watcher(mbox)
    with later("append", mbox):
        assert w.wait(10) is True
    # Later events of the same write (close_write) may wake once more; then it is quiet.
    assert not all(w.wait(0.3) for _ in range(3))


def test_change_between_waits_is_not_missed(make_watcher: MakeWatcher, mbox: Path) -> None:
    w = make_watcher(mbox)
    with mbox.open("ab") as fh:  # happens while nobody is inside wait()
        fh.write(SEP + b"Subject: x\n\nhi\n\n")
    assert w.wait(10) is True


def test_wakes_on_maildir_delivery(make_watcher: MakeWatcher, maildir: Path) -> None:
    w = make_watcher(maildir)
    with later("deliver", maildir):
        assert w.wait(10) is True


def test_wakes_when_a_missing_mbox_is_created(make_watcher: MakeWatcher, tmp_path: Path) -> None:
    path = tmp_path / "user"
    w = make_watcher(path)
    with later("append", path):
        assert w.wait(10) is True


def test_wakes_when_a_missing_directory_and_mbox_appear(
    make_watcher: MakeWatcher, tmp_path: Path
) -> None:
    path = tmp_path / "not" / "yet" / "user"
    w = make_watcher(path)
    assert w.wait(0.2) is False
    with later("mkdirs", path):
        assert w.wait(10) is True


def test_follows_a_replaced_file(make_watcher: MakeWatcher, mbox: Path) -> None:
    w = make_watcher(mbox)
    replacement = mbox.with_name("user.new")
    replacement.write_bytes(b"")
    replacement.rename(mbox)  # e.g. a mail program rewrote the mbox
    assert w.wait(10) is True
    with later("append", mbox):  # appends now go to the new inode
        assert w.wait(10) is True


def test_dotlocks_beside_the_mbox_do_not_wake(make_watcher: MakeWatcher, mbox: Path) -> None:
    """Otherwise the intake's own dotlock would wake the daemon in an endless loop."""
    w = make_watcher(mbox)
    mbox.with_name("user.lock").write_bytes(b"")
    mbox.with_name("user.lock").unlink()
    mbox.with_name("other-user").write_bytes(b"mail for someone else")
    assert w.wait(0.5) is False


def test_daemon_loop_of_collect_and_wait_settles(
    make_watcher: MakeWatcher, mbox: Path, tmp_path: Path
) -> None:
    """collect() empties the mbox (a change); the loop must then go quiet, not spin."""
    spool = Spool(tmp_path / "spool")
    intake = MboxIntake(mbox, spool)
    w = make_watcher(mbox)
    with later("append", mbox):
        assert w.wait(10) is True
    wakes = 0
    while True:
        intake.collect()
        if not w.wait(0.5):
            break
        wakes += 1
        assert wakes < 3, "collect keeps waking its own watcher"
    assert len(spool.pending()) == 1


def test_falls_back_to_polling_when_inotify_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, mbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(watch_mod, "INotify", broken)
    with Watcher([mbox], poll_interval=0.05) as w:
        assert "inotify unavailable" in caplog.text
        with later("append", mbox):
            assert w.wait(10) is True


def test_closed_watcher_refuses_to_wait(mbox: Path) -> None:
    with Watcher([mbox]) as w:
        pass
    with pytest.raises(ValueError, match="closed"):
        w.wait(0)


def test_wakes_when_another_process_puts_into_the_spool(
    make_watcher: MakeWatcher, tmp_path: Path
) -> None:
    """``mailsh deliver`` writes straight into the spool; the daemon watches its root."""
    spool = Spool(tmp_path / "spool")
    w = make_watcher(spool.root)
    put = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from mailsh.server.spool import Spool\n"
        "time.sleep(0.3)\n"
        "Spool(Path(sys.argv[1])).put(b'x', source='pipe')\n"
    )
    with subprocess.Popen([sys.executable, "-c", put, str(spool.root)]):
        assert w.wait(10) is True
    assert len(spool.pending()) == 1
