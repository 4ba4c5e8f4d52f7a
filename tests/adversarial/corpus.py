"""The adversarial corpus: one builder function per hostile case, grouped by threat class.

Every builder gets the :class:`~tests.kit.adversarial.Kit` (throwaway keys made for this
test session) and a fresh marker path, and returns the mails to feed plus what the
promises of docs/security.md allow to happen: how often the marker command may run and
how many replies (always to the pinned address) may leave. Anything unauthenticated
runs nothing and is never answered (P1, P2, P7). Adding a case is adding one function
with the ``@case(THREAT)`` decorator; every intake test picks it up.
"""

from __future__ import annotations

import base64
import quopri
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailsh import protocol, seal
from mailsh.keys import packets
from mailsh.keys.crypto import seal as pgp_seal
from mailsh.protocol import Reply, ReplyStatus
from tests.kit import forge
from tests.kit.adversarial import RIG_SETTINGS, Case, Hostile, Kit, marker_command
from tests.kit.serverkit import open_reply

CORPUS: list[Case] = []


def case(threat: str) -> Callable[[Callable[[Kit, Path], Hostile]], Callable[[Kit, Path], Hostile]]:
    def register(fn: Callable[[Kit, Path], Hostile]) -> Callable[[Kit, Path], Hostile]:
        CORPUS.append(Case(threat, fn.__name__.replace("_", "-"), fn))
        return fn

    return register


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def payload(k: Kit, marker: Path, **over: object) -> bytes:
    """The signed JSON a real client would send for the marker command."""
    t = datetime.now(UTC)
    fields: dict[str, object] = {
        "request_id": protocol.new_request_id(),
        "audience": protocol.Audience(address=k.server.email, fingerprint=k.server.fingerprint),
        "reply_to": k.alice.email,
        "issued_at": t,
        "expires_at": t + timedelta(hours=1),
        "command": marker_command(marker),
    }
    fields.update(over)
    return protocol.encode_payload(protocol.Request(**fields))


def gpg_alice(k: Kit, *args: str, data: bytes) -> bytes:
    return forge.gpg(k.alice.settings.gnupg_home, *args, data=data)


def body_of(mail: bytes) -> bytes:
    return mail.split(b"\r\n\r\n", 1)[1]


def armored_of(mail: bytes) -> bytes:
    return protocol.extract_armor(protocol.extract_uu(body_of(mail), max_bytes=1 << 22))


def headers_plus(mail: bytes, extra: bytes) -> bytes:
    head, _, body = mail.partition(b"\r\n\r\n")
    return head + b"\r\n" + extra + b"\r\n\r\n" + body


def multipart(parts: list[bytes], boundary: str = "XX", kind: str = "mixed") -> tuple[bytes, str]:
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"
    return body, f'multipart/{kind}; boundary="{boundary}"'


def mime_mail(body: bytes, content_type: str, **headers: str) -> bytes:
    return forge.mail_with_body(body, {"Content-Type": content_type, **headers})


def text_part(mail: bytes) -> bytes:
    return b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body_of(mail)


def cached(k: Kit, key: str, make: Callable[[], bytes]) -> bytes:
    """Build a marker-independent mail once per rig (the bombs are costly to make)."""
    if key not in k.cache:
        k.cache[key] = make()
    return k.cache[key]


def decrypted(k: Kit, raws: list[bytes], sealed: seal.SealedRequest) -> list[Reply]:
    out = []
    for raw in raws:
        try:
            out.append(open_reply(k.alice, k.server, sealed, raw))
        except Exception:  # noqa: S112 - a reply to another request of the case
            continue
    return out


# --------------------------------------------------------------------------------------
# gpg API confusion (P1, P4)
# --------------------------------------------------------------------------------------


@case("gpg-confusion")
def unsigned_literal(k: Kit, marker: Path) -> Hostile:
    armored = gpg_alice(k, "--store", "--armor", data=payload(k, marker))
    return Hostile([forge.request_mail(armored)])


