"""Requests sent and not yet answered: one small JSON file per request in the home.

``HOME/pending/<request id>.json`` (format ``mailsh.pending.v1``) holds what
``mailsh wait-reply ID`` needs to accept exactly the one reply to that request, from any
shell, later: the server address and pinned fingerprint, the SHA-256 of the signed
payload, the request mail's Message-ID, when it was created and when it expires,
optionally a mark in the reply mbox (where it ended when the request was sent), and the
command's first :data:`COMMAND_PREVIEW` characters (for ``mailsh status``; records
written before it was added have none).

Files are written atomically (temp file, fsync, rename, fsync directory) with mode 0600.
A record is not deleted when its reply is accepted but marked ``answered_at`` (so
``wait-reply ID`` can print the same reply again); records older than
:data:`KEEP_RECORDS` are pruned whenever a new request is recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailsh.errors import MailshError, StateError
from mailsh.fsio import atomic_write
from mailsh.protocol import REQUEST_ID_RE

PENDING_FORMAT = "mailsh.pending.v1"
PENDING_DIR = "pending"
KEEP_RECORDS = timedelta(days=30)
"""How long records are kept: a reply older than this no longer verifies anyway."""

COMMAND_PREVIEW = 200
"""How much of the command a record keeps, to show it in ``mailsh status``."""


class UnknownRequestError(MailshError):
    """No request with this id was sent from this home (exit 255, like every mailsh
    failure of wait-reply, so it cannot be mistaken for a remote exit status)."""


MARK_TAIL_BYTES = 4096
"""Bytes before the mbox mark whose hash must still match for a scan to start there."""


def tail_sha256(fd: int, offset: int) -> str:
    """The hash of the :data:`MARK_TAIL_BYTES` of the open mbox ``fd`` that end at
    ``offset``: taken when the mark is made, compared when a scan would start there."""
    start = max(0, offset - MARK_TAIL_BYTES)
    return hashlib.sha256(os.pread(fd, offset - start, start)).hexdigest()


@dataclass(frozen=True)
class MboxMark:
    """Where the reply mbox ended when the request was sent (a scan may start there).

    Valid only while the file is the same inode, at least ``offset`` long, and the
    bytes just before ``offset`` still hash to ``tail_sha256`` (nothing was rewritten).
    """

    path: str
    device: int
    inode: int
    offset: int
    tail_sha256: str


@dataclass(frozen=True)
class PendingRequest:
    """One sent request, as recorded in the home."""

    request_id: str
    to: str
    server_fingerprint: str | None  # None: sent with --no-encrypt to an unpinned server
    payload_sha256: str
    message_id: str
    created: datetime
    expires_at: datetime
    mbox_mark: MboxMark | None = None
    answered_at: datetime | None = None
    command: str | None = None  # saved as its first COMMAND_PREVIEW characters (status)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["format"] = PENDING_FORMAT
        if self.command is not None:
            doc["command"] = command_preview(self.command)
        for key in ("created", "expires_at", "answered_at"):
            value = getattr(self, key)
            doc[key] = value.isoformat() if value is not None else None
        return doc

    @classmethod
    def from_json(cls, doc: object) -> PendingRequest:
        if not isinstance(doc, dict) or doc.get("format") != PENDING_FORMAT:
            raise ValueError(f"not a {PENDING_FORMAT} record")
        mark = doc.get("mbox_mark")
        answered = doc.get("answered_at")
        return cls(
            request_id=check_request_id(str(doc["request_id"])),
            to=str(doc["to"]),
            server_fingerprint=(
                None if doc.get("server_fingerprint") is None else str(doc["server_fingerprint"])
            ),
            payload_sha256=str(doc["payload_sha256"]),
            message_id=str(doc["message_id"]),
            created=_utc(doc["created"]),
            expires_at=_utc(doc["expires_at"]),
            mbox_mark=None if mark is None else MboxMark(**mark),
            answered_at=None if answered is None else _utc(answered),
            command=None if doc.get("command") is None else str(doc["command"]),
        )


def command_preview(command: str) -> str:
    """``command`` as a record keeps it: at most :data:`COMMAND_PREVIEW` characters."""
    if len(command) <= COMMAND_PREVIEW:
        return command
    return command[: COMMAND_PREVIEW - 1] + "…"


def _utc(value: object) -> datetime:
    parsed = datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        raise ValueError("timestamp without time zone")
    return parsed.astimezone(UTC)


def check_request_id(request_id: str) -> str:
    """``request_id`` if it looks like one mailsh send prints; else UnknownRequestError."""
    if not REQUEST_ID_RE.match(request_id):
        raise UnknownRequestError(
            f"{request_id[:80]!r} is not a request id (32 lowercase hex characters)",
            hint="use the id that mailsh send printed",
        )
    return request_id


class PendingStore:
    """The ``pending/`` directory of one home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.directory = home / PENDING_DIR

    def path_for(self, request_id: str) -> Path:
        return self.directory / f"{check_request_id(request_id)}.json"

    def save(self, record: PendingRequest) -> Path:
        """Write ``record`` atomically and durably; returns its path."""
        target = self.path_for(record.request_id)
        data = (json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n").encode()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(target, data, prefix=".pending.")
        except OSError as exc:
            raise StateError(
                f"cannot record the pending request in {self.directory}: {exc.strerror}",
                hint=f"check that {self.home} is writable (--home / MAILSH_HOME)",
            ) from exc
        return target

    def load(self, request_id: str) -> PendingRequest:
        """The record of ``request_id``; UnknownRequestError with a next step if there is none."""
        path = self.path_for(request_id)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UnknownRequestError(
                f"no request {request_id} was sent from this home ({self.home})",
                hint="check the id printed by mailsh send and use the same --home / "
                f"MAILSH_HOME (the ids sent from here are the file names in {self.directory})",
            ) from None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return PendingRequest.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"the record {path} is damaged ({exc})",
                hint=f"remove {path}; the reply can no longer be matched to its request",
            ) from exc

    def mark_answered(self, record: PendingRequest, *, now: datetime) -> PendingRequest:
        done = replace(record, answered_at=now)
        self.save(done)
        return done

    def all(self) -> list[PendingRequest]:
        """Every readable record, oldest first (damaged files are skipped)."""
        out: list[PendingRequest] = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return out
        except OSError as exc:
            raise StateError(f"cannot list {self.directory}: {exc.strerror}") from exc
        for name in names:
            stem = name.removesuffix(".json")
            if not name.endswith(".json") or not REQUEST_ID_RE.match(stem):
                continue
            with contextlib.suppress(MailshError):
                out.append(self.load(stem))
        return sorted(out, key=lambda r: r.created)

    def prune(self, *, now: datetime) -> int:
        """Remove records created more than :data:`KEEP_RECORDS` ago; returns how many."""
        removed = 0
        for record in self.all():
            if now - record.created > KEEP_RECORDS:
                with contextlib.suppress(OSError):
                    self.path_for(record.request_id).unlink()
                    removed += 1
        return removed
