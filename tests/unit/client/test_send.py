"""mailsh.client.send and .pending against a real aiosmtpd server and real GnuPG homes.

The SMTP sink, the client rig (a test "server" built from the library) and the mailbox
writers are in :mod:`tests.kit`.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailsh.client.pending import (
    KEEP_RECORDS,
    PendingRequest,
    PendingStore,
    UnknownRequestError,
)
from mailsh.client.send import (
    build_request,
    mbox_mark,
    prepare_request,
    read_stdin_arg,
    submit_request,
)
from mailsh.errors import (
    ConfigError,
    ExitCode,
    IdentityError,
    TransportError,
    TrustError,
    UsageError,
)
from mailsh.home import ensure_home
from mailsh.keys.gpg import Gpg
from mailsh.mail.smtp_url import SmtpOptions, parse_smtp_url
from mailsh.mail.transport import Transport, transport_from_settings
from mailsh.settings import load_settings
from tests.kit.clientkit import Rig, open_as_server
from tests.kit.mailbox import mbox_append
from tests.kit.smtp import Sink, free_port

# ------------------------------------------------------------- prepare_request + submit_request


def test_send_submits_crlf_mail_the_server_can_open_and_records_it(rig: Rig, sink: Sink) -> None:
    settings = rig.settings(smtp=sink.url)
    sent = submit_request(
        settings, prepare_request(settings, rig.client.gpg, command="echo hi", to=rig.server.email)
    )
    sink.wait_for(1)
    mail_from, rcpts, raw, _ = sink.messages[0]
    assert (mail_from, rcpts) == (rig.client.email, [rig.server.email])
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only, no bare LF
    verified = open_as_server(rig, raw)
    assert verified.encrypted
    assert verified.request_id == sent.request_id
    assert verified.command == "echo hi"
    assert verified.payload_sha256 == sent.pending.payload_sha256
    assert sent.sealed.request.audience.fingerprint == rig.server.fingerprint
    record = PendingStore(settings.home).load(sent.request_id)
    assert record == sent.pending
    assert record.server_fingerprint == rig.server.fingerprint
    assert record.message_id == sent.sealed.message_id
    assert record.expires_at - record.created <= timedelta(seconds=settings.request_lifetime)
    path = PendingStore(settings.home).path_for(sent.request_id)
    assert path.stat().st_mode & 0o077 == 0


def test_send_carries_stdin_timeout_and_window(rig: Rig, sink: Sink) -> None:
    settings = rig.settings(smtp=sink.url, request_lifetime=120)
    sent = submit_request(
        settings,
        prepare_request(
            settings,
            rig.client.gpg,
            command="cat",
            to=rig.server.email,
            stdin=b"\x00\xff binary",
            timeout=5,
        ),
    )
    sink.wait_for(1)
    verified = open_as_server(rig, sink.messages[0].data)
    assert verified.stdin == b"\x00\xff binary"
    assert verified.timeout == 5
    request = sent.sealed.request
    assert request.expires_at - request.issued_at == timedelta(seconds=120)


def test_no_encrypt_to_unknown_server_warns_and_leaves_audience_unbound(
    rig: Rig, sink: Sink
) -> None:
    warnings: list[str] = []
    settings = rig.settings(smtp=sink.url)
    sent = submit_request(
        settings,
        prepare_request(
            settings,
            rig.client.gpg,
            command="id",
            to="other@server.test",
            encrypt=False,
            on_warning=warnings.append,
        ),
    )
    assert not sent.encrypted
    assert sent.pending.server_fingerprint is None
    assert sent.sealed.request.audience.fingerprint is None
    assert any("NOT encrypted" in w for w in warnings)
    assert any("no reply can be verified" in w and "mailsh trust add" in w for w in warnings)
    sink.wait_for(1)
    verified = open_as_server(rig, sink.messages[0].data, address="other@server.test")
    assert not verified.encrypted


def test_no_encrypt_to_trusted_server_still_binds_its_key(rig: Rig, sink: Sink) -> None:
    settings = rig.settings(smtp=sink.url)
    sent = submit_request(
        settings,
        prepare_request(settings, rig.client.gpg, command="id", to=rig.server.email, encrypt=False),
    )
    assert not sent.encrypted
    assert sent.sealed.request.audience.fingerprint == rig.server.fingerprint


def test_unknown_server_key_is_an_error_with_the_trust_hint(rig: Rig, sink: Sink) -> None:
    with pytest.raises(TrustError) as err:
        settings = rig.settings(smtp=sink.url)
        submit_request(
            settings, prepare_request(settings, rig.client.gpg, command="id", to="x@unknown.test")
        )
    assert err.value.hint is not None
    assert "mailsh trust add" in err.value.hint
    assert sink.messages == []


def test_wait_requires_the_server_key_even_without_encryption(rig: Rig, sink: Sink) -> None:
    with pytest.raises(TrustError, match="could not be verified"):
        settings = rig.settings(smtp=sink.url)
        submit_request(
            settings,
            prepare_request(
                settings,
                rig.client.gpg,
                command="id",
                to="x@unknown.test",
                encrypt=False,
                require_server_key=True,
            ),
        )
    assert sink.messages == []


def test_no_transport_configured(rig: Rig) -> None:
    with pytest.raises(ConfigError) as err:
        settings = rig.settings()
        submit_request(
            settings, prepare_request(settings, rig.client.gpg, command="id", to=rig.server.email)
        )
    assert err.value.hint is not None
    assert "--smtp smtp://host:587" in err.value.hint
    assert "--sendmail /usr/sbin/sendmail" in err.value.hint


def test_both_transports_configured_is_refused(rig: Rig) -> None:
    with pytest.raises(UsageError, match="choose one"):
        transport_from_settings(rig.settings(smtp="smtp://h:587", sendmail=Path("/bin/true")))


def test_transport_from_settings_carries_tls_options(rig: Rig, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    out = transport_from_settings(
        rig.settings(smtp="smtps://me@mail.test", require_tls=True, smtp_ca_file=ca)
    )
    assert out.smtp == parse_smtp_url("smtps://me@mail.test")
    assert out.smtp_options == SmtpOptions(require_tls=True, ca_file=ca, password=None)


def test_no_identity_hints_keygen(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path / "empty", smtp="smtp://127.0.0.1:25")
    ensure_home(settings)
    gpg = Gpg.for_settings(settings)
    try:
        with pytest.raises(IdentityError) as err:
            submit_request(
                settings, prepare_request(settings, gpg, command="id", to="root@server.test")
            )
    finally:
        gpg.kill_agent()
    assert err.value.hint is not None
    assert "mailsh keygen --email" in err.value.hint


def test_refused_connection_removes_the_pending_record(rig: Rig) -> None:
    settings = rig.settings(smtp=f"smtp://127.0.0.1:{free_port()}")
    before = {r.request_id for r in PendingStore(settings.home).all()}
    with pytest.raises(TransportError, match="refused"):
        submit_request(
            settings, prepare_request(settings, rig.client.gpg, command="id", to=rig.server.email)
        )
    assert {r.request_id for r in PendingStore(settings.home).all()} == before


def test_sendmail_transport_gets_lf_mail(rig: Rig, tmp_path: Path) -> None:
    captured = tmp_path / "captured"
    program = tmp_path / "sendmail"
    program.write_text(f'#!/bin/sh\necho "$@" > {captured}.args\ncat > {captured}\n')
    program.chmod(0o755)
    settings = rig.settings(sendmail=program)
    sent = submit_request(
        settings, prepare_request(settings, rig.client.gpg, command="id", to=rig.server.email)
    )
    raw = captured.read_bytes()
    assert b"\r\n" not in raw
    assert open_as_server(rig, raw).request_id == sent.request_id
    assert (captured.parent / "captured.args").read_text().split() == [
        "-i",
        "-f",
        rig.client.email,
        "--",
        rig.server.email,
    ]


def test_from_address_setting_wins_over_key_email(rig: Rig, sink: Sink) -> None:
    settings = rig.settings(smtp=sink.url, from_address="ops@client.test")
    sent = submit_request(
        settings,
        prepare_request(
            settings,
            rig.client.gpg,
            command="id",
            to=rig.server.email,
        ),
    )
    sink.wait_for(1)
    assert sink.messages[0].mail_from == "ops@client.test"
    assert sent.sealed.request.reply_to == "ops@client.test"


def test_transport_needs_exactly_one_way() -> None:
    with pytest.raises(UsageError):
        Transport()


# --------------------------------------------------------------------------- pieces


def test_build_request_rejects_bad_values_with_usage_error() -> None:
    with pytest.raises(UsageError, match="timeout"):
        build_request(
            to="root@server.test",
            server_fingerprint=None,
            reply_to="op@client.test",
            command="id",
            stdin=None,
            timeout=10**6,
            now=datetime.now(UTC),
            lifetime=timedelta(hours=1),
        )
    with pytest.raises(UsageError, match="command"):
        build_request(
            to="root@server.test",
            server_fingerprint=None,
            reply_to="op@client.test",
            command="a\x00b",
            stdin=None,
            timeout=None,
            now=datetime.now(UTC),
            lifetime=timedelta(hours=1),
        )


def test_read_stdin_arg_file_dash_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "in"
    data.write_bytes(b"0123456789")
    assert read_stdin_arg(str(data)) == b"0123456789"
    with pytest.raises(UsageError, match="larger than 4 bytes"):
        read_stdin_arg(str(data), max_bytes=4)
    with pytest.raises(UsageError, match="cannot read"):
        read_stdin_arg(str(tmp_path / "missing"))

    class FakeStdin:
        buffer = io.BytesIO(b"from the pipe")

    monkeypatch.setattr("sys.stdin", FakeStdin())
    assert read_stdin_arg("-") == b"from the pipe"


def test_mbox_mark_only_at_a_message_boundary(tmp_path: Path) -> None:
    box = tmp_path / "mbox"
    assert mbox_mark(box) is None  # missing
    box.write_bytes(b"")
    empty = mbox_mark(box)
    assert empty is not None
    assert empty.offset == 0
    mbox_append(box, b"Subject: x\n\nhello\n")
    mark = mbox_mark(box)
    assert mark is not None
    assert mark.offset == box.stat().st_size
    assert mark.inode == box.stat().st_ino
    with open(box, "ab") as fh:
        fh.write(b"From half-written\nSubject: y\n")
    assert mbox_mark(box) is None


# --------------------------------------------------------------------------- pending store


def _record(request_id: str, created: datetime) -> PendingRequest:
    return PendingRequest(
        request_id=request_id,
        to="root@server.test",
        server_fingerprint="A" * 40,
        payload_sha256="0" * 64,
        message_id="<m@client.test>",
        created=created,
        expires_at=created + timedelta(hours=1),
    )


def test_pending_store_round_trip_mark_answered_and_prune(tmp_path: Path) -> None:
    store = PendingStore(tmp_path)
    now = datetime.now(UTC).replace(microsecond=0)
    fresh = _record("a" * 32, now)
    old = _record("b" * 32, now - KEEP_RECORDS - timedelta(days=1))
    store.save(fresh)
    store.save(old)
    assert store.load("a" * 32) == fresh
    assert [r.request_id for r in store.all()] == ["b" * 32, "a" * 32]
    done = store.mark_answered(fresh, now=now)
    assert store.load("a" * 32).answered_at == now == done.answered_at
    assert store.prune(now=now) == 1
    assert [r.request_id for r in store.all()] == ["a" * 32]
    assert not list(tmp_path.glob("pending/.pending.*"))  # no temp files left


@pytest.mark.parametrize("bad", ["nope", "../../etc/passwd", "A" * 32, "a" * 31])
def test_pending_store_refuses_ids_that_are_not_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnknownRequestError) as err:
        PendingStore(tmp_path).load(bad)
    assert err.value.exit_code == ExitCode.FAILURE


def test_unknown_request_id_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(UnknownRequestError, match="no request") as err:
        PendingStore(tmp_path).load("c" * 32)
    assert err.value.exit_code == ExitCode.FAILURE
    assert err.value.hint is not None
    assert "mailsh send" in err.value.hint


def test_damaged_pending_record_is_reported(tmp_path: Path) -> None:
    store = PendingStore(tmp_path)
    store.directory.mkdir()
    store.path_for("d" * 32).write_text("{not json")
    with pytest.raises(Exception, match="damaged"):
        store.load("d" * 32)
    assert store.all() == []
