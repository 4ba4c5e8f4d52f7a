"""The keygen / keys / trust commands: in-process through mailsh.cli.main and as a real
subprocess (``python -m mailsh``), with throwaway homes in short paths."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from mailsh.cli import app
from tests.kit.cli import cli
from tests.kit.homes import Home

FPR_LINE = re.compile(r"^[0-9A-F]{40}$")


def _kill_agents(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"],
        check=False,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture
def home() -> Iterator[Path]:
    """An empty mailsh home in a short path (gpg-agent socket paths are limited)."""
    root = Path(tempfile.mkdtemp(prefix="msc.", dir="/tmp"))
    yield root / "home"
    _kill_agents(root / "home")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_mailsh_env: None) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------


def test_keygen_prints_fingerprint_and_writes_key(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path
) -> None:
    r = cli(capsys, "--home", str(home), "keygen", "--email", "ops@example.org")
    assert r.code == 0, r.err
    assert FPR_LINE.match(r.out.strip())
    fpr = r.out.strip()
    key = in_tmp / "ops@example.org.asc"
    assert "BEGIN PGP PUBLIC KEY BLOCK" in key.read_text()
    assert "trust add" in r.err

    again = cli(capsys, "--home", str(home), "keygen", "--email", "ops@example.org")
    assert again.code == 255
    assert again.out == ""
    assert "--force" in again.err
    assert "next:" in again.err
    assert "Traceback" not in again.err

    show = cli(capsys, "--home", str(home), "keys", "show")
    assert show.code == 0
    assert show.out.splitlines()[0] == fpr
    assert "ops@example.org" in show.out
    shown = json.loads(cli(capsys, "--home", str(home), "keys", "show", "--json").out)
    assert shown["fingerprint"] == fpr
    assert any("ops@example.org" in uid for uid in shown["uids"])

    exported = cli(capsys, "--home", str(home), "keys", "export")
    assert exported.code == 0
    assert exported.out.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert "PRIVATE" not in exported.out
    r = cli(capsys, "--home", str(home), "keys", "export", "--output", str(in_tmp / "k.asc"))
    assert r.code == 0
    assert (in_tmp / "k.asc").read_text() == exported.out

    forced = cli(capsys, "--home", str(home), "keygen", "--email", "ops@example.org", "--force")
    assert forced.code == 0, forced.err
    new = forced.out.strip()
    assert FPR_LINE.match(new)
    assert new != fpr
    assert cli(capsys, "--home", str(home), "keys", "show").out.splitlines()[0] == new


def test_trust_add_list_remove(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path, alice: Home, mallory: Home
) -> None:
    h = ("--home", str(home))
    r = cli(capsys, *h, "trust", "list")
    assert r.code == 0
    assert r.out == ""
    assert "trust add" in r.err

    r = cli(capsys, *h, "trust", "add", str(alice.pubkey))
    assert r.code == 0, r.err
    assert r.out.strip() == alice.fingerprint
    assert "alice@example.org" in r.err
    r = cli(capsys, *h, "trust", "add", str(mallory.pubkey), "--reply-to", "m@evil.test")
    assert r.code == 0, r.err

    listed = cli(capsys, *h, "trust", "list")
    assert f"{alice.fingerprint}  alice@example.org" in listed.out
    doc = json.loads(cli(capsys, *h, "trust", "list", "--json").out)
    assert [k["fingerprint"] for k in doc] == [alice.fingerprint, mallory.fingerprint]
    assert doc[1]["reply_to"] == "m@evil.test"

    r = cli(capsys, *h, "trust", "remove", mallory.fingerprint)
    assert r.code == 0
    assert mallory.fingerprint in r.err
    doc = json.loads(cli(capsys, *h, "trust", "list", "--json").out)
    assert [k["fingerprint"] for k in doc] == [alice.fingerprint]

    r = cli(capsys, *h, "trust", "remove", mallory.fingerprint)
    assert r.code == 255
    assert "next: mailsh trust list" in r.err


def test_missing_file_is_one_line_with_hint(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path
) -> None:
    r = cli(capsys, "--home", str(home), "trust", "add", str(in_tmp / "missing.asc"))
    assert r.code == 255
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("mailsh: ")
    assert "missing.asc" in lines[0]
    assert lines[1].strip().startswith("next:")
    assert "Traceback" not in r.err


def test_no_identity_hint(capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path) -> None:
    r = cli(capsys, "--home", str(home), "keys", "show")
    assert r.code == 255
    assert "next: mailsh keygen" in r.err


@pytest.mark.parametrize(
    "argv",
    [
        ["keygen"],
        ["keygen", "--email"],
        ["trust", "add"],
        ["trust", "remove"],
        ["no-such-command"],
        ["keys", "show", "--bogus"],
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path, argv: list[str]
) -> None:
    r = cli(capsys, "--home", str(home), *argv)
    assert r.code == 2
    assert "Traceback" not in r.err


def test_bad_algo_and_address_are_not_tracebacks(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path
) -> None:
    r = cli(capsys, "--home", str(home), "keygen", "--email", "a@b.test", "--algo", "dsa")
    assert r.code == 2
    assert "next:" in r.err
    r = cli(capsys, "--home", str(home), "keygen", "--email", "not an address")
    assert r.code in (2, 255)
    assert "Traceback" not in r.err
    assert not (home / "gnupg" / "openpgp-revocs.d").exists()


def _commands() -> Iterator[tuple[list[str], Any]]:
    """Every command and group of the app (typer's vendored click objects)."""

    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


COMMANDS = list(_commands())


@pytest.mark.parametrize(
    ("path", "cmd"), COMMANDS, ids=[" ".join(p) or "mailsh" for p, _ in COMMANDS]
)
def test_help_mentions_env_vars(
    capsys: pytest.CaptureFixture[str], in_tmp: Path, path: list[str], cmd: Any
) -> None:
    r = cli(capsys, *path, "--help")
    assert r.code == 0
    flat = " ".join(r.out.split())
    for param in cmd.params:
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        for name in filter(None, envvars):
            assert name in flat, f"{' '.join(path)} --help does not mention {name}"


def test_key_commands_document_their_env_vars(
    capsys: pytest.CaptureFixture[str], in_tmp: Path
) -> None:
    assert "MAILSH_HOME" in cli(capsys, "--help").out
    assert "MAILSH_PASSPHRASE_FILE" in " ".join(cli(capsys, "keygen", "--help").out.split())


# --------------------------------------------------------------------------------------
# Real subprocess
# --------------------------------------------------------------------------------------


def mailsh(*argv: str, env_home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "MAILSH_HOME": str(env_home),
        "LC_ALL": "C.UTF-8",
    }
    return subprocess.run(
        [sys.executable, "-m", "mailsh", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_subprocess_keygen_and_trust(home: Path, tmp_path: Path, alice: Home) -> None:
    r = mailsh("keygen", "--email", "srv@example.org", env_home=home, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert FPR_LINE.match(r.stdout.strip())
    assert (tmp_path / "srv@example.org.asc").exists()
    assert (home / "gnupg").is_dir()
    assert (home.stat().st_mode & 0o777) == 0o700

    r = mailsh("keygen", "--email", "srv@example.org", env_home=home, cwd=tmp_path)
    assert r.returncode == 255
    assert "--force" in r.stderr
    assert "Traceback" not in r.stderr

    r = mailsh("trust", "add", str(alice.pubkey), env_home=home, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == alice.fingerprint
    r = mailsh("trust", "list", "--json", env_home=home, cwd=tmp_path)
    assert json.loads(r.stdout)[0]["fingerprint"] == alice.fingerprint
    assert ((home / "trust.json").stat().st_mode & 0o777) == 0o600

    r = mailsh("trust", "add", str(tmp_path / "nope.asc"), env_home=home, cwd=tmp_path)
    assert r.returncode == 255
    assert r.stdout == ""
    assert "next:" in r.stderr
    assert "Traceback" not in r.stderr

    r = mailsh("trust", env_home=home, cwd=tmp_path)
    assert r.returncode in (0, 2)  # no_args_is_help
    assert mailsh("keygen", env_home=home, cwd=tmp_path).returncode == 2


# --------------------------------------------------------------------------------------
# Trust ergonomics (issue 12 point 7)
# --------------------------------------------------------------------------------------


def test_trust_add_reads_stdin_and_remove_takes_prefix_or_email(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path, alice: Home, mallory: Home
) -> None:
    piped = subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(home), "trust", "add", "-"],
        input=alice.pubkey.read_bytes(),
        capture_output=True,
        check=False,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")},
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode().strip() == alice.fingerprint
    nothing = subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(home), "trust", "add", "-"],
        input=b"",
        capture_output=True,
        check=False,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")},
    )
    assert nothing.returncode == 255
    assert b"no key on standard input" in nothing.stderr

    h = ("--home", str(home))
    assert cli(capsys, *h, "trust", "add", str(mallory.pubkey)).code == 0
    too_short = cli(capsys, *h, "trust", "remove", mallory.fingerprint[:4])
    assert too_short.code == 255
    assert "at least 8" in too_short.err
    assert "next: mailsh trust list" in too_short.err
    unknown = cli(capsys, *h, "trust", "remove", "nobody@example.org")
    assert (unknown.code, "no pinned key matches" in unknown.err) == (255, True)

    # A unique prefix (any case, spaces allowed as gpg prints them) names one key.
    prefix = mallory.fingerprint[:12].lower()
    r = cli(capsys, *h, "trust", "remove", f"{prefix[:4]} {prefix[4:]}")
    assert r.code == 0, r.err
    assert mallory.fingerprint in r.err
    # The email of the key (its user id or reply address) names it too.
    r = cli(capsys, *h, "trust", "remove", "Alice@Example.org")
    assert r.code == 0, r.err
    assert json.loads(cli(capsys, *h, "trust", "list", "--json").out) == []


def test_trust_remove_refuses_an_ambiguous_reference(
    capsys: pytest.CaptureFixture[str], home: Path, alice: Home, mallory: Home
) -> None:
    h = ("--home", str(home))
    cli(capsys, *h, "trust", "add", str(alice.pubkey), "--reply-to", "ops@example.org")
    cli(capsys, *h, "trust", "add", str(mallory.pubkey), "--reply-to", "ops@example.org")
    r = cli(capsys, *h, "trust", "remove", "ops@example.org")
    assert r.code == 255
    assert "matches 2 pinned keys" in r.err
    assert alice.fingerprint in r.err and mallory.fingerprint in r.err
    assert len(json.loads(cli(capsys, *h, "trust", "list", "--json").out)) == 2


def test_trust_add_refuses_the_homes_own_key(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path
) -> None:
    h = ("--home", str(home))
    made = cli(capsys, *h, "keygen", "--email", "me@example.org")
    assert made.code == 0, made.err
    r = cli(capsys, *h, "trust", "add", "me@example.org.asc")
    assert r.code == 255
    assert "this home's own key" in r.err
    assert made.out.strip() in r.err
    assert "next:" in r.err
    assert not (home / "trust.json").exists()


def test_keygen_twice_refuses_before_announcing(
    capsys: pytest.CaptureFixture[str], home: Path, in_tmp: Path
) -> None:
    assert cli(capsys, "--home", str(home), "keygen", "--email", "me@example.org").code == 0
    again = cli(capsys, "--home", str(home), "keygen", "--email", "me@example.org")
    assert again.code == 255
    assert "already has an identity" in again.err
    assert "generating" not in again.err
    assert "unprotected" not in again.err


def test_home_that_is_a_file_says_so(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    afile = in_tmp / "home.txt"
    afile.write_text("not a home")
    r = cli(capsys, "--home", str(afile), "trust", "list")
    assert r.code == 255
    assert f"the home {afile} is a file, not a directory" in r.err
    assert "next: point --home" in r.err
    r = cli(capsys, "--home", str(afile / "sub"), "keys", "show")
    assert r.code == 255
    assert f"{afile} is a file, not a directory" in r.err
