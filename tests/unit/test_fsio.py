"""mailsh.fsio: atomic, durable replacement of small files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailsh.fsio import atomic_write, fsync_dir


def test_atomic_write_replaces_the_file_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_bytes(b"old")
    old_umask = os.umask(0o277)  # a umask that would leave a new file 0400
    try:
        atomic_write(target, b"new", prefix=".record.")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_atomic_write_leaves_no_temporary_file_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    (target / "inside").mkdir(parents=True)  # a non-empty directory cannot be replaced
    with pytest.raises(OSError):
        atomic_write(target, b"data", prefix=".record.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"]


def test_fsync_dir_refuses_a_file(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
