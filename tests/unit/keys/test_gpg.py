"""mailsh.keys.gpg: one GnuPG set-up per process and home (real gpg)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsh.errors import GpgError
from mailsh.keys.gpg import MIN_GNUPG, Gpg

CAP = 1 << 20


def _home(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def test_second_handle_for_a_home_reuses_the_first_set_up(tmp_path: Path) -> None:
    home = _home(tmp_path / "a")
    first, second = Gpg(home, max_output=CAP), Gpg(home, max_output=CAP)
    assert second.raw is first.raw  # no second version probe
    assert second.version == first.version >= MIN_GNUPG
    assert Gpg(_home(tmp_path / "b"), max_output=CAP).raw is not first.raw
    assert Gpg(home, max_output=CAP * 2).raw is not first.raw  # other options, other handle


def test_a_removed_home_is_checked_again(tmp_path: Path) -> None:
    home = _home(tmp_path / "a")
    Gpg(home, max_output=CAP)
    home.rmdir()
    (tmp_path / "a").write_text("not a directory")
    with pytest.raises(GpgError, match="cannot run gpg"):
        Gpg(home, max_output=CAP)
