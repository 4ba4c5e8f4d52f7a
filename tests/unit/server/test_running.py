"""The running-serve record that `mailsh status` reads: a held lock is proof of life."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mailsh.server.running import RUN_DIR, SERVE_FORMAT, running_servers, serving


def test_a_serve_is_listed_while_it_runs_and_not_after(tmp_path: Path) -> None:
    with serving(tmp_path, sources=["mbox /var/mail/x"]) as path:
        [proc] = running_servers(tmp_path)
        assert (proc.pid, proc.sources) == (os.getpid(), ("mbox /var/mail/x",))
        assert path.exists()
    assert running_servers(tmp_path) == []
    assert not path.exists()


def test_a_leftover_record_of_a_killed_serve_is_not_taken_for_a_live_one(
    tmp_path: Path,
) -> None:
    """A SIGKILLed serve leaves its file behind; the kernel dropped its lock."""
    code = (
        "import os, sys; from pathlib import Path; from mailsh.server.running import serving\n"
        "with serving(Path(sys.argv[1]), sources=[]):\n"
        "    os._exit(0)  # no clean-up, like SIGKILL\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    [leftover] = (tmp_path / RUN_DIR).glob("serve.*.json")
    assert json.loads(leftover.read_text())["format"] == SERVE_FORMAT
    assert running_servers(tmp_path) == []
    with serving(tmp_path, sources=[]):  # the next serve removes it
        assert not leftover.exists()
        assert [p.pid for p in running_servers(tmp_path)] == [os.getpid()]
