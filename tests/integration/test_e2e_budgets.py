"""``max_concurrency`` and per-event budgets (``timeouts``) under load through a real Postfix.

Six SMTP sessions at once reach one endpoint capped at one call in flight, which answers
slowly. Postfix runs with ``milter_default_action = accept``, so a call the bridge dropped
would show up as a delivered message: every message must get the endpoint's own decision
(a reject), or, when its budget runs out while it waits for the slot, the endpoint's
``on_error`` (tempfail), and none may be delivered.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from milterbridge.milter.constants import Event
from milterbridge.policy.model import OnError
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, blocking, smtp
from .postfix import PostfixInstance, SmtpResult, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"
SESSIONS = 6
ANSWER_DELAY = 0.3
WAIT = "milterbridge_webhook_queue_wait_seconds"
REFUSAL = FakeResponse.decision("reject", reply={"code": 550, "enhanced": "5.7.1", "text": "refused by the endpoint"})


async def concurrent_sessions(mta: PostfixInstance) -> list[SmtpResult]:
    """SESSIONS SMTP sessions at once, one message each."""
    return list(
        await asyncio.gather(*(smtp(mta, SENDER, [RCPT], make_message(subject=f"load {n}")) for n in range(SESSIONS)))
    )


def end_codes(results: list[SmtpResult]) -> list[int]:
    """The reply codes after the dot, sorted (0: no reply, as ``SmtpReply`` has it)."""
    return sorted(0 if r.transaction.end_of_data is None else r.transaction.end_of_data.code for r in results)


@pytest.mark.asyncio
async def test_one_slot_serves_every_session_in_turn(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """With max_concurrency = 1 and a slow endpoint, all six messages get its 550, one call at a
    time, and every call's wait for the slot is in the queue-wait histogram."""
    webhooks.set_default(REFUSAL.after(ANSWER_DELAY), event="eom")
    endpoint = webhooks.endpoint("slow", max_concurrency=1, timeout=10.0, events=frozenset({Event.EOM}))
    bridge = await bridges.start(endpoint, default_action="accept")

    results = await concurrent_sessions(mta)

    assert end_codes(results) == [550] * SESSIONS, [r.transaction for r in results]
    arrivals = sorted(request.received_at for request in webhooks.requests_for(event="eom"))
    assert len(arrivals) == SESSIONS
    # One call in flight: each request arrives only after the previous answer was sent.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) >= ANSWER_DELAY * 0.9, gaps
    assert bridge.metric(f"{WAIT}_count", endpoint="slow") == SESSIONS
    # Waits add up: the n-th call in line waits for about n answers (0 + 1 + ... + 5 of them).
    assert bridge.metric(f"{WAIT}_sum", endpoint="slow") >= ANSWER_DELAY * 10
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_calls_that_wait_past_their_eom_budget_are_tempfailed(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """With timeouts = { eom = 1.0 } and an endpoint that takes 0.8 s, the calls queued behind
    the slot run out of budget: they get on_error (451), nothing is sent for most of them, and
    no message is delivered."""
    webhooks.set_default(REFUSAL.after(0.8), event="eom")
    endpoint = webhooks.endpoint(
        "tight",
        max_concurrency=1,
        timeout=10.0,
        timeouts=((Event.EOM, 1.0),),
        on_error=OnError.TEMPFAIL,
        events=frozenset({Event.EOM}),
    )
    bridge = await bridges.start(endpoint, default_action="accept")

    results = await concurrent_sessions(mta)

    codes = end_codes(results)
    refused = codes.count(550)
    tempfailed = [code for code in codes if 400 <= code < 500]
    assert refused + len(tempfailed) == SESSIONS, [r.transaction for r in results]
    # The first call in line answers in time; the ones behind it cannot all fit in 1 s.
    assert refused >= 1
    assert len(tempfailed) >= SESSIONS - 2, codes
    for result in results:
        reply = result.transaction.end_of_data
        assert reply is not None
        if reply.code != 550:
            assert reply.text.startswith("4."), reply
    # A call that got no slot in time sent nothing (one that got it too late sent a request
    # and timed out on it), so the endpoint saw fewer calls than there were messages.
    assert refused <= len(webhooks.requests_for(event="eom")) < SESSIONS
    assert bridge.metric(f"{WAIT}_count", endpoint="tight") == SESSIONS
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []
