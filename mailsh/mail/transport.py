"""Handing one finished RFC 5322 message (bytes) to a mail server.

Used by the client (``mailsh send``) and by the server (replies). Two ways out:

- :func:`send_smtp` speaks SMTP to ``smtp://[user@]host[:port]`` (STARTTLS whenever the
  server offers it) or ``smtps://[user@]host[:port]`` (implicit TLS). Certificates are
  always verified, against the system store or ``ca_file``. A password is never sent in
  clear text to a host other than loopback.
- :func:`send_sendmail` pipes the message into a local ``sendmail`` program.

The message bytes are sent as given apart from line endings: SMTP gets CRLF
(:func:`to_crlf`), sendmail gets LF (:func:`to_lf`). Nothing re-serializes the message,
so body lines starting with ``From `` and signed bytes survive (``smtplib.send_message``
would mangle them).

Every failure is a :class:`~mailsh.errors.TransportError` with a one-line message and a
hint. Failures where trying again later may succeed (4xx replies, connection refused,
timeouts, DNS "try again", sendmail exit 75) are :class:`TransportTempError`; use
:func:`is_temporary` to ask.

Retry policy for the server's outbound queue (documented here because this module
decides what "temporary" means):

- :class:`TransportTempError`: retry with exponential backoff, as an MTA would.
- any other :class:`~mailsh.errors.TransportError`: retry too, but only a few times
  and far apart. "Permanent" here includes failures an operator fixes without touching
  the message (wrong SMTP password, missing CA file, a relay refusing the sender), and a
  reply is the only report the requester gets (docs/security.md P9). A message refused for
  itself (552 too large) will keep failing; the queue should log that and give up.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from mailsh.addresses import validate_address
from mailsh.errors import TransportError, UsageError
from mailsh.text import printable_line

SMTP_DEFAULT_PORT = 25
SMTPS_DEFAULT_PORT = 465
PASSWORD_ENV = "MAILSH_SMTP_PASSWORD"  # noqa: S105 - a variable name
MAX_SERVER_TEXT = 200
"""Characters of a server reply or sendmail stderr quoted in an error message."""
SENDMAIL_TEMPFAIL = 75
"""sysexits.h EX_TEMPFAIL: the message was not accepted, try again later."""

_PASSWORD_HINT = f"export {PASSWORD_ENV}=... (the SMTP password for the user in the URL)"
_URL_HINT = "use smtp://[user@]host[:port] (STARTTLS when offered) or smtps://[user@]host[:port]"


class TransportTempError(TransportError):
    """A sending failure where trying again later may succeed."""

    temporary: ClassVar[bool] = True


class HandoffUnknownError(TransportTempError):
    """The mail may or may not have been accepted: the connection failed after the message
    itself started to go out (SMTP DATA), or sendmail was killed or timed out. A caller
    must treat the message as possibly sent (a request may run)."""


def is_temporary(exc: BaseException) -> bool:
    """Whether retrying the failed send later might help."""
    return isinstance(exc, TransportTempError)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class SmtpTarget:
    """Where to send: a parsed ``smtp://`` or ``smtps://`` URL."""

    scheme: Literal["smtp", "smtps"]
    host: str
    port: int
    user: str | None = None

    @property
    def implicit_tls(self) -> bool:
        """``smtps``: TLS from the first byte (no STARTTLS)."""
        return self.scheme == "smtps"

    @property
    def hostport(self) -> str:
        """``host:port`` with IPv6 literals in brackets, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}://{user}{self.hostport}"


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse ``smtp://[user@]host[:port]`` or ``smtps://[user@]host[:port]``.

    ``smtp`` defaults to port 25 (use ``:587`` for submission), ``smtps`` to 465. IPv6
    literals go in brackets. A user may be percent-encoded. Passwords, paths, queries and
    fragments are refused with a :class:`~mailsh.errors.UsageError`.
    """
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise UsageError(f"SMTP URL {url!r} contains spaces or control characters", hint=_URL_HINT)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"invalid SMTP URL {url!r}: {exc}", hint=_URL_HINT) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps"):
        raise UsageError(
            f"unsupported URL scheme {parts.scheme + ':' if parts.scheme else '(none)'} in {url!r}",
            hint=_URL_HINT,
        )
    if parts.password is not None:
        raise UsageError(
            "the SMTP URL must not contain a password (it would show in process lists "
            "and shell history)",
            hint=f"remove it from the URL and {_PASSWORD_HINT}",
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(
            f"SMTP URL {url!r} must not have a path, query or fragment", hint=_URL_HINT
        )
    host = _check_host(parts.hostname, url)
    if port == 0:
        raise UsageError(f"SMTP URL {url!r} has port 0", hint=_URL_HINT)
    if port is None:
        port = SMTPS_DEFAULT_PORT if scheme == "smtps" else SMTP_DEFAULT_PORT
    user = _check_user(parts.username, url)
    return SmtpTarget(
        scheme="smtps" if scheme == "smtps" else "smtp", host=host, port=port, user=user
    )


def _check_host(host: str | None, url: str) -> str:
    if not host:
        raise UsageError(f"SMTP URL {url!r} has no host", hint=_URL_HINT)
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UsageError(f"invalid IPv6 address {host!r} in SMTP URL", hint=_URL_HINT) from exc
    elif not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise UsageError(f"invalid host name {host!r} in SMTP URL", hint=_URL_HINT)
    return host


def _check_user(username: str | None, url: str) -> str | None:
    if username is None:
        return None
    user = unquote(username)
    if not user or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in user):
        raise UsageError(f"invalid user name in SMTP URL {url!r}", hint=_URL_HINT)
    return user


