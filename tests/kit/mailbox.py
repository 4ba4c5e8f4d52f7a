"""Mailbox writers: deliver into an mbox or a Maildir as an MDA would."""

from __future__ import annotations

import os
import time
from itertools import count
from pathlib import Path

_names = count()


def to_mbox(mail: bytes) -> bytes:
    """One mboxo entry as Postfix local(8) writes it (``From `` quoted, blank line after)."""
    lines = mail.replace(b"\r\n", b"\n").split(b"\n")
    body = b"\n".join(b">" + ln if ln.startswith(b"From ") else ln for ln in lines)
    if not body.endswith(b"\n"):
        body += b"\n"
    return b"From alice@example.org Wed Nov 25 00:00:00 2026\n" + body + b"\n"


def mbox_append(path: Path, *mails: bytes) -> None:
    """Deliver like Postfix local(8): the mboxo entries of ``mails``, in one write."""
    with path.open("ab") as fh:
        fh.write(b"".join(to_mbox(mail) for mail in mails))


def drop_maildir(path: Path, raw: bytes) -> Path:
    """Deliver into a Maildir: write in tmp/, rename into new/."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}.{os.getpid()}_{next(_names)}.test"
    tmp = path / "tmp" / name
    tmp.write_bytes(raw)
    os.rename(tmp, path / "new" / name)
    return path / "new" / name