@case("gpg-confusion")
def encrypted_but_unsigned(k: Kit, marker: Path) -> Hostile:
    armored = forge.gpg(
        k.scratch, "--encrypt", "--armor", "-r", k.server.fingerprint, data=payload(k, marker)
    )
    return Hostile([forge.request_mail(armored)])


@case("gpg-confusion")
def mallory_signature_plus_alices(k: Kit, marker: Path) -> Hostile:
    armored = forge.gpg(
        k.scratch,
        "--sign",
        "--encrypt",
        "--armor",
        "-r",
        k.server.fingerprint,
        "-u",
        k.mallory.fingerprint,
        "-u",
        k.alice.fingerprint,
        data=payload(k, marker),
    )
    return Hostile([forge.request_mail(armored)])


@case("gpg-confusion")
def unknown_signature_plus_alices(k: Kit, marker: Path) -> Hostile:
    eve = k.eve
    armored = forge.gpg(
        k.scratch,
        "--sign",
        "--armor",
        "-u",
        eve,
        "-u",
        k.alice.fingerprint,
        data=payload(k, marker),
    )
    return Hostile([forge.request_mail(armored)])


@case("gpg-confusion")
def detached_signature_beside_payload(k: Kit, marker: Path) -> Hostile:
    data = payload(k, marker)
    sig = gpg_alice(k, "--detach-sign", "--armor", data=data)
    body = data + b"\n" + protocol.uuencode(sig)
    return Hostile([forge.mail_with_body(body.replace(b"\n", b"\r\n"))])


@case("gpg-confusion")
def detached_signature_armored_as_message(k: Kit, marker: Path) -> Hostile:
    sig = gpg_alice(k, "--detach-sign", data=payload(k, marker))
    return Hostile([forge.request_mail(forge.armor(sig))])


@case("gpg-confusion")
def unsigned_literal_before_signed_message(k: Kit, marker: Path) -> Hostile:
    bad = gpg_alice(k, "--store", data=payload(k, marker))
    good = gpg_alice(k, "--sign", data=payload(k, marker.with_suffix(".other")))
    return Hostile([forge.request_mail(forge.armor(bad + good))])


@case("gpg-confusion")
def two_signed_messages_in_one_armor(k: Kit, marker: Path) -> Hostile:
    one = gpg_alice(k, "--sign", data=payload(k, marker))
    two = gpg_alice(k, "--sign", data=payload(k, marker))
    return Hostile([forge.request_mail(forge.armor(one + two))])


@case("gpg-confusion")
def clearsigned_request(k: Kit, marker: Path) -> Hostile:
    armored = gpg_alice(k, "--clearsign", data=payload(k, marker))
    return Hostile([forge.request_mail(armored)])


# --------------------------------------------------------------------------------------
# MIME wrapping (P4)
# --------------------------------------------------------------------------------------


@case("mime")
def multipart_beside_attacker_text(k: Kit, marker: Path) -> Hostile:
    attacker = b"Content-Type: text/plain\r\n\r\n" + marker_command(marker).encode() + b"\r\n"
    body, ctype = multipart([attacker, text_part(k.request(marker_command(marker)))])
    return Hostile([mime_mail(body, ctype)])


@case("mime")
def nested_multipart(k: Kit, marker: Path) -> Hostile:
    inner, inner_type = multipart([text_part(k.request(marker_command(marker)))], "in")
    middle, middle_type = multipart([f"Content-Type: {inner_type}\r\n\r\n".encode() + inner], "mid")
    outer, outer_type = multipart(
        [f"Content-Type: {middle_type}\r\n\r\n".encode() + middle], "out", "alternative"
    )
    return Hostile([mime_mail(outer, outer_type)])


@case("mime")
def request_as_attachment(k: Kit, marker: Path) -> Hostile:
    att = (
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="request.asc"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(body_of(k.request(marker_command(marker))))
    )
    body, ctype = multipart([b"Content-Type: text/plain\r\n\r\nsee attachment\r\n", att])
    return Hostile([mime_mail(body, ctype)])


