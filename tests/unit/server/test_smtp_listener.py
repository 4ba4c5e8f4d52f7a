"""The embedded SMTP listener, driven by real smtplib clients over 127.0.0.1 port 0."""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Iterator

import pytest

from mailsh.errors import TransportError
from mailsh.mail.watch import Watcher
from mailsh.server.intake.smtp import SPOOL_SOURCE, SmtpListener, spool_id
from mailsh.server.spool import Spool, SpooledMessage

OURS = "run@mailsh.test"
FROM = "alice@client.test"
MESSAGE = (
    b"From: alice@client.test\r\n"
    b"To: run@mailsh.test\r\n"
    b"Subject: x\r\n"
    b"\r\n"
    b"From the start\r\n"
    b".dot line\r\n"
    b"end\r\n"
)


def _accept(address: str) -> bool:
    return address.lower() == OURS


class FlakySpool:
    """A real Spool whose next ``failures`` puts raise, like a full or broken disk."""

    def __init__(self, spool: Spool, failures: int) -> None:
        self.spool = spool
        self.failures = failures

    def put(self, data: bytes, *, source: str) -> SpooledMessage:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return self.spool.put(data, source=source)


@pytest.fixture
def watcher(spool: Spool) -> Iterator[Watcher]:
    """What wakes ``mailsh serve`` after an SMTP delivery: its watcher on the spool."""
    with Watcher([spool.root]) as watching:
        yield watching


@pytest.fixture
def listener(spool: Spool) -> Iterator[SmtpListener]:
    with SmtpListener(
        host="127.0.0.1",
        port=0,
        spool=spool,
        accept=_accept,
        max_message_bytes=10_000,
        hostname="mx.mailsh.test",
    ) as running:
        yield running


def _client(listener: SmtpListener) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", listener.port, local_hostname="client.test", timeout=10)


def _contents(spool: Spool) -> list[bytes]:
    return [spool.read(msg, 10**7) for msg in spool.pending()]


def test_port_zero_records_the_bound_port(listener: SmtpListener) -> None:
    assert listener.port != 0
    with _client(listener) as client:
        code, _ = client.noop()
    assert code == 250


def test_accepted_message_is_spooled_byte_exact_before_250(
    watcher: Watcher, listener: SmtpListener, spool: Spool
) -> None:
    assert not watcher.wait(timeout=0)
    with _client(listener) as client:
        client.ehlo()
        assert client.has_extn("size")
        assert client.esmtp_features["size"] == "10000"
        assert client.mail(FROM)[0] == 250
        assert client.rcpt(OURS)[0] == 250
        code, text = client.data(MESSAGE)
        # The message is durable by the time the client reads 250.
        [stored] = spool.pending()
    assert code == 250
    assert text.decode() == f"2.0.0 queued as {stored.id}"
    assert stored.source == SPOOL_SOURCE
    assert spool.read(stored, 10**6) == MESSAGE
    assert watcher.wait(timeout=10)  # the daemon's watcher wakes for it


def test_null_sender_accepted(listener: SmtpListener, spool: Spool) -> None:
    # Bounces must reach the daemon, which logs and discards them: the null sender is
    # recorded as a local delivery agent records it, so the processor can tell.
    with _client(listener) as client:
        client.sendmail("", [OURS], MESSAGE)
    assert _contents(spool) == [b"Return-Path: <>\r\n" + MESSAGE]


def test_foreign_recipient_refused_and_nothing_spooled(
    listener: SmtpListener, spool: Spool
) -> None:
    with _client(listener) as client:
        client.ehlo()
        client.mail(FROM)
        code, text = client.rcpt("victim@elsewhere.example")
        assert (code, text) == (550, b"5.1.1 not a mailsh address here")
        client.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(FROM, ["victim@elsewhere.example"], MESSAGE)
    assert spool.pending() == []


def test_mixed_recipients_only_ours_taken(listener: SmtpListener, spool: Spool) -> None:
    with _client(listener) as client:
        refused = client.sendmail(FROM, ["victim@elsewhere.example", OURS], MESSAGE)
    assert list(refused) == ["victim@elsewhere.example"]
    assert _contents(spool) == [MESSAGE]


def test_oversize_refused_at_mail_from_when_size_declared(
    listener: SmtpListener, spool: Spool
) -> None:
    with _client(listener) as client, pytest.raises(smtplib.SMTPSenderRefused) as info:
        client.sendmail(FROM, [OURS], MESSAGE + b"x" * 20_000 + b"\r\n")
    assert info.value.smtp_code == 552
    assert spool.pending() == []


def test_oversize_refused_after_data_without_size(listener: SmtpListener, spool: Spool) -> None:
    big = MESSAGE + b"".join(b"%0100d\r\n" % i for i in range(200))
    with _client(listener) as client:
        client.ehlo()
        client.mail(FROM)  # no SIZE= parameter
        client.rcpt(OURS)
        code, _ = client.data(big)
        assert code == 552
        # The session goes on.
        client.sendmail(FROM, [OURS], MESSAGE)
    assert _contents(spool) == [MESSAGE]


