"""Maildir intake (spool first, then move to cur/) and the client's read-only scanner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mailsh.errors import TransportError
from mailsh.mail.maildir import scan_maildir
from mailsh.server.intake.maildir import MaildirIntake
from mailsh.server.spool import Spool
from tests.kit.serverkit import fail_second_put, spooled


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


def deliver(maildir: Path, name: str, data: bytes) -> None:
    """Deliver like an MDA: write in tmp/, rename into new/."""
    (maildir / "tmp" / name).write_bytes(data)
    (maildir / "tmp" / name).rename(maildir / "new" / name)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return make_maildir(tmp_path / "Maildir")


def test_collect_spools_new_mail_and_moves_it_to_cur_seen(maildir: Path, spool: Spool) -> None:
    for i in range(3):
        deliver(maildir, f"100{i}.M1P1.host", b"From me\nSubject: %d\n\nFrom here\n" % i)
    (maildir / "new" / ".hidden").write_bytes(b"dotfile")
    (maildir / "tmp" / "busy.host").write_bytes(b"being delivered")
    got = MaildirIntake(maildir, spool).collect()
    assert [m.source for m in got] == ["maildir"] * 3
    assert spooled(spool) == [b"From me\nSubject: %d\n\nFrom here\n" % i for i in range(3)]
    assert os.listdir(maildir / "new") == [".hidden"]
    assert sorted(os.listdir(maildir / "cur")) == [f"100{i}.M1P1.host:2,S" for i in range(3)]
    assert os.listdir(maildir / "tmp") == ["busy.host"]
    assert MaildirIntake(maildir, spool).collect() == []


def test_missing_maildir_is_nothing_to_do(tmp_path: Path, spool: Spool) -> None:
    assert MaildirIntake(tmp_path / "nope", spool).collect() == []


def test_spool_failure_leaves_the_message_in_new(
    maildir: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        deliver(maildir, f"m{i}", b"msg %d" % i)
    fail_second_put(monkeypatch)
    with pytest.raises(TransportError):
        MaildirIntake(maildir, spool).collect()
    assert sorted(os.listdir(maildir / "new")) == ["m1", "m2"]
    monkeypatch.undo()
    MaildirIntake(maildir, spool).collect()
    assert sorted(spooled(spool)) == [b"msg 0", b"msg 1", b"msg 2"]


# The spool renames too, so kill the child only at the Maildir module's own rename.
_KILLED_BEFORE_MOVE = """
import os, signal, sys
from pathlib import Path
import mailsh.server.intake.maildir as md
from mailsh.server.spool import Spool

class DieOnRename:
    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def rename(src, dst, **dir_fds):
        os.kill(os.getpid(), signal.SIGKILL)

md.os = DieOnRename()
md.MaildirIntake(Path(sys.argv[1]), Spool(Path(sys.argv[2]))).collect()
"""


def test_crash_between_spool_and_move_duplicates_not_loses(maildir: Path, spool: Spool) -> None:
    deliver(maildir, "m0", b"only message")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BEFORE_MOVE, str(maildir), str(spool.root)], check=False
    )
    assert proc.returncode == -signal.SIGKILL
    assert spooled(spool) == [b"only message"]
    assert os.listdir(maildir / "new") == ["m0"]
    MaildirIntake(maildir, spool).collect()
    assert Counter(spooled(spool)) == Counter({b"only message": 2})
    assert os.listdir(maildir / "new") == []


def test_symlinks_in_new_are_not_followed(maildir: Path, spool: Spool, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"server private key")
    (maildir / "new" / "evil").symlink_to(secret)
    deliver(maildir, "good", b"fine")
    MaildirIntake(maildir, spool).collect()
    assert spooled(spool) == [b"fine"]
    assert os.listdir(maildir / "new") == ["evil"]


def tree(path: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for sub in ("tmp", "new", "cur"):
        for name in os.listdir(path / sub):
            st = (path / sub / name).stat()
            out[f"{sub}/{name}"] = ((path / sub / name).read_bytes(), st.st_ino, st.st_mtime_ns)
    return out


def test_scan_returns_unseen_mail_from_new_and_cur_and_never_moves_it(maildir: Path) -> None:
    deliver(maildir, "a.host", b"A")
    deliver(maildir, "b.host", b"B")
    (maildir / "new" / "b.host").rename(maildir / "cur" / "b.host:2,S")
    (maildir / "new" / ".dot").write_bytes(b"hidden")
    before = tree(maildir)
    assert scan_maildir(maildir, set()) == [("a.host", b"A"), ("b.host", b"B")]
    assert tree(maildir) == before
    assert scan_maildir(maildir, {"a.host"}) == [("b.host", b"B")]
    # A mail program moving a seen message to cur/ with flags does not make it new again.
    (maildir / "new" / "a.host").rename(maildir / "cur" / "a.host:2,RS")
    assert scan_maildir(maildir, {"a.host", "b.host"}) == []
    deliver(maildir, "c.host", b"C")
    assert scan_maildir(maildir, {"a.host", "b.host"}) == [("c.host", b"C")]


def test_scan_of_missing_maildir_is_empty(tmp_path: Path) -> None:
    assert scan_maildir(tmp_path / "nope", set()) == []
