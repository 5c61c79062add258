"""``milterbridge serve --workers N``: worker processes sharing the listeners (design.md §6)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from milterbridge.admin import PID_HEADER
from milterbridge.client import TransactionResult
from milterbridge.instance import REFRESH_INTERVAL
from milterbridge.milter.messages import AddHeader, Continue
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .conftest import (
    NO_ENDPOINTS,
    WAIT_TIMEOUT,
    BridgeLauncher,
    BridgeProcess,
    children_of,
    config_text,
    free_port,
    metric_value,
    pid_alive,
    send_message,
    write_config,
)

WORKERS = 2


def worker_pids(bridge: BridgeProcess) -> list[int]:
    """The pids the parent logged when it started the workers."""
    started = bridge.logs("started ")
    assert started, bridge.describe()
    return list(started[0]["pids"])


def admin_view_pid(bridge: BridgeProcess) -> int:
    """The pid of the instance's admin view, as the parent logged it."""
    (started,) = bridge.logs("started the admin view")
    (pid,) = started["pids"]
    return int(pid)


async def send_many(milter: str, count: int, *, stagger: float = 0.005) -> None:
    """``count`` messages on ``count`` connections, started ``stagger`` seconds apart; all must pass."""
    tasks = []
    for n in range(count):
        tasks.append(asyncio.create_task(send_message(milter, queue_id=f"W{n}")))
        await asyncio.sleep(stagger)
    results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_TIMEOUT)
    assert all(isinstance(r.final, Continue) for r in results)


async def connections_per_worker(bridge: BridgeProcess, admins: list[str]) -> list[float]:
    """``milterbridge_connections_total`` from each worker's private admin socket."""
    return [metric_value(await bridge.metrics(admin=a), "milterbridge_connections_total") for a in admins]


async def start_workers(tmp_path: Path, bridges: BridgeLauncher, listen: list[str]) -> BridgeProcess:
    """A ``--workers 2`` bridge with per-worker admin listeners on free ports (port 0)."""
    path = write_config(tmp_path, listen=listen, admin="127.0.0.1:0", drain_timeout=3.0, server=NO_ENDPOINTS)
    bridge = await bridges.start(path, workers=WORKERS)
    assert len(worker_pids(bridge)) == WORKERS
    return bridge


async def stop(bridge: BridgeProcess) -> None:
    """SIGTERM to the parent: every worker drains and the parent exits 0."""
    pids = worker_pids(bridge)
    bridge.send_signal(signal.SIGTERM)
    assert await bridge.wait_exit(timeout=5.0) == 0
    assert not [pid for pid in pids if pid_alive(pid)]


@pytest.mark.asyncio
async def test_two_workers_share_a_tcp_listener(tmp_path, bridges):
    """40 connections to one TCP port are spread over both worker processes."""
    bridge = await start_workers(tmp_path, bridges, [f"inet:127.0.0.1:{free_port()}"])
    admins = bridge.worker_admins()
    assert len(set(admins)) == WORKERS
    await send_many(bridge.milter, 40)
    counts = await connections_per_worker(bridge, admins)
    assert sum(counts) == 40
    assert all(count > 0 for count in counts), f"connections per worker: {counts}"
    for admin in admins:
        assert (await bridge.get("/readyz", admin=admin))[0] == 200
    await stop(bridge)


@pytest.mark.asyncio
async def test_two_workers_share_a_unix_socket(tmp_path, bridges):
    """A unix socket bound once by the parent serves through both workers and is removed at exit."""
    sock = tmp_path / "mb.sock"
    bridge = await start_workers(tmp_path, bridges, [f"unix:{sock}"])
    assert bridge.milter == f"unix:{sock}"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    await send_many(bridge.milter, 20)
    counts = await connections_per_worker(bridge, bridge.worker_admins())
    assert sum(counts) == 20
    await stop(bridge)
    assert not sock.exists()


