"""The admin listener: a real server on 127.0.0.1:0 queried with an aiohttp client."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
import pytest_asyncio

from milterbridge.admin import PID_HEADER, AdminServer, HealthSource, ProcessPages
from milterbridge.metrics import Metrics
from tests.conftest import assert_no_leaked_tasks


class FakeHealth:
    """A HealthSource whose answer the test sets."""

    def __init__(self) -> None:
        self.ready = True
        self.reason = ""
        self.fail = False

    def readiness(self) -> tuple[bool, str]:
        if self.fail:
            raise RuntimeError("check crashed")
        return self.ready, self.reason


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest_asyncio.fixture
async def admin(metrics, health) -> AsyncIterator[str]:
    """A started AdminServer; yields its base URL and checks for leaks after closing."""
    source: HealthSource = health
    server = AdminServer("127.0.0.1:0", ProcessPages(metrics, source))
    await server.start()
    host, port = server.bound
    try:
        yield f"http://{host}:{port}"
    finally:
        await server.aclose()
        await asyncio.sleep(0)
        assert_no_leaked_tasks()


async def get(url: str) -> tuple[int, str, Mapping[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text(), response.headers


@pytest.mark.asyncio
async def test_livez_ok_even_when_not_ready(admin, health):
    """/livez answers 200 ok whatever readiness says."""
    health.ready, health.reason = False, "draining"
    status, text, _ = await get(admin + "/livez")
    assert (status, text) == (200, "ok")


@pytest.mark.asyncio
async def test_readyz_follows_the_health_source(admin, health):
    """/readyz is 200 ready, then 503 with the reason once the source says not ready."""
    status, text, _ = await get(admin + "/readyz")
    assert (status, text) == (200, "ready")
    health.ready, health.reason = False, "draining"
    status, text, headers = await get(admin + "/readyz")
    assert (status, text) == (503, "draining")
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.asyncio
async def test_readyz_is_503_when_the_check_raises(admin, health, caplog):
    """A readiness check that raises means not ready, not a 500."""
    health.fail = True
    with caplog.at_level(logging.ERROR, logger="milterbridge.admin"):
        status, text, _ = await get(admin + "/readyz")
    assert (status, text) == (503, "readiness check failed")
    assert "readiness check failed" in caplog.text


@pytest.mark.asyncio
async def test_metrics_page(admin, metrics):
    """/metrics serves the registry in the Prometheus text format."""
    metrics.message("rejected")
    status, text, headers = await get(admin + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert 'milterbridge_messages_total{outcome="rejected"} 1.0' in text
    assert "milterbridge_info{" in text


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/", "/health", "/metrics/extra", "/livez/"])
async def test_unknown_paths_are_404(admin, path):
    """Anything but the three pages is 404."""
    status, _, _ = await get(admin + path)
    assert status == 404


@pytest.mark.asyncio
async def test_no_access_log_lines(admin, caplog):
    """Requests do not produce per-request log lines."""
    with caplog.at_level(logging.DEBUG):
        await get(admin + "/livez")
    assert not [r for r in caplog.records if r.name.startswith("aiohttp.access")]


@pytest.mark.asyncio
async def test_close_stops_listening(metrics, health):
    """After aclose the port refuses connections; bound raises; a second aclose is harmless."""
    server = AdminServer("127.0.0.1:0", ProcessPages(metrics, health))
    async with server:
        host, port = server.bound
        status, _, _ = await get(f"http://{host}:{port}/livez")
        assert status == 200
    with pytest.raises(RuntimeError):
        _ = server.bound
    with pytest.raises(aiohttp.ClientConnectorError):
        await get(f"http://{host}:{port}/livez")
    await server.aclose()
    assert_no_leaked_tasks()


@pytest.mark.asyncio
async def test_close_with_a_keepalive_client_open(metrics, health):
    """Shutdown does not wait for an idle keep-alive connection from a client still open."""
    server = AdminServer("127.0.0.1:0", ProcessPages(metrics, health))
    await server.start()
    host, port = server.bound
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/livez") as response:
            assert response.status == 200
        await asyncio.wait_for(server.aclose(), timeout=5)
    assert_no_leaked_tasks()


@pytest.mark.asyncio
async def test_ipv6_listen_string(metrics, health):
    """A [v6]:port listen string binds the IPv6 loopback."""
    server = AdminServer("[::1]:0", ProcessPages(metrics, health))
    try:
        await server.start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        host, port = server.bound
        assert host == "::1"
        status, _, _ = await get(f"http://[::1]:{port}/livez")
        assert status == 200
    finally:
        await server.aclose()


@pytest.mark.parametrize("listen", ["8891", "127.0.0.1", "::1:8891", "host:port"])
def test_bad_listen_string(metrics, health, listen):
    """A listen string that is not host:port or [v6]:port is refused at construction."""
    with pytest.raises(ValueError):
        AdminServer(listen, ProcessPages(metrics, health))


@pytest.mark.asyncio
async def test_start_twice_is_refused(metrics, health):
    """start() on a running server raises instead of binding again."""
    async with AdminServer("127.0.0.1:0", ProcessPages(metrics, health)) as server:
        with pytest.raises(RuntimeError):
            await server.start()


@pytest.mark.asyncio
async def test_port_in_use_fails_cleanly(metrics, health):
    """Binding an address already in use raises OSError and leaves nothing running."""
    async with AdminServer("127.0.0.1:0", ProcessPages(metrics, health)) as first:
        _, port = first.bound
        second = AdminServer(f"127.0.0.1:{port}", ProcessPages(metrics, health))
        with pytest.raises(OSError):
            await second.start()
        with pytest.raises(RuntimeError):
            _ = second.bound
    assert_no_leaked_tasks()


@pytest.mark.asyncio
async def test_every_answer_names_the_process(admin):
    """Each page carries the answering process's id, which the instance view keys workers on."""
    for path in ("/livez", "/readyz", "/metrics"):
        _, _, headers = await get(admin + path)
        assert headers[PID_HEADER] == str(os.getpid())


@pytest.mark.asyncio
async def test_private_unix_socket(tmp_path, metrics, health):
    """``unix:/path`` serves on a socket only its owner may open; aclose removes the file."""
    path = tmp_path / "worker-0.sock"
    async with AdminServer(f"unix:{path}", ProcessPages(metrics, health)) as server:
        assert server.bound == ("unix", 0)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector) as session, session.get("http://worker/readyz") as resp:
            assert (resp.status, await resp.text()) == (200, "ready")
    assert not path.exists()
    assert_no_leaked_tasks()


@pytest.mark.asyncio
async def test_a_prebound_socket(metrics, health):
    """With ``sock``, the server answers on the socket it was given (the supervisor binds the instance's)."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with AdminServer(f"127.0.0.1:{port}", ProcessPages(metrics, health), sock=sock) as server:
        assert server.bound == ("127.0.0.1", port)
        status, text, _ = await get(f"http://127.0.0.1:{port}/livez")
        assert (status, text) == (200, "ok")
    assert_no_leaked_tasks()


class FailingPages(ProcessPages):
    """Pages whose liveness check raises."""

    async def livez(self) -> tuple[bool, str]:
        raise RuntimeError("check crashed")


@pytest.mark.asyncio
async def test_livez_is_503_when_the_check_raises(metrics, health):
    """A liveness check that raises means not alive (503), not a 500."""
    async with AdminServer("127.0.0.1:0", FailingPages(metrics, health)) as server:
        host, port = server.bound
        status, text, _ = await get(f"http://{host}:{port}/livez")
    assert (status, text) == (503, "liveness check failed")
