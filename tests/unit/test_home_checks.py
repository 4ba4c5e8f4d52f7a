"""Start-up checks of the home, GnuPG home and trust store (P15), with real owners.

The owner tests chown to nobody (uid 65534), which needs root; as another user they
are skipped with that reason (the mode tests still run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailsh.errors import ConfigError, ExitCode
from mailsh.home import check_serve_home, ensure_home
from mailsh.settings import load_settings

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    ensure_home(load_settings(home=home))
    (home / "trust.json").write_text('{"format": "mailsh.trust.v1", "keys": []}\n')
    (home / "trust.json").chmod(0o600)
    return home


def _refused(home: Path) -> str:
    with pytest.raises(ConfigError) as info:
        check_serve_home(load_settings(home=home))
    assert info.value.hint
    return info.value.message


def test_a_private_home_passes(tmp_path: Path) -> None:
    check_serve_home(load_settings(home=_home(tmp_path)))


@needs_root
@pytest.mark.parametrize("part", [".", "gnupg", "trust.json"])
def test_home_parts_owned_by_another_user_are_refused(tmp_path: Path, part: str) -> None:
    home = _home(tmp_path)
    os.chown(home / part, NOBODY, NOBODY)
    assert "owned by uid 65534" in _refused(home)


@pytest.mark.parametrize(("part", "mode"), [(".", 0o770), ("gnupg", 0o702), ("trust.json", 0o620)])
def test_home_parts_writable_by_group_or_others_are_refused(
    tmp_path: Path, part: str, mode: int
) -> None:
    home = _home(tmp_path)
    (home / part).chmod(mode)
    assert "writable by group or others" in _refused(home)
    assert os.stat(home / part).st_mode & 0o777 == mode  # left as found, for a human to look


def test_trust_store_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    home = _home(tmp_path)
    (tmp_path / "theirs.json").write_text((home / "trust.json").read_text())
    (home / "trust.json").unlink()
    (home / "trust.json").symlink_to(tmp_path / "theirs.json")
    assert "not a regular file" in _refused(home)


@needs_root
def test_home_inside_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    home = _home(theirs)
    os.chown(theirs, NOBODY, NOBODY)
    assert "uid 65534 owns" in _refused(home)


def test_home_inside_a_group_writable_directory_is_refused_unless_sticky(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    home = _home(shared)
    shared.chmod(0o775)
    assert "group or others may write" in _refused(home)
    shared.chmod(0o1777)  # like /tmp: nobody can rename another user's entry
    check_serve_home(load_settings(home=home))


@needs_root
def test_serve_refuses_to_start_with_exit_255_and_a_hint(tmp_path: Path) -> None:
    home = _home(tmp_path)
    os.chown(home / "trust.json", NOBODY, NOBODY)
    result = subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(home), "serve", "--once",
         "--sendmail", "/bin/true", "--mbox", str(tmp_path / "none")],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == ExitCode.FAILURE
    assert b"trust store" in result.stderr and b"owned by uid 65534" in result.stderr
    assert b"Traceback" not in result.stderr