@pytest.mark.asyncio
async def test_sigterm_to_the_parent_stops_every_worker(tmp_path, bridges):
    """SIGTERM to the parent drains both workers; the parent exits 0 and no worker is left."""
    bridge = await start_workers(tmp_path, bridges, [f"inet:127.0.0.1:{free_port()}"])
    pids = worker_pids(bridge)
    admin = admin_view_pid(bridge)
    assert children_of(bridge.pid) == {*pids, admin}
    await stop(bridge)
    assert not pid_alive(admin)
    assert len(bridge.logs("stopped")) == WORKERS


@pytest.mark.asyncio
async def test_a_killed_worker_is_restarted(tmp_path, bridges):
    """A worker that dies is replaced by a new process that serves, and shutdown still exits 0."""
    bridge = await start_workers(tmp_path, bridges, [f"inet:127.0.0.1:{free_port()}"])
    victim, survivor = worker_pids(bridge)
    os.kill(victim, signal.SIGKILL)
    await bridge.wait_log("worker ")
    assert "restarting" in bridge.logs("worker ")[0]["msg"]
    await bridge.wait_log("milterbridge ", count=WORKERS + 1)  # the replacement's "ready" line
    children = children_of(bridge.pid) - {admin_view_pid(bridge)}
    assert survivor in children
    assert victim not in children
    assert len(children) == WORKERS
    (replacement,) = children - {survivor}
    new_admin = bridge.worker_admins()[-1]
    assert (await bridge.get("/readyz", admin=new_admin))[0] == 200
    await send_many(bridge.milter, 10)
    bridge.send_signal(signal.SIGTERM)
    assert await bridge.wait_exit(timeout=5.0) == 0
    assert not pid_alive(replacement)
    assert not pid_alive(survivor)


@pytest.mark.asyncio
async def test_the_admin_port_shows_every_worker(tmp_path, bridges):
    """--workers 3: the one admin port counts every message, stays right when a worker is killed and
    restarted, and is ready only while every worker is."""
    workers = 3
    admin_port = free_port()
    path = write_config(
        tmp_path,
        listen=[f"inet:127.0.0.1:{free_port()}"],
        admin=f"127.0.0.1:{admin_port}",
        drain_timeout=3.0,
        server=NO_ENDPOINTS,
    )
    bridge = await bridges.start(path, workers=workers, wait_ready=False)
    await bridge.wait_ready(workers=workers)
    await bridge.wait_log("admin listening on", count=workers + 1)
    assert bridge.admin == f"127.0.0.1:{admin_port}"
    assert (await bridge.get("/readyz"))[0] == 200
    assert await bridge.get("/livez") == (200, "ok")

    await send_many(bridge.milter, 60)
    per_worker = await worker_states(bridge)  # index -> (pid, connections)
    assert sorted(per_worker) == list(range(workers))
    counts = [count for _, count in per_worker.values()]
    assert sum(counts) == 60
    assert sum(1 for count in counts if count > 0) >= 2, f"connections per worker: {counts}"
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_connections_total") == 60
    assert metric_value(text, "milterbridge_messages_total", outcome="accepted") == 60
    assert metric_value(text, "milterbridge_workers", state="up") == workers
    assert metric_value(text, "milterbridge_connections_active") == 0

    # More mail, no scrape: the admin view reads the workers on its own every REFRESH_INTERVAL.
    await send_many(bridge.milter, 30)
    per_worker = await worker_states(bridge)
    await asyncio.sleep(REFRESH_INTERVAL + 1.0)

    # Kill the worker that served the most: what it counted stays in the sum, never twice.
    victim_index, (victim, served) = max(per_worker.items(), key=lambda item: item[1][1])
    assert served > 0
    os.kill(victim, signal.SIGKILL)
    await bridge.wait_log("worker ")
    status, reason = await bridge.get("/readyz")
    assert status == 503
    assert f"worker {victim_index}: not answering" in reason
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_messages_total", outcome="accepted") == 90
    assert metric_value(text, "milterbridge_workers", state="down") == 1

    await bridge.wait_log("milterbridge ", count=workers + 1)  # the replacement's "ready" line
    await bridge.wait_until(lambda: len(bridge.worker_admins()) == workers + 1, "the replacement's admin socket")
    assert (await bridge.get("/readyz"))[0] == 200
    assert (await worker_states(bridge))[victim_index][0] != victim
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_messages_total", outcome="accepted") == 90
    await send_many(bridge.milter, 30)
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_messages_total", outcome="accepted") == 120
    assert metric_value(text, "milterbridge_connections_total") == 120
    assert metric_value(text, "milterbridge_workers", state="up") == workers
    await stop(bridge)


