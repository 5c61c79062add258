"""Per-message limits through a real Postfix set to ``milter_default_action = accept``.

``accept`` is the setting that would hide an open gate: if the bridge hung up on a message
over a limit, Postfix would deliver it unfiltered. The bridge must answer instead
(``server.on_oversize``, design.md §3.7), and healthy messages must still get the endpoint's
real decision. The endpoint here rejects every message it is asked about, so a delivered
message is one that no endpoint decided on. A spool directory that is full is the same kind
of fault: the bridge's, answered with a tempfail.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from milterbridge.config import EndpointSettings
from milterbridge.milter.constants import Event
from milterbridge.policy.model import OnError, OnOversize
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, blocking, smtp
from .postfix import PostfixInstance, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"
REFUSAL = {"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1", "text": "refused by the endpoint"}}


def many_headers(count: int) -> list[tuple[str, str]]:
    return [("X-Flood", f"line {n}") for n in range(count)]


FLOODS = [
    # The case found by a user: 12,000 one-line headers (about 110 KB) with the default limits.
    pytest.param({}, [RCPT], many_headers(12_000), "max_headers", id="12000-headers-default-limits"),
    pytest.param({"max_header_bytes": 2000}, [RCPT], [("X-Big", "v" * 3000)], "max_header_bytes", id="header-bytes"),
    pytest.param({"max_recipients": 3}, [f"r{n}@example.net" for n in range(6)], [], "max_recipients", id="rcpt"),
    # Postfix sends seven connect-stage macros (milterbridge asks for them): a limit of 4 is a
    # macro flood as far as the bridge can tell.
    pytest.param({"max_macros": 4}, [RCPT], [], "max_macros", id="macros"),
]


async def refusing_bridge(webhooks: FakeWebhooks, bridges: BridgeRunner, server: dict[str, Any]) -> None:
    webhooks.set_default(FakeResponse.json(REFUSAL), event="eom")
    endpoint = EndpointSettings(name="policy", url=webhooks.url("/policy"), timeout=5.0)
    await bridges.start(endpoint, server=server, default_action="accept")


@pytest.mark.asyncio
@pytest.mark.parametrize(("server", "rcpts", "headers", "limit"), FLOODS)
async def test_a_flood_is_refused_not_delivered(
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    bridges: BridgeRunner,
    server: dict[str, Any],
    rcpts: list[str],
    headers: list[tuple[str, str]],
    limit: str,
) -> None:
    """A message over a limit gets 451 4.3.4 naming the limit and is not delivered; the
    endpoint never saw it; a normal message next still gets the endpoint's own 550."""
    await refusing_bridge(webhooks, bridges, server)
    flood = await smtp(mta, SENDER, rcpts, make_message(subject="flood", headers=headers))
    reply = flood.transaction.end_of_data
    assert reply is not None
    assert reply.code == 451, reply
    assert reply.text.startswith("4.3.4"), reply
    assert limit in reply.text, reply
    assert webhooks.requests_for(event="eom") == []
    if limit != "max_macros":  # with that limit every session is over it
        normal = await smtp(mta, SENDER, [RCPT], make_message(subject="normal"))
        assert normal.transaction.end_of_data is not None
        assert normal.transaction.end_of_data.code == 550, normal.transaction.end_of_data
        assert len(webhooks.requests_for(event="eom")) == 1
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_continue_lets_the_endpoint_decide_on_what_was_kept(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """With on_oversize = continue the endpoint is asked, sees ``truncated``, and its reject holds."""
    await refusing_bridge(webhooks, bridges, {"max_headers": 50, "on_oversize": OnOversize.CONTINUE})
    flood = await smtp(mta, SENDER, [RCPT], make_message(subject="flood", headers=many_headers(200)))
    assert flood.transaction.end_of_data is not None
    assert flood.transaction.end_of_data.code == 550
    (request,) = webhooks.requests_for(event="eom")
    assert request.json["message"]["truncated"] == ["headers"]
    assert len(request.json["message"]["headers"]) == 50
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_a_recipient_flood_is_refused_per_recipient_when_rcpt_waits(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """With an rcpt endpoint the recipients over max_recipients get 451 at RCPT and the message,
    with the recipients kept, still gets the endpoint's decision at end-of-data."""
    webhooks.set_default(FakeResponse.decision("continue"), event="rcpt")
    webhooks.set_default(FakeResponse.json(REFUSAL), event="eom")
    endpoint = EndpointSettings(
        name="policy", url=webhooks.url("/policy"), events=frozenset({Event.RCPT, Event.EOM}), timeout=5.0
    )
    await bridges.start(endpoint, server={"max_recipients": 2}, default_action="accept")
    rcpts = [f"r{n}@example.net" for n in range(4)]
    result = await smtp(mta, SENDER, rcpts, make_message(subject="many"))
    codes = [r.code for r in result.transaction.rcpts]
    assert codes[:2] == [250, 250]
    assert codes[2:] == [452, 452]
    assert result.transaction.end_of_data is not None
    assert result.transaction.end_of_data.code == 550
    (request,) = webhooks.requests_for(event="eom")
    assert [r["address"] for r in request.json["message"]["rcpt_to"]] == rcpts[:2]
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.fixture
def full_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 64 KiB tmpfs as the directory body spool files go to (the bridge runs in this process)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)], check=False)
    assert mounted.returncode == 0, "cannot mount a small tmpfs (the real-Postfix suite runs as root)"
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    try:
        yield spool
    finally:
        subprocess.run(["umount", str(spool)], check=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("on_error", [OnError.CONTINUE, OnError.TEMPFAIL])
async def test_a_full_spool_tempfails_whatever_on_error_says(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, full_spool: Path, on_error: OnError
) -> None:
    """A body that cannot be spooled (ENOSPC) tempfails its message: not an endpoint failure, so
    not on_error (even continue), and not a hang; a body that fits in memory is decided as usual."""
    webhooks.set_default(FakeResponse.json(REFUSAL), event="eom")
    endpoint = EndpointSettings(
        name="policy", url=webhooks.url("/policy"), include_body=True, on_error=on_error, timeout=5.0
    )
    await bridges.start(endpoint, server={"body_memory_bytes": 4096}, default_action="accept")
    big = await smtp(mta, SENDER, [RCPT], _big_message())
    reply = big.transaction.end_of_data
    assert reply is not None
    assert reply.code == 451, reply
    assert webhooks.requests_for(event="eom") == []
    small = await smtp(mta, SENDER, [RCPT], make_message(subject="small"))
    assert small.transaction.end_of_data is not None
    assert small.transaction.end_of_data.code == 550
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


def _big_message() -> bytes:
    """About 200 KB: more than the 64 KiB spool can hold."""
    return make_message(subject="big", body=("x" * 76 + "\n") * 2600)
