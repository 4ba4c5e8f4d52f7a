"""The mail rig itself: submission, local delivery (mbox and Maildir), no relaying, IMAP.

These guard the assumptions every mail-level test builds on; when one fails, look at
``/var/log/mailsh-rig/`` before suspecting mailsh.
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kit.mailrig import (
    MailRig,
    build_message,
    contains,
    submit,
    unique_token,
    wait_for_message,
)

pytestmark = pytest.mark.mailrig

Cleanup = Callable[[Path, str], None]


def test_submission_to_root_lands_in_var_mail_root(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    token = unique_token()
    cleanup_messages(mailrig.root_mbox, token)
    raw = build_message(
        sender=mailrig.alice.address, to=mailrig.root_address, subject=token, body="to root\n"
    )
    submit(mailrig, raw, to=[mailrig.root_address])
    message = wait_for_message(mailrig.root_mbox, contains(token))
    # Postfix prepends Return-Path/Delivered-To/Received and stores LF line ends.
    assert message.endswith(raw.replace(b"\r\n", b"\n"))
    assert f"Delivered-To: {mailrig.root_address}".encode() in message


def test_submission_to_bob_lands_in_maildir_new(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    token = unique_token()
    cleanup_messages(mailrig.bob_maildir, token)
    # A body line starting "From " survives in a Maildir (an mbox would get ">From ").
    body = "first line\nFrom the rig, unquoted\n"
    raw = build_message(
        sender=mailrig.alice.address, to=mailrig.bob.address, subject=token, body=body
    )
    submit(mailrig, raw, to=[mailrig.bob.address])
    message = wait_for_message(mailrig.bob_maildir, contains(token))
    new = mailrig.bob_maildir / "new"
    assert [p for p in new.iterdir() if token.encode() in p.read_bytes()], "not in new/"
    assert message.endswith(raw.replace(b"\r\n", b"\n"))
    assert b"\nFrom the rig, unquoted\n" in message


def test_port_25_refuses_to_relay_to_an_outside_domain(mailrig: MailRig) -> None:
    raw = build_message(
        sender="someone@outside.example", to="victim@outside.example", subject="relay", body="x\n"
    )
    with (
        smtplib.SMTP(mailrig.host, mailrig.smtp_port, timeout=30) as smtp,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        smtp.sendmail("someone@outside.example", ["victim@outside.example"], raw)
    code, reply = refused.value.recipients["victim@outside.example"]
    assert code == 554
    assert b"Relay access denied" in reply


def test_submission_without_auth_is_refused(mailrig: MailRig) -> None:
    raw = build_message(
        sender=mailrig.alice.address, to=mailrig.bob.address, subject="no auth", body="x\n"
    )
    with smtplib.SMTP(mailrig.host, mailrig.submission_port, timeout=30) as smtp:
        smtp.starttls(context=mailrig.ssl_context())
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail(mailrig.alice.address, [mailrig.bob.address], raw)


def test_submission_offers_auth_only_after_starttls(mailrig: MailRig) -> None:
    with smtplib.SMTP(mailrig.host, mailrig.submission_port, timeout=30) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        assert smtp.has_extn("starttls")


def test_alice_imap_login_sees_a_delivered_message(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    token = unique_token()
    cleanup_messages(mailrig.alice_mbox, token)
    raw = build_message(
        sender=mailrig.bob.address, to=mailrig.alice.address, subject=token, body="imap\n"
    )
    submit(mailrig, raw, to=[mailrig.alice.address], user=mailrig.bob)
    wait_for_message(mailrig.alice_mbox, contains(token))
    imap = imaplib.IMAP4(mailrig.host, mailrig.imap_port, timeout=30)
    try:
        imap.starttls(ssl_context=mailrig.ssl_context())
        imap.login(mailrig.alice.name, mailrig.alice.password)
        status, _ = imap.select("INBOX", readonly=True)
        assert status == "OK"
        status, data = imap.uid("SEARCH", "SUBJECT", token)
        assert status == "OK"
        uids = data[0].split() if data and isinstance(data[0], bytes) else []
        assert len(uids) == 1
    finally:
        imap.logout()


def test_imaps_port_speaks_tls_with_the_rig_certificate(mailrig: MailRig) -> None:
    imap = imaplib.IMAP4_SSL(mailrig.host, mailrig.imaps_port, ssl_context=mailrig.ssl_context())
    try:
        imap.login(mailrig.bob.name, mailrig.bob.password)
    finally:
        imap.logout()


@pytest.mark.skipif(shutil.which("s-nail") is None, reason="s-nail not installed")
def test_s_nail_submits_with_starttls_and_auth(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    token = unique_token()
    cleanup_messages(mailrig.bob_maildir, token)
    account = mailrig.alice
    # s-nail checks the certificate against the host name, not an IP SAN: use localhost.
    mta = f"smtp://{account.name}:{account.password}@localhost:{mailrig.submission_port}"
    settings = [
        "v15-compat",
        f"mta={mta}",
        "smtp-use-starttls",
        "smtp-auth=plain",
        f"tls-ca-file={mailrig.ca_file}",
        "tls-ca-no-defaults",
        f"hostname=client.{mailrig.domain}",
        f"from={account.address}",
    ]
    argv = ["s-nail", "-n", "-#"]
    for setting in settings:
        argv += ["-S", setting]
    subprocess.run(
        [*argv, "-s", token, mailrig.bob.address],
        input=b"sent by s-nail\n",
        check=True,
        timeout=60,
        capture_output=True,
    )
    message = wait_for_message(mailrig.bob_maildir, contains(token))
    assert b"sent by s-nail" in message


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_submits_with_starttls_and_auth(
    mailrig: MailRig,
    cleanup_messages: Cleanup,
) -> None:
    token = unique_token()
    cleanup_messages(mailrig.bob_maildir, token)
    account = mailrig.alice
    argv = ["swaks", "-4", "--server", mailrig.host, "--port", str(mailrig.submission_port)]
    argv += ["-tls", "--tls-verify", "--tls-ca-path", str(mailrig.ca_file)]
    argv += ["--auth", "PLAIN", "--auth-user", account.name, "--auth-password", account.password]
    argv += ["--from", account.address, "--to", mailrig.bob.address]
    argv += ["--header", f"Subject: {token}", "--body", "sent by swaks"]
    subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        check=True,
        timeout=60,
        capture_output=True,
    )
    message = wait_for_message(mailrig.bob_maildir, contains(token))
    assert b"sent by swaks" in message