async def worker_states(bridge: BridgeProcess) -> dict[int, tuple[int, float]]:
    """Worker index -> (pid, ``connections_total``), read from each worker's private admin socket."""
    states = {}
    for admin in bridge.worker_admins():  # a replacement's line comes after its predecessor's
        path = admin.removeprefix("unix:")
        index = int(re.search(r"worker-(\d+)\.sock$", path).group(1))
        connector = aiohttp.UnixConnector(path=path)
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession(connector=connector) as session, session.get("http://w/metrics") as got:
                pid = int(got.headers[PID_HEADER])
                states[index] = (pid, metric_value(await got.text(), "milterbridge_connections_total"))
    return states


@pytest.mark.asyncio
async def test_a_busy_admin_port_stops_the_start(tmp_path, bridges):
    """With workers, an admin address that cannot be bound stops the start before any worker runs."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        listen = [f"inet:127.0.0.1:{free_port()}"]
        path = write_config(tmp_path, listen=listen, admin=f"127.0.0.1:{port}", server=NO_ENDPOINTS)
        bridge = await bridges.start(path, workers=WORKERS, wait_ready=False)
        assert await bridge.wait_exit() == 1
    (line,) = bridge.logs("cannot start")
    assert "in use" in line["msg"], line
    assert not bridge.logs("started ")


@pytest.mark.asyncio
async def test_sigterm_while_a_worker_restarts_still_stops(tmp_path, bridges):
    """SIGTERM during a worker's restart delay stops everything and the parent exits 0."""
    bridge = await start_workers(tmp_path, bridges, [f"inet:127.0.0.1:{free_port()}"])
    victim, _ = worker_pids(bridge)
    os.kill(victim, signal.SIGKILL)
    await bridge.wait_log("worker ")  # logged just before the restart delay
    bridge.send_signal(signal.SIGTERM)
    assert await bridge.wait_exit(timeout=3.0) == 0
    assert not children_of(bridge.pid)


def tagging_config(webhooks: FakeWebhooks, path: str, listen: str) -> str:
    """A config with one enforcing eom endpoint at ``path`` (it answers with an X-Ops tag)."""
    endpoint = {"name": "policy", "url": webhooks.url(path), "events": ["eom"], "timeout": 3}
    return config_text(listen=[listen], admin="127.0.0.1:0", drain_timeout=3.0, endpoints=[endpoint])


def ops_tag(result: TransactionResult) -> str | None:
    """The X-Ops header value added at end-of-message, if any."""
    eom = result.eom
    values = [m.value.decode().strip() for m in (eom.modifications if eom else ()) if isinstance(m, AddHeader)]
    return values[0] if values else None


def tag_op(value: str) -> dict[str, str]:
    """An add_header modification ``X-Ops: value``."""
    return {"op": "add_header", "name": "X-Ops", "value": value}