@case("mime")
def forwarded_as_message_rfc822(k: Kit, marker: Path) -> Hostile:
    return Hostile([mime_mail(k.request(marker_command(marker)), "message/rfc822")])


@case("mime")
def unknown_transfer_encoding(k: Kit, marker: Path) -> Hostile:
    mail = k.request(marker_command(marker))
    return Hostile(
        [mail.replace(b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: x-uue")]
    )


def _reencoded(mail: bytes, cte: str) -> bytes:
    head, _, body = mail.partition(b"\r\n\r\n")
    head = head.replace(
        b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: " + cte.encode()
    )
    if cte == "base64":
        return head + b"\r\n\r\n" + base64.encodebytes(body).replace(b"\n", b"\r\n")
    return head + b"\r\n\r\n" + quopri.encodestring(body, quotetabs=True)


@case("mime")
def base64_wrapping_a_valid_request(k: Kit, marker: Path) -> Hostile:
    """A relay may re-encode: the same signed bytes run, once, and nothing else does."""
    return Hostile([_reencoded(k.request(marker_command(marker)), "base64")], runs=1, replies=1)


@case("mime")
def quoted_printable_wrapping_a_valid_request(k: Kit, marker: Path) -> Hostile:
    return Hostile(
        [_reencoded(k.request(marker_command(marker)), "quoted-printable")], runs=1, replies=1
    )


@case("mime")
def base64_body_that_is_not_base64(k: Kit, marker: Path) -> Hostile:
    mail = k.request(marker_command(marker))
    return Hostile(
        [mail.replace(b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: base64")]
    )


# --------------------------------------------------------------------------------------
# Identity (P2, P3)
# --------------------------------------------------------------------------------------


@case("identity")
def mallory_forges_alices_from(k: Kit, marker: Path) -> Hostile:
    mail = k.request(marker_command(marker), by=k.mallory)
    return Hostile([mail.replace(b"From: mallory@evil.test", b"From: alice@example.org")])


@case("identity")
def alices_request_with_forged_from_and_reply_to(k: Kit, marker: Path) -> Hostile:
    """Headers never route the answer: it runs (alice signed it) and goes to alice only."""
    mail = k.request(marker_command(marker)).replace(
        b"From: alice@example.org", b"From: victim@elsewhere.test"
    )
    mail = headers_plus(mail, b"Reply-To: victim@elsewhere.test\r\nSender: victim@elsewhere.test")

    def check(replies: list[bytes]) -> None:
        assert all(b"victim" not in r for r in replies)

    return Hostile([mail], runs=1, replies=1, check=check, mail_from="victim@elsewhere.test")


@case("identity")
def unknown_key(k: Kit, marker: Path) -> Hostile:
    eve = k.eve
    armored = forge.gpg(k.scratch, "--sign", "--armor", "-u", eve, data=payload(k, marker))
    return Hostile([forge.request_mail(armored)])


@case("identity")
def revoked_key(k: Kit, marker: Path) -> Hostile:
    return Hostile([k.request(marker_command(marker), by=k.revoked)])


@case("identity")
def expired_key(k: Kit, marker: Path) -> Hostile:
    old = k.expired
    data = payload(k, marker)
    armored = forge.gpg(
        old.home, "--sign", "--armor", "-u", old.fingerprint, data=data, faked=old.sign_time
    )
    return Hostile([forge.request_mail(armored)])


@case("identity")
def signed_by_the_server_key_itself(k: Kit, marker: Path) -> Hostile:
    """The server's own key is not pinned: its signature authorizes nothing."""
    armored = pgp_seal(
        k.server.gpg, payload(k, marker), signer=k.server.fingerprint, recipient=None
    )
    return Hostile([forge.request_mail(armored)])


# --------------------------------------------------------------------------------------
# Replay (P5)
# --------------------------------------------------------------------------------------


def _replayed(original: bytes, *again: bytes) -> Hostile:
    """The original runs once and is answered; each replay is refused, and told so."""
    return Hostile([original, *again], runs=1, replies=1 + len(again))


@case("replay")
def same_mail_twice(k: Kit, marker: Path) -> Hostile:
    mail = k.request(marker_command(marker))
    return _replayed(mail, mail)


@case("replay")
def rewrapped_capture(k: Kit, marker: Path) -> Hostile:
    mail = k.request(marker_command(marker))
    again = forge.request_mail(armored_of(mail), uu_name="other.asc").replace(b"\r\n", b"\n")
    return _replayed(mail, again.replace(b"\n", b"\r\n"))


@case("replay")
def re_encoded_signature(k: Kit, marker: Path) -> Hostile:
    """The signed-only packets re-framed (decompressed, re-armored): same signature."""
    sealed = k.sealed(marker_command(marker), encrypt=False)
    raw = packets.dearmor(armored_of(sealed.mail))
    [(tag, body)] = packets.split_packets(raw)
    assert tag == packets.COMPRESSED
    inner = packets.decompress(body, max_bytes=1 << 22)
    again = forge.request_mail(forge.armor(inner))
    return _replayed(sealed.mail, again)


@case("replay")
def replay_after_the_reply(k: Kit, marker: Path) -> Hostile:
    """Replayed with another Message-ID and a new transfer encoding."""
    mail = k.request(marker_command(marker))
    again = _reencoded(mail.replace(b"Message-ID: <", b"Message-ID: <again."), "base64")
    return _replayed(mail, again)


# --------------------------------------------------------------------------------------
# Oracle / backscatter (P7)
# --------------------------------------------------------------------------------------


@case("oracle")
def junk_from_a_victim(k: Kit, marker: Path) -> Hostile:
    junk = forge.mail_with_body(b"please reply\r\n", {"From": "victim@elsewhere.test"})
    return Hostile([junk], mail_from="victim@elsewhere.test")


@case("oracle")
def tampered_request(k: Kit, marker: Path) -> Hostile:
    lines = k.request(marker_command(marker)).split(b"\r\n")
    i = next(n for n, ln in enumerate(lines) if ln.startswith(b"begin 600 ")) + 3
    line = bytearray(lines[i])
    line[10] = 32 + ((line[10] - 32 + 1) & 63)
    lines[i] = bytes(line)
    return Hostile([b"\r\n".join(lines)])


@case("oracle")
def mallory_asks_for_a_reply_to_a_victim(k: Kit, marker: Path) -> Hostile:
    data = payload(k, marker, reply_to="victim@elsewhere.test")
    armored = pgp_seal(
        k.mallory.gpg, data, signer=k.mallory.fingerprint, recipient=k.server.fingerprint
    )
    return Hostile([forge.request_mail(armored)])


@case("oracle")
def encrypted_to_another_key(k: Kit, marker: Path) -> Hostile:
    data = payload(k, marker)
    armored = pgp_seal(
        k.alice.gpg, data, signer=k.alice.fingerprint, recipient=k.mallory.fingerprint
    )
    return Hostile([forge.request_mail(armored)])


# --------------------------------------------------------------------------------------
# Loops (no reply to automated mail)
# --------------------------------------------------------------------------------------


@case("loops")
def auto_submitted_valid_request(k: Kit, marker: Path) -> Hostile:
    return Hostile(
        [headers_plus(k.request(marker_command(marker)), b"Auto-Submitted: auto-replied")]
    )


@case("loops")
def auto_generated_valid_request(k: Kit, marker: Path) -> Hostile:
    mail = headers_plus(k.request(marker_command(marker)), b"Auto-Submitted: Auto-Generated")
    return Hostile([mail])


@case("loops")
def bounce_with_empty_return_path(k: Kit, marker: Path) -> Hostile:
    mail = headers_plus(k.request(marker_command(marker)), b"Return-Path: <>")
    return Hostile([mail], mail_from="")


@case("loops")
def delivery_report_quoting_a_request(k: Kit, marker: Path) -> Hostile:
    report = b"Content-Type: text/plain\r\n\r\nDelivery failed.\r\n"
    quoted = b"Content-Type: message/rfc822\r\n\r\n" + k.request(marker_command(marker))
    body, ctype = multipart([report, quoted], "rep", "report")
    mail = mime_mail(body, ctype, From="MAILER-DAEMON@mx.test", **{"Return-Path": "<>"})
    return Hostile([mail], mail_from="")


@case("loops")
def our_own_reply_fed_back(k: Kit, marker: Path) -> Hostile:
    reply = Reply(
        request_id=protocol.new_request_id(),
        request_sha256="0" * 64,
        server=k.server.email,
        status=ReplyStatus.OK,
        exit_code=0,
        stdout=marker_command(marker).encode(),
    )
    mail = seal.seal_reply(
        k.server.gpg,
        reply,
        signer=k.server.fingerprint,
        recipient=k.alice.fingerprint,
        to_addr=k.server.email,
        in_reply_to=None,
        passphrase=None,
    )
    unmarked = mail.replace(b"Auto-Submitted: auto-replied\r\n", b"")
    rewrapped = forge.request_mail(protocol.extract_armor(body_of(mail)))  # to the signature
    return Hostile([unmarked, rewrapped])


# --------------------------------------------------------------------------------------
# Parsing bombs (P10, P11): all within the size limit
# --------------------------------------------------------------------------------------


@case("bombs")
def deep_mime_nesting(k: Kit, marker: Path) -> Hostile:
    body = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(2000)
    )
    return Hostile([mime_mail(body, 'multipart/mixed; boundary="b0"')])


@case("bombs")
def many_parts(k: Kit, marker: Path) -> Hostile:
    parts = [b"Content-Type: text/plain\r\n\r\nx"] * 20_000
    body, ctype = multipart(parts, "p")
    return Hostile([mime_mail(body, ctype)])


@case("bombs")
def many_headers(k: Kit, marker: Path) -> Hostile:
    extra = b"\r\n".join(b"X-H%d: %s" % (i, b"v" * 20) for i in range(25_000))
    return Hostile([headers_plus(k.request(marker_command(marker), by=k.mallory), extra)])


@case("bombs")
def one_huge_folded_header(k: Kit, marker: Path) -> Hostile:
    folded = b"X-Big: start" + b"".join(b"\r\n\t" + b"w" * 70 for _ in range(10_000))
    return Hostile([headers_plus(k.request(marker_command(marker), by=k.mallory), folded)])


@case("bombs")
def very_long_line(k: Kit, marker: Path) -> Hostile:
    """SMTP refuses it (500, line over 1000 bytes); the other intakes discard it."""
    return Hostile([forge.mail_with_body(b"A" * 500_000 + b"\r\n")])


@case("bombs")
def oversize_mail(k: Kit, marker: Path) -> Hostile:
    limit = int(RIG_SETTINGS["max_message_bytes"])
    body = (b"B" * 76 + b"\r\n") * (limit // 78 + 10)
    return Hostile([forge.mail_with_body(body)])


def _zeros_literal(size: int) -> bytes:
    """A raw literal packet of ``size`` zero bytes (new format, partial lengths)."""
    head = b"b\x00" + b"\x00\x00\x00\x00"  # binary, empty file name, date 0
    data = head + bytes(size)
    out = bytearray([0xC0 | packets.LITERAL])
    chunk = 1 << 16  # partial body length 2**16
    pos = 0
    while len(data) - pos > chunk:
        out += bytes([0xE0 | 16]) + data[pos : pos + chunk]
        pos += chunk
    rest = data[pos:]
    out += bytes([0xFF]) + len(rest).to_bytes(4, "big") + rest
    return bytes(out)


def _compressed_packet(inner: bytes) -> bytes:
    body = b"\x02" + zlib.compress(inner, 9)  # algorithm 2: ZLIB
    return bytes([0xC0 | packets.COMPRESSED, 0xFF]) + len(body).to_bytes(4, "big") + body


@case("bombs")
def compression_bomb_unsigned(k: Kit, marker: Path) -> Hostile:
    """16 MiB of zeros in ~16 KiB; the packet check stops decompressing at its cap."""

    def make() -> bytes:
        return forge.request_mail(forge.armor(_compressed_packet(_zeros_literal(16 << 20))))

    return Hostile([cached(k, "bomb-unsigned", make)])


@case("bombs")
def compression_bomb_signed_and_encrypted_by_mallory(k: Kit, marker: Path) -> Hostile:
    """gpg does the decompressing here: --max-output stops it."""

    def make() -> bytes:
        return forge.request_mail(
            forge.gpg(
                k.scratch,
                "--sign",
                "--encrypt",
                "--armor",
                "-z",
                "9",
                "--compress-algo",
                "zlib",
                "-u",
                k.mallory.fingerprint,
                "-r",
                k.server.fingerprint,
                data=bytes(16 << 20),
            )
        )

    return Hostile([cached(k, "bomb-mallory", make)])


# --------------------------------------------------------------------------------------
# uuencode ambiguity (P4)
# --------------------------------------------------------------------------------------


@case("uuencode")
def two_uu_blocks(k: Kit, marker: Path) -> Hostile:
    uu = protocol.uuencode(armored_of(k.request(marker_command(marker))))
    return Hostile([forge.mail_with_body((uu + uu).replace(b"\n", b"\r\n"))])


@case("uuencode")
def begin_base64_block(k: Kit, marker: Path) -> Hostile:
    b64 = base64.encodebytes(armored_of(k.request(marker_command(marker))))
    body = b"begin-base64 600 request.asc\n" + b64 + b"====\n"
    return Hostile([forge.mail_with_body(body.replace(b"\n", b"\r\n"))])


@case("uuencode")
def uu_and_begin_base64(k: Kit, marker: Path) -> Hostile:
    armored = armored_of(k.request(marker_command(marker)))
    body = (
        protocol.uuencode(armored)
        + b"begin-base64 600 x\n"
        + base64.encodebytes(armored)
        + b"====\n"
    )
    return Hostile([forge.mail_with_body(body.replace(b"\n", b"\r\n"))])


@case("uuencode")
def junk_lines_inside_the_block(k: Kit, marker: Path) -> Hostile:
    lines = protocol.uuencode(armored_of(k.request(marker_command(marker)))).split(b"\n")
    lines[3:3] = [b"rm -rf / #", b"M" + b"!" * 60]
    return Hostile([forge.mail_with_body(b"\r\n".join(lines))])


@case("uuencode")
def block_without_end(k: Kit, marker: Path) -> Hostile:
    uu = protocol.uuencode(armored_of(k.request(marker_command(marker))))
    return Hostile([forge.mail_with_body(uu.replace(b"\nend\n", b"\n").replace(b"\n", b"\r\n"))])


@case("uuencode")
def armor_outside_the_block(k: Kit, marker: Path) -> Hostile:
    armored = armored_of(k.request(marker_command(marker)))
    junk = protocol.uuencode(b"hello\n")
    return Hostile([forge.mail_with_body((armored + junk).replace(b"\n", b"\r\n"))])


# --------------------------------------------------------------------------------------
# Execution limits (P10): authorized commands, bounded
# --------------------------------------------------------------------------------------


@case("exec-limits")
def timeout_beyond_the_server_maximum(k: Kit, marker: Path) -> Hostile:
    """Asks for an hour; the server's maximum (1 s here) kills it before the marker."""
    sealed = k.sealed(f"sleep 30; {marker_command(marker)}", timeout=3600)

    def check(replies: list[bytes]) -> None:
        [reply] = decrypted(k, replies, sealed)
        assert reply.timed_out

    return Hostile([sealed.mail], runs=0, replies=1, check=check)


@case("exec-limits")
def output_flood(k: Kit, marker: Path) -> Hostile:
    sealed = k.sealed(f"head -c 3000000 /dev/zero; {marker_command(marker)}")
    cap = int(RIG_SETTINGS["max_output_bytes"])

    def check(replies: list[bytes]) -> None:
        [reply] = decrypted(k, replies, sealed)
        assert reply.stdout_truncated
        assert len(reply.stdout) == cap

    return Hostile([sealed.mail], runs=1, replies=1, check=check)
