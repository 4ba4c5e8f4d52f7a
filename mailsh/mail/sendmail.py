"""Submission through a local ``sendmail`` program (the MTA's own command).

The message goes in on stdin with LF line endings; the envelope is on the command line
(``-f`` sender, ``--`` then the recipients), each address validated first so that none can
pass as an option.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from mailsh.errors import HandoffUnknownError, TransportError, TransportTempError
from mailsh.mail.transport import check_envelope, server_text, to_lf

SENDMAIL_TEMPFAIL = 75
"""sysexits.h EX_TEMPFAIL: the message was not accepted, try again later."""


def send_sendmail(
    path: Path,
    *,
    mail_from: str,
    rcpt_to: Sequence[str],
    message: bytes,
    timeout: float = 60.0,
) -> None:
    """Pipe ``message`` (LF line endings) into ``PATH -i -f FROM -- RCPT...``.

    ``mail_from`` ``""`` becomes ``-f <>`` (null sender). Exit status 75 (EX_TEMPFAIL),
    a timeout or a killed program raise :class:`TransportTempError`; any other failure
    :class:`~mailsh.errors.TransportError` with an excerpt of the program's stderr.
    """
    sender, recipients = check_envelope(mail_from, rcpt_to)
    argv = [str(path), "-i", "-f", sender or "<>", "--", *recipients]
    try:
        proc = subprocess.run(
            argv,
            input=to_lf(message),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise TransportError(
            f"sendmail program {str(path)!r} not found",
            hint="install an MTA (e.g. postfix) or give the right path to sendmail",
        ) from exc
    except PermissionError as exc:
        raise TransportError(
            f"sendmail program {str(path)!r} is not executable",
            hint=f"check the permissions of {path}",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise HandoffUnknownError(
            f"{path} did not finish within {timeout:g} s and was killed; "
            "the message may or may not have been queued",
            hint="check the local MTA (mailq) before resending",
        ) from exc
    except OSError as exc:
        raise TransportError(f"cannot run {path}: {server_text(str(exc))}") from exc
    if proc.returncode == 0:
        return
    stderr = server_text(proc.stderr) or "no error output"
    if proc.returncode == SENDMAIL_TEMPFAIL:
        raise TransportTempError(
            f"{path} exited with 75 (temporary failure): {stderr}",
            hint="the local MTA asked to try again later",
        )
    if proc.returncode < 0:
        raise HandoffUnknownError(
            f"{path} was killed by signal {-proc.returncode}: {stderr}",
            hint="check the local MTA (mailq) before resending",
        )
    raise TransportError(
        f"{path} exited with status {proc.returncode}: {stderr}",
        hint="see the local MTA's log for the reason",
    )