async def refused_count(bridge: BridgeProcess, admin: str, *, wanted: float) -> float:
    """``config_reloads_total{result="refused"}`` of one worker, polled until it reaches ``wanted`` (or time is up)."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        text = await bridge.metrics(admin=admin)
        count = metric_value(text, "milterbridge_config_reloads_total", result="refused")
        if count >= wanted or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_restarted_worker_gets_the_last_accepted_config(tmp_path, bridges, webhooks):
    """A worker killed while the file is broken comes back with the last config the supervisor accepted."""
    for name in ("old", "new"):
        webhooks.set_default(FakeResponse.decision("continue", modifications=[tag_op(name)]), path=f"/{name}")
    listen = f"inet:127.0.0.1:{free_port()}"
    config = tmp_path / "milterbridge.toml"
    config.write_text(tagging_config(webhooks, "/old", listen))
    bridge = await bridges.start(config, workers=WORKERS)
    victim, survivor = worker_pids(bridge)

    # An accepted reload: the supervisor passes SIGHUP on and both workers switch.
    config.write_text(tagging_config(webhooks, "/new", listen))
    bridge.send_signal(signal.SIGHUP)
    await bridge.wait_log("config accepted")
    await bridge.wait_log("config reloaded", count=WORKERS)

    # Then the file breaks: refused by the supervisor, never passed on, counted by each worker.
    config.write_text("")
    bridge.send_signal(signal.SIGHUP)
    (refused,) = await bridge.wait_log("config reload refused")
    assert refused["level"] == "error"
    assert "server.allow_no_endpoints" in refused["msg"]
    for admin in bridge.worker_admins():
        assert await refused_count(bridge, admin, wanted=1) == 1
    os.kill(victim, signal.SIGKILL)
    await bridge.wait_log("milterbridge ", count=WORKERS + 1)  # the replacement's "ready" line
    (replacement,) = children_of(bridge.pid) - {survivor, admin_view_pid(bridge)}
    replacement_admin = bridge.worker_admins()[-1]

    # Every message gets the accepted endpoint's answer, including those the replacement serves.
    tags = []
    for n in range(40):
        tags.append(ops_tag(await send_message(bridge.milter, queue_id=f"R{n}")))
        served = metric_value(await bridge.metrics(admin=replacement_admin), "milterbridge_connections_total")
        if served >= 3 and n >= 9:
            break
    assert served >= 3, "the kernel sent no connection to the restarted worker"
    assert tags == ["new"] * len(tags)
    assert len(bridge.logs("config reloaded")) == WORKERS  # the broken file reached no worker
    text = await bridge.metrics(admin=replacement_admin)
    assert metric_value(text, "milterbridge_config_reloads_total", result="refused") == 0  # it started after
    assert pid_alive(replacement)
    await stop(bridge)


def self_signed_certificate(directory: Path) -> Path:
    """A throwaway self-signed certificate (PEM), made with the openssl command."""
    cert, key = directory / "ca.pem", directory / "ca.key"
    command = ["openssl", "req", "-x509", "-nodes", "-days", "2", "-newkey", "rsa:2048", "-subj", "/CN=localhost"]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert


@pytest.mark.asyncio
async def test_a_worker_that_cannot_build_its_endpoints_says_why(tmp_path, bridges):
    """A worker restarted after its endpoint's CA file went bad logs why it cannot start (and the
    supervisor keeps trying); it does not die without a word."""
    ca_file = self_signed_certificate(tmp_path)
    endpoint = {"name": "policy", "url": "https://127.0.0.1:9/milter", "tls": {"ca_file": str(ca_file)}}
    path = write_config(tmp_path, listen=[f"inet:127.0.0.1:{free_port()}"], drain_timeout=3.0, endpoints=[endpoint])
    bridge = await bridges.start(path, workers=WORKERS)
    victim, survivor = worker_pids(bridge)
    ca_file.write_text("not a certificate\n")  # a rotation gone wrong
    os.kill(victim, signal.SIGKILL)
    (refusal, *_) = await bridge.wait_log("cannot start")
    assert refusal["level"] == "error"
    assert "X509" in refusal["msg"] or "PEM" in refusal["msg"], refusal
    await bridge.wait_log("worker ", count=2)  # the failed replacement is reported and restarted
    assert pid_alive(survivor)
    bridge.send_signal(signal.SIGTERM)
    assert await bridge.wait_exit(timeout=5.0) == 0


@pytest.mark.asyncio
async def test_a_tmpdir_too_long_for_the_admin_sockets_stops_the_start(tmp_path, bridges):
    """The workers' private admin sockets must fit a unix socket path: a long TMPDIR is refused at start."""
    long_dir = tmp_path / ("d" * 90)
    long_dir.mkdir()
    path = write_config(tmp_path, listen=[f"inet:127.0.0.1:{free_port()}"], server=NO_ENDPOINTS)
    bridge = await bridges.start(path, workers=WORKERS, env={"TMPDIR": str(long_dir)}, wait_ready=False)
    assert await bridge.wait_exit() == 1
    (line,) = bridge.logs("cannot start")
    assert "set TMPDIR to a shorter directory" in line["msg"]
    assert not bridge.logs("started ")
    assert list(long_dir.iterdir()) == []  # the private directory was removed
