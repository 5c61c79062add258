"""Two bridge replicas behind Debian's HAProxy, with a real Postfix relaying mail through them.

HAProxy runs with deploy/haproxy/haproxy.cfg as shipped: TCP mode, ``leastconn``, health
checks on each replica's ``/readyz``, ``retries`` with ``redispatch``. Only the addresses
change (the frontend and both replicas on loopback ports) and a stats socket is added, from
which the test reads what HAProxy thinks of each replica.

The mail path is the one a sending MTA gives: the test submits to Postfix's main listener,
which queues the message and relays it (``content_filter``) to a second smtpd of the same
Postfix whose milter is HAProxy. A replica that goes away mid-message makes that smtpd answer
4xx (``milter_default_action = tempfail``, the setting docs/postfix.md asks for: with
``accept``, Postfix itself would let the broken session's mail through, whatever the bridge
does), the message stays in Postfix's queue, and Postfix tries again through HAProxy. So
"nothing lost" is checked as: every message submitted lands in the Maildir exactly once, and
each carries the header of the one replica whose endpoint decided it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from milterbridge.client import Envelope, MilterClient
from tests.conftest import required_tool
from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.ops.conftest import BridgeLauncher, BridgeProcess, metric_value, pid_alive, write_config

from .bridge import blocking, header_lines, smtp
from .postfix import PostfixInstance, free_port, make_message

pytestmark = pytest.mark.postfix

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SENDER = "alice@example.org"
RCPT = "bob@example.net"
HEADER = "X-Replica"
#: HAProxy needs fall (2) checks 2 s apart to mark a replica down, rise (2) to bring it back.
HAPROXY_WAIT = 20.0
#: Each endpoint answers after this long, so that a kill finds messages in flight.
ENDPOINT_DELAY = 0.3


class Replica:
    """One ``milterbridge serve`` replica: fixed ports, so that a restart takes the same place."""

    def __init__(self, name: str, tmp_path: Path, webhooks: FakeWebhooks) -> None:
        self.name = name
        self.milter_port = free_port()
        self.admin_port = free_port()
        webhooks.set_default(
            FakeResponse.decision(
                "continue", modifications=[{"op": "add_header", "name": HEADER, "value": name}]
            ).after(ENDPOINT_DELAY),
            path=f"/{name}",
        )
        endpoint = {"name": "policy", "url": webhooks.url(f"/{name}"), "events": ["eom"], "timeout": 5}
        directory = tmp_path / name
        directory.mkdir()
        self.config = write_config(
            directory,
            listen=[f"inet:127.0.0.1:{self.milter_port}"],
            admin=f"127.0.0.1:{self.admin_port}",
            drain_timeout=30.0,
            endpoints=[endpoint],
        )
        self.process: BridgeProcess | None = None

    async def start(self, launcher: BridgeLauncher) -> BridgeProcess:
        self.process = await launcher.start(self.config)
        return self.process

    @property
    def running(self) -> BridgeProcess:
        assert self.process is not None
        return self.process


def haproxy_config(frontend_port: int, replicas: list[Replica], stats_socket: Path) -> str:
    """The shipped config with loopback addresses, these replicas and a stats socket; nothing else changed."""
    lines = SHIPPED.read_text().splitlines()
    out = []
    replaced = {"bind": 0, "server": 0, "global": 0}
    for line in lines:
        stripped = line.strip()
        if stripped == "bind :8890":
            out.append(f"    bind 127.0.0.1:{frontend_port}")
            replaced["bind"] += 1
        elif stripped.startswith("server milterbridge-"):
            if replaced["server"] == 0:
                # Each replica's health check goes to its own admin port (they share a host here).
                out.extend(f"    server {r.name} 127.0.0.1:{r.milter_port} port {r.admin_port}" for r in replicas)
            replaced["server"] += 1
        else:
            out.append(line)
            if stripped == "global":
                out.append(f"    stats socket {stats_socket} mode 600 level admin")
                replaced["global"] += 1
    assert replaced == {"bind": 1, "server": 3, "global": 1}, f"deploy/haproxy/haproxy.cfg changed shape: {replaced}"
    return "\n".join(out) + "\n"


class HAProxy:
    """A foreground HAProxy (``-db``) and its stats socket."""

    def __init__(self, tmp_path: Path, frontend_port: int, replicas: list[Replica]) -> None:
        binary = required_tool("haproxy", "scripts/install-test-tools installs it")
        self.port = frontend_port
        self.stats_socket = tmp_path / "haproxy.sock"
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(haproxy_config(frontend_port, replicas, self.stats_socket))
        self.log = tmp_path / "haproxy.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers: name -> columns (status, stot, check_status, ...)."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(b"show stat\n")
            await writer.drain()
            text = (await reader.read()).decode()
        finally:
            writer.close()
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "milterbridge" and row["svname"] != "BACKEND"}

    async def wait_status(self, server: str, status: str, *, timeout: float = HAPROXY_WAIT) -> dict[str, str]:
        """Wait until HAProxy reports ``server`` with ``status`` (UP, DOWN, ...); its stats row."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"haproxy exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                row = (await self.servers())[server]
            except (OSError, KeyError):
                row = {}
            if row.get("status") == status:
                return row
            if time.monotonic() > deadline:
                pytest.fail(f"haproxy never reported {server} {status}: {row}\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)


def relay_through(mta: PostfixInstance, milter: str) -> None:
    """Postfix relays every message it queues to a second smtpd of its own, whose milter is ``milter``."""
    filtered_port = mta.add_smtpd_service(
        "filtered",
        {
            "smtpd_milters": milter,
            "milter_default_action": "tempfail",
            "content_filter": "",  # mail received here is delivered, not relayed again
            "myhostname": "filter.milterbridge.test",  # not the relaying side's name: no loop detected
        },
    )
    mta.configure(
        {
            "smtpd_milters": "",
            "content_filter": f"smtp:[127.0.0.1]:{filtered_port}",
            # One SMTP session, so one milter connection, per message: HAProxy spreads connections.
            "smtp_connection_cache_on_demand": "no",
        }
    )


def replicas_of(messages: list[tuple[str, bytes]]) -> list[str]:
    """The X-Replica value of each delivered message; fails if one has none or several."""
    found = []
    for name, raw in messages:
        values = [value.strip() for key, value in header_lines(raw) if key.lower() == HEADER.lower()]
        assert len(values) == 1, f"{name}: {values}"
        found.append(values[0])
    return found


async def submit(mta: PostfixInstance, tag: str, count: int) -> None:
    """Submit ``count`` messages to Postfix's main listener (it has no milter: all are queued)."""
    for n in range(count):
        result = await smtp(mta, SENDER, [RCPT], make_message(subject=f"{tag} {n}"))
        assert result.accepted, result


async def delivered(mta: PostfixInstance, count: int, timeout: float = 60.0) -> list[tuple[str, bytes]]:
    """Wait until ``count`` messages are in the Maildir (Postfix retries deferred ones every 1-2 s)."""
    return await blocking(mta.wait_for_delivery, count, timeout)


@pytest.mark.asyncio
async def test_two_replicas_behind_haproxy_lose_nothing(
    tmp_path: Path, processes: BridgeLauncher, mta: PostfixInstance, webhooks: FakeWebhooks
) -> None:
    """Both replicas carry mail; one killed mid-traffic and restarted loses nothing; a draining one is
    taken out by HAProxy's /readyz check while it still runs, and gets no new connection."""
    one, two = Replica("replica1", tmp_path, webhooks), Replica("replica2", tmp_path, webhooks)
    for replica in (one, two):
        await replica.start(processes)
    haproxy = HAProxy(tmp_path, free_port(), [one, two])
    try:
        for replica in (one, two):
            await haproxy.wait_status(replica.name, "UP")
        await blocking(relay_through, mta, f"inet:127.0.0.1:{haproxy.port}")
        mark = mta.log_mark()

        # Both replicas carry traffic.
        await submit(mta, "first", 10)
        first = replicas_of(await delivered(mta, 10))
        assert set(first) == {one.name, two.name}, Counter(first)

        # One replica killed while messages are in flight through it, then started again.
        in_flight = len(webhooks.requests_for(path=f"/{one.name}"))
        await submit(mta, "kill", 20)
        await webhooks.wait_for(in_flight + 2, path=f"/{one.name}", timeout=30)
        one.running.send_signal(signal.SIGKILL)
        assert await one.running.wait_exit() == -signal.SIGKILL
        await haproxy.wait_status(one.name, "DOWN")
        await delivered(mta, 30)
        await one.start(processes)
        await haproxy.wait_status(one.name, "UP")
        await submit(mta, "after", 10)
        await delivered(mta, 40)
        assert metric_value(await one.running.metrics(), "milterbridge_messages_total", outcome="accepted") > 0

        # A draining replica: unready at once, taken out by HAProxy while it still runs (a session
        # it holds keeps it draining), and it gets no new connection.
        held = await MilterClient.open(f"inet:127.0.0.1:{two.milter_port}")
        try:
            await held.negotiate()
            await held.open_session(Envelope())
            before = metric_value(await two.running.metrics(), "milterbridge_connections_total")
            two.running.send_signal(signal.SIGTERM)
            row = await haproxy.wait_status(two.name, "DOWN")
            assert row["check_status"] == "L7STS", row  # the /readyz answer, not a refused connection
            assert pid_alive(two.running.pid)
            await submit(mta, "drain", 10)
            messages = await delivered(mta, 50)
            assert metric_value(await two.running.metrics(), "milterbridge_connections_total") == before
            await held.quit()
        finally:
            await held.aclose()
        assert await two.running.wait_exit(timeout=10) == 0
    finally:
        haproxy.stop()
        await blocking(mta.remove_smtpd_services)
        await blocking(mta.reset_settings)

    by_subject = {subject_of(raw): replica for (_, raw), replica in zip(messages, replicas_of(messages), strict=True)}
    batches = {"first": 10, "kill": 20, "after": 10, "drain": 10}
    expected = {f"{tag} {n}" for tag, count in batches.items() for n in range(count)}
    assert len(messages) == 50
    assert set(by_subject) == expected  # each message exactly once
    assert {by_subject[f"drain {n}"] for n in range(10)} == {one.name}
    assert await blocking(mta.wait_for_queue_idle) == []
    # What the kill broke was tempfailed to the relaying side and delivered on a later try.
    deferred = re.findall(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 4\d\d ", mta.log_since(mark))
    assert deferred, mta.log_tail(40)


def subject_of(raw: bytes) -> str:
    (subject,) = [value.strip() for key, value in header_lines(raw) if key.lower() == "subject"]
    return subject
