"""The outbound worker sends every due reply, through real SMTP on 127.0.0.1."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mailsh.server.outbound import OutboundWorker, mailer_from_settings
from mailsh.server.state import MessageState, StateDB
from mailsh.settings import load_settings
from tests.kit.smtp import Sink


def test_flush_sends_more_than_one_lease_of_replies(tmp_path: Path, sink: Sink) -> None:
    # 150 queued replies: more than one lease_outbound batch (100); found by ./dev bench,
    # where serve --once left 300 of 500 replies queued.
    url = sink.url
    count = 150
    with StateDB.open(tmp_path) as db:
        for i in range(count):
            db.record_message(f"m{i}", "mbox", 10, "h")
            db.finish_with_reply(
                spool_id=f"m{i}",
                state=MessageState.REJECTED,
                to_addr="alice@example.org",
                from_addr="root@server.example",
                message=f"Subject: reply {i}\r\n\r\nreply {i}\r\n".encode(),
            )
        worker = OutboundWorker(db, mailer_from_settings(load_settings(home=tmp_path, smtp=url)))
        assert worker.flush() == count
        assert db.lease_outbound(datetime.now(UTC)) == []
    assert sorted(m.data.split(b"\r\n")[0] for m in sink.messages) == sorted(
        f"Subject: reply {i}".encode() for i in range(count)
    )
    # a burst shares one SMTP connection per lease of replies, not one per reply
    assert len({m.peer for m in sink.messages}) == 2
