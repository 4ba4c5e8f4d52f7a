"""Running the ``mailsh`` command: in-process through its error funnel, or as a process.

In-process goes through :func:`mailsh.cli.main`, the same entry point as the installed
script (argument parsing, settings, the one error funnel), and is fast; a real process
(``python -m mailsh``) is for what needs one: signal handlers, logging set-up, stdin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import AnyStr

import pytest

from mailsh.cli import main


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_main(
    capture: pytest.CaptureFixture[AnyStr], argv: Sequence[str]
) -> tuple[int, AnyStr, AnyStr]:
    """Run ``mailsh ARGV`` in-process: (exit status, stdout, stderr) as ``capture`` reads
    them (``capsys``: text, ``capsysbinary``: bytes). Every outcome is a SystemExit."""
    capture.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capture.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """Run ``mailsh ARGV`` in-process; the outcome as text."""
    return Run(*run_main(capsys, argv))


def mailsh_process(
    *args: str, home: Path, stdin: bytes = b"", **env: str
) -> subprocess.CompletedProcess[bytes]:
    """``python -m mailsh --home HOME ARGS...`` in a process of its own (``env`` added)."""
    return subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def serve_argv(port: int, workdir: Path) -> list[str]:
    """``python -m mailsh serve`` with its SMTP listener on 127.0.0.1:PORT."""
    return [
        sys.executable,
        "-m",
        "mailsh",
        "serve",
        "--smtp-listen",
        f"127.0.0.1:{port}",
        "--workdir",
        str(workdir),
    ]