@dataclass(frozen=True)
class SmtpOptions:
    """How to talk to the SMTP server.

    ``require_tls``: refuse to send anything when the connection cannot be encrypted
    (``smtp://`` to a server not offering STARTTLS). ``ca_file``: PEM file of the CA(s)
    to trust instead of the system store (private CAs, self-signed servers).
    ``password``: for the user in the URL. ``timeout``: seconds per network operation.
    ``local_hostname``: name sent in EHLO (default: this host's FQDN).
    """

    require_tls: bool = False
    ca_file: Path | None = None
    password: SecretStr | None = None
    timeout: float = 30.0
    local_hostname: str | None = None


# --------------------------------------------------------------------------- line endings

_EOL_RE = re.compile(rb"\r\n|\r|\n")


def to_crlf(data: bytes) -> bytes:
    """Turn every line ending (CRLF, bare LF, bare CR) into CRLF, as SMTP requires.

    aiosmtpd 1.4.6 refuses bare-LF messages (``500 Line too long``); Postfix accepts them
    but other servers may not.
    """
    return _EOL_RE.sub(b"\r\n", data)


def to_lf(data: bytes) -> bytes:
    """Turn every line ending into LF, as a local ``sendmail`` expects."""
    return _EOL_RE.sub(b"\n", data)


# --------------------------------------------------------------------------- SMTP


class _TracksData:
    """Notes when the DATA command started: from then on a failure is ambiguous."""

    data_started = False

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_started = True
        reply: tuple[int, bytes] = super().data(msg)  # type: ignore[misc]
        return reply


class _Smtp(_TracksData, smtplib.SMTP):
    pass


class _SmtpSsl(_TracksData, smtplib.SMTP_SSL):
    pass


def send_smtp(
    target: SmtpTarget,
    options: SmtpOptions,
    *,
    mail_from: str,
    rcpt_to: Sequence[str],
    message: bytes,
) -> None:
    """Send ``message`` to ``rcpt_to`` via ``target``; return once the server accepted it.

    ``mail_from`` may be ``""`` (null reverse-path, for automatic replies). Raises
    :class:`~mailsh.errors.UsageError` for bad arguments, :class:`TransportTempError` when
    a later retry may succeed and :class:`~mailsh.errors.TransportError` otherwise.
    """
    with SmtpSession(target, options) as session:
        session.send(mail_from=mail_from, rcpt_to=rcpt_to, message=message)