def test_spool_failure_answers_451_and_listener_keeps_serving(spool: Spool) -> None:
    flaky = FlakySpool(spool, failures=1)
    with SmtpListener(
        host="127.0.0.1", port=0, spool=flaky, accept=_accept, hostname="mx.mailsh.test"
    ) as listener:
        with _client(listener) as client, pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(FROM, [OURS], MESSAGE)
        assert info.value.smtp_code == 451
        assert spool.pending() == []
        with _client(listener) as client:
            client.sendmail(FROM, [OURS], MESSAGE)
    assert _contents(spool) == [MESSAGE]


def test_accept_raising_answers_451(spool: Spool) -> None:
    def broken(address: str) -> bool:
        raise RuntimeError("trust store unreadable")

    with (
        SmtpListener(
            host="127.0.0.1", port=0, spool=spool, accept=broken, hostname="mx.mailsh.test"
        ) as listener,
        _client(listener) as client,
    ):
        client.ehlo()
        client.mail(FROM)
        assert client.rcpt(OURS)[0] == 451
        assert client.noop()[0] == 250
    assert spool.pending() == []


def _raw(listener: SmtpListener, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        sock.recv(1024)  # greeting
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_garbage_and_broken_clients_do_not_stop_the_listener(
    listener: SmtpListener, spool: Spool
) -> None:
    # Binary junk, an overlong command line, NUL bytes, commands out of order.
    answer = _raw(listener, b"\x00\xff\xfe junk\r\n" + b"A" * 5000 + b"\r\nDATA\r\nRCPT TO:<>\r\n")
    assert answer.startswith(b"500")
    # A client that disconnects in the middle of DATA.
    _raw(
        listener,
        b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<" + OURS.encode() + b">\r\n"
        b"DATA\r\nSubject: half\r\n\r\nno final dot",
    )
    # A client that just connects and drops.
    socket.create_connection(("127.0.0.1", listener.port), timeout=10).close()
    with _client(listener) as client:
        client.sendmail(FROM, [OURS], MESSAGE)
    assert _contents(spool) == [MESSAGE]


def test_bare_lf_client(listener: SmtpListener, spool: Spool) -> None:
    """What a client sending bare-LF line endings sees (aiosmtpd 1.4.6 reads to CRLF).

    A message longer than aiosmtpd's 1001-byte line limit is refused with 500 and the
    client keeps it (nothing lost, nothing spooled). A short one is taken as a single
    "line", so the dot-stuffing smtplib applied after a bare LF is NOT undone and the
    CRLF smtplib appended before the final dot stays: not byte-exact. Harmless for
    OpenPGP armor (no armor line starts with a dot), and RFC 5321 requires CRLF.
    """
    short = MESSAGE.replace(b"\r\n", b"\n")
    long = short + b"".join(b"line %d\n" % i for i in range(300))
    with _client(listener) as client:
        client.sendmail(FROM, [OURS], short)
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(FROM, [OURS], long)
    assert info.value.smtp_code == 500
    assert b"Line too long" in info.value.smtp_error
    assert _contents(spool) == [short.replace(b"\n.dot", b"\n..dot") + b"\r\n"]


def test_concurrent_clients_all_spooled(listener: SmtpListener, spool: Spool) -> None:
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:  # each from its own address: more than one peer may open at once (SmtpLimits)
            with smtplib.SMTP(
                "127.0.0.1", listener.port, timeout=10, source_address=(f"127.0.0.{10 + i}", 0)
            ) as client:
                client.sendmail(FROM, [OURS], MESSAGE + b"client %d\r\n" % i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(_contents(spool)) == sorted(MESSAGE + b"client %d\r\n" % i for i in range(20))


def test_stop_with_idle_client_connected(spool: Spool) -> None:
    listener = SmtpListener(
        host="127.0.0.1", port=0, spool=spool, accept=_accept, hostname="mx.mailsh.test"
    )
    listener.start()
    idle = _client(listener)
    listener.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        idle.noop()
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", listener.port), timeout=10).close()
    listener.stop()  # idempotent


def test_start_on_busy_port_raises(spool: Spool, listener: SmtpListener) -> None:
    other = SmtpListener(host="127.0.0.1", port=listener.port, spool=spool, accept=_accept)
    with pytest.raises(TransportError, match="the port is already in use"):
        other.start()


def test_spool_id_is_printable_and_short(spool: Spool) -> None:
    stored = spool.put(b"x\r\n", source="smtp")
    assert spool_id(stored) == stored.id
    assert spool_id("evil\r\n250 injected " + "x" * 100) == "evil250injected" + "x" * 49


class _BadStored:
    @property
    def id(self) -> str:
        raise RuntimeError("bug in a hook")


class _BuggySpool:
    def put(self, data: bytes, *, source: str) -> object:
        return _BadStored()


def test_unexpected_exception_in_a_hook_answers_451_via_handle_exception() -> None:
    # Regression guard for P11: aiosmtpd's default handle_exception would answer 500 with
    # the exception text; ours logs it and answers 451 so the sender retries.
    with (
        SmtpListener(
            host="127.0.0.1", port=0, spool=_BuggySpool(), accept=_accept, hostname="mx.mailsh.test"
        ) as listener,
        _client(listener) as client,
    ):
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(FROM, [OURS], MESSAGE)
        assert info.value.smtp_code == 451
        assert b"bug in a hook" not in info.value.smtp_error
        assert client.noop()[0] == 250
