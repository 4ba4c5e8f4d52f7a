"""The home directory: created private, refused if another user could change it (P15).

Whoever can write the home, the GnuPG home or the trust store decides which keys are
trusted, so every command checks them (:func:`ensure_home`), and serve also checks every
directory above the home (:func:`check_serve_home`). docs/security.md, P15.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from mailsh.errors import ConfigError

if TYPE_CHECKING:
    from mailsh.settings import Settings


def _check_private(path: Path, what: str, st: os.stat_result) -> None:
    """Refuse ``path`` unless this user owns it and neither group nor others may write it.

    Whoever can write the home, the GnuPG home or the trust store decides which keys are
    trusted (P15): a ``trust.json`` written by another user must never be believed.
    """
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ConfigError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {uid})",
            hint=f"run mailsh as the owner of {path}, or choose a --home this user owns",
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"{what} {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}): anyone could have changed it",
            hint=f"check its contents, then: chmod go-w {path}",
        )


def ensure_home(settings: Settings) -> Path:
    """Create the home (0700) and its GnuPG home (0700), and check them and the trust store.

    Refuses (``ConfigError``, exit 255) a home, GnuPG home or trust store that another
    user owns or that group or others may write (P15); removes group and other read
    access that older versions or a hand-made directory left.
    """
    # The home, or the first of its parents that exists, must be a directory.
    for path in (settings.home, *settings.home.parents):
        if path.is_dir():
            break
        if path.exists() or path.is_symlink():
            what = "a file, not a directory" if path.is_file() else "not a directory"
            message = f"the home {path} is {what}"
            if path != settings.home:
                message = f"the home {settings.home} cannot be created: {path} is {what}"
            raise ConfigError(
                message,
                hint="point --home (or MAILSH_HOME) at a directory; mailsh creates it if missing",
            )
    for directory, what in ((settings.home, "home"), (settings.gnupg_home, "GnuPG home")):
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = directory.stat()
        except OSError as exc:
            raise ConfigError(
                f"cannot create {directory}: {exc.strerror}",
                hint="choose a writable --home DIR (or set MAILSH_HOME)",
            ) from exc
        _check_private(directory, what, st)
        if st.st_mode & 0o077:
            try:
                directory.chmod(0o700)
            except OSError as exc:
                raise ConfigError(f"cannot chmod 700 {directory}: {exc.strerror}") from exc
    try:
        trust = settings.trust_file.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {settings.trust_file}: {exc.strerror}") from exc
    else:
        if not stat.S_ISREG(trust.st_mode):
            raise ConfigError(
                f"trust store {settings.trust_file} is not a regular file",
                hint=f"replace {settings.trust_file} by the trust store (mailsh trust add)",
            )
        _check_private(settings.trust_file, "trust store", trust)
    return settings.home


def check_serve_home(settings: Settings) -> None:
    """For serve: :func:`ensure_home`, and refuse a home below a directory another user
    could replace it in.

    Every directory above the home (as given and with symlinks resolved) must belong to
    root or this user, and be writable by group or others only if it is sticky (like
    ``/tmp``, where nobody can rename another user's entry). Otherwise that user could
    swap the home, and its trust store, for their own (P15).
    """
    ensure_home(settings)
    home = settings.home
    uid = os.geteuid()
    for parent in sorted({*home.absolute().parents, *home.resolve().parents}):
        try:
            st = parent.stat()
        except OSError as exc:
            raise ConfigError(f"cannot check {parent}: {exc.strerror}") from exc
        if st.st_uid not in (0, uid):
            raise ConfigError(
                f"the home {home} lies in {parent}, which uid {st.st_uid} owns and could "
                "replace the home in",
                hint="choose a --home whose parent directories belong to root or this user",
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ConfigError(
                f"the home {home} lies in {parent}, which group or others may write "
                f"(mode {stat.S_IMODE(st.st_mode):o}) and could replace the home in",
                hint=f"chmod go-w {parent}, or choose another --home",
            )
