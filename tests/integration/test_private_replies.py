"""Private replies (docs/security.md P17): relays see only "the reply to request ID".

Real server, real gpg, real mbox intake and a real SMTP sink: the clear-text parts of
the replies to ``true``, ``false``, ``exit 3`` and a rejected request must be identical
once the request id and the per-mail headers (Date, Message-ID, In-Reply-To,
References) are blanked, so nothing of status, exit code or reason is readable outside
the encryption. ``--reply-summary`` puts status and exit code back in clear text.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailsh.client.wait import looks_like_reply
from mailsh.protocol import ReplyStatus
from mailsh.seal import SealedRequest
from mailsh.server.daemon import ServeOptions, Server
from tests.kit.homes import Home
from tests.kit.mailbox import mbox_append
from tests.kit.serverkit import open_reply, request, server_settings
from tests.kit.smtp import Sink

_PER_MAIL_HEADERS = re.compile(rb"^(Date|Message-ID|In-Reply-To|References): .*\r\n", re.M | re.I)


def _clear_text(raw: bytes, request_id: str) -> bytes:
    """Headers and preamble: every byte before the armored (encrypted) block."""
    clear = raw.partition(b"-----BEGIN PGP MESSAGE-----")[0]
    clear = _PER_MAIL_HEADERS.sub(b"", clear)
    return clear.replace(request_id.encode(), b"RID")


def _serve(srv: Home, sink: Sink, tmp_path: Path, *requests: SealedRequest, **over: object) -> None:
    mbox = tmp_path / "root.mbox"
    mbox_append(mbox, *(r.mail for r in requests))
    settings = server_settings(srv, sink, workdir=tmp_path, poll_interval=0.2, **over)
    Server(settings, ServeOptions(mboxes=[mbox], once=True)).run()


def _replies(alice: Home, srv: Home, sink: Sink, *requests: SealedRequest) -> list[bytes]:
    """The raw reply to each request, in the order of ``requests``."""
    by_id = {}
    for msg in sink.messages:
        for sealed in requests:
            if looks_like_reply(msg.data, sealed.request.request_id):
                by_id[sealed.request.request_id] = msg.data
    return [by_id[s.request.request_id] for s in requests]


def test_default_reply_clear_text_says_nothing_of_the_outcome(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    stale = datetime.now(UTC) - timedelta(days=3)
    sent = [
        request(alice, srv, "true"),
        request(alice, srv, "false"),
        request(alice, srv, "echo secret; exit 3"),
        request(alice, srv, "true", issued_at=stale),  # rejected: too old
    ]
    _serve(srv, sink, tmp_path, *sent)
    raws = _replies(alice, srv, sink, *sent)

    outcomes = [open_reply(alice, srv, s, raw) for s, raw in zip(sent, raws, strict=True)]
    assert [(r.status, r.exit_code) for r in outcomes] == [
        (ReplyStatus.OK, 0),
        (ReplyStatus.OK, 1),
        (ReplyStatus.OK, 3),
        (ReplyStatus.REJECTED, None),
    ]
    assert outcomes[3].reason  # the signer still learns why, inside the encryption
    clear = [_clear_text(raw, s.request.request_id) for s, raw in zip(sent, raws, strict=True)]
    assert clear[0] == clear[1] == clear[2] == clear[3]
    assert b"\r\nSubject: mailsh reply RID\r\n" in clear[0]
    for word in (b"status:", b"exit code:", b"rejected", b"[ok]", b"secret"):
        assert word not in clear[0].lower()
    # The client's cheap pre-check still recognises the private form.
    for sealed, raw in zip(sent, raws, strict=True):
        assert looks_like_reply(raw, sealed.request.request_id)


def test_reply_summary_restores_status_and_exit_code_in_clear_text(
    alice: Home, srv: Home, sink: Sink, tmp_path: Path
) -> None:
    sent = request(alice, srv, "false")
    _serve(srv, sink, tmp_path, sent, reply_summary=True)
    [raw] = _replies(alice, srv, sink, sent)
    rid = sent.request.request_id
    assert f"\r\nSubject: mailsh reply {rid} [ok]\r\n".encode() in raw
    assert b"\r\nstatus: ok\r\nexit code: 1\r\n" in _clear_text(raw, rid)
    assert open_reply(alice, srv, sent, raw).exit_code == 1
