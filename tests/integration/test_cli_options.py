"""How the command line behaves as a whole (issue 12): global options anywhere, ``-h``,
help that names every global option, readable metavars, summaries that are not cut.

In-process through :func:`mailsh.cli.main`, the same entry point as the ``mailsh``
script, with throwaway homes in short paths.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer
import typer.main

from mailsh.cli import app, main
from mailsh.settings import Settings
from tests.kit.cli import cli
from tests.kit.homes import Home


def _command_paths() -> tuple[list[list[str]], set[str]]:
    """Every command and group of the app as the words that name it, and the leaves."""
    paths: list[list[str]] = [[]]
    leaves: set[str] = set()

    def walk(command: object, prefix: list[str]) -> None:
        subcommands = getattr(command, "commands", {})
        if not subcommands:
            leaves.add(" ".join(prefix))
        for name, sub in subcommands.items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths, leaves


COMMANDS, LEAVES = _command_paths()


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"send", "wait-reply", "serve", "deliver", "keygen", "trust list", "keys"} <= names


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "mailsh")
def test_every_help_lists_the_global_options_and_h_is_help(
    capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    long = cli(capsys, *words, "--help")
    assert long.code == 0, long.err
    short = cli(capsys, *words, "-h")
    assert short.code == 0, short.err
    assert short.out == long.out
    globals_section = long.out.split("Global options:", 1)[1]
    for option in ("--home DIR", "--debug", "--version"):
        assert option in globals_section, (words, long.out)
    # Readable metavars: typer's type labels never show.
    assert not re.search(r"<(str|path|float|int|text)>|list\[", long.out), long.out
    assert "{" not in long.out.splitlines()[0], long.out  # usage: `ID`, not `{ID}`


def test_command_list_shows_whole_first_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    out = cli(capsys, "--help").out
    commands = " ".join(out.split("Commands:", 1)[1].split())
    assert "..." not in commands
    assert "Run commands that arrive as signed mail, and mail back signed, encrypted" in commands


# Each command with the least it needs to reach its settings, and --home DIR after it.
# Most then fail (no identity, no state ...): what matters is which home they used.
HOME_AFTER = {
    "send": ["send", "--to", "srv@example.org", "id"],
    "wait-reply": ["wait-reply", "0123456789abcdef"],
    "keygen": ["keygen", "--email", "me@example.org"],
    "serve": ["serve", "--spool-only", "--mbox", "m"],  # refused before logging is set up
    "status": ["status"],
    "deliver": ["deliver"],
    "keys show": ["keys", "show"],
    "keys export": ["keys", "export"],
    "trust add": ["trust", "add", "missing.asc"],
    "trust list": ["trust", "list"],
    "trust remove": ["trust", "remove", "A" * 40],
}


def test_home_after_covers_every_command_that_uses_a_home() -> None:
    assert LEAVES - set(HOME_AFTER) == {"demo"}  # demo makes its own temporary homes


@pytest.mark.parametrize("name", sorted(HOME_AFTER))
def test_home_after_the_subcommand_is_the_home_used(
    capsys: pytest.CaptureFixture[str], scratch: Path, name: str
) -> None:
    home = scratch / "h"
    result = cli(capsys, *HOME_AFTER[name], "--home", str(home))
    assert "No such option" not in result.err, result.err
    assert (home / "gnupg").is_dir(), (result.code, result.err)


def test_the_innermost_home_wins_over_the_outer_flag_and_the_environment(
    capsys: pytest.CaptureFixture[str], scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSH_HOME", str(scratch / "env"))
    result = cli(
        capsys, "--home", str(scratch / "outer"), "trust", "--home", str(scratch / "mid"), "list",
        "--home", str(scratch / "inner"),
    )  # fmt: skip
    assert result.code == 0, result.err
    assert (scratch / "inner").is_dir()
    assert not any((scratch / name).exists() for name in ("env", "outer", "mid"))

    # Without a flag after the subcommand, the outer flag beats the environment...
    assert cli(capsys, "--home", str(scratch / "outer"), "trust", "list").code == 0
    assert (scratch / "outer").is_dir()
    assert not (scratch / "env").exists()
    # ...and the environment applies when no flag is given.
    assert cli(capsys, "trust", "list").code == 0
    assert (scratch / "env").is_dir()


def test_debug_after_the_subcommand_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], scratch: Path
) -> None:
    plain = cli(capsys, "keys", "show", "--home", str(scratch / "h"))
    assert plain.code == 255
    assert "Traceback" not in plain.err
    debug = cli(capsys, "keys", "show", "--home", str(scratch / "h"), "--debug")
    assert debug.code == 255
    assert "Traceback" in debug.err
    assert "mailsh: this home has no identity yet" in debug.err
    # The next run without --debug is quiet again (no state leaks between runs).
    assert "Traceback" not in cli(capsys, "keys", "show", "--home", str(scratch / "h")).err


def test_version_after_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "trust", "list", "--version")
    assert result.code == 0
    assert result.out.startswith("mailsh ")


def test_an_option_without_a_metavar_still_shows_a_readable_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mailsh.cli import MailshTyper

    probe = MailshTyper(add_completion=False, rich_markup_mode=None)

    @probe.command()
    def count(  # the typer type labels this would show: <int>, list[str]
        n: Annotated[int, typer.Option("--n")] = 1,
        tag: Annotated[Optional[list[str]], typer.Option("--tag")] = None,  # noqa: UP045
    ) -> None:
        """Count."""

    with pytest.raises(SystemExit):
        probe(["--help"], prog_name="probe")
    out = capsys.readouterr().out
    assert "--n N" in out
    assert "--tag TEXT" in out


# -- precedence for option families, through the CLI ------------------------------------


@pytest.fixture(scope="module")
def client_home(server: Home) -> Iterator[tuple[Path, str]]:
    """A client home that pins the server's key and has one request pending."""
    from mailsh.client.pending import PendingRequest, PendingStore

    root = Path(tempfile.mkdtemp(prefix="msp.", dir="/tmp"))
    home = root / "c"
    with pytest.raises(SystemExit) as added:
        main(["trust", "add", str(server.pubkey), "--home", str(home)])
    assert added.value.code == 0
    now = datetime.now(UTC)
    request_id = "0123456789abcdef0123456789abcdef"
    PendingStore(home).save(
        PendingRequest(
            request_id=request_id,
            to=server.email,
            server_fingerprint=server.fingerprint,
            payload_sha256="0" * 64,
            message_id="<probe@example.org>",
            created=now,
            expires_at=now + timedelta(hours=1),
        )
    )
    yield home, request_id
    _ = subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"], check=False)
    shutil.rmtree(root, ignore_errors=True)


