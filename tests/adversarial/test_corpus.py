"""Every case of the adversarial corpus through every intake of one running server.

Each test asserts the three things docs/security.md promises for hostile mail: nothing
ran (the marker command left no trace, or exactly the trace of the one signed command
the case legitimately contains), nothing was mailed except what a promise allows
(replies, to the pinned address only), and the next valid request through the same
intake, queued right behind the hostile mail, still runs exactly once and is answered.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adversarial.corpus import CORPUS
from tests.kit.adversarial import INTAKES, Case, Rig, marker_command, marker_runs

#: Fed through a real ``mailsh deliver`` process as well (half a second per mail).
PROCESS_SAMPLE = ["gpg-confusion/unsigned-literal", "bombs/oversize-mail"]


@pytest.mark.parametrize("intake", INTAKES)
@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_hostile_mail(rig: Rig, case: Case, intake: str, tmp_path: Path) -> None:
    check_case(rig, case, intake, tmp_path)


@pytest.mark.parametrize("case", [c for c in CORPUS if c.id in PROCESS_SAMPLE], ids=lambda c: c.id)
def test_hostile_mail_through_the_deliver_process(rig: Rig, case: Case, tmp_path: Path) -> None:
    check_case(rig, case, "deliver-process", tmp_path)


def check_case(rig: Rig, case: Case, intake: str, tmp_path: Path) -> None:
    marker, after = tmp_path / "ran", tmp_path / "next"
    hostile = case.build(rig.kit, marker)
    before = len(rig.sink.messages)
    rig.feed(intake, hostile.mails, mail_from=hostile.mail_from)
    rig.feed_valid(intake, after)
    rig.settle()

    assert marker_runs(marker) == hostile.runs, "a hostile message ran something"
    mailed = rig.mailed(before)
    assert len(mailed) == hostile.replies + 1, "mail left that no promise allows"
    if hostile.check is not None:
        hostile.check(mailed)
    assert marker_runs(after) == 1, "the next valid request did not run exactly once"
    assert rig.alive


def test_null_sender_over_smtp_is_a_bounce(rig: Rig, tmp_path: Path) -> None:
    """MAIL FROM:<> marks a bounce (RFC 5321 section 4.5.5), which docs/server.md says is
    discarded, as smtp_listener.py's doc promises ("bounces must reach the daemon so that
    it can log and discard them"). Over the mbox, Postfix adds ``Return-Path: <>``; the
    listener records the null sender the same way, so the same message is discarded."""
    marker = tmp_path / "ran"
    before = len(rig.sink.messages)
    request = rig.kit.request(marker_command(marker))
    # the second copy starts with a folded line, which would join the Return-Path: <>
    # the listener puts on top (and make it "<> x" instead of "<>")
    rig.feed("smtp", [request, b" folded\r\n" + request], mail_from="")
    rig.settle()
    assert marker_runs(marker) == 0
    assert rig.mailed(before) == []
