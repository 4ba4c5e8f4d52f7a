"""The account a command runs as: who, with which environment, in which directory.

:func:`resolve_target` looks the ``run_as`` user (or this process's own) up once, with
its supplementary groups; :func:`scrubbed_env` is the command's whole environment, fixed
values and nothing inherited; :func:`check_cwd` refuses a directory that user could not
use before anything starts. :mod:`mailsh.server.execute` runs the command as that account.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from mailsh.errors import ConfigError

#: The only PATH a command ever sees; nothing is inherited from the server.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def current_user_is_root() -> bool:
    """True when this process runs with effective uid 0 (callers warn loudly)."""
    return os.geteuid() == 0


@dataclass(frozen=True)
class Target:
    """The account a command runs as, resolved once."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]
    switch: bool  # whether Popen must change uid/gid


def resolve_target(run_as: str | None) -> Target:
    """The account ``run_as`` names, or this process's own for None (ConfigError if none)."""
    if run_as is None:
        uid, gid = os.geteuid(), os.getegid()
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:  # a uid without a passwd entry (containers)
            return Target(str(uid), uid, gid, "/", "/bin/sh", (), switch=False)
        return Target(pw.pw_name, uid, gid, pw.pw_dir, pw.pw_shell, (), switch=False)
    try:
        pw = pwd.getpwnam(run_as)
    except KeyError:
        raise ConfigError(
            f"cannot run commands as {run_as!r}: no such user",
            hint=f"create the account (useradd --system {run_as}) or change the run-as user",
        ) from None
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    switch = (pw.pw_uid, pw.pw_gid) != (os.geteuid(), os.getegid())
    return Target(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell, groups, switch)


def scrubbed_env(target: Target) -> dict[str, str]:
    """The whole environment of a command: fixed values, nothing inherited (no message data)."""
    return {
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": target.home,
        "USER": target.name,
        "LOGNAME": target.name,
        "SHELL": target.shell,
    }


def _may(st: os.stat_result, target: Target, bits: int) -> bool:
    """Classic mode-bit check (ACLs are not consulted) for ``bits`` in r=4 w=2 x=1."""
    if target.uid == 0:
        return True
    if st.st_uid == target.uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid in target.groups or st.st_gid == target.gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def check_cwd(cwd: Path, target: Target) -> None:
    """Fail early when ``target`` could not enter and list ``cwd``.

    Popen changes directory *before* dropping privileges, so a root server would happily
    start a command in a directory its user cannot use; check it as that user would.
    """
    path = Path(os.path.abspath(cwd))
    try:
        final = path.stat()
        if not stat.S_ISDIR(final.st_mode):
            raise ConfigError(f"command directory {path} is not a directory")
        for parent in reversed(path.parents):
            if not _may(parent.stat(), target, 1):
                raise ConfigError(
                    f"user {target.name} cannot enter {parent} (on the way to {path})",
                    hint=f"choose a command directory {target.name} can reach, or chmod o+x",
                )
        if not _may(final, target, 5):
            raise ConfigError(
                f"user {target.name} cannot read and enter the command directory {path}",
                hint=f"chown {target.name} {path} (or pick another command directory)",
            )
    except OSError as exc:
        raise ConfigError(f"command directory {path} is unusable: {exc.strerror}") from exc