# Each mailbox kind at a path that cannot exist: wait-reply names it at once, so the
# message says which mailbox it chose. (IMAP is covered in tests/unit/test_settings_families.)
MISSING = {"mbox": "/nonexistent-{}/mbox", "maildir": "/nonexistent-{}/Maildir"}


@pytest.mark.parametrize(
    ("flag", "env", "file", "winner"),
    [
        ("mbox", None, "maildir", "flag"),  # the case issue 12 reports
        ("maildir", "mbox", "mbox", "flag"),
        (None, "maildir", "mbox", "env"),
        (None, "mbox", "maildir", "env"),
        (None, None, "maildir", "file"),
    ],
)
def test_wait_reply_reads_the_mailbox_of_the_highest_source(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    client_home: tuple[Path, str],
    flag: str | None,
    env: str | None,
    file: str | None,
    winner: str,
) -> None:
    home, request_id = client_home
    for name in [n for n in os.environ if n.startswith("MAILSH_")]:
        monkeypatch.delenv(name)
    toml = home / "mailsh.toml"
    toml.unlink(missing_ok=True)
    if file is not None:
        toml.write_text(f'reply_{file} = "{MISSING[file].format("file")}"\n')
    if env is not None:
        monkeypatch.setenv(f"MAILSH_REPLY_{env.upper()}", MISSING[env].format("env"))
    argv = ["wait-reply", request_id, "--home", str(home), "--wait-timeout", "1"]
    if flag is not None:
        argv += [f"--{flag}", MISSING[flag].format("flag")]
    result = cli(capsys, *argv)
    toml.unlink(missing_ok=True)
    assert result.code == 255
    assert "several" not in result.err and "both" not in result.err, result.err
    assert f"/nonexistent-{winner}/" in result.err, result.err


