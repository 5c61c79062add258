"""The circuit breaker judges the endpoint, not the mail, through the real Postfix.

Postfix runs with ``milter_default_action = accept``, the worst case: any message the bridge
let slip to Postfix's default would be delivered unfiltered. The endpoint answers garbage for
some messages (their content's fault) and a real decision for the others; the garbage must
only cost those messages their ``on_error``, never open the breaker for everyone
(design.md §3.7).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .bridge import BridgeRunner, blocking
from .postfix import PostfixInstance, SmtpTransaction, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"
#: Messages of each kind; with the default breaker (50% of at least 20 calls in 10 s) this
#: many failures, had they counted, would open it.
PER_KIND = 30
SESSIONS = 3
REJECT_TEXT = "5.7.1 rejected by policy"
#: Bad answers alternate between a body that is not JSON and JSON that is not a decision.
GARBAGE = (FakeResponse.raw(b"<html>garbage</html>"), FakeResponse.decision("explode"))


def _subject(request: RecordedRequest) -> str:
    headers = request.json["message"]["headers"]
    return str(next(h.get("value", "") for h in headers if h["name"].lower() == "subject")).strip()


def _answer(request: RecordedRequest) -> FakeResponse:
    """Garbage for subjects with "bad" in them, a 550 reject for every other message."""
    subject = _subject(request)
    if "bad" in subject:
        return GARBAGE[int(subject.rsplit(" ", 1)[1]) % 2]
    return FakeResponse.decision("reject", reply={"code": 550, "text": REJECT_TEXT})


def _send_all(mta: PostfixInstance, subjects: Sequence[str]) -> list[tuple[str, SmtpTransaction]]:
    """One SMTP session with one transaction per subject."""
    with mta.smtp_session() as session:
        return [(subject, session.send(SENDER, [RCPT], make_message(subject=subject))) for subject in subjects]


@pytest.mark.asyncio
async def test_garbage_answers_do_not_open_the_breaker(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """Interleaved garbage and real answers: good get the 550, bad get on_error, none delivered, breaker closed."""
    webhooks.set_default(_answer, event="eom")
    bridge = await bridges.start(webhooks.endpoint("policy"), default_action="accept")
    subjects = [f"{kind} {n}" for n in range(PER_KIND) for kind in ("bad", "good")]

    batches = await asyncio.gather(*(blocking(_send_all, mta, subjects[i::SESSIONS]) for i in range(SESSIONS)))

    results = [item for batch in batches for item in batch]
    assert sorted(subject for subject, _ in results) == sorted(subjects)
    for subject, transaction in results:
        end = transaction.end_of_data
        assert end is not None, subject
        if subject.startswith("good"):
            assert (end.code, end.text) == (550, REJECT_TEXT), subject
        else:  # on_error tempfail, answered by the bridge (Postfix's default text for a bare 451)
            assert (end.code, end.text) == (451, "4.7.1 Service unavailable - try again later"), subject
    # Every message reached the endpoint: the breaker never refused a call.
    assert sorted(_subject(r) for r in webhooks.requests_for(event="eom")) == sorted(subjects)
    assert bridge.breaker_states() == {"policy": "closed"}
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []
