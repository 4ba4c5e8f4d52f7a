"""The outbound worker sends every due reply, through real SMTP on 127.0.0.1."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailsh.server.outbound import ReplySender, send_mail_from_settings
from mailsh.server.state import MailToQueue, StateDB
from mailsh.settings import load_settings
from tests.kit.smtp import Sink


def test_flush_sends_more_than_one_lease_of_replies(tmp_path: Path, sink: Sink) -> None:
    # 150 queued replies: more than one outbox.lease batch (100); found by ./dev bench,
    # where serve --once left 300 of 500 replies queued.
    url = sink.url
    count = 150
    with StateDB(tmp_path / "state.db") as db:
        for i in range(count):
            db.messages.record(f"m{i}", "mbox", 10, "h")
            assert db.requests.record_rejection(
                spool_id=f"m{i}",
                signer="A" * 40,
                request_id=f"r{i}",
                issued_at=datetime.now(UTC),
                request_sha256="1" * 64,
                reason="audience",
                reply=MailToQueue(
                    to_addr="alice@example.org",
                    from_addr="root@server.example",
                    message=f"Subject: reply {i}\r\n\r\nreply {i}\r\n".encode(),
                ),
            )
        settings = load_settings(home=tmp_path, smtp=url)
        worker = ReplySender(db, send_mail_from_settings(settings), settings)
        assert worker.flush() == count
        assert db.outbox.lease(datetime.now(UTC), lease=timedelta(minutes=5)) == []
    assert sorted(m.data.split(b"\r\n")[0] for m in sink.messages) == sorted(
        f"Subject: reply {i}".encode() for i in range(count)
    )
    # a burst shares one SMTP connection per lease of replies, not one per reply
    assert len({m.peer for m in sink.messages}) == 2
