"""mailsh.settings: precedence flag > env > mailsh.toml > default, secrets, home modes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from mailsh.errors import ConfigError
from mailsh.home import ensure_home
from mailsh.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSH_HOME", "MAILSH_CLOCK_SKEW", "MAILSH_ADDRESS", "MAILSH_SMTP_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def toml(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "mailsh.toml").write_text(text)


def test_default(tmp_path: Path) -> None:
    assert load_settings(home=tmp_path).clock_skew == 300


def test_toml_beats_default(tmp_path: Path) -> None:
    toml(tmp_path, "clock-skew = 10\n")
    assert load_settings(home=tmp_path).clock_skew == 10


def test_env_beats_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml(tmp_path, "clock_skew = 10\n")
    monkeypatch.setenv("MAILSH_CLOCK_SKEW", "20")
    assert load_settings(home=tmp_path).clock_skew == 20


def test_env_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSH_CLOCK_SKEW", "20")
    assert load_settings(home=tmp_path).clock_skew == 20


def test_flag_beats_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml(tmp_path, "clock_skew = 10\n")
    monkeypatch.setenv("MAILSH_CLOCK_SKEW", "20")
    assert load_settings(home=tmp_path, clock_skew=30).clock_skew == 30


def test_flag_beats_toml(tmp_path: Path) -> None:
    toml(tmp_path, "clock_skew = 10\n")
    assert load_settings(home=tmp_path, clock_skew=30).clock_skew == 30


def test_flag_beats_default(tmp_path: Path) -> None:
    assert load_settings(home=tmp_path, clock_skew=0).clock_skew == 0


def test_none_flag_means_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSH_CLOCK_SKEW", "20")
    assert load_settings(home=tmp_path, clock_skew=None).clock_skew == 20


def test_toml_is_read_from_the_env_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml(tmp_path / "h", "clock_skew = 11\n")
    monkeypatch.setenv("MAILSH_HOME", str(tmp_path / "h"))
    s = load_settings()
    assert s.home == (tmp_path / "h").absolute()
    assert s.clock_skew == 11


def test_home_flag_beats_env_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSH_HOME", str(tmp_path / "env"))
    assert load_settings(home=tmp_path / "flag").home == (tmp_path / "flag").absolute()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("root@a.test", ["root@a.test"]),
        ("root@a.test, ops@b.test", ["root@a.test", "ops@b.test"]),
        (" root@a.test ,,ops@b.test, ", ["root@a.test", "ops@b.test"]),
    ],
)
def test_address_env_is_a_comma_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("MAILSH_ADDRESS", value)
    assert load_settings(home=tmp_path).address == expected


def test_address_toml_list(tmp_path: Path) -> None:
    toml(tmp_path, 'address = ["a@x.test", "b@x.test"]\n')
    assert load_settings(home=tmp_path).address == ["a@x.test", "b@x.test"]


def test_secret_never_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSH_SMTP_PASSWORD", "hunter2-secret")
    s = load_settings(home=tmp_path, imap_password=SecretStr("imap-secret"))
    assert isinstance(s.smtp_password, SecretStr)
    assert s.smtp_password.get_secret_value() == "hunter2-secret"
    for text in (repr(s), str(s), repr(s.model_dump())):
        assert "hunter2-secret" not in text
        assert "imap-secret" not in text


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"clock_skew": -1}, "clock_skew"),
        ({"workers": 0}, "workers"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_invalid_setting_is_a_config_error(
    tmp_path: Path, kwargs: dict[str, object], where: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(home=tmp_path, **kwargs)
    assert where in info.value.message
    assert info.value.hint is not None


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    toml(tmp_path, "clock_skew = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(home=tmp_path)
    assert "mailsh.toml" in info.value.message


def test_unknown_toml_key_is_rejected(tmp_path: Path) -> None:
    toml(tmp_path, "clock_skw = 1\n")
    with pytest.raises(ConfigError):
        load_settings(home=tmp_path)


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path)
    with pytest.raises(ValueError, match="frozen"):
        s.clock_skew = 1  # type: ignore[misc]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_home_and_gnupg_created_0700(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path / "new" / "home")
    ensure_home(s)
    assert _mode(s.home) == 0o700
    assert _mode(s.gnupg_home) == 0o700
    assert s.gnupg_home == s.home / "gnupg"
    assert s.trust_file == s.home / "trust.json"


def test_looser_read_modes_are_fixed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "gnupg").mkdir(parents=True)
    home.chmod(0o755)
    (home / "gnupg").chmod(0o750)
    ensure_home(load_settings(home=home))
    assert _mode(home) == 0o700
    assert _mode(home / "gnupg") == 0o700


def test_unwritable_home_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as info:
        ensure_home(load_settings(home=blocker / "home"))
    assert info.value.hint is not None


def test_passphrase_file(tmp_path: Path) -> None:
    pf = tmp_path / "pw"
    pf.write_text("s3cret\n")
    assert load_settings(home=tmp_path, passphrase_file=pf).passphrase() == "s3cret"
    assert load_settings(home=tmp_path).passphrase() is None
    with pytest.raises(ConfigError):
        load_settings(home=tmp_path, passphrase_file=tmp_path / "missing").passphrase()


def test_docstring_states_precedence() -> None:
    assert Settings.__doc__ is not None
    assert "flag > environment" in Settings.__doc__


def test_command_max_processes_defaults_only_for_a_run_as_user(tmp_path: Path) -> None:
    assert load_settings(home=tmp_path).command_max_processes is None  # would count serve too
    assert load_settings(home=tmp_path, run_as="nobody").command_max_processes == 256
    assert (
        load_settings(home=tmp_path, run_as="nobody", max_processes=0).command_max_processes is None
    )
    assert load_settings(home=tmp_path, max_processes=12).command_max_processes == 12
