"""A config file that breaks under a running bridge, through a real Postfix that would let mail pass.

Postfix runs with ``milter_default_action = accept``: if the bridge ever hung up, or ran with
no enforcing endpoint, mail would be delivered unfiltered, so every message the endpoint
rejects must still be rejected. The bridge is the real ``milterbridge serve`` process (the
``tests/ops`` launcher), because reloads and worker restarts happen in that process and its
supervisor, not in the in-process bridge of ``bridge.py`` (design.md §3.7).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.ops.conftest import BridgeLauncher, BridgeProcess, metric_value, write_config

from .bridge import blocking, configure_milter, smtp
from .postfix import PostfixInstance, SmtpResult, closed_port, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"
REJECT = FakeResponse.decision("reject", reply={"code": 554, "enhanced": "5.7.1", "text": "policy says no"})


async def start_rejecting_bridge(
    tmp_path: Path,
    processes: BridgeLauncher,
    mta: PostfixInstance,
    webhooks: FakeWebhooks,
    listen: str,
    workers: int,
    env: Mapping[str, str] | None = None,
) -> tuple[Path, BridgeProcess]:
    """A bridge whose one enforcing endpoint rejects every message, with Postfix pointed at it (default accept)."""
    webhooks.set_default(REJECT, event="eom")
    endpoint = {"name": "policy", "url": webhooks.url("/hook"), "events": ["eom"], "timeout": 3}
    config = write_config(tmp_path, listen=[listen], endpoints=[endpoint])
    bridge = await processes.start(config, workers=workers, env=env)
    await blocking(configure_milter, mta, bridge.milter, "accept")
    assert_rejected(await smtp(mta, SENDER, [RCPT], make_message(subject="before")))
    return config, bridge


def assert_rejected(result: SmtpResult) -> None:
    """The endpoint's rejection reached the SMTP client at end-of-data."""
    reply = result.transaction.end_of_data
    assert reply is not None, result
    assert (reply.code, reply.text) == (554, "5.7.1 policy says no"), reply


async def assert_nothing_delivered(mta: PostfixInstance) -> None:
    """No message is queued or in the Maildir."""
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_truncated_config_at_sighup_keeps_the_gate_closed(
    tmp_path: Path, processes: BridgeLauncher, mta: PostfixInstance, webhooks: FakeWebhooks, milter_listen: str
) -> None:
    """A config truncated to 0 bytes and SIGHUP: refused and counted; every later message is still rejected."""
    config, bridge = await start_rejecting_bridge(tmp_path, processes, mta, webhooks, milter_listen, workers=1)

    config.write_bytes(b"")
    bridge.send_signal(signal.SIGHUP)
    (refused,) = await bridge.wait_log("config reload refused")
    assert refused["level"] == "error"

    for n in range(5):
        assert_rejected(await smtp(mta, SENDER, [RCPT], make_message(subject=f"after {n}")))
    assert len(webhooks.requests_for(event="eom")) == 6  # the endpoint decided every message
    await assert_nothing_delivered(mta)
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_config_reloads_total", result="refused") == 1
    assert metric_value(text, "milterbridge_config_reloads_total", result="ok") == 0


@pytest.mark.asyncio
async def test_worker_killed_while_the_config_is_broken_keeps_the_gate_closed(
    tmp_path: Path, processes: BridgeLauncher, mta: PostfixInstance, webhooks: FakeWebhooks, milter_listen: str
) -> None:
    """--workers 2, the file made invalid, one worker SIGKILLed: the restarted worker still rejects every message."""
    config, bridge = await start_rejecting_bridge(tmp_path, processes, mta, webhooks, milter_listen, workers=2)
    victim = bridge.logs("started ")[0]["pids"][0]

    config.write_text('[[endpoints]]\nname = "policy"\nurl = ')  # a write caught half-way: not TOML
    bridge.send_signal(signal.SIGHUP)
    await bridge.wait_log("config reload refused")
    os.kill(victim, signal.SIGKILL)
    await bridge.wait_log("milterbridge ", count=3)  # the replacement's "ready" line
    replacement_admin = bridge.worker_admins()[-1]

    # Each SMTP session is a new milter connection; send until the replacement has served some.
    sent = 0
    served = 0.0
    while sent < 10 or (served < 2 and sent < 40):
        assert_rejected(await smtp(mta, SENDER, [RCPT], make_message(subject=f"after {sent}")))
        sent += 1
        served = metric_value(await bridge.metrics(admin=replacement_admin), "milterbridge_connections_total")
    assert served >= 2, "the kernel sent no connection to the restarted worker"
    assert len(webhooks.requests_for(event="eom")) == sent + 1
    await assert_nothing_delivered(mta)


@pytest.mark.asyncio
async def test_tracing_to_a_dead_collector_keeps_the_gate_closed(
    tmp_path: Path, processes: BridgeLauncher, mta: PostfixInstance, webhooks: FakeWebhooks, milter_listen: str
) -> None:
    """Tracing on with its spans going to a collector that is not there, --workers 2: every message is
    still the endpoint's to decide, and one whose endpoint fails is tempfailed, never let through."""
    with closed_port() as port:
        env = {
            "MILTERBRIDGE_TRACING__ENABLED": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        _, bridge = await start_rejecting_bridge(tmp_path, processes, mta, webhooks, milter_listen, workers=2, env=env)
        for n in range(5):
            assert_rejected(await smtp(mta, SENDER, [RCPT], make_message(subject=f"traced {n}")))
        webhooks.set_default(FakeResponse.status_code(500), event="eom")
        failed = (await smtp(mta, SENDER, [RCPT], make_message(subject="endpoint down"))).transaction.end_of_data
        assert failed is not None
        assert 400 <= failed.code < 500, failed  # the endpoint's on_error (tempfail), not accept
    await assert_nothing_delivered(mta)
    assert len(bridge.logs("milterbridge ")) == 2  # both workers started with tracing on
