"""``mailsh send`` / ``mailsh wait-reply`` end to end: real SMTP on 127.0.0.1, real keys,
a test server built from the library that answers into a real mbox or Maildir.

The CLI runs in-process through the one error funnel (``mailsh.cli.main``) and once as a
real subprocess (``python -m mailsh``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailsh.client.pending import PendingStore
from mailsh.protocol import ReplyStatus
from tests.kit.cli import run_main
from tests.kit.clientkit import Rig, answer, open_as_server
from tests.kit.homes import Home
from tests.kit.mailbox import drop_maildir, mbox_append
from tests.kit.smtp import Sink, free_port

ID_LINE = re.compile(rb"^[0-9a-f]{32}\n$")

pytestmark = pytest.mark.usefixtures("no_mailsh_env")


Run = Callable[..., tuple[int, bytes, bytes]]


@pytest.fixture
def run(capsysbinary: pytest.CaptureFixture[bytes], rig: Rig) -> Run:
    """Run ``mailsh --home CLIENT ARGS...`` in-process: (exit status, stdout, stderr)."""

    def call(*args: str) -> tuple[int, bytes, bytes]:
        return run_main(capsysbinary, ["--home", str(rig.client.path), *args])

    return call


def auto_answer(
    rig: Rig, box: Sink, deliver: Callable[[bytes], object], delay: float = 0, **fields: Any
) -> None:
    """Make the SMTP sink act as the server: answer each request into ``deliver``."""

    def respond(raw: bytes) -> None:
        mail = answer(rig, raw, **fields)
        time.sleep(delay)
        deliver(mail)

    box.on_message = respond


def _send(run: Run, rig: Rig, url: str, *extra: str, command: str = "id") -> str:
    code, out, err = run("send", command, "--to", rig.server.email, "--smtp", url, *extra)
    assert code == 0, err
    assert ID_LINE.match(out), out
    return out.decode().strip()


# --------------------------------------------------------------------------- send


def test_send_prints_only_the_request_id_and_records_it(run: Run, rig: Rig, sink: Sink) -> None:
    rid = _send(run, rig, sink.url)
    sink.wait_for(1)
    assert rid.encode() in sink.messages[0].data
    assert PendingStore(rig.client.path).load(rid).to == rig.server.email


@pytest.mark.parametrize(
    ("fields", "status"),
    [({"exit_code": 0}, 0), ({"exit_code": 3}, 3), ({"signal": 9}, 137)],
    ids=["exit-0", "exit-3", "sigkill-137"],
)
def test_wait_reply_exits_with_the_remote_status(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path, fields: dict[str, int], status: int
) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(rig, sink, lambda mail: mbox_append(mbox, mail), stdout=b"remote out\n", **fields)
    rid = _send(run, rig, sink.url)
    code, out, err = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "60")
    assert (code, out, err) == (status, b"remote out\n", b"")


def test_stdout_and_stderr_are_separate_and_byte_exact(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    maildir = tmp_path / "Maildir"
    drop_maildir(maildir, b"Subject: hello\n\nnot for mailsh\n")
    stdout = bytes(range(256)) * 3 + b"\r\nno newline at end"
    stderr = b"\xff\xfe not utf-8 \x1b[31m\r\n\x00"
    auto_answer(rig, sink, lambda mail: drop_maildir(maildir, mail), stdout=stdout, stderr=stderr)
    rid = _send(run, rig, sink.url)
    code, out, err = run("wait-reply", rid, "--maildir", str(maildir), "--timeout", "60")
    assert (code, out, err) == (0, stdout, stderr)


def test_send_wait_round_trip_picks_up_a_reply_arriving_while_waiting(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    mbox.write_bytes(b"")
    auto_answer(rig, sink, lambda mail: mbox_append(mbox, mail), delay=1.0, stdout=b"Linux\n")
    code, out, err = run(
        "send", "--to", rig.server.email, "--smtp", sink.url,
        "--wait", "--mbox", str(mbox), "--wait-timeout", "60", "--", "uname", "-s",
    )  # fmt: skip
    assert (code, out, err) == (0, b"Linux\n", b"")
    assert open_as_server(rig, sink.messages[0].data).command == "uname -s"


def test_remote_timeout_is_reported_with_the_server_status(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(
        rig, sink, lambda mail: mbox_append(mbox, mail), signal=9, timed_out=True, stdout=b"part"
    )
    rid = _send(run, rig, sink.url, "--timeout", "1")
    code, out, err = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "60")
    assert (code, out) == (137, b"part")
    assert b"timed out and was killed by signal 9" in err


def test_rejected_request_exits_255_with_the_reason(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(
        rig,
        sink,
        lambda mail: mbox_append(mbox, mail),
        status=ReplyStatus.REJECTED,
        reason="request-expired: too old",
    )
    rid = _send(run, rig, sink.url)
    code, out, err = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "60")
    assert (code, out) == (255, b"")
    assert f"rejected request {rid}: request-expired: too old".encode() in err


def test_json_prints_the_whole_reply_and_keeps_the_status(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(
        rig, sink, lambda mail: mbox_append(mbox, mail), exit_code=3, stdout=b"\x00x", stderr=b"e"
    )
    rid = _send(run, rig, sink.url)
    code, out, err = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "60", "--json")
    assert (code, err) == (3, b"")
    doc = json.loads(out)
    assert doc["request_id"] == rid
    assert base64.b64decode(doc["stdout"]) == b"\x00x"
    assert base64.b64decode(doc["stderr"]) == b"e"
    assert (doc["exit_code"], doc["shell_status"], doc["status"]) == (3, 3, "ok")


def test_answered_request_can_be_printed_again(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(rig, sink, lambda mail: mbox_append(mbox, mail), stdout=b"again")
    rid = _send(run, rig, sink.url)
    first = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "60")
    assert first == (0, b"again", b"")
    assert run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "5") == first


# --------------------------------------------------------------------------- failures


def test_wait_timeout_exits_255_and_says_how_to_check_each_usual_cause(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    mbox = tmp_path / "mbox"
    rid = _send(run, rig, sink.url)
    code, out, err = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "0.3")
    assert (code, out) == (255, b"")
    text = err.decode()
    assert f"no reply to request {rid} in mbox {mbox} after 0.3s" in text
    assert "the request may still run" in text
    assert f"next: mailsh wait-reply {rid}" in text
    # The three usual causes, each with the command that checks it.
    assert "does the server trust your key?" in text
    assert "unknown-key or signer-not-pinned" in text
    assert "is serve running?" in text
    assert f"do replies land in mbox {mbox}?" in text


def test_only_invalid_replies_are_named_at_the_timeout(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path, mallory_signs: Home
) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(rig, sink, lambda mail: mbox_append(mbox, mail), signer=mallory_signs)
    rid = _send(run, rig, sink.url)
    sink.wait_for(1)
    deadline = time.monotonic() + 30
    while not mbox.exists() and time.monotonic() < deadline:  # the forged reply is there
        time.sleep(0.05)
    code, _, err = run("wait-reply", rid, "--mbox", str(mbox), "--timeout", "0.5")
    assert code == 255
    assert f"no valid reply to request {rid} in mbox {mbox} after 0.5s".encode() in err
    assert b", only 1 invalid reply ignored (" in err


def test_unknown_request_id(run: Run) -> None:
    code, out, err = run("wait-reply", "0" * 32, "--mbox", "/tmp/none", "--timeout", "1")
    assert (code, out) == (255, b"")
    assert b"no request 00000000000000000000000000000000 was sent from this home" in err


def test_no_transport_configured(run: Run, rig: Rig) -> None:
    code, out, err = run("send", "id", "--to", rig.server.email)
    assert (code, out) == (255, b"")
    assert b"no way to send mail is configured" in err
    assert b"--smtp smtp://host:587 or --sendmail /usr/sbin/sendmail" in err


def test_unknown_server_key(run: Run, sink: Sink) -> None:
    code, _, err = run("send", "id", "--to", "who@unknown.test", "--smtp", sink.url)
    assert code == 255
    assert b"no trusted key for the server who@unknown.test" in err
    assert b"mailsh trust add SERVER.asc" in err


def test_send_wait_refuses_an_unverifiable_reply_before_sending(
    run: Run, sink: Sink, tmp_path: Path
) -> None:
    code, _, err = run(
        "send", "id", "--to", "who@unknown.test", "--smtp", sink.url, "--no-encrypt",
        "--wait", "--mbox", str(tmp_path / "mbox"),
    )  # fmt: skip
    assert code == 255
    assert b"could not be verified" in err
    assert sink.messages == []


def test_connection_refused(run: Run, rig: Rig) -> None:
    code, _, err = run(
        "send", "id", "--to", rig.server.email, "--smtp", f"smtp://127.0.0.1:{free_port()}"
    )
    assert code == 255
    assert b"refused" in err


def test_missing_maildir(run: Run, rig: Rig, sink: Sink, tmp_path: Path) -> None:
    rid = _send(run, rig, sink.url)
    code, _, err = run("wait-reply", rid, "--maildir", str(tmp_path / "nope"))
    assert code == 255
    assert b"is not a Maildir" in err


def test_wait_options_without_wait_are_a_usage_error(run: Run, rig: Rig) -> None:
    code, _, err = run("send", "id", "--to", rig.server.email, "--json")
    assert code == 2
    assert b"--json only applies with --wait" in err


# --------------------------------------------------------------------------- subprocess


def test_real_subprocess_round_trip(rig: Rig, sink: Sink, tmp_path: Path) -> None:
    mbox = tmp_path / "mbox"
    auto_answer(
        rig, sink, lambda mail: mbox_append(mbox, mail), exit_code=7, stdout=b"o\n", stderr=b"e\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSH_")}
    env["MAILSH_REPLY_MBOX"] = str(mbox)
    proc = subprocess.run(
        [sys.executable, "-m", "mailsh", "--home", str(rig.client.path),
         "send", "echo o; echo e >&2; exit 7", "--to", rig.server.email, "--smtp", sink.url,
         "--wait", "--wait-timeout", "120"],
        env=env,
        capture_output=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"o\n", b"e\n")
    assert sink.messages[0].data.count(b"mailsh request") >= 1


def test_reply_mbox_from_the_environment_is_noted_at_send_time(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: MAILSH_REPLY_MBOX set for wait-reply must not break a plain send."""
    mbox = tmp_path / "mbox"
    mbox_append(mbox, b"Subject: old\n\nold mail\n")
    monkeypatch.setenv("MAILSH_REPLY_MBOX", str(mbox))
    rid = _send(run, rig, sink.url)
    mark = PendingStore(rig.client.path).load(rid).mbox_mark
    assert mark is not None
    assert mark.offset == mbox.stat().st_size


