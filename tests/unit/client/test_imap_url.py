"""parse_imap_url: what --imap accepts, and what it refuses (cleartext, passwords in URLs)."""

from __future__ import annotations

import pytest

from mailsh.client.imap import ImapTarget, TlsMode, parse_imap_url
from mailsh.errors import UsageError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("imap://alice@mail.example.org", ImapTarget("mail.example.org", 143, "alice")),
        (
            "imap://alice@mail.example.org:1143/Replies",
            ImapTarget("mail.example.org", 1143, "alice", "Replies"),
        ),
        (
            "imaps://alice@mail.example.org",
            ImapTarget("mail.example.org", 993, "alice", tls=TlsMode.IMPLICIT),
        ),
        (
            "IMAPS://alice%40example.org@[2001:db8::1]:9993/INBOX/mailsh",
            ImapTarget("2001:db8::1", 9993, "alice@example.org", "INBOX/mailsh", TlsMode.IMPLICIT),
        ),
        (
            "imap://bob@127.0.0.1/Sent%20Replies?tls=none",
            ImapTarget("127.0.0.1", 143, "bob", "Sent Replies", TlsMode.NONE),
        ),
        ("imap://bob@localhost?tls=none", ImapTarget("localhost", 143, "bob", tls=TlsMode.NONE)),
        ("imap://bob@[::1]:143/?tls=none", ImapTarget("::1", 143, "bob", tls=TlsMode.NONE)),
        ("imap://bob@Mail.Example.ORG/", ImapTarget("mail.example.org", 143, "bob")),
    ],
)
def test_valid_urls(url: str, expected: ImapTarget) -> None:
    assert parse_imap_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://alice@example.org", "scheme"),
        ("imap://example.org", "user is required"),
        ("imap://alice@", "host is required"),
        ("imap://alice@example.org:99999", "port"),
        ("imap://alice@example.org:0", "port"),
        ("imap://alice@example.org:abc", "port"),
        ("imap://alice@example.org/INBOX#x", "fragment"),
        ("imap://alice@example.org?debug=1", "unknown parameter"),
        ("imaps://alice@127.0.0.1?tls=none", "only accepted parameter"),
        ("imap://alice@127.0.0.1?tls=yes", "only accepted parameter"),
        ("imap://alice@example.org/IN BOX", "control characters"),
        ("imap://alice@example.org/IN%0ABOX", "control characters"),
        ("imap://al%0Dice@example.org", "control characters"),
    ],
)
def test_invalid_urls(url: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_imap_url(url)
    assert fragment in caught.value.message
    assert caught.value.hint


def test_password_in_url_is_refused_and_not_echoed() -> None:
    with pytest.raises(UsageError) as caught:
        parse_imap_url("imap://alice:s3cret@example.org")
    assert "s3cret" not in caught.value.message
    assert "MAILSH_IMAP_PASSWORD" in (caught.value.hint or "")


@pytest.mark.parametrize(
    "host", ["example.org", "10.0.0.1", "127.0.0.1.example.org", "[2001:db8::1]"]
)
def test_cleartext_only_to_loopback(host: str) -> None:
    """Regression guard: ?tls=none must never send a password in clear off the machine."""
    with pytest.raises(UsageError) as caught:
        parse_imap_url(f"imap://alice@{host}?tls=none")
    assert "loopback" in caught.value.message


def test_str_round_trips() -> None:
    for url in [
        "imap://alice%40example.org@mail.example.org:1143/Sent%20Replies",
        "imaps://bob@[2001:db8::1]:993/INBOX",
        "imap://bob@127.0.0.1:143/INBOX?tls=none",
    ]:
        target = parse_imap_url(url)
        assert str(target) == url
        assert parse_imap_url(str(target)) == target