class SmtpSession:
    """Several messages over one SMTP connection (a burst of replies), opened on the
    first :meth:`send` and closed (QUIT) on exit.

    Each :meth:`send` behaves and fails exactly like :func:`send_smtp`. Before a reused
    connection carries another message it must answer NOOP, else a new one is opened;
    after any failure the connection is dropped and the next message starts afresh.
    Connection, EHLO, STARTTLS and AUTH are paid once per burst instead of once per
    message (docs/performance.md).
    """

    def __init__(self, target: SmtpTarget, options: SmtpOptions) -> None:
        self.target = target
        self.options = options
        self._password = options.password.get_secret_value() if options.password is not None else ""
        # A given --ca-file is loaded (and a bad one refused) before connecting. The
        # system CA store costs tens of ms to load (docs/performance.md), so without
        # --ca-file the context is built only when TLS is actually used, once per process.
        self._context: ssl.SSLContext | None = None
        if options.ca_file is not None:
            try:
                self._context = _tls_context(options.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(
                    f"cannot load CA file {str(options.ca_file)!r}: {_one_line(str(exc))}",
                    hint="--ca-file must name a PEM file of CA certificates",
                ) from exc
        self._client: _Smtp | _SmtpSsl | None = None

    def send(self, *, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> None:
        """Send one message; return once the server accepted it (see :func:`send_smtp`).

        A failure after the message itself started to go out (SMTP DATA) without a
        definite answer raises :class:`HandoffUnknownError`: it may have been accepted.
        """
        target = self.target
        sender, recipients = _check_envelope(mail_from, rcpt_to)
        if target.user is not None and not self._password:
            raise UsageError(
                f"SMTP user {target.user!r} given but no password", hint=_PASSWORD_HINT
            )
        client: _Smtp | _SmtpSsl | None = None
        try:
            client = self._connected()
            client.data_started = False
            refused = client.sendmail(sender, recipients, to_crlf(message))
            if refused:
                raise _recipients_error(refused, target.hostport, all_refused=False)
        except BaseException as exc:
            self._drop()
            if isinstance(exc, TransportError):
                raise
            if isinstance(exc, smtplib.SMTPResponseException):  # a definite answer
                raise _smtp_error(exc, target, sender) from exc
            if isinstance(exc, smtplib.SMTPException | OSError):
                if client is not None and client.data_started:
                    raise HandoffUnknownError(
                        f"the connection to {target.hostport} failed while the message was "
                        f"being sent ({_one_line(str(exc)) or type(exc).__name__}); the "
                        "server may or may not have accepted it",
                        hint="assume it may have been sent",
                    ) from exc
                if isinstance(exc, smtplib.SMTPException):
                    raise _smtp_error(exc, target, sender) from exc
                raise _network_error(exc, target, self.options) from exc
            raise

    def _connected(self) -> _Smtp | _SmtpSsl:
        if self._client is not None:
            try:
                if self._client.noop()[0] == 250:
                    return self._client
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()
        target, options = self.target, self.options
        # Host given to the constructor (which connects): smtplib only remembers it for
        # TLS host name checks then; connect() alone leaves server_hostname empty.
        client: _Smtp | _SmtpSsl
        if target.implicit_tls:
            client = _SmtpSsl(
                target.host,
                target.port,
                local_hostname=options.local_hostname,
                timeout=options.timeout,
                context=self._context or _system_tls_context(),
            )
        else:
            client = _Smtp(
                target.host,
                target.port,
                local_hostname=options.local_hostname,
                timeout=options.timeout,
            )
        try:
            _start_session(client, target, options, context=self._context, password=self._password)
        except BaseException:
            client.close()
            raise
        self._client = client
        return client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        """QUIT and close; every message sent was already accepted, so errors here change
        nothing."""
        if self._client is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                self._client.quit()
            self._drop()

    def __enter__(self) -> SmtpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_session(
    client: smtplib.SMTP,
    target: SmtpTarget,
    options: SmtpOptions,
    *,
    context: ssl.SSLContext | None,
    password: str,
) -> None:
    """EHLO, STARTTLS if offered, AUTH if a user is given."""
    where = target.hostport
    client.ehlo_or_helo_if_needed()
    encrypted = target.implicit_tls
    if not encrypted and client.has_extn("starttls"):
        client.starttls(context=context or _system_tls_context())
        client.ehlo()
        encrypted = True
    if not encrypted and options.require_tls:
        raise TransportError(
            f"{where} does not offer STARTTLS and TLS is required; nothing was sent",
            hint="use smtps:// if the server speaks implicit TLS, or another server",
        )
    if target.user is None:
        return
    if not encrypted and not _is_loopback(target.host):
        raise TransportError(
            f"{where} does not offer STARTTLS; refusing to send the password in clear text",
            hint="use smtps:// or the submission port (587) with STARTTLS",
        )
    if not client.has_extn("auth"):
        raise TransportError(
            f"{where} does not offer SMTP AUTH, but a user is given in the URL",
            hint="remove the user from the URL, or use the submission port (587)",
        )
    client.login(target.user, password)


def _smtp_error(exc: smtplib.SMTPException, target: SmtpTarget, sender: str) -> TransportError:
    """Translate an smtplib failure."""
    where = target.hostport
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return _recipients_error(exc.recipients, where, all_refused=True)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return TransportError(
            f"SMTP login as {target.user!r} failed at {where}: "
            f"{exc.smtp_code} {_text(exc.smtp_error)}",
            hint=f"check the user in the URL and {_PASSWORD_HINT}",
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        what = "said"
        if isinstance(exc, smtplib.SMTPSenderRefused):
            what = f"refused the sender <{sender}>"
        elif isinstance(exc, smtplib.SMTPDataError):
            what = "refused the message"
        elif isinstance(exc, smtplib.SMTPConnectError):
            what = "refused the connection"
        return _reply_error(exc, f"{where} {what}", where)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TransportTempError(
            f"{where} closed the connection unexpectedly ({_one_line(str(exc)) or 'no reason'})",
            hint="this is usually temporary; try again later",
        )
    return TransportError(f"SMTP error with {where}: {_one_line(str(exc))}")


def _network_error(exc: OSError, target: SmtpTarget, options: SmtpOptions) -> TransportError:
    """Translate a socket, DNS or TLS failure."""
    where = target.hostport
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"TLS certificate of {where} could not be verified: "
            f"{_one_line(exc.verify_message or str(exc))}",
            hint="for a private or self-signed CA, pass its certificate with --ca-file",
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(
            f"TLS with {where} failed: {_one_line(str(exc))}",
            hint="check that the port speaks the expected protocol "
            "(smtps:// for implicit TLS, usually 465; smtp:// + STARTTLS, usually 587)",
        )
    if isinstance(exc, ConnectionRefusedError):
        return TransportTempError(
            f"connection to {where} refused",
            hint=f"is the mail server running? check host and port ({where})",
        )
    if isinstance(exc, socket.gaierror):
        error_class = TransportTempError if exc.errno == socket.EAI_AGAIN else TransportError
        return error_class(
            f"cannot resolve host {target.host!r}: {exc.strerror}",
            hint="check the host name in the SMTP URL and the DNS configuration",
        )
    if isinstance(exc, TimeoutError):
        return TransportTempError(
            f"timed out talking to {where} (after {options.timeout:g} s)",
            hint="check host and port, firewalls, or raise the timeout",
        )
    return TransportTempError(
        f"network error talking to {where}: {_one_line(str(exc))}",
        hint=f"check that {where} is reachable",
    )


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:
        return _system_tls_context()
    return ssl.create_default_context(cafile=str(ca_file))


@functools.cache
def _system_tls_context() -> ssl.SSLContext:
    """The default context with the system CA store, loaded once per process.

    Contexts are safe to share between connections and threads; a server picks up a
    changed system CA store when it restarts.
    """
    return ssl.create_default_context()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _recipients_error(
    refused: dict[str, tuple[int, bytes]], where: str, *, all_refused: bool
) -> TransportError:
    parts = [f"<{rcpt}> ({code} {_text(text)})" for rcpt, (code, text) in refused.items()]
    if all_refused:
        message = f"{where} refused the recipient(s): {', '.join(parts)}"
    else:
        message = (
            f"{where} refused some recipient(s): {', '.join(parts)}; "
            "the other recipients got the message"
        )
    temporary = all_refused and all(400 <= code < 500 for code, _ in refused.values())
    error_class = TransportTempError if temporary else TransportError
    hint = (
        "the refusal is temporary; try again later"
        if temporary
        else "check the recipient address; the server does not accept mail for it"
    )
    return error_class(message, hint=hint)


def _reply_error(exc: smtplib.SMTPResponseException, what: str, where: str) -> TransportError:
    code, text = exc.smtp_code, _text(exc.smtp_error)
    if code == 552:
        return TransportError(
            f"{where} refused the message as too large: {code} {text}",
            hint="the server's size limit is lower than the message; send less output",
        )
    if 400 <= code < 500:
        return TransportTempError(
            f"{what}: {code} {text} (temporary failure)",
            hint="the server asked to try again later",
        )
    return TransportError(f"{what}: {code} {text}", hint=f"the server at {where} refused")


def _text(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return _one_line(text)


def _one_line(text: str) -> str:
    """Untrusted text from a server or program, made one short printable line."""
    return printable_line(text, MAX_SERVER_TEXT)


def _check_envelope(mail_from: str, rcpt_to: Sequence[str]) -> tuple[str, list[str]]:
    if isinstance(rcpt_to, str):
        raise UsageError("rcpt_to must be a sequence of addresses, not one string")
    if not rcpt_to:
        raise UsageError("no recipients given", hint="give at least one recipient address")
    sender = "" if mail_from == "" else validate_address(mail_from)
    return sender, [validate_address(rcpt) for rcpt in rcpt_to]


# --------------------------------------------------------------------------- sendmail


def send_sendmail(
    path: Path,
    *,
    mail_from: str,
    rcpt_to: Sequence[str],
    message: bytes,
    timeout: float = 60,
) -> None:
    """Pipe ``message`` (LF line endings) into ``PATH -i -f FROM -- RCPT...``.

    ``mail_from`` ``""`` becomes ``-f <>`` (null sender). Exit status 75 (EX_TEMPFAIL),
    a timeout or a killed program raise :class:`TransportTempError`; any other failure
    :class:`~mailsh.errors.TransportError` with an excerpt of the program's stderr.
    """
    sender, recipients = _check_envelope(mail_from, rcpt_to)
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
        raise TransportError(f"cannot run {path}: {_one_line(str(exc))}") from exc
    if proc.returncode == 0:
        return
    stderr = _text(proc.stderr) or "no error output"
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