# --------------------------------------------------------------------------- status


def test_status_on_a_client_home_lists_the_requests_sent(
    run: Run, rig: Rig, sink: Sink, tmp_path: Path
) -> None:
    """A client home has no server state: status shows what was sent and what came back."""
    mbox = tmp_path / "mbox"
    auto_answer(rig, sink, lambda mail: mbox_append(mbox, mail), stdout=b"ok")
    answered = _send(run, rig, sink.url, command="echo answered")
    assert run("wait-reply", answered, "--mbox", str(mbox), "--timeout", "60")[0] == 0
    sink.on_message = None
    waiting = _send(run, rig, sink.url, command="echo " + "x" * 300)

    code, out, err = run("status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["format"], doc["role"]) == ("mailsh.status.v1", "client")
    assert doc["identity"]["fingerprint"] == rig.client.fingerprint
    assert "queue" not in doc  # no server sections on a client home
    sent = {r["request_id"]: r for r in doc["sent"]}
    assert sent[answered]["state"] == "answered"
    assert sent[answered]["answered_at"] is not None
    assert sent[answered]["command"] == "echo answered"
    assert sent[answered]["to"] == rig.server.email
    assert sent[waiting]["state"] == "waiting"
    assert sent[waiting]["answered_at"] is None
    assert sent[waiting]["command"].startswith("echo xxx")
    assert len(sent[waiting]["command"]) == 200  # a preview, not the whole script

    code, out, err = run("status")
    assert code == 0, err
    text = out.decode()
    assert "requests sent from this home" in text
    assert answered in text and waiting in text
    assert "echo answered" in text
    assert "start the server" not in text + err.decode()
