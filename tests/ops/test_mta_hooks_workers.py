"""``--workers N`` with an MTA Hooks endpoint: one registration serves the whole instance."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from milterbridge.milter.messages import Continue, TempFail
from tests.fakes.hooks_scanner import TOKEN, HooksScanner

from .conftest import WAIT_TIMEOUT, BridgeProcess, free_port, metric_value, pid_alive, send_message, write_config

WORKERS = 2


def scanner_config(tmp_path, scanner: HooksScanner):
    endpoint: dict[str, Any] = {
        "name": "scanner",
        "url": scanner.url(),
        "protocol": "mta-hooks",
        "events": ["eom"],
        "headers": {"Authorization": f"Bearer {TOKEN}"},
    }
    listen = [f"inet:127.0.0.1:{free_port()}"]
    return write_config(tmp_path, listen=listen, drain_timeout=3.0, endpoints=[endpoint])


async def send(bridge: BridgeProcess, count: int, prefix: str) -> list[Any]:
    """``count`` messages, each on its own connection, a few at a time (the kernel spreads them)."""
    results = []
    for start in range(0, count, 5):
        batch = [send_message(bridge.milter, queue_id=f"{prefix}{n}") for n in range(start, min(count, start + 5))]
        results += await asyncio.gather(*batch)
    return [result.final for result in results]


async def until(predicate, timeout: float = WAIT_TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the scanner has no event to wait on
            await asyncio.sleep(0.05)


async def calls_per_worker(bridge: BridgeProcess) -> list[float]:
    return [
        metric_value(await bridge.metrics(admin=admin), "milterbridge_webhook_requests_total", outcome="ok")
        for admin in bridge.worker_admins()
    ]


@pytest.mark.asyncio
async def test_one_registration_serves_every_worker_through_reload_loss_and_stop(tmp_path, bridges):
    """Both workers call with the one registration; a reload keeps it; a 404 renews it for both; stop deletes it."""
    async with HooksScanner() as scanner:
        bridge = await bridges.start(scanner_config(tmp_path, scanner), workers=WORKERS)
        [first] = scanner.active()

        finals = await send(bridge, 30, "A")
        assert all(isinstance(final, Continue) for final in finals), finals
        assert all(count > 0 for count in await calls_per_worker(bridge)), "one worker got no message"
        assert {registration for registration, _, _ in scanner.calls} == {first.id}
        assert scanner.violations == []

        bridge.send_signal(signal.SIGHUP)
        await bridge.wait_log("config reloaded", count=WORKERS)
        finals = await send(bridge, 10, "B")
        assert all(isinstance(final, Continue) for final in finals)
        assert [r.id for r in scanner.active()] == [first.id]
        assert len(scanner.registrations) == 1

        scanner.forget()  # a restarted scanner: 404 to the next call
        [lost] = await send(bridge, 1, "C")
        assert isinstance(lost, TempFail)
        await until(lambda: len(scanner.active()) == 1)
        [second] = scanner.active()
        assert second.id != first.id
        before = len(scanner.calls)
        await asyncio.sleep(1.0)  # every worker reads the shared registrations twice a second
        finals = await send(bridge, 20, "D")
        assert all(isinstance(final, Continue) for final in finals), finals
        assert {registration for registration, _, _ in scanner.calls[before:]} == {second.id}

        workers = list(bridge.logs("started ")[0]["pids"])
        bridge.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit(timeout=10.0) == 0
        assert not [pid for pid in workers if pid_alive(pid)]
        assert scanner.deregistered == [second.id]


@pytest.mark.asyncio
async def test_a_killed_registrar_is_restarted_and_mail_flows_meanwhile(tmp_path, bridges):
    """SIGKILL to the registrar: the workers keep the published registration; the new registrar makes its own."""
    async with HooksScanner() as scanner:
        bridge = await bridges.start(scanner_config(tmp_path, scanner), workers=WORKERS)
        [first] = scanner.active()
        [started] = bridge.logs("started the MTA Hooks registrar")
        [registrar] = started["pids"]

        os.kill(registrar, signal.SIGKILL)
        finals = await send(bridge, 10, "K")
        assert all(isinstance(final, Continue) for final in finals), finals
        assert {registration for registration, _, _ in scanner.calls} == {first.id}

        await bridge.wait_log("MTA Hooks registrar (pid")
        await until(lambda: len(scanner.active()) == 2)
        [second] = [r for r in scanner.active() if r.id != first.id]
        before = len(scanner.calls)
        await asyncio.sleep(1.0)  # the workers read the new registration
        finals = await send(bridge, 10, "L")
        assert all(isinstance(final, Continue) for final in finals), finals
        assert {registration for registration, _, _ in scanner.calls[before:]} == {second.id}

        bridge.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit(timeout=10.0) == 0
        # The new registrar took over its predecessor's registration, and deleted it too.
        assert sorted(scanner.deregistered) == sorted([first.id, second.id])
