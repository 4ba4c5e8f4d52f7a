"""Forge hostile OpenPGP messages with the real ``gpg`` command line.

mailsh's own code only ever produces well-formed messages, so attacks are built here
with gpg directly: unsigned literals (``--store``), several signers at once, signatures
made at a faked system time, concatenated packet streams wrapped in a hand-made
``BEGIN PGP MESSAGE`` armor (``gpg --enarmor`` would say ``ARMORED FILE``), and so on.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailsh import protocol
from mailsh.mail.message import build_request_mail

GPG_BATCH = ("--batch", "--yes", "--no-tty", "--pinentry-mode", "loopback", "--passphrase", "")


def gpg(home: Path, *args: str, data: bytes = b"", faked: str | None = None) -> bytes:
    """Run ``gpg --homedir HOME ARGS`` on ``data``; return stdout, raise on failure."""
    cmd = ["gpg", "--homedir", str(home), *GPG_BATCH, "--trust-model", "always"]
    if faked is not None:
        cmd += ["--faked-system-time", faked]
    proc = subprocess.run([*cmd, *args], input=data, capture_output=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"gpg {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


@contextmanager
def scratch_home() -> Iterator[Path]:
    """A throwaway GnuPG home in a short path (agent sockets must fit in 108 bytes)."""
    home = Path(tempfile.mkdtemp(prefix="msf.", dir="/tmp"))
    os.chmod(home, 0o700)
    try:
        yield home
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            check=False,
            capture_output=True,
            timeout=30,
        )
        shutil.rmtree(home, ignore_errors=True)


def fingerprints(home: Path, *, secret: bool = False) -> list[str]:
    """The primary fingerprints in ``home`` (``--with-colons``)."""
    out = gpg(home, "--with-colons", "--list-secret-keys" if secret else "--list-keys")
    fprs: list[str] = []
    want_fpr = False
    for line in out.decode().splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sec"):
            want_fpr = True
        elif fields[0] == "fpr" and want_fpr:
            fprs.append(fields[9])
            want_fpr = False
        elif fields[0] in ("sub", "ssb"):
            want_fpr = False
    return fprs


def copy_secret_key(src: Path, fpr: str, dst: Path) -> None:
    """Copy an (unprotected) secret key from one GnuPG home into another."""
    gpg(dst, "--import", data=gpg(src, "--export-secret-keys", fpr))


def copy_public_key(src: Path, fpr: str, dst: Path) -> None:
    gpg(dst, "--import", data=gpg(src, "--export", fpr))


# --------------------------------------------------------------------------------------
# Armor (RFC 4880 section 6): base64 with a CRC-24 checksum line
# --------------------------------------------------------------------------------------

_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB


def crc24(data: bytes) -> int:
    crc = _CRC24_INIT
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
    return crc & 0xFFFFFF


def armor(packets: bytes, kind: str = "MESSAGE") -> bytes:
    """Wrap raw OpenPGP packets in a ``BEGIN PGP <kind>`` armor with a valid CRC."""
    b64 = base64.b64encode(packets).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    checksum = base64.b64encode(crc24(packets).to_bytes(3, "big")).decode("ascii")
    text = "\n".join(
        [f"-----BEGIN PGP {kind}-----", "", *lines, f"={checksum}", f"-----END PGP {kind}-----"]
    )
    return (text + "\n").encode("ascii")


def dearmor(armored: bytes) -> bytes:
    """The raw packets inside one armored block (the CRC line is not checked)."""
    lines = armored.replace(b"\r\n", b"\n").split(b"\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith(b"-----BEGIN PGP"))
    body_start = lines.index(b"", start) + 1
    b64 = b""
    for line in lines[body_start:]:
        if line.startswith((b"=", b"-----END")):
            break
        b64 += line.strip()
    return base64.b64decode(b64)


# --------------------------------------------------------------------------------------
# Mails
# --------------------------------------------------------------------------------------


def request_mail(
    armored: bytes, *, to_addr: str = "root@server.test", uu_name: str = protocol.UU_FILE_NAME
) -> bytes:
    """A request mail exactly as the client builds it, around any armored bytes."""
    mail, _ = build_request_mail(
        uu_block=protocol.uuencode(armored, name=uu_name),
        from_addr="alice@example.org",
        to_addr=to_addr,
        request_id="0" * 32,
    )
    return mail


def mail_with_body(body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A minimal mail with the given raw body (CRLF headers, body kept byte-exact)."""
    base = {
        "From": "alice@example.org",
        "To": "root@server.test",
        "Subject": "hostile",
        "Message-ID": "<hostile.1@example.org>",
        "MIME-Version": "1.0",
        "Content-Type": "text/plain; charset=us-ascii",
    }
    base.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in base.items()).encode("ascii")
    return head + b"\r\n" + body
