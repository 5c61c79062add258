"""Over ``max_connections`` through a real Postfix with ``milter_default_action = accept``.

Hanging up on the extra milter connection would let Postfix accept that session's mail
unfiltered. The bridge instead tempfails the session at CONNECT, and Postfix answers MAIL
with that reply (milter-protocol.md §5.4).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, blocking, smtp
from .postfix import PostfixInstance, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"


@pytest.mark.asyncio
async def test_session_over_max_connections_is_tempfailed_not_delivered(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """With the only slot held by an open SMTP session, a second session's message gets 451 4.3.2, no delivery."""
    webhooks.set_default(FakeResponse.decision("reject"), event="eom")
    bridge = await bridges.start(webhooks.endpoint("policy"), server={"max_connections": 1}, default_action="accept")
    holder = mta.smtp_session()
    await blocking(holder.open)  # Postfix opens its milter connection when the SMTP session starts
    try:
        for _ in range(500):
            if bridge.server.state.connections:
                break
            await asyncio.sleep(0.01)
        assert len(bridge.server.state.connections) == 1

        result = await smtp(mta, SENDER, [RCPT], make_message())

        assert result.greeting.code == 220
        mail = result.transaction.mail
        assert mail is not None
        assert mail.code == 451
        assert mail.text == "4.3.2 too many connections to the filter, try again later"
        assert not result.transaction.rcpts
        assert webhooks.requests == []  # answered by the bridge alone
        assert bridge.server.refused_connections == 0
    finally:
        await blocking(holder.close)
    await blocking(mta.wait_for_queue_idle)
    assert mta.maildir_messages() == []

    # With the slot free again the endpoint decides: its reject reaches the client.
    for _ in range(500):
        if not bridge.server.state.connections:
            break
        await asyncio.sleep(0.01)
    result = await smtp(mta, SENDER, [RCPT], make_message())
    end = result.transaction.end_of_data
    assert end is not None
    assert end.code == 550
    assert len(webhooks.requests_for(event="eom")) == 1
