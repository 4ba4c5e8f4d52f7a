"""The ``mailsh status`` report: a list of named sections, for people and for programs.

Each section is built by one function of :data:`SECTIONS` from a :class:`StatusContext`
and returns a :class:`Section` (or None where it does not apply: a client home has no
queue). ``--json`` prints ``{"format": "mailsh.status.v1", "home": ..., KEY: DATA, ...}``
with each section's ``key`` and ``data``; on a terminal (``mailsh.cli.render``) each
section is a heading and either ``label  value`` lines or a table. This module builds
data only: it imports no rich. The JSON schema is documented in
docs/server.md ("mailsh status"); a new section is one more function appended to
:data:`SECTIONS` and one more row in that table. Keys and fields are only ever added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mailsh.units import format_size

if TYPE_CHECKING:
    from mailsh.keys.identity import Identity
    from mailsh.server.state import StateDB
    from mailsh.settings import Settings

STATUS_FORMAT = "mailsh.status.v1"
#: ``messages`` key of mailsh.status.v1 before the states took the wire's spelling
#: (``outcome-unknown``); kept, with the same count, so no v1 reader loses a key.
LEGACY_OUTCOME_UNKNOWN = "outcome_unknown"
RECENT_DECISIONS = 10
"""How many of the latest final decisions the ``recent`` section lists."""
SENT_REQUESTS = 20
"""How many of the latest sent requests the ``sent`` section lists."""
PROBLEM_REASONS = 20
"""How many (state, reason) pairs the ``problems`` section lists, latest first."""
LAST_ERRORS = 5
"""How many of the latest errors the ``last_errors`` section lists."""

JsonValue = Any


@dataclass(frozen=True)
class Section:
    """One part of the report.

    ``data`` is what ``--json`` prints under ``key``. On a terminal: ``rows`` (label,
    value) if given, else a table of ``data`` (a list of dicts) with ``columns`` (field,
    heading), where only the ``wrap`` fields may wrap; ``empty`` is printed instead of
    an empty table; ``note`` follows.
    """

    key: str
    title: str
    data: JsonValue
    rows: list[tuple[str, str]] | None = None
    columns: list[tuple[str, str]] = field(default_factory=list)
    empty: str = "none"
    note: str | None = None
    wrap: frozenset[str] = frozenset({"error", "reason", "command", "ref", "signer"})


@dataclass
class StatusContext:
    """What section builders read. Expensive parts are loaded once, on first use."""

    settings: Settings
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def is_server(self) -> bool:
        return self.settings.state_db.exists()

    @cached_property
    def state(self) -> StateDB:
        from mailsh.server.state import StateDB

        return StateDB(self.settings.state_db)

    @cached_property
    def counts(self) -> dict[str, int]:
        return self.state.report.counts()

    @cached_property
    def identity(self) -> Identity | None:
        from mailsh.keys.gpg import Gpg
        from mailsh.keys.identity import own_identity

        s = self.settings
        return own_identity(Gpg.for_settings(s))

    def close(self) -> None:
        if "state" in self.__dict__:
            self.state.close()


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


def human_time(iso: str | None) -> str:
    """An ISO 8601 UTC time as people read it (``2026-01-02 03:04:05Z``); ``-`` if None."""
    return "-" if iso is None else iso.replace("T", " ").replace("+00:00", "Z")


def _human_bytes(size: int) -> str:
    return format_size(size, byte_unit="bytes")


# -- sections -------------------------------------------------------------------------


def identity_section(ctx: StatusContext) -> Section:
    ident = ctx.identity
    email = None if ident is None else ident.email
    addresses = list(ctx.settings.address) or ([email] if email else [])
    fingerprint = None if ident is None else ident.fingerprint
    data = {
        "fingerprint": fingerprint,
        "email": email,
        "addresses": addresses if ctx.is_server else [],
    }
    rows = [("fingerprint", fingerprint or "none: create one with mailsh keygen")]
    if ctx.is_server:
        rows.insert(0, ("address", ", ".join(addresses) or "none (set --address)"))
    elif email:
        rows.insert(0, ("email", email))
    title = "server identity" if ctx.is_server else "identity"
    return Section("identity", title, data, rows=rows)


def serve_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    from mailsh.server.running import running_servers

    procs = running_servers(ctx.settings.home)
    data = {
        "running": bool(procs),
        "processes": [
            {"pid": p.pid, "host": p.host, "started_at": p.started_at, "sources": list(p.sources)}
            for p in procs
        ],
    }
    if not procs:
        rows = [("running", "no")]
    else:
        rows = [
            ("running", f"yes, pid {p.pid} on {p.host} since {human_time(p.started_at)}")
            for p in procs
        ]
        rows += [("sources", ", ".join(p.sources) or "-") for p in procs[:1]]
    from mailsh.server.cgroup import recorded

    containment = recorded(ctx.settings.home)  # as the last serve on this home chose it
    rows.append(("commands", containment))
    data["command_containment"] = containment
    return Section("serve", "serve", data, rows=rows)


def queue_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    from mailsh.server.diskspace import count_files

    counts = ctx.counts
    pending = count_files(ctx.settings.spool_dir / "new")[0]
    next_retry = _when(ctx.state.outbox.next_due())
    data = {
        "spool_pending": pending,
        "received": counts["received"],
        "executing": counts["executing"],
        "requests_unfinished": counts["requests_unfinished"],
        "outbound_pending": counts["outbound_pending"],
        "outbound_failing": counts["outbound_failing"],
        "outbound_abandoned": counts["outbound_abandoned"],
        "next_retry_at": next_retry,
    }
    outbound = f"{data['outbound_pending']} waiting"
    if data["outbound_failing"]:
        outbound += f", {data['outbound_failing']} after a failed attempt"
    if next_retry is not None:
        outbound += f"; next attempt {human_time(next_retry)}"
    rows = [
        ("received", f"{pending} in the spool, {data['received']} recorded not yet handled"),
        ("executing", str(data["executing"])),
        ("outbound", outbound),
        ("abandoned", f"{data['outbound_abandoned']} replies given up on"),
    ]
    return Section("queue", "queue", data, rows=rows)


def messages_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    from mailsh.server.state import MessageState

    counts = ctx.counts
    data = {state.value: counts[state.value] for state in MessageState}
    rows = [(state.replace("-", " "), str(n)) for state, n in data.items()]
    # The schema only gains keys: the state's spelling before one vocabulary stays too.
    data[LEGACY_OUTCOME_UNKNOWN] = data[MessageState.OUTCOME_UNKNOWN.value]
    return Section("messages", "messages by state", data, rows=rows)


def spool_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    from mailsh.server.diskspace import count_files

    data: dict[str, int] = {}
    rows = []
    for sub in ("new", "done", "quarantine"):
        files, size = count_files(ctx.settings.spool_dir / sub)
        data[f"{sub}_files"], data[f"{sub}_bytes"] = files, size
        rows.append((sub, f"{files} files, {_human_bytes(size)}"))
    data["bytes"] = sum(v for k, v in data.items() if k.endswith("_bytes"))
    rows.append(("total", _human_bytes(data["bytes"])))
    return Section("spool", f"spool ({ctx.settings.spool_dir})", data, rows=rows)


def disk_section(ctx: StatusContext) -> Section | None:
    """Disk use and whether intake is paused by the free-space floor (P: bounded disk)."""
    if not ctx.is_server:
        return None
    from mailsh.server.diskspace import disk_status

    s = ctx.settings
    data = disk_status(s.spool_dir, s.state_db, s.min_free_space)
    rows = [
        ("spool", _human_bytes(int(data["spool_bytes"]))),
        ("state", _human_bytes(int(data["state_db_bytes"]))),
        (
            "free",
            f"{_human_bytes(int(data['free_bytes']))} "
            f"(floor {_human_bytes(int(data['min_free_bytes']))})",
        ),
        ("intake", str(data["intake"])),
    ]
    return Section("disk", "disk", data, rows=rows)


def refused_section(ctx: StatusContext) -> Section | None:
    """Mailboxes intake refused to read (a link or special file planted beside them)."""
    if not ctx.is_server:
        return None
    from mailsh.server.intake.files import read_refusals

    data = [
        {"mailbox": r.mailbox, "reason": r.reason, "since": r.since}
        for r in read_refusals(ctx.settings.spool_dir)
    ]
    return Section(
        "refused_mailboxes",
        "refused mailboxes",
        data,
        columns=[("mailbox", "mailbox"), ("reason", "reason"), ("since", "since")],
        wrap=frozenset({"mailbox", "reason"}),
    )


def problems_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    data = [
        {"state": c.state.value, "reason": c.reason, "count": c.count, "last_at": _when(c.last_at)}
        for c in ctx.state.report.problem_counts(PROBLEM_REASONS)
    ]
    return Section(
        "problems",
        "problems (rejected, discarded, quarantined, duplicate, unreported), per reason",
        data,
        columns=[("count", "count"), ("state", "state"), ("reason", "reason"), ("last_at", "last")],
        empty="none",
        note="reason codes: docs/protocol.md section 6" if data else None,
    )


def errors_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    data = [
        {"at": _when(e.at), "kind": e.kind, "ref": e.ref, "error": e.error}
        for e in ctx.state.report.last_errors(LAST_ERRORS)
    ]
    return Section(
        "last_errors",
        "last errors",
        data,
        columns=[("at", "at"), ("kind", "kind"), ("ref", "id"), ("error", "error")],
    )


def recent_section(ctx: StatusContext) -> Section | None:
    if not ctx.is_server:
        return None
    data = [
        {
            "at": _when(m.updated_at),
            "state": m.state.value,
            "reason": m.reason,
            "message": m.spool_id,
            "signer": m.signer,
            "request_id": m.request_id,
        }
        for m in ctx.state.report.recent_decisions(RECENT_DECISIONS)
    ]
    return Section(
        "recent",
        "recent decisions",
        data,
        columns=[
            ("at", "at"),
            ("state", "state"),
            ("reason", "reason"),
            ("request_id", "request"),
            ("signer", "signer"),
        ],
    )


def sent_section(ctx: StatusContext) -> Section | None:
    """Requests sent from this home (any home with a ``pending/`` directory)."""
    from mailsh.client.pending import PendingStore

    store = PendingStore(ctx.settings.home)
    if ctx.is_server and not store.directory.exists():
        return None
    records = store.all()[-SENT_REQUESTS:][::-1]
    data = []
    for r in records:
        if r.answered_at is not None:
            state = "answered"
        elif ctx.now > r.expires_at:
            state = "expired"
        else:
            state = "waiting"
        data.append(
            {
                "request_id": r.request_id,
                "to": r.to,
                "command": r.command,
                "sent_at": _when(r.created),
                "expires_at": _when(r.expires_at),
                "answered_at": _when(r.answered_at),
                "state": state,
            }
        )
    return Section(
        "sent",
        "requests sent from this home (newest first)",
        data,
        columns=[
            ("request_id", "id"),
            ("to", "to"),
            ("command", "command"),
            ("sent_at", "sent"),
            ("state", "reply"),
        ],
        empty="none yet: mailsh send --to SERVER 'COMMAND'",
        note=(
            "waiting/expired: no reply accepted yet; read it with mailsh wait-reply ID"
            if any(d["state"] != "answered" for d in data)
            else None
        ),
    )


SECTIONS: list[Callable[[StatusContext], Section | None]] = [
    identity_section,
    serve_section,
    queue_section,
    spool_section,
    disk_section,
    refused_section,
    messages_section,
    problems_section,
    errors_section,
    recent_section,
    sent_section,
]
"""The report, in order. Append a builder to add a section (and document its key)."""


def build_report(settings: Settings) -> list[Section]:
    ctx = StatusContext(settings)
    try:
        return [s for s in (build(ctx) for build in SECTIONS) if s is not None]
    finally:
        ctx.close()


def report_json(settings: Settings, sections: list[Section]) -> dict[str, JsonValue]:
    doc: dict[str, JsonValue] = {"format": STATUS_FORMAT, "home": str(settings.home)}
    doc["role"] = "server" if settings.state_db.exists() else "client"
    for section in sections:
        doc[section.key] = section.data
    return doc
