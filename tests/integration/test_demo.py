"""`mailsh demo`: the README's first command, a real round trip on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

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
