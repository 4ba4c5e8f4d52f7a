"""A throwaway sshd on a loopback port with throwaway keys: the baseline of the race."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.core import wait_until
from bench.world import free_port

SSHD = "/usr/sbin/sshd"


def unavailable_reason() -> str | None:
    """Why the ssh baseline cannot run here, or None when it can."""
    if not Path(SSHD).exists():
        return (
            "openssh-server is not installed (./dev bench installs it when run as root: "
            "apt-get install openssh-server)"
        )
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the ssh client (openssh-client) is not installed"
    if os.geteuid() != 0:
        return "sshd needs root to log a user in; run ./dev bench as root for the baseline"
    return None


class ThrowawaySshd:
    """``sshd -D`` on 127.0.0.1 with its own host key, config and authorized key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_key = root / "id_ed25519"

    def start(self) -> ThrowawaySshd:
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "ssh_host_ed25519_key"
        for key in (host_key, self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        auth = self.root / "authorized_keys"
        auth.write_bytes(self.client_key.with_suffix(".pub").read_bytes())
        auth.chmod(0o600)
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"PidFile {self.root / 'sshd.pid'}\nStrictModes no\nUseDNS no\n"
            "PrintMotd no\nPrintLastLog no\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "sshd.log").open("wb"),
        )
        wait_until(self._ready, 30, interval=0.05)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.root / "sshd.log").read_text(errors="replace")
            raise RuntimeError(f"sshd exited {self.proc.returncode}: {log[-500:]}")
        try:
            self.run("true")
        except subprocess.CalledProcessError:
            time.sleep(0.05)
            return False
        return True

    def argv(self, command: str) -> list[str]:
        """A fresh connection each time, like `ssh host cmd` from a shell."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "root@127.0.0.1",
            command,
        ]

    def run(self, command: str) -> bytes:
        return subprocess.run(
            self.argv(command), check=True, capture_output=True, timeout=60
        ).stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def __enter__(self) -> ThrowawaySshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
