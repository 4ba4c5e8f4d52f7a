"""No tracebacks (issue 12): every failure of the ``mailsh`` command is one line and a
``next:`` step with its exit code; ``--debug`` adds what it promises (the traceback and,
for gpg failures, gpg's own output).

``serve`` runs as a real subprocess (it sets up logging and signal handlers); the rest
in-process through :func:`mailsh.cli.main`, with real gpg.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kit.cli import cli
from tests.kit.homes import Home
from tests.kit.serverkit import replies_for, request
from tests.kit.smtp import Sink


def _one_failure(err: str) -> list[str]:
    """The failure lines: exactly `mailsh: ...` then `  next: ...`, no traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 2, err
    assert lines[0].startswith("mailsh: "), err
    assert lines[1].startswith("  next: "), err
    return lines


# -- serve --smtp-listen ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server_home(make_home: Callable[..., Home]) -> Home:
    home = make_home("listen@server.test")
    (home.path / "mailsh.toml").write_text('sendmail = "/bin/true"\n')
    return home


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _serve(home: Home, listen: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    return subprocess.run(
        [sys.executable, "-m", "mailsh", "serve", "--smtp-listen", listen, "--once"],
        env={**env, "MAILSH_HOME": str(home.path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _serve_failure(served: subprocess.CompletedProcess[str]) -> list[str]:
    """The failure lines of serve's stderr, without its log lines (time-stamped)."""
    assert served.returncode == 255, served.stderr
    assert "Traceback" not in served.stderr, served.stderr
    lines = [ln for ln in served.stderr.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", ln)]
    return _one_failure("\n".join(lines))


def test_serve_on_a_busy_port(server_home: Home, busy_port: int) -> None:
    first, hint = _serve_failure(_serve(server_home, f"127.0.0.1:{busy_port}"))
    assert first == f"mailsh: cannot listen on 127.0.0.1:{busy_port}: the port is already in use"
    assert f"sport = :{busy_port}" in hint


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("nosuchhost.invalid:2525", "the host name 'nosuchhost.invalid' does not resolve"),
        ("192.0.2.1:2525", "192.0.2.1 is not an address of this machine"),  # TEST-NET-1
    ],
)
def test_serve_on_an_address_that_is_not_ours(server_home: Home, listen: str, reason: str) -> None:
    first, _ = _serve_failure(_serve(server_home, listen))
    assert first.startswith(f"mailsh: cannot listen on {listen}: {reason}"), first


@pytest.mark.parametrize("listen", ["127.0.0.1:70000", "127.0.0.1", ":2525"])
def test_serve_refuses_a_listen_address_that_cannot_be_one(
    capsys: pytest.CaptureFixture[str], scratch: Path, listen: str
) -> None:
    result = cli(capsys, "serve", "--smtp-listen", listen, "--home", str(scratch / "h"))
    assert result.code == 2
    first, _ = _one_failure(result.err)
    assert first == f"mailsh: bad --smtp-listen {listen!r}"


# -- keygen: values checked before gpg runs --------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--expire", "forever", "--expire 'forever' is not a key lifetime"),
        ("--expire", "2001-01-01", "--expire 2001-01-01 is not in the future"),
        ("--expire", "2030-02-30", "--expire '2030-02-30' is not a date"),
        ("--name", "Eve\nPassphrase: x", "cannot be part of a user id"),
    ],
)
def test_keygen_refuses_bad_values_before_gpg_runs(
    capsys: pytest.CaptureFixture[str], scratch: Path, option: str, value: str, message: str
) -> None:
    home = scratch / "h"
    result = cli(capsys, "keygen", "--email", "me@example.org", option, value, "--home", str(home))
    assert result.code == 2
    first, _ = _one_failure(result.err)
    assert message in first
    assert "generating" not in result.err
    assert not home.exists()  # refused before the home or any key was made


@pytest.mark.parametrize("expire", ["0", "never", "90d", "12w", "6m", "2y", "2099-12-31"])
def test_keygen_accepts_every_documented_lifetime(expire: str) -> None:
    from mailsh.cli.keys import _check_expire

    _check_expire(expire)  # no exception


# -- --debug shows gpg's own output ----------------------------------------------------


def test_a_gpg_failure_is_one_line_and_debug_shows_gpgs_output(
    capsys: pytest.CaptureFixture[str], scratch: Path
) -> None:
    """A real gpg failure: the home's keyring is damaged, so gpg cannot store a key."""
    home = scratch / "h"
    (home / "gnupg").mkdir(mode=0o700, parents=True)
    (home / "gnupg" / "pubring.kbx").write_bytes(b"not a keyring\n" * 64)
    keygen = ["keygen", "--email", "me@example.org", "--home", str(home)]

    plain = cli(capsys, *keygen)
    assert plain.code == 255
    lines = plain.err.strip().splitlines()
    first, hint = _one_failure("\n".join(lines[-2:]))
    assert "Traceback" not in plain.err
    assert first.startswith("mailsh: gpg could not generate a key: gpg: ")
    assert hint == "  next: run again with --debug to see gpg's output"

    debug = cli(capsys, *keygen, "--debug")
    assert debug.code == 255
    assert "Traceback" in debug.err
    output = debug.err.split("gpg's output:\n", 1)[1]
    assert "[GNUPG:] KEY_NOT_CREATED" in output  # gpg's own status lines, verbatim
    assert "gpg: key generation failed: Invalid packet" in output
    assert output.strip().splitlines()[-2:] == [first, hint]


# -- unexpected exceptions and usage errors --------------------------------------------


def test_an_unexpected_exception_is_one_line_and_debug_shows_where(
    capsys: pytest.CaptureFixture[str], scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug cannot be produced on demand, so this one is planted: the trust store
    loader raises a plain RuntimeError (a mock, and the only one in this file)."""
    import mailsh.keys.trust

    def broken(path: Path) -> object:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(mailsh.keys.trust, "load_trust", broken)
    home = str(scratch / "h")
    plain = cli(capsys, "trust", "list", "--home", home)
    assert plain.code == 255
    first, hint = _one_failure(plain.err)
    assert first == "mailsh: unexpected error: RuntimeError: planted bug"
    assert "run again with --debug" in hint

    debug = cli(capsys, "trust", "list", "--home", home, "--debug")
    assert debug.code == 255
    assert "Traceback" in debug.err
    assert "in broken" in debug.err


@pytest.mark.parametrize(
    ("argv", "message", "command"),
    [
        (["trust", "list", "--hme", "x"], "No such option: --hme", "mailsh trust list"),
        (["send", "id"], "Missing option '--to'", "mailsh send"),
        (["nosuch"], "No such command 'nosuch'", "mailsh"),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str, command: str
) -> None:
    result = cli(capsys, *argv)
    assert result.code == 2
    first, hint = _one_failure(result.err)
    assert message in first
    assert hint == f"  next: see {command} --help"


# -- what a timed-out command reports (docs/client.md, "Exit codes") ---------------------


def test_a_timed_out_command_reports_sigterm_so_the_client_exits_143(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    """The server stops a command at its limit with SIGTERM first: the reply says signal
    15, and wait-reply / send --wait exit 128+15 = 143 (not 137)."""
    from mailsh.client.wait import exit_status, notes

    sealed = request(alice, srv, "sleep 300", timeout=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    env["MAILSH_HOME"] = str(srv.path)
    mailsh = [sys.executable, "-m", "mailsh"]
    delivered = subprocess.run(
        [*mailsh, "deliver"],
        input=sealed.mail,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert delivered.returncode == 0, delivered.stderr
    served = subprocess.run(
        [
            *mailsh,
            "serve",
            "--spool-only",
            "--once",
            "--smtp",
            sink.url,
            "--workdir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert served.returncode == 0, served.stderr
    [reply] = replies_for(alice, srv, sealed, sink)
    assert (reply.timed_out, reply.signal, reply.exit_code) == (True, 15, None)
    assert exit_status(reply) == 143
    assert "timed out and was killed by signal 15" in notes(reply)[0]


def test_keygen_refuses_a_passphrase_of_several_lines(
    capsys: pytest.CaptureFixture[str], scratch: Path
) -> None:
    """A newline in the passphrase used to become a line of gpg's key parameters."""
    (scratch / "pass").write_text("first\nName-Email: evil@example.org\n")
    home = scratch / "h"
    result = cli(
        capsys, "keygen", "--email", "me@example.org", "--passphrase-file", "pass",
        "--home", str(home),
    )  # fmt: skip
    assert result.code == 255
    first, _ = _one_failure(result.err)
    assert first == f"mailsh: passphrase file {Path('pass')} holds more than one line"
    assert "generating" not in result.err


def test_a_public_key_that_cannot_be_written_is_one_line(
    capsys: pytest.CaptureFixture[str], scratch: Path, alice: Home
) -> None:
    missing = scratch / "no-such-dir" / "key.asc"
    home = scratch / "h"
    refused = cli(
        capsys, "keygen", "--email", "me@example.org", "-o", str(missing), "--home", str(home)
    )
    assert refused.code == 2
    first, _ = _one_failure(refused.err)
    assert (
        first
        == f"mailsh: cannot write the public key to {missing}: {missing.parent} is not a directory"
    )
    assert not home.exists()  # checked before anything was generated

    exported = cli(capsys, "keys", "export", "-o", str(missing), "--home", str(alice.path))
    assert exported.code == 255
    first, _ = _one_failure(exported.err)
    assert first == f"mailsh: cannot write {missing}: No such file or directory"


def test_ctrl_c_outside_a_wait_is_one_line_and_exit_255(tmp_path: Path) -> None:
    # typer turns a KeyboardInterrupt into a silent exit 130; mailsh says it, exit 255
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailsh", "--home", str(tmp_path / "h"), "send", "--stdin", "-",
         "--to", "root@server.test", "--smtp", "smtp://127.0.0.1:1", "--", "cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wchan = Path(f"/proc/{proc.pid}/wchan")
        for _ in range(600):  # until it blocks reading the command's stdin
            if wchan.read_text().endswith("pipe_read"):  # anon_pipe_read on Linux >= 6.14
                break
            time.sleep(0.05)
        else:
            raise AssertionError("mailsh send never read its stdin")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        assert proc.stdin is not None
        proc.stdin.close()
    assert proc.returncode == 255, err
    assert err.decode().strip().splitlines()[-1] == "mailsh: interrupted"