def test_wait_reply_with_two_mailbox_flags_names_them(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    client_home: tuple[Path, str],
) -> None:
    home, request_id = client_home
    for name in [n for n in os.environ if n.startswith("MAILSH_")]:
        monkeypatch.delenv(name)
    result = cli(
        capsys, "wait-reply", request_id, "--home", str(home),
        "--mbox", "/tmp/m", "--maildir", "/tmp/d",
    )  # fmt: skip
    assert result.code == 255
    assert "mailsh: --mbox and --maildir were both given" in result.err
    assert "next: give only one of --mbox and --maildir" in result.err


def test_a_transport_flag_replaces_the_environment_and_the_file(
    make_home: Callable[..., Home],
) -> None:
    """MAILSH_SMTP (which typer also reads for --smtp) and smtp in mailsh.toml give way
    to --sendmail: serve starts instead of refusing two ways to send mail. (serve runs
    as a subprocess: it sets up logging and signal handlers.)"""
    srv = make_home("precedence@server.test")
    toml = srv.path / "mailsh.toml"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}

    def serve(*extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailsh", "serve", "--spool-only", "--once", *extra],
            env={**base, "MAILSH_HOME": str(srv.path), **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    toml.write_text('smtp = "smtp://127.0.0.1:1"\n')
    started = serve("--sendmail", "/bin/true", MAILSH_SMTP="smtp://127.0.0.1:2")
    assert started.returncode == 0, started.stderr
    # The environment against the file, each with another kind: no conflict either.
    toml.write_text('sendmail = "/bin/true"\n')
    started = serve(MAILSH_SMTP="smtp://127.0.0.1:2")
    assert started.returncode == 0, started.stderr
    # Two in the same source are still a mistake, named as such.
    toml.write_text('smtp = "smtp://h"\nsendmail = "/bin/true"\n')
    refused = serve()
    assert refused.returncode == 255
    assert f"mailsh: smtp and sendmail are both set in {toml}" in refused.stderr


@pytest.mark.parametrize("option", ["--wait-timeout", "--timeout"])
def test_wait_reply_wait_limit_flag_beats_the_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    client_home: tuple[Path, str],
    tmp_path: Path,
    option: str,
) -> None:
    """--wait-timeout, and --timeout (its hidden old name), beat MAILSH_WAIT_TIMEOUT."""
    home, request_id = client_home
    for name in [n for n in os.environ if n.startswith("MAILSH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MAILSH_WAIT_TIMEOUT", "5")
    mbox = tmp_path / "mbox"
    mbox.touch()
    argv = ["wait-reply", request_id, "--home", str(home), "--mbox", str(mbox)]
    result = cli(capsys, *argv, option, "0.2")
    assert result.code == 255
    assert "after 0.2s; the request may still run" in result.err, result.err
    help_text = cli(capsys, "wait-reply", "--help").out
    assert "--wait-timeout S" in help_text
    assert "--timeout" not in help_text


# -- shell completion -----------------------------------------------------------------


def _bash(script: str, home: Path) -> str:
    """Run SCRIPT in a real bash with the installed `mailsh` first on PATH."""
    bindir = Path(sys.executable).parent
    assert (bindir / "mailsh").exists(), "the mailsh entry point is installed beside python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILSH_", "_MAILSH"))}
    env.update(HOME=str(home), PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}")
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


COMPLETE = """
complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _mailsh_completion mailsh;
                   echo "${COMPREPLY[*]}"; }
complete_words mailsh tr
complete_words mailsh trust list --ho
complete_words mailsh wait-reply ID --wait-t
"""


def test_install_completion_in_bash(capsys: pytest.CaptureFixture[str], scratch: Path) -> None:
    """Installed from a real bash, then used by one: the script completes commands and
    options (global ones after a subcommand too)."""
    said = _bash("mailsh --install-completion", scratch)
    assert said.startswith("bash completion installed in ")
    installed = scratch / ".bash_completions" / "mailsh.sh"
    assert f"source '{installed}'" in (scratch / ".bashrc").read_text()
    # --show-completion bash prints the same script, for installing by hand.
    assert cli(capsys, "--show-completion", "bash").out.strip() == installed.read_text().strip()
    out = _bash("source ~/.bashrc" + COMPLETE, scratch)
    assert out.splitlines() == ["trust", "--home", "--wait-timeout"]


