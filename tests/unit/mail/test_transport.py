"""Mail submission (mailsh.mail.transport, smtp, sendmail) against a real aiosmtpd server
on 127.0.0.1 and a real fake sendmail."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr

from mailsh.addresses import InvalidAddressError, validate_address
from mailsh.errors import TransportError, TransportTempError, UsageError
from mailsh.mail import smtp
from mailsh.mail.sendmail import send_sendmail
from mailsh.mail.smtp import SmtpSession, send_smtp
from mailsh.mail.smtp_url import SmtpOptions, SmtpTarget, parse_smtp_url
from mailsh.mail.transport import is_temporary, to_crlf, to_lf, transport_from_settings
from mailsh.settings import load_settings
from tests.kit.smtp import PortZeroController

# A body with a line starting "From " (mboxo would quote it; send_message would mangle it)
# and one starting with "." (dot-stuffing must round-trip).
MESSAGE = (
    b"From: alice@mailsh.test\r\n"
    b"To: bob@mailsh.test\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"From the start\r\n"
    b".hidden line\r\n"
    b"last line\r\n"
)
FROM = "alice@mailsh.test"
TO = "bob@mailsh.test"
PASSWORD = "correct horse"  # noqa: S105 - test credential of a test server


# --------------------------------------------------------------------------- fixtures


@dataclass
class Recorder:
    """aiosmtpd handler keeping every accepted envelope; can refuse on demand."""

    envelopes: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    peers: list[object] = field(default_factory=list)  # the connection of each envelope
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None

    async def handle_RCPT(  # noqa: N802 - aiosmtpd hook
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd hook
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        if self.data_reply is not None:
            return self.data_reply
        sender, content = envelope.mail_from, envelope.original_content
        assert sender is not None
        assert isinstance(content, bytes)
        self.envelopes.append((sender, list(envelope.rcpt_tos), content))
        self.peers.append(session.peer)
        return "250 OK"


@dataclass
class Server:
    recorder: Recorder
    controller: PortZeroController

    def url(self, scheme: str = "smtp", user: str | None = None) -> SmtpTarget:
        prefix = f"{user}@" if user else ""
        return parse_smtp_url(f"{scheme}://{prefix}127.0.0.1:{self.controller.port}")


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"alice", PASSWORD.encode())
    # handled=False: let aiosmtpd answer 535 itself (its default, True, means "already replied").
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
def make_server() -> Iterator[Any]:
    started: list[PortZeroController] = []

    def make(**smtp_kwargs: Any) -> Server:
        recorder = Recorder()
        controller = PortZeroController(
            recorder, hostname="127.0.0.1", port=0, server_hostname="test.invalid", **smtp_kwargs
        )
        controller.start()
        started.append(controller)
        return Server(recorder, controller)

    yield make
    for controller in started:
        controller.stop()


OPTS = SmtpOptions(timeout=10, local_hostname="client.test")


# --------------------------------------------------------------------------- URL parsing


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.org", SmtpTarget("smtp", "mail.example.org", 25)),
        ("smtp://mail.example.org:587", SmtpTarget("smtp", "mail.example.org", 587)),
        ("smtp://mail.example.org:587/", SmtpTarget("smtp", "mail.example.org", 587)),
        ("SMTP://Mail.Example.org", SmtpTarget("smtp", "mail.example.org", 25)),
        ("smtps://mail.example.org", SmtpTarget("smtps", "mail.example.org", 465)),
        ("smtps://bob@mail.example.org:2465", SmtpTarget("smtps", "mail.example.org", 2465, "bob")),
        ("smtp://bob%40example.org@mx:587", SmtpTarget("smtp", "mx", 587, "bob@example.org")),
        ("smtp://bob@example.org@mx:587", SmtpTarget("smtp", "mx", 587, "bob@example.org")),
        ("smtp://[::1]:2525", SmtpTarget("smtp", "::1", 2525)),
        ("smtp://127.0.0.1", SmtpTarget("smtp", "127.0.0.1", 25)),
    ],
)
def test_parse_smtp_url_accepts(url: str, expected: SmtpTarget) -> None:
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://mail.example.org", "unsupported URL scheme"),
        ("mail.example.org:25", "unsupported URL scheme"),
        ("lmtp://mail.example.org", "unsupported URL scheme"),
        ("smtp://bob:secret@mail.example.org", "must not contain a password"),
        ("smtp://mail.example.org/path", "path"),
        ("smtp://mail.example.org?x=1", "path, query or fragment"),
        ("smtp://mail.example.org#frag", "path, query or fragment"),
        ("smtp://", "no host"),
        ("smtp://:25", "no host"),
        ("smtp://mail.example.org:99999", "invalid SMTP URL"),
        ("smtp://mail.example.org:abc", "invalid SMTP URL"),
        ("smtp://mail.example.org:0", "port 0"),
        ("smtp://[::1", "invalid SMTP URL"),
        ("smtp://[zz::1]:25", "invalid SMTP URL"),
        ("smtp://mail example.org", "spaces or control"),
        ("smtp://mail.example.org\r\n", "spaces or control"),
        ("smtp://m%41il.example.org", "invalid host name"),
    ],
)
def test_parse_smtp_url_rejects(url: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_smtp_url(url)
    assert fragment in info.value.message
    assert info.value.hint


def test_password_in_url_hint_names_the_environment_variable() -> None:
    with pytest.raises(UsageError) as info:
        parse_smtp_url("smtp://bob:secret@mail.example.org")
    assert "MAILSH_SMTP_PASSWORD" in (info.value.hint or "")
    assert "secret" not in info.value.message


def test_target_str_brackets_ipv6() -> None:
    assert str(parse_smtp_url("smtps://bob@[::1]")) == "smtps://bob@[::1]:465"


def test_options_repr_hides_password() -> None:
    assert PASSWORD not in repr(SmtpOptions(password=SecretStr(PASSWORD)))


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "addr",
    ["alice@mailsh.test", "a.b+tag@example.org", "root@localhost", "x@[192.0.2.1]",
     "x@[IPv6:2001:db8::1]", "o'neil@xn--bcher-kva.example", "-oQ@example.org"],
)  # fmt: skip
def test_validate_address_accepts(addr: str) -> None:
    assert validate_address(addr) == addr


@pytest.mark.parametrize(
    "addr",
    ["", "alice", "@example.org", "alice@", "alice@@example.org", "Alice <alice@example.org>",
     "<alice@example.org>", "alice@example.org\r\nRCPT TO:<eve@example.org>", "a\x00@example.org",
     "a b@example.org", "ali..ce@example.org", ".alice@example.org", "alice@-example.org",
     "alice@example..org", "\"quoted\"@example.org", "jörg@example.org", "alice@exämple.org",
     "a" * 65 + "@example.org", "a@" + "b" * 250 + ".org", "x@[300.1.1.1]", "x@[IPv6:zz]",
     "alice@example.org,eve@example.org"],
)  # fmt: skip
def test_validate_address_rejects(addr: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        validate_address(addr)
    assert isinstance(info.value, UsageError)
    assert isinstance(info.value, ValueError)  # usable inside pydantic validators


# --------------------------------------------------------------------------- line endings


def test_line_ending_helpers() -> None:
    assert to_crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\r\nd\r\n"
    assert to_lf(b"a\nb\r\nc\rd\r\n") == b"a\nb\nc\nd\n"
    assert to_crlf(MESSAGE) == MESSAGE


# --------------------------------------------------------------------------- SMTP


def test_plain_send_arrives_byte_exact(make_server: Any) -> None:
    server = make_server()
    send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)]


def test_plain_smtp_does_not_load_the_system_ca_store(make_server: Any) -> None:
    # Loading it cost tens of ms per `mailsh send` and per reply (docs/performance.md);
    # plain SMTP on loopback never needs it.
    smtp._system_tls_context.cache_clear()
    server = make_server()
    send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)] * 2
    assert smtp._system_tls_context.cache_info().currsize == 0


def test_session_sends_a_burst_over_one_connection(make_server: Any) -> None:
    server = make_server()
    with SmtpSession(server.url(), OPTS) as session:
        for _ in range(3):
            session.send(mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)] * 3
    assert len(set(server.recorder.peers)) == 1


def test_session_reconnects_when_the_connection_died(make_server: Any) -> None:
    server = make_server()
    with SmtpSession(server.url(), OPTS) as session:
        session.send(mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
        assert session._client is not None
        assert session._client.sock is not None
        session._client.sock.shutdown(socket.SHUT_RDWR)  # gone (server timeout, reset)
        session.send(mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)] * 2
    assert len(set(server.recorder.peers)) == 2


def test_session_failure_drops_the_connection_and_the_next_message_goes(
    make_server: Any,
) -> None:
    server = make_server()
    server.recorder.rcpt_replies["bad@mailsh.test"] = "550 no such user"
    with SmtpSession(server.url(), OPTS) as session:
        with pytest.raises(TransportError):
            session.send(mail_from=FROM, rcpt_to=["bad@mailsh.test"], message=MESSAGE)
        assert session._client is None
        session.send(mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)]


def test_bare_lf_message_arrives_crlf_normalised(make_server: Any) -> None:
    # Regression: aiosmtpd 1.4.6 answers "500 Line too long" to a long bare-LF message.
    server = make_server()
    long_lf = MESSAGE.replace(b"\r\n", b"\n") + b"".join(b"line %d\n" % i for i in range(300))
    send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=long_lf)
    [(_, _, received)] = server.recorder.envelopes
    assert received == long_lf.replace(b"\n", b"\r\n")


def test_null_sender(make_server: Any) -> None:
    server = make_server()
    send_smtp(server.url(), OPTS, mail_from="", rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [("<>", [TO], MESSAGE)]  # aiosmtpd spells it <>


def test_invalid_address_refused_before_connecting(make_server: Any) -> None:
    server = make_server()
    with pytest.raises(UsageError):
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO + "\r\nDATA"], message=MESSAGE)
    with pytest.raises(UsageError):
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[], message=MESSAGE)
    assert server.recorder.envelopes == []


def test_starttls_verified_with_ca_file(make_server: Any, tls_files: tuple[Path, Path]) -> None:
    server = make_server(tls_context=_server_context(tls_files), require_starttls=True)
    options = SmtpOptions(require_tls=True, ca_file=tls_files[0], timeout=10)
    send_smtp(server.url(), options, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)]


def test_starttls_unknown_ca_refused(make_server: Any, tls_files: tuple[Path, Path]) -> None:
    server = make_server(tls_context=_server_context(tls_files))
    with pytest.raises(TransportError) as info:
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert "could not be verified" in info.value.message
    assert "--ca-file" in (info.value.hint or "")
    assert not is_temporary(info.value)
    assert server.recorder.envelopes == []


def test_implicit_tls(make_server: Any, tls_files: tuple[Path, Path]) -> None:
    server = make_server(ssl_context=_server_context(tls_files))
    options = SmtpOptions(ca_file=tls_files[0], timeout=10)
    send_smtp(server.url("smtps"), options, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)]


def test_bad_ca_file_is_a_usage_error(make_server: Any, tmp_path: Path) -> None:
    server = make_server()
    options = SmtpOptions(ca_file=tmp_path / "missing.pem")
    with pytest.raises(UsageError, match="cannot load CA file"):
        send_smtp(server.url(), options, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)


def test_require_tls_without_starttls(make_server: Any) -> None:
    server = make_server()
    with pytest.raises(TransportError) as info:
        send_smtp(
            server.url(), SmtpOptions(require_tls=True, timeout=10),
            mail_from=FROM, rcpt_to=[TO], message=MESSAGE,
        )  # fmt: skip
    assert "does not offer STARTTLS and TLS is required" in info.value.message
    assert server.recorder.envelopes == []


def test_auth_over_starttls(make_server: Any, tls_files: tuple[Path, Path]) -> None:
    server = make_server(tls_context=_server_context(tls_files), authenticator=_authenticate)
    options = SmtpOptions(ca_file=tls_files[0], password=SecretStr(PASSWORD), timeout=10)
    send_smtp(server.url(user="alice"), options, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)]


def test_auth_wrong_password(make_server: Any) -> None:
    # Loopback: the password may go in clear (the server only offers AUTH without TLS here).
    server = make_server(authenticator=_authenticate, auth_require_tls=False)
    options = SmtpOptions(password=SecretStr("wrong"), timeout=10)
    with pytest.raises(TransportError) as info:
        send_smtp(server.url(user="alice"), options, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert "SMTP login as 'alice' failed" in info.value.message
    assert "535" in info.value.message
    assert "MAILSH_SMTP_PASSWORD" in (info.value.hint or "")
    assert "wrong" not in info.value.message
    assert server.recorder.envelopes == []


def test_auth_user_without_password(make_server: Any) -> None:
    server = make_server(authenticator=_authenticate, auth_require_tls=False)
    with pytest.raises(UsageError) as info:
        send_smtp(server.url(user="alice"), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert info.value.hint is not None
    assert "export MAILSH_SMTP_PASSWORD=" in info.value.hint


def test_auth_not_offered(make_server: Any) -> None:
    server = make_server()
    options = SmtpOptions(password=SecretStr(PASSWORD), timeout=10)
    with pytest.raises(TransportError, match="does not offer SMTP AUTH"):
        send_smtp(server.url(user="alice"), options, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)


def test_connection_refused_names_host_and_port() -> None:
    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        target = parse_smtp_url(f"smtp://127.0.0.1:{port}")
        with pytest.raises(TransportTempError) as info:
            send_smtp(target, OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert f"127.0.0.1:{port}" in info.value.message
    assert "refused" in info.value.message
    assert "running" in (info.value.hint or "")


def test_dns_failure() -> None:
    target = parse_smtp_url("smtp://no-such-host.invalid:25")
    with pytest.raises(TransportError, match=r"cannot resolve host 'no-such-host\.invalid'"):
        send_smtp(target, OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)


def test_timeout() -> None:
    with socket.socket() as sock:  # listening but never answering: the greeting times out
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        target = parse_smtp_url(f"smtp://127.0.0.1:{sock.getsockname()[1]}")
        with pytest.raises(TransportTempError, match="timed out"):
            send_smtp(
                target, SmtpOptions(timeout=0.3), mail_from=FROM, rcpt_to=[TO], message=MESSAGE
            )


def test_recipient_refused_names_the_recipient(make_server: Any) -> None:
    server = make_server()
    server.recorder.rcpt_replies["nobody@mailsh.test"] = "550 5.1.1 no such user"
    with pytest.raises(TransportError) as info:
        send_smtp(
            server.url(), OPTS, mail_from=FROM, rcpt_to=["nobody@mailsh.test"], message=MESSAGE
        )
    assert "<nobody@mailsh.test>" in info.value.message
    assert "550" in info.value.message
    assert not is_temporary(info.value)


def test_some_recipients_refused(make_server: Any) -> None:
    server = make_server()
    server.recorder.rcpt_replies["nobody@mailsh.test"] = "550 5.1.1 no such user"
    with pytest.raises(TransportError) as info:
        send_smtp(
            server.url(), OPTS, mail_from=FROM, rcpt_to=[TO, "nobody@mailsh.test"], message=MESSAGE
        )
    assert "<nobody@mailsh.test>" in info.value.message
    assert "other recipients got the message" in info.value.message
    assert server.recorder.envelopes == [(FROM, [TO], MESSAGE)]


def test_recipient_temporarily_refused(make_server: Any) -> None:
    server = make_server()
    server.recorder.rcpt_replies[TO] = "450 4.2.0 mailbox busy"
    with pytest.raises(TransportTempError) as info:
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert is_temporary(info.value)


def test_temporary_failure_at_data(make_server: Any) -> None:
    server = make_server()
    server.recorder.data_reply = "451 4.3.0 try again later"
    with pytest.raises(TransportTempError) as info:
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert "451" in info.value.message
    assert "temporary" in info.value.message


def test_permanent_failure_at_data(make_server: Any) -> None:
    server = make_server()
    server.recorder.data_reply = "554 5.7.1 rejected as spam"
    with pytest.raises(TransportError) as info:
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert "554 5.7.1 rejected as spam" in info.value.message
    assert not is_temporary(info.value)


def test_message_too_large(make_server: Any) -> None:
    server = make_server(data_size_limit=100)
    with pytest.raises(TransportError) as info:
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE * 10)
    assert "too large" in info.value.message
    assert "552" in info.value.message
    assert not is_temporary(info.value)


# --------------------------------------------------------------------------- sendmail

FAKE_SENDMAIL = """#!/bin/sh
# Records its arguments (one per line) and stdin, like a real sendmail would take them.
dir=$(dirname "$0")
printf '%s\\n' "$@" > "$dir/argv"
cat > "$dir/stdin"
if [ -n "$FAKE_EXIT" ]; then echo "fake: queue file write error" >&2; exit "$FAKE_EXIT"; fi
exit 0
"""


@pytest.fixture
def fake_sendmail(tmp_path: Path) -> Path:
    path = tmp_path / "sendmail"
    path.write_text(FAKE_SENDMAIL)
    path.chmod(0o755)
    return path


def test_sendmail_args_and_lf_bytes(fake_sendmail: Path) -> None:
    send_sendmail(fake_sendmail, mail_from=FROM, rcpt_to=[TO, "-oQ@mailsh.test"], message=MESSAGE)
    argv = (fake_sendmail.parent / "argv").read_text().splitlines()
    assert argv == ["-i", "-f", FROM, "--", TO, "-oQ@mailsh.test"]
    assert (fake_sendmail.parent / "stdin").read_bytes() == MESSAGE.replace(b"\r\n", b"\n")


def test_sendmail_null_sender(fake_sendmail: Path) -> None:
    send_sendmail(fake_sendmail, mail_from="", rcpt_to=[TO], message=MESSAGE)
    argv = (fake_sendmail.parent / "argv").read_text().splitlines()
    assert argv == ["-i", "-f", "<>", "--", TO]


def test_sendmail_tempfail(fake_sendmail: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EXIT", "75")
    with pytest.raises(TransportTempError) as info:
        send_sendmail(fake_sendmail, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert "75" in info.value.message
    assert "queue file write error" in info.value.message


def test_sendmail_permanent_failure(fake_sendmail: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EXIT", "67")
    with pytest.raises(TransportError) as info:
        send_sendmail(fake_sendmail, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert not is_temporary(info.value)
    assert "status 67" in info.value.message
    assert "queue file write error" in info.value.message


def test_sendmail_missing(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="not found"):
        send_sendmail(tmp_path / "nope", mail_from=FROM, rcpt_to=[TO], message=MESSAGE)


def test_sendmail_timeout(tmp_path: Path) -> None:
    path = tmp_path / "sendmail"
    path.write_text("#!/bin/sh\nexec sleep 30\n")
    path.chmod(0o755)
    with pytest.raises(TransportTempError, match="did not finish"):
        send_sendmail(path, mail_from=FROM, rcpt_to=[TO], message=MESSAGE, timeout=0.3)


def test_the_timeout_settings_reach_the_transport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sendmail"
    path.write_text("#!/bin/sh\nexec sleep 30\n")
    path.chmod(0o755)
    monkeypatch.setenv("MAILSH_SENDMAIL_TIMEOUT", "0.3")
    monkeypatch.setenv("MAILSH_SMTP_TIMEOUT", "7")
    by_sendmail = transport_from_settings(load_settings(home=tmp_path, sendmail=path))
    with pytest.raises(TransportTempError, match=r"did not finish within 0\.3 s"):
        by_sendmail.submit(mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    by_smtp = transport_from_settings(load_settings(home=tmp_path, smtp="smtp://127.0.0.1:1"))
    assert by_smtp.smtp_options is not None
    assert by_smtp.smtp_options.timeout == 7


def test_hostile_server_text_reaches_the_user_as_one_printable_line(make_server: Any) -> None:
    server = make_server()
    server.recorder.data_reply = "554 5.7.1 no\x1b[2J\x1b]0;owned\x07 thanks\u202e"
    with pytest.raises(TransportError) as info:
        send_smtp(server.url(), OPTS, mail_from=FROM, rcpt_to=[TO], message=MESSAGE)
    assert "554 5.7.1 no [2J ]0;owned thanks" in info.value.message
    assert info.value.message.isprintable()
