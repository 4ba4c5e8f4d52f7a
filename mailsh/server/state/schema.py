"""The database schema, as migrations: ``MIGRATIONS[n]`` brings version n-1 to n."""

from __future__ import annotations

SCHEMA_VERSION = 3

# Version N-1 -> N. Statements run one by one inside the migration transaction
# (executescript would commit first). Never edit a released entry; append a new one.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE messages (
            spool_id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT,
            state TEXT NOT NULL,
            reason TEXT,
            signer TEXT,
            request_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            received_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        ) STRICT""",
        "CREATE INDEX messages_by_state ON messages (state, updated_at)",
        """CREATE TABLE requests (
            signer TEXT NOT NULL,
            request_id TEXT NOT NULL,
            signature_id TEXT UNIQUE,
            issued_at TEXT NOT NULL,
            request_sha256 TEXT NOT NULL,
            spool_id TEXT NOT NULL,
            claimed_at TEXT NOT NULL,
            claimed_by TEXT NOT NULL,
            finished_at TEXT,
            status TEXT,
            PRIMARY KEY (signer, request_id)
        ) STRICT""",
        "CREATE INDEX requests_unfinished ON requests (claimed_at) WHERE finished_at IS NULL",
        """CREATE TABLE outbound (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            to_addr TEXT NOT NULL,
            from_addr TEXT NOT NULL,
            message BLOB NOT NULL,
            spool_id TEXT NOT NULL,
            request_id TEXT,
            created_at TEXT NOT NULL,
            next_attempt_at TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            last_error_at TEXT,
            sent_at TEXT,
            abandoned_at TEXT
        ) STRICT""",
        "CREATE INDEX outbound_due ON outbound (next_attempt_at, id)"
        " WHERE sent_at IS NULL AND abandoned_at IS NULL",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            event TEXT NOT NULL,
            fields TEXT NOT NULL
        ) STRICT""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
    ),
    # v2: one outcome per request (docs/protocol.md section 9). A notice about a copy of
    # a request is sent at most once; rejected requests are recorded here too, so a copy
    # of a rejected request is a duplicate, not a second verdict.
    2: (
        "ALTER TABLE requests ADD COLUMN notice_sent_at TEXT",
        "CREATE INDEX requests_by_spool_id ON requests (spool_id)",
    ),
    # v3: one spelling for one outcome. The state of a message interrupted by a crash is
    # spelled as its reply status on the wire, outcome-unknown (docs/protocol.md).
    3: ("UPDATE messages SET state = 'outcome-unknown' WHERE state = 'outcome_unknown'",),
}
