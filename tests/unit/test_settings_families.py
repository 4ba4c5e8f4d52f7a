"""Precedence for option families (issue 12): the reply mailbox (mbox, Maildir, IMAP) and
the way mail leaves (SMTP, sendmail) are each one choice, and a higher source replaces
the lower sources' choice whatever its kind: flag > MAILSH_* > mailsh.toml."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from mailsh.errors import ConfigError
from mailsh.settings import FAMILY_FLAGS, OPTION_FAMILIES, load_settings

# One value of each kind, distinct per source, so the winner is visible.
VALUES = {
    "flag": {
        "reply_mbox": "/f/mbox",
        "reply_maildir": "/f/Maildir",
        "reply_imap": "imaps://f@flag.test",
        "smtp": "smtp://flag.test",
        "sendmail": "/f/sendmail",
    },
    "env": {
        "reply_mbox": "/e/mbox",
        "reply_maildir": "/e/Maildir",
        "reply_imap": "imaps://e@env.test",
        "smtp": "smtp://env.test",
        "sendmail": "/e/sendmail",
    },
    "file": {
        "reply_mbox": "/t/mbox",
        "reply_maildir": "/t/Maildir",
        "reply_imap": "imaps://t@file.test",
        "smtp": "smtp://file.test",
        "sendmail": "/t/sendmail",
    },
}
MEMBERS = [name for family in OPTION_FAMILIES.values() for name in family]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("MAILSH_")]:
        monkeypatch.delenv(name)


def _chosen(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    family: tuple[str, ...],
    flag: str | None,
    env: str | None,
    file: str | None,
) -> dict[str, str]:
    """Set one member per source (None: that source sets nothing); the members left set."""
    if file is not None:
        (tmp_path / "mailsh.toml").write_text(f'{file} = "{VALUES["file"][file]}"\n')
    if env is not None:
        monkeypatch.setenv(f"MAILSH_{env.upper()}", VALUES["env"][env])
    flags = {flag: VALUES["flag"][flag]} if flag is not None else {}
    settings = load_settings(home=tmp_path, **flags)
    return {name: str(getattr(settings, name)) for name in family if getattr(settings, name)}


CASES = [
    (family, flag, env, file)
    for family in OPTION_FAMILIES.values()
    for flag, env, file in itertools.product([None, *family], repeat=3)
]


@pytest.mark.parametrize(("family", "flag", "env", "file"), CASES)
def test_the_highest_source_chooses_the_whole_family(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    family: tuple[str, ...],
    flag: str | None,
    env: str | None,
    file: str | None,
) -> None:
    chosen = _chosen(tmp_path, monkeypatch, family, flag, env, file)
    if flag is not None:
        expected = {flag: VALUES["flag"][flag]}
    elif env is not None:
        expected = {env: VALUES["env"][env]}
    elif file is not None:
        expected = {file: VALUES["file"][file]}
    else:
        expected = {}
    assert chosen == expected


def test_two_flags_of_one_family_are_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(home=tmp_path, reply_mbox=Path("/m"), reply_imap="imaps://u@h")
    assert err.value.message == "--mbox and --imap were both given"
    assert err.value.hint == "give only one of --mbox and --imap"


def test_two_env_vars_of_one_family_are_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSH_SMTP", "smtp://h")
    monkeypatch.setenv("MAILSH_SENDMAIL", "/usr/sbin/sendmail")
    with pytest.raises(ConfigError) as err:
        load_settings(home=tmp_path)
    assert "MAILSH_SMTP and MAILSH_SENDMAIL are both set" in err.value.message
    # ...and a flag settles it.
    assert load_settings(home=tmp_path, sendmail=Path("/x")).smtp is None


def test_two_file_entries_of_one_family_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "mailsh.toml").write_text('reply_mbox = "/m"\nreply-maildir = "/d"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(home=tmp_path)
    assert err.value.message.startswith(
        f"reply_mbox and reply_maildir are both set in {tmp_path / 'mailsh.toml'}"
    )


def test_every_member_has_a_flag_name() -> None:
    assert set(MEMBERS) == set(FAMILY_FLAGS)


def test_settings_outside_the_families_keep_plain_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mailsh.toml").write_text('smtp = "smtp://file.test"\nrequire_tls = true\n')
    monkeypatch.setenv("MAILSH_SENDMAIL", "/e/sendmail")
    settings = load_settings(home=tmp_path)
    assert settings.smtp is None
    assert str(settings.sendmail) == "/e/sendmail"
    assert settings.require_tls is True  # not a family member: the file still counts