@pytest.mark.parametrize(
    ("shell", "env", "expected"),
    [
        ("zsh", {"_TYPER_COMPLETE_ARGS": "mailsh tr"}, '"trust":'),
        (
            "fish",
            {"_TYPER_COMPLETE_ARGS": "mailsh keys ", "_TYPER_COMPLETE_FISH_ACTION": "get-args"},
            "export\tExport this home's public key",
        ),
    ],
)
def test_zsh_and_fish_completion(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    shell: str,
    env: dict[str, str],
    expected: str,
) -> None:
    """zsh and fish are not installed here: this checks their script, then asks mailsh
    for completions exactly as that script does (same variables, same protocol)."""
    script = cli(capsys, "--show-completion", shell)
    assert script.code == 0
    assert "_MAILSH_COMPLETE=complete_" + shell in script.out
    assert "_TYPER_COMPLETE_ARGS" in script.out
    monkeypatch.setenv("_MAILSH_COMPLETE", f"complete_{shell}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    answered = cli(capsys)
    assert answered.code == 0
    assert expected in answered.out


def test_show_completion_for_an_unknown_shell(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "--show-completion", "tcsh")
    assert result.code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.err


@pytest.mark.parametrize(
    ("words", "footer"),
    [
        (["send"], "Exit codes: the remote command's status"),
        (["wait-reply"], "Exit codes: the remote command's status"),
        (["demo"], "Exit codes: the remote command's status"),
        (["deliver"], "75 temporary failure"),
        (["keygen"], None),
        (["serve"], None),
        (["trust", "add"], None),
    ],
)
def test_exit_code_footers_only_where_those_codes_apply(
    capsys: pytest.CaptureFixture[str], words: list[str], footer: str | None
) -> None:
    out = " ".join(cli(capsys, *words, "--help").out.split())
    if footer is None:
        assert "Exit codes" not in out
    else:
        assert footer in out
        assert ("deliver" in words) == ("75" in out)


def test_keygen_name_default_is_described_as_it_is(
    capsys: pytest.CaptureFixture[str], scratch: Path
) -> None:
    out = " ".join(cli(capsys, "keygen", "--help").out.split())
    assert "--name NAME Name in the user id [the part of the address before the @]" in out
    home = scratch / "h"
    made = cli(capsys, "keygen", "--email", "ann.lee@example.org", "--home", str(home))
    assert made.code == 0, made.err
    uids = cli(capsys, "keys", "show", "--home", str(home)).out
    assert "uid ann.lee <ann.lee@example.org>" in uids


def test_serve_poll_interval_and_shutdown_grace_are_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """MAILSH_POLL_INTERVAL and MAILSH_SHUTDOWN_GRACE reach serve like every other
    setting, and --poll-interval still beats its variable. (The server is replaced by a
    stand-in that records its settings: what matters is what serve would run with.)"""
    seen: list[Settings] = []

    class RecordingServer:
        abandoned = False

        def __init__(self, settings: Settings, options: object) -> None:
            seen.append(settings)

        def install_signal_handlers(self) -> None:
            pass

        def run(self) -> None:
            pass

    monkeypatch.setattr("mailsh.server.daemon.Server", RecordingServer)
    monkeypatch.setattr("mailsh.cli.server._setup_logging", lambda fmt: None)
    for name in [n for n in os.environ if n.startswith("MAILSH_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    argv = ["serve", "--spool-only", "--once", "--sendmail", "/bin/true", "--home", str(home)]
    assert cli(capsys, *argv).code == 0
    monkeypatch.setenv("MAILSH_POLL_INTERVAL", "0.25")
    monkeypatch.setenv("MAILSH_SHUTDOWN_GRACE", "7")
    assert cli(capsys, *argv).code == 0
    assert cli(capsys, *argv, "--poll-interval", "0.5").code == 0
    assert [(s.poll_interval, s.shutdown_grace) for s in seen] == [
        (2.0, 30.0),
        (0.25, 7.0),
        (0.5, 7.0),
    ]
