"""Files planted beside a mailbox (P13): what a user in group ``mail`` can put in
/var/mail (mode 2775, no sticky bit), or what the owner of a Maildir can put in it,
when serve runs as root.

Each test plants the file first and shows nothing outside the mailbox is read, moved or
truncated; that the intake neither crashes nor hangs; and that the refusal is logged
as an error and recorded for ``mailsh status``. Real files, FIFOs, links and owners
(the owner tests need root: they chown to nobody, uid 65534).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailsh.server.intake.files import read_refusals
from mailsh.server.intake.maildir import MaildirIntake
from mailsh.server.intake.mbox import MboxIntake
from mailsh.server.spool import Spool, SpooledMessage, SpoolError

SEP = b"From sender@example.org  Mon Jan  1 00:00:00 2024\n"
MBOX = SEP + b"Subject: m\n\nhello\n\n"
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "home" / "spool")


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "Maildir" / sub).mkdir(parents=True)
    return tmp_path / "Maildir"


def fast_mbox(path: Path, spool: Spool) -> MboxIntake:
    return MboxIntake(path, spool, lock_attempts=2, lock_interval=0.01)


def refused(spool: Spool) -> dict[str, str]:
    return {r.mailbox: r.reason for r in read_refusals(spool.root)}


def finishes(call: Callable[[], object], unblock: Callable[[], None]) -> object:
    """Run ``call`` in a thread; fail (not hang) if it is still blocked after a minute.

    Not a timing assertion: a correct intake returns at once, a broken one never does.
    ``unblock`` releases a thread stuck in the broken way, so the test run can end.
    """
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        unblock()
        thread.join(10)
        pytest.fail("intake blocked on a planted file")
    return result[0] if result else None


def _open_fifo_writer(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


# -- mbox ------------------------------------------------------------------------------


def test_mbox_that_is_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "mail").mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(MBOX + b"secret data\n")
    mbox = tmp_path / "mail" / "root"
    mbox.symlink_to(victim)
    with caplog.at_level(logging.ERROR):
        assert fast_mbox(mbox, spool).collect() == []
    assert victim.read_bytes() == MBOX + b"secret data\n"  # not truncated
    assert spool.pending() == []  # not copied
    assert "symbolic link" in refused(spool)[str(mbox)]
    assert any(r.levelno == logging.ERROR and str(mbox) in r.getMessage() for r in caplog.records)


def test_refusal_is_logged_once_and_a_later_process_clears_it(
    tmp_path: Path, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "mail").mkdir()
    mbox = tmp_path / "mail" / "root"
    mbox.symlink_to(tmp_path / "elsewhere")
    intake = fast_mbox(mbox, spool)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            intake.collect()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    mbox.unlink()
    mbox.write_bytes(MBOX)
    assert len(fast_mbox(mbox, spool).collect()) == 1  # as after a restart
    assert refused(spool) == {}


def test_mbox_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path, spool: Spool) -> None:
    (tmp_path / "mail").mkdir()
    mbox = tmp_path / "mail" / "root"
    os.mkfifo(mbox)
    assert finishes(fast_mbox(mbox, spool).collect, lambda: _open_fifo_writer(mbox)) == []
    assert "FIFO" in refused(spool)[str(mbox)]


def test_mbox_with_a_second_hard_link_is_refused(tmp_path: Path, spool: Spool) -> None:
    (tmp_path / "mail").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(MBOX)
    mbox = tmp_path / "mail" / "root"
    os.link(elsewhere, mbox)
    assert fast_mbox(mbox, spool).collect() == []
    assert elsewhere.read_bytes() == MBOX
    assert "hard link" in refused(spool)[str(mbox)]


def test_fifo_at_the_dotlock_path_does_not_block_serve(tmp_path: Path, spool: Spool) -> None:
    (tmp_path / "mail").mkdir()
    mbox = tmp_path / "mail" / "root"
    mbox.write_bytes(MBOX)
    lock = tmp_path / "mail" / "root.lock"
    os.mkfifo(lock)
    assert finishes(fast_mbox(mbox, spool).collect, lambda: _open_fifo_writer(lock)) == []
    assert mbox.read_bytes() == MBOX  # left for when the operator removes the FIFO
    assert "root.lock" in refused(spool)[str(mbox)]
    lock.unlink()
    assert len(fast_mbox(mbox, spool).collect()) == 1
    assert refused(spool) == {}  # cleared once the mailbox is accepted again


def test_symlink_at_the_dotlock_path_is_neither_followed_nor_its_target_removed(
    tmp_path: Path, spool: Spool
) -> None:
    (tmp_path / "mail").mkdir()
    mbox = tmp_path / "mail" / "root"
    mbox.write_bytes(MBOX)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.utime(victim, (0, 0))  # "stale" if its age were read through the link
    (tmp_path / "mail" / "root.lock").symlink_to(victim)
    assert fast_mbox(mbox, spool).collect() == []
    assert victim.read_bytes() == b"keep me"
    assert mbox.read_bytes() == MBOX
    assert "symbolic link" in refused(spool)[str(mbox)]


# -- Maildir ---------------------------------------------------------------------------


def test_maildir_new_symlinked_to_another_directory_moves_nothing(
    tmp_path: Path, maildir: Path, spool: Spool
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious").write_bytes(b"data")
    (maildir / "new").rmdir()
    (maildir / "new").symlink_to(other)
    assert MaildirIntake(maildir, spool).collect() == []
    assert os.listdir(other) == ["precious"]
    assert os.listdir(maildir / "cur") == []
    assert spool.pending() == []
    assert "new" in refused(spool)[str(maildir)]


def test_maildir_cur_symlinked_to_another_directory_receives_nothing(
    tmp_path: Path, maildir: Path, spool: Spool
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (maildir / "cur").rmdir()
    (maildir / "cur").symlink_to(target)
    (maildir / "new" / "1.host").write_bytes(b"mail")
    assert MaildirIntake(maildir, spool).collect() == []
    assert os.listdir(target) == []
    assert os.listdir(maildir / "new") == ["1.host"]
    assert "cur" in refused(spool)[str(maildir)]


def test_maildir_that_is_a_symlink_is_refused(tmp_path: Path, spool: Spool) -> None:
    real = tmp_path / "real"
    for sub in ("tmp", "new", "cur"):
        (real / sub).mkdir(parents=True)
    (real / "new" / "1.host").write_bytes(b"mail")
    link = tmp_path / "Maildir"
    link.symlink_to(real)
    assert MaildirIntake(link, spool).collect() == []
    assert os.listdir(real / "new") == ["1.host"]
    assert "symbolic link" in refused(spool)[str(link)]


def test_fifo_in_new_is_skipped_without_hanging(maildir: Path, spool: Spool) -> None:
    os.mkfifo(maildir / "new" / "0.fifo")
    (maildir / "new" / "1.host").write_bytes(b"mail")
    intake = MaildirIntake(maildir, spool)
    got = finishes(intake.collect, lambda: _open_fifo_writer(maildir / "new" / "0.fifo"))
    assert isinstance(got, list) and len(got) == 1
    assert sorted(os.listdir(maildir / "new")) == ["0.fifo"]


def test_name_too_long_to_move_to_cur_is_left_alone_not_spooled_again_and_again(
    maildir: Path, spool: Spool
) -> None:
    long_name = "1." + "x" * 251  # 253 bytes: fits in new/, but not with ":2,S" in cur/
    (maildir / "new" / long_name).write_bytes(b"mail")
    (maildir / "new" / "2.host").write_bytes(b"other")
    intake = MaildirIntake(maildir, spool)
    for _ in range(2):
        intake.collect()
    assert [spool.read(m, 100) for m in spool.pending()] == [b"other"]
    assert os.listdir(maildir / "new") == [long_name]


@needs_root
def test_file_in_new_owned_by_another_user_is_left_alone(
    maildir: Path, spool: Spool, tmp_path: Path
) -> None:
    foreign = maildir / "new" / "1.foreign"
    foreign.write_bytes(b"someone else's file")
    os.chown(foreign, NOBODY, NOBODY)
    (maildir / "new" / "2.host").write_bytes(b"mail")
    got = MaildirIntake(maildir, spool).collect()
    assert [spool.read(m, 100) for m in got] == [b"mail"]
    assert os.listdir(maildir / "new") == ["1.foreign"]


@needs_root
def test_maildir_subdirectory_owned_by_another_user_is_refused(maildir: Path, spool: Spool) -> None:
    os.chown(maildir / "cur", NOBODY, NOBODY)
    (maildir / "new" / "1.host").write_bytes(b"mail")
    assert MaildirIntake(maildir, spool).collect() == []
    assert os.listdir(maildir / "new") == ["1.host"]
    assert "owned by uid 65534" in refused(spool)[str(maildir)]


# -- spool -----------------------------------------------------------------------------


@pytest.fixture
def planted(spool: Spool) -> Iterator[Path]:
    path = spool.new / "00000000000000000001.1.0123456789abcdef.mbox"
    yield path


def test_fifo_in_the_spool_is_not_listed_as_pending(spool: Spool, planted: Path) -> None:
    os.mkfifo(planted)
    good = spool.put(b"mail", source="mbox")
    assert spool.pending() == [good]


def test_spool_read_does_not_follow_a_symlink(spool: Spool, planted: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    planted.symlink_to(secret)
    msg = SpooledMessage(id=planted.name.rsplit(".", 1)[0], path=planted, source="mbox", size=6)
    assert spool.pending() == []
    with pytest.raises(SpoolError):
        spool.read(msg, 100)
