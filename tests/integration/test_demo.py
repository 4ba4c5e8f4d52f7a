"""`mailsh demo`: the README's first command, a real round trip on this machine."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mailsh.cli import main


def test_demo_in_process_passes_remote_status_and_output(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "printf 'out\\000'; printf err >&2; exit 5"])
    assert exc.value.code == 5
    out, err = capsysbinary.readouterr()
    assert out == b"out\x00"
    assert err.endswith(b"err")
    assert b"sign, encrypt, send" in err  # step timings are shown


def test_demo_as_subprocess_default_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mailsh", "demo"],
        capture_output=True,
        timeout=300,
        check=False,
        env={**os.environ, "HOME": os.environ.get("HOME", "/root")},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert (
        proc.stdout.decode()
        == subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout.decode()
    )
    assert b"reply to request" in proc.stderr


def _lines_after(lines: list[str], marker: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith(marker)) + 1
    out = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    return out


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=120, check=False, env=env)


def test_demo_keep_leaves_a_playground_that_the_printed_commands_use() -> None:
    """Issue 12 point 9: run exactly what `demo --keep DIR` prints, as a user would."""
    base = Path(tempfile.mkdtemp(prefix="mdk.", dir="/tmp"))  # short: gpg-agent sockets
    play = base / "play"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    serve: subprocess.Popen[bytes] | None = None
    try:
        made = subprocess.run(
            [sys.executable, "-m", "mailsh", "demo", "--keep", str(play), "echo first"],
            capture_output=True, timeout=300, check=False, env=env,
        )  # fmt: skip
        err = made.stderr.decode()
        assert (made.returncode, made.stdout) == (0, b"first\n"), err
        assert (play / "server" / "mailsh.toml").is_file()
        assert (play / "client" / "mailsh.toml").is_file()
        lines = err.splitlines()
        [start] = _lines_after(lines, "demo: start the server")
        send, client_status, server_status = _lines_after(lines, "demo: then, in another")
        assert " serve --smtp-listen 127.0.0.1:" in start

        serve = subprocess.Popen(shlex.split(start), env=env, stderr=subprocess.PIPE)
        port = int(start.rsplit(":", 1)[1])
        for _ in range(600):  # until the embedded listener accepts connections
            assert serve.poll() is None, serve.communicate()[1]
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)

        sent = _run(shlex.split(send), env)
        assert sent.returncode == 0, sent.stderr
        uname = subprocess.run(["uname", "-a"], capture_output=True, check=True).stdout
        assert sent.stdout == uname
        # "send more requests": the same command line with another command.
        more = [("echo more; exit 7" if a == "uname -a" else a) for a in shlex.split(send)]
        again = _run(more, env)
        assert (again.returncode, again.stdout) == (7, b"more\n"), again.stderr

        listed = _run(shlex.split(client_status), env)
        assert listed.returncode == 0, listed.stderr
        assert b"echo more; exit 7" in listed.stdout
        assert listed.stdout.count(b"answered") == 3  # the demo's request and both sends
        shown = _run(shlex.split(server_status), env)
        assert f"yes, pid {serve.pid}".encode() in shown.stdout, shown.stdout
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            serve.communicate(timeout=120)
        for side in ("client", "server"):
            subprocess.run(
                ["gpgconf", "--homedir", str(play / side / "gnupg"), "--kill", "all"],
                capture_output=True, check=False, timeout=30,
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def test_demo_keep_refuses_a_directory_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--keep", str(tmp_path)])
    assert exc.value.code == 255
    err = capsys.readouterr().err
    assert "is not an empty directory" in err
    assert "generating" not in err  # refused before any key was made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
