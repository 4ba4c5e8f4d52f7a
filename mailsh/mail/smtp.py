"""SMTP submission: one message, or a burst of them on one connection, with TLS.

``smtp://`` uses STARTTLS whenever the server offers it (and refuses to go on without it
when TLS is required, or before sending a password to a host other than loopback);
``smtps://`` speaks TLS from the first byte. Certificates are always verified, against
the system store or ``ca_file``. Every smtplib, socket, DNS and TLS failure becomes a
:class:`~mailsh.errors.TransportError` (:class:`~mailsh.errors.TransportTempError` when a
retry may help) with a one-line message and a hint; what counts as temporary is set out
in :mod:`mailsh.mail.transport`.
"""

from __future__ import annotations

import contextlib
import functools
import smtplib
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailsh.addresses import is_loopback
from mailsh.errors import HandoffUnknownError, TransportError, TransportTempError, UsageError
from mailsh.mail.smtp_url import PASSWORD_HINT, SmtpOptions, SmtpTarget
from mailsh.mail.transport import check_envelope, server_text, to_crlf
from mailsh.resources import Closing


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


class SmtpSession(Closing):
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
                    f"cannot load CA file {str(options.ca_file)!r}: {server_text(str(exc))}",
                    hint="--ca-file must name a PEM file of CA certificates",
                ) from exc
        self._client: _Smtp | _SmtpSsl | None = None

    def send(self, *, mail_from: str, rcpt_to: Sequence[str], message: bytes) -> None:
        """Send one message; return once the server accepted it (see :func:`send_smtp`).

        A failure after the message itself started to go out (SMTP DATA) without a
        definite answer raises :class:`HandoffUnknownError`: it may have been accepted.
        """
        target = self.target
        sender, recipients = check_envelope(mail_from, rcpt_to)
        if target.user is not None and not self._password:
            raise UsageError(f"SMTP user {target.user!r} given but no password", hint=PASSWORD_HINT)
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
                        f"being sent ({server_text(str(exc)) or type(exc).__name__}); the "
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
    if not encrypted and not is_loopback(target.host):
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
            f"{exc.smtp_code} {server_text(exc.smtp_error)}",
            hint=f"check the user in the URL and {PASSWORD_HINT}",
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
            f"{where} closed the connection unexpectedly ({server_text(str(exc)) or 'no reason'})",
            hint="this is usually temporary; try again later",
        )
    return TransportError(f"SMTP error with {where}: {server_text(str(exc))}")


def _network_error(exc: OSError, target: SmtpTarget, options: SmtpOptions) -> TransportError:
    """Translate a socket, DNS or TLS failure."""
    where = target.hostport
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"TLS certificate of {where} could not be verified: "
            f"{server_text(exc.verify_message or str(exc))}",
            hint="for a private or self-signed CA, pass its certificate with --ca-file",
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(
            f"TLS with {where} failed: {server_text(str(exc))}",
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
        f"network error talking to {where}: {server_text(str(exc))}",
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


def _recipients_error(
    refused: dict[str, tuple[int, bytes]], where: str, *, all_refused: bool
) -> TransportError:
    parts = [f"<{rcpt}> ({code} {server_text(text)})" for rcpt, (code, text) in refused.items()]
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
    code, text = exc.smtp_code, server_text(exc.smtp_error)
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
