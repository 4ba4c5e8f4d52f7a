"""The GnuPG boundary: every gpg invocation of mailsh goes through :class:`Gpg`.

gpg runs with ``--no-options`` (a gpg.conf could turn on ``auto-key-import``), no key
retrieval or import of any kind, no dirmngr, batch mode and ``--max-output`` so a
compressed bomb cannot fill memory (docs/security.md P10). Failures of the
``gnupg`` library are wrapped into :class:`mailsh.errors.GpgError` here, at the boundary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import gnupg

from mailsh.errors import DependencyError, GpgError

if TYPE_CHECKING:
    from mailsh.settings import Settings

MIN_GNUPG = (2, 2, 36)
AGENT_KILL_TIMEOUT = 30
"""Seconds ``gpgconf --kill all`` may take when a home's agent is stopped (tests, demo
clean-up). Not a setting: nothing the user runs waits on it, and errors are ignored."""

HARDENING_OPTIONS = (
    "--no-options",
    "--no-auto-key-retrieve",
    "--no-auto-key-import",
    "--auto-key-locate",
    "local",
    "--disable-dirmngr",
    "--no-random-seed-file",
    "--no-greeting",
    "--no-permission-warning",
    "--keyid-format",
    "long",
)


#: python-gnupg handles already set up in this process. ``gnupg.GPG()`` runs gpg once
#: to learn its version; a client round trip would otherwise pay that for every
#: :class:`Gpg` it makes (send, then wait). A handle holds no per-call state, and the
#: server already shares one between its worker threads.
_HANDLES: dict[tuple[str, ...], Any] = {}
_HANDLES_LOCK = threading.Lock()


def _handle(binary: str, gnupg_home: Path, max_output: int) -> Any:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "GNUPGHOME": str(gnupg_home),
        "LC_ALL": "C",
        "LANG": "C",
    }
    key = (str(shutil.which(binary)), str(gnupg_home), str(max_output), env["PATH"], env["HOME"])
    with _HANDLES_LOCK:
        raw = _HANDLES.get(key)
        if raw is None or not gnupg_home.is_dir():  # a removed home is set up (and checked) anew
            try:
                raw = gnupg.GPG(
                    gpgbinary=binary,
                    gnupghome=str(gnupg_home),
                    options=[*HARDENING_OPTIONS, "--max-output", str(max_output)],
                    env=env,
                )
            except (OSError, ValueError) as exc:
                raise GpgError(
                    f"cannot run gpg with home {gnupg_home}: {exc}",
                    hint=f"check that {gnupg_home} exists and is yours (mode 0700)",
                ) from exc
            raw.encoding = "utf-8"
            _HANDLES[key] = raw
        return raw


class Gpg:
    """A python-gnupg handle bound to one GnuPG home with mailsh's hardening.

    Set up once per process and home: later instances reuse the handle (no version probe).
    """

    @classmethod
    def for_settings(cls, settings: Settings) -> Self:
        """The GnuPG home, program and output cap of ``settings``."""
        return cls(
            settings.gnupg_home, binary=settings.gpg_binary, max_output=settings.max_gpg_output
        )

    def __init__(self, gnupg_home: Path, *, binary: str = "gpg", max_output: int) -> None:
        if shutil.which(binary) is None:
            raise DependencyError(
                f"GnuPG ({binary}) is not installed",
                hint="apt-get install -y gnupg   (or set MAILSH_GPG_BINARY)",
            )
        self.home = gnupg_home
        self.binary = binary
        self.max_output = max_output
        self.raw: Any = _handle(binary, gnupg_home, max_output)
        version = tuple(self.raw.version or (0,))
        if version < MIN_GNUPG:
            raise DependencyError(
                "GnuPG {} is too old: mailsh needs >= {}".format(
                    ".".join(map(str, version)), ".".join(map(str, MIN_GNUPG))
                ),
                hint="upgrade gnupg (Debian 12 ships 2.2.40)",
            )
        self.version: tuple[int, ...] = version

    def kill_agent(self) -> None:
        """Stop this home's gpg-agent (tests, demo clean-up). Errors are ignored."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf is None:
            return
        subprocess.run(
            [gpgconf, "--homedir", str(self.home), "--kill", "all"],
            check=False,
            capture_output=True,
            timeout=AGENT_KILL_TIMEOUT,
        )


def status_lines(stderr: str) -> list[tuple[str, list[str]]]:
    """Parse gpg's ``[GNUPG:]`` status lines (python-gnupg puts status-fd on stderr)."""
    out: list[tuple[str, list[str]]] = []
    for line in stderr.splitlines():
        if line.startswith("[GNUPG:] "):
            parts = line[9:].split()
            if parts:
                out.append((parts[0], parts[1:]))
    return out
