"""Filesystem tricks planted beside a mailbox (docs/security.md, issue 9 point 4).

On most hosts anyone in group ``mail`` can write into /var/mail (mode 2775, no sticky
bit), and a Maildir's owner can plant anything in it. When serve runs as root, intake
must never follow a link or open a non-regular file there: nothing outside the mailbox
is read, moved or truncated, serve never hangs, and the mailboxes beside it are still
served. Each test plants one trick, lets one serve (with a clean mbox beside the
planted one) run, and checks the victim, the marker, the mail sent and the next valid
request.

The defences are docs/security.md P13 (``mailsh/server/intake/files.py``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.kit.adversarial import Kit, marker_command, marker_runs, serve_rig
from tests.kit.mailbox import to_mbox

HANG_SECONDS = 8.0  # the next request is served in well under a second when nothing hangs


@dataclass
class Planted:
    """A trick: the extra intakes to serve, and how to check its victim afterwards."""

    mboxes: tuple[Path, ...] = ()
    maildirs: tuple[Path, ...] = ()
    victim_intact: Callable[[], None] = lambda: None
    fifos: list[Path] = field(default_factory=list)  # to unblock a hung reader at the end


def _hostile_mail(kit: Kit, marker: Path) -> bytes:
    """What the attacker plants: mallory's request (not pinned), as an mbox entry."""
    return to_mbox(kit.request(marker_command(marker), by=kit.mallory))


def _victim_file(root: Path, content: bytes) -> tuple[Path, Callable[[], None]]:
    victim = root / "victim" / "secret"
    victim.parent.mkdir()
    victim.write_bytes(content)
    mode = victim.stat().st_mode

    def intact() -> None:
        assert victim.read_bytes() == content, "a file outside the mailbox was changed"
        assert victim.stat().st_mode == mode

    return victim, intact


def _victim_dir(root: Path, files: dict[str, bytes]) -> tuple[Path, Callable[[], None]]:
    victim = root / "victimdir"
    victim.mkdir()
    for name, data in files.items():
        (victim / name).write_bytes(data)

    def intact() -> None:
        now = {p.name: p.read_bytes() for p in victim.iterdir()}
        assert now == files, "files were moved into or out of a directory outside the Maildir"

    return victim, intact


def _maildir(path: Path, *, new: Path | None = None, cur: Path | None = None) -> Path:
    path.mkdir()
    (path / "tmp").mkdir()
    for sub, target in (("new", new), ("cur", cur)):
        if target is None:
            (path / sub).mkdir()
        else:
            (path / sub).symlink_to(target)
    return path


def symlinked_mbox(kit: Kit, root: Path, marker: Path) -> Planted:
    victim, intact = _victim_file(root, _hostile_mail(kit, marker))
    mbox = root / "planted.mbox"
    mbox.symlink_to(victim)
    return Planted(mboxes=(mbox,), victim_intact=intact)


def hard_linked_mbox(kit: Kit, root: Path, marker: Path) -> Planted:
    victim, intact = _victim_file(root, _hostile_mail(kit, marker))
    mbox = root / "planted.mbox"
    os.link(victim, mbox)
    return Planted(mboxes=(mbox,), victim_intact=intact)


def fifo_at_the_lock_path(kit: Kit, root: Path, marker: Path) -> Planted:
    mbox = root / "planted.mbox"
    mbox.write_bytes(_hostile_mail(kit, marker))
    lock = root / "planted.mbox.lock"
    os.mkfifo(lock)
    return Planted(mboxes=(mbox,), fifos=[lock])


def fifo_as_the_mbox(kit: Kit, root: Path, marker: Path) -> Planted:
    mbox = root / "planted.mbox"
    os.mkfifo(mbox)
    return Planted(mboxes=(mbox,), fifos=[mbox])


def maildir_new_is_a_symlink(kit: Kit, root: Path, marker: Path) -> Planted:
    victim, intact = _victim_dir(root, {"1.mail": _hostile_mail(kit, marker)})
    return Planted(maildirs=(_maildir(root / "planted", new=victim),), victim_intact=intact)


def maildir_cur_is_a_symlink(kit: Kit, root: Path, marker: Path) -> Planted:
    victim, intact = _victim_dir(root, {})
    maildir = _maildir(root / "planted", cur=victim)
    (maildir / "new" / "1.mail").write_bytes(_hostile_mail(kit, marker))
    return Planted(maildirs=(maildir,), victim_intact=intact)


def links_and_fifos_inside_new(kit: Kit, root: Path, marker: Path) -> Planted:
    victim, file_intact = _victim_file(root, _hostile_mail(kit, marker))
    maildir = _maildir(root / "planted")
    new = maildir / "new"
    (new / "1.link").symlink_to(victim)
    os.mkfifo(new / "2.fifo")
    (new / "3.dir").mkdir()

    def intact() -> None:
        file_intact()
        assert (new / "1.link").is_symlink()
        assert stat.S_ISFIFO((new / "2.fifo").lstat().st_mode)

    return Planted(maildirs=(maildir,), victim_intact=intact, fifos=[new / "2.fifo"])


TRICKS = [
    pytest.param(symlinked_mbox),
    pytest.param(hard_linked_mbox),
    pytest.param(fifo_at_the_lock_path),
    fifo_as_the_mbox,
    pytest.param(maildir_new_is_a_symlink),
    pytest.param(maildir_cur_is_a_symlink),
    links_and_fifos_inside_new,
]


def _unblocker(fifos: list[Path]) -> Callable[[], None]:
    """Let a serve hung on a FIFO stop: remove the FIFO, then open it for writing
    (non-blocking) so that a reader hung in open() gets EOF."""

    def unblock() -> None:
        for fifo in fifos:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is waiting on it (or it is gone)
                fd = -1
            fifo.unlink(missing_ok=True)
            if fd >= 0:
                os.close(fd)

    return unblock


@pytest.mark.parametrize("trick", TRICKS, ids=lambda t: t.__name__.replace("_", "-"))
def test_planted_trick(
    kit: Kit, trick: Callable[[Kit, Path, Path], Planted], tmp_path: Path
) -> None:
    marker, after = tmp_path / "ran", tmp_path / "next"
    planted = trick(kit, tmp_path, marker)
    with serve_rig(kit, tmp_path / "rig", mboxes=planted.mboxes, maildirs=planted.maildirs) as rig:
        try:
            before = len(rig.sink.messages)
            rig.feed_valid("mbox", after)  # through the clean mbox beside the planted one
            rig.wait_until(lambda: marker_runs(after) > 0, HANG_SECONDS)
            rig.settle(timeout=HANG_SECONDS)
            assert rig.alive
            assert marker_runs(after) == 1
            assert marker_runs(marker) == 0
            assert len(rig.mailed(before)) == 1
            planted.victim_intact()
        finally:
            rig.stop(unblock=_unblocker(planted.fifos))
