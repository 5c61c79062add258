"""``milterbridge serve`` operated as a process: demo, metrics, logs, drain and reload (design.md §6)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import milterbridge
from milterbridge.client import Envelope, MilterClient
from milterbridge.milter.messages import AddHeader, Continue
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .conftest import (
    MESSAGE,
    NO_ENDPOINTS,
    WAIT_TIMEOUT,
    BridgeProcess,
    child_env,
    config_text,
    free_port,
    metric_value,
    port_is_free,
    run_cli,
    send_message,
    write_config,
)

DEMO_PORTS = (8890, 8891, 8892)
SECRET_B64 = "b3BzLWxvZy1zZWNyZXQtbmV2ZXItbG9nZ2Vk"
SECRET = f"whsec_{SECRET_B64}"
ENV_SECRET_B64 = "ZW52LXNlY3JldC1mb3Itb3BzLWxvZ3MtdGVzdA=="
ENV_SECRET = f"whsec_{ENV_SECRET_B64}"
TOKEN = "ops-bearer-5e1d2c"


def tag(value: str) -> FakeResponse:
    """An eom answer that adds ``X-Ops: value``."""
    return FakeResponse.decision("continue", modifications=[{"op": "add_header", "name": "X-Ops", "value": value}])


def added_headers(result: object) -> dict[str, str]:
    """Headers added at end-of-message, name -> value without the leading space."""
    eom = getattr(result, "eom", None)
    assert eom is not None, f"no end-of-message answer: {result!r}"
    return {m.name.decode(): m.value.decode().strip() for m in eom.modifications if isinstance(m, AddHeader)}


def policy_endpoint(webhooks: FakeWebhooks, path: str = "/hook", **keys: object) -> dict[str, object]:
    """An enforcing endpoint at ``path`` for eom."""
    return {"name": "policy", "url": webhooks.url(path), "events": ["eom"], "timeout": 3, **keys}


async def connection_refused(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` is refused."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# -- the demo ----------------------------------------------------------------------------


def demo_ports_busy(why: str) -> None:
    """Skip loudly (fail under CI=true): the demo cannot run here."""
    reason = f"DEMO TEST NOT RUN: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.mark.asyncio
async def test_demo_without_config(tmp_path, bridges, message_file):
    """``serve`` without a config runs the demo: banner, refused recipient, tag header, SIGTERM exits 0."""
    busy = [port for port in DEMO_PORTS if not port_is_free(port)]
    if busy:
        demo_ports_busy(f"the demo's fixed ports {busy} are in use on this machine")
    bridge = await bridges.start(None, workers=None, wait_ready=False)
    await bridge.wait_until(
        lambda: "milterbridge demo" in bridge.stderr() or bridge.proc.poll() is not None,
        "the demo banner",
        allow_exit=True,
    )
    if bridge.proc.poll() is not None and "address already in use" in bridge.stdout() + bridge.stderr():
        demo_ports_busy(f"another process took one of the demo's ports {DEMO_PORTS} first")
    await bridge.wait_log("milterbridge ")
    assert "inet:127.0.0.1:8890" in bridge.stderr()
    assert "http://127.0.0.1:8891/metrics" in bridge.stderr()
    message_file.write_bytes(b"Subject: spam offer\r\n\r\nhello\r\n")

    result = await run_cli(
        "send",
        str(message_file),
        "--milter",
        "inet:127.0.0.1:8890",
        "--rcpt",
        "alice@example.com",
        "--rcpt",
        "blocked@example.com",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    accepted, blocked = document["stages"]["rcpt"]
    assert accepted == {"action": "continue"}
    assert blocked["action"] == "reject"
    assert any(line.startswith("550") for line in blocked["reply"])
    headers = {m["name"]: m["value"].strip() for m in document["modifications"] if m["op"] == "add_header"}
    assert headers["X-Milterbridge-Demo"] == "tagged"
    assert headers["X-Spam-Flag"] == "YES"
    assert document["decision"] == {"action": "continue"}

    status, _ = await bridge.get("/readyz", admin="127.0.0.1:8891")
    assert status == 200
    bridge.send_signal(signal.SIGTERM)
    assert await bridge.wait_exit(timeout=5.0) == 0


def test_demo_with_its_filter_port_busy_fails_cleanly():
    """The demo with port 8892 taken exits 1 with a one-line error naming the address, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        # Hold the port ourselves when it is free; when it is not, someone else holds it: the same case.
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", DEMO_PORTS[2]))
            holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "milterbridge", "serve"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert "cannot start" in result.stdout + result.stderr
    assert "8892" in result.stdout + result.stderr


@pytest.mark.asyncio
async def test_demo_is_not_used_when_milterbridge_config_is_set(tmp_path, bridges):
    """MILTERBRIDGE_CONFIG alone selects the configured bridge (no banner, the file's listener)."""
    port = free_port()
    path = write_config(tmp_path, listen=[f"inet:127.0.0.1:{port}"], server=NO_ENDPOINTS)
    bridge = await bridges.start(None, env={"MILTERBRIDGE_CONFIG": str(path)})
    assert bridge.milter == f"inet:127.0.0.1:{port}"
    assert "demo" not in bridge.stderr()
    result = await send_message(bridge.milter)
    assert isinstance(result.final, Continue)


# -- metrics -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metrics_change_with_traffic(tmp_path, bridges, webhooks):
    """/metrics counters grow with messages and webhook calls; /livez and /readyz answer 200."""
    webhooks.set_default(tag("yes"), event="eom")
    dead = f"http://127.0.0.1:{free_port()}/gone"
    path = write_config(
        tmp_path,
        endpoints=[
            policy_endpoint(webhooks),
            # /livez must not care about a dead endpoint: an observe one cannot change any message.
            {"name": "shadow", "url": dead, "mode": "observe", "timeout": 1, "retry": False},
        ],
    )
    bridge = await bridges.start(path)
    assert await bridge.get("/livez") == (200, "ok")
    assert (await bridge.get("/readyz"))[0] == 200
    before = await bridge.metrics()

    for n in range(3):
        result = await send_message(bridge.milter, queue_id=f"Q{n}")
        assert added_headers(result) == {"X-Ops": "yes"}

    async def counted() -> str:
        text = await bridge.metrics()
        # observe calls finish in the background: wait for them before comparing
        done = metric_value(text, "milterbridge_webhook_requests_total", endpoint="shadow")
        return text if done >= 3 else ""

    deadline = time.monotonic() + WAIT_TIMEOUT
    after = await counted()
    while not after and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        after = await counted()
    assert after, "the observe endpoint's calls were never counted"

    def delta(sample: str, **labels: str) -> float:
        return metric_value(after, sample, **labels) - metric_value(before, sample, **labels)

    assert delta("milterbridge_messages_total", outcome="accepted") == 3
    assert delta("milterbridge_messages_total", outcome="tempfailed") == 0
    assert delta("milterbridge_connections_total") == 3
    assert delta("milterbridge_webhook_requests_total", endpoint="policy", event="eom", outcome="ok") == 3
    assert delta("milterbridge_webhook_requests_total", endpoint="shadow", outcome="connection_error") == 3
    assert delta("milterbridge_decisions_total", endpoint="policy", event="eom", action="continue") == 3
    assert delta("milterbridge_webhook_request_duration_seconds_count", endpoint="policy", event="eom") == 3
    assert metric_value(after, "milterbridge_info", version=milterbridge.__version__) == 1
    assert metric_value(after, "milterbridge_draining") == 0
    # Bounded labels: no address, queue id or URL ever becomes a label value.
    for value in ("Q0", "rcpt@example.net", "127.0.0.1", "/hook"):
        assert f'"{value}"' not in after
    assert await bridge.get("/livez") == (200, "ok")
    assert (await bridge.get("/readyz"))[0] == 200


# -- logs --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_logs_are_json_with_one_line_per_message_and_per_close(tmp_path, bridges, webhooks):
    """Every stdout line is JSON; each message outcome and each connection close has its own line."""
    webhooks.set_default(FakeResponse.decision("continue"), event="rcpt")
    webhooks.set_default(
        lambda req: (
            FakeResponse.decision("reject", reply={"code": 550, "text": "no"})
            if req.json["message"]["queue_id"] == "QREJ"
            else tag("ok")
        ),
        event="eom",
    )
    path = write_config(tmp_path, endpoints=[policy_endpoint(webhooks, events=["rcpt", "eom"])])
    bridge = await bridges.start(path)

    # Two messages on one connection, then one more on a second connection.
    envelope = Envelope(queue_id=b"QONE")
    async with asyncio.timeout(WAIT_TIMEOUT):
        client = await MilterClient.open(bridge.milter)
        try:
            await client.negotiate()
            await client.open_session(envelope)
            first = await client.send_transaction(envelope, MESSAGE)
            second = await client.send_transaction(Envelope(queue_id=b"QREJ"), MESSAGE)
            await client.quit()
        finally:
            await client.aclose()
    assert added_headers(first) == {"X-Ops": "ok"}
    assert second.final is not None
    assert not isinstance(second.final, Continue)
    await send_message(bridge.milter, queue_id="QTWO")

    closes = await bridge.wait_log("connection closed", count=2)
    records = bridge.records()  # parse_log fails the test on any line that is not JSON
    assert records
    for record in records:
        for key in ("ts", "level", "logger", "msg"):
            assert key in record, record
    outcomes = [r for r in records if "outcome" in r and r.get("msg", "").startswith("message ")]
    assert [r["queue_id"] for r in outcomes] == ["QONE", "QREJ", "QTWO"]
    assert [r["outcome"] for r in outcomes] == ["accepted", "rejected", "accepted"]
    for record in outcomes:
        assert record["level"] == "info"
        assert record["session"]
        assert record["message"]
        endpoints = record["endpoints"]
        assert {e["event"] for e in endpoints} == {"rcpt", "eom"}
        for call in endpoints:
            assert call["endpoint"] == "policy"
            assert call["action"] in ("continue", "reject")
            assert isinstance(call["ms"], int | float)
            assert call["ms"] >= 0
    assert outcomes[0]["session"] == outcomes[1]["session"] != outcomes[2]["session"]
    assert len({r["message"] for r in outcomes}) == 3
    assert [e["action"] for e in outcomes[1]["endpoints"] if e["event"] == "eom"] == ["reject"]

    assert len(closes) == 2
    assert {c["session"] for c in closes} == {outcomes[0]["session"], outcomes[2]["session"]}
    by_session = {c["session"]: c for c in closes}
    assert by_session[outcomes[0]["session"]]["messages"] == 2
    assert by_session[outcomes[2]["session"]]["messages"] == 1
    # info level: no per-event lines
    assert not [r for r in records if r["level"] == "debug"]


@pytest.mark.asyncio
async def test_no_secret_appears_in_any_output(tmp_path, bridges, webhooks):
    """Secrets and Authorization values from file and environment never reach stdout or stderr."""
    webhooks.set_default(tag("signed"), path="/hook")
    webhooks.set_default(FakeResponse.status_code(500, b"upstream broke"), path="/broken")
    path = write_config(
        tmp_path,
        log_level="debug",  # the most output there is
        endpoints=[
            policy_endpoint(
                webhooks,
                events=["rcpt", "eom"],
                secret=SECRET,
                secret_env="OPS_WEBHOOK_SECRET",
                headers={"Authorization": "Bearer ${OPS_TOKEN}"},
            ),
            {
                "name": "broken",
                "url": webhooks.url("/broken"),
                "events": ["eom"],
                "timeout": 2,
                "on_error": "continue",
                "retry": False,
                "secret": SECRET,
                "headers": {"Authorization": "Bearer ${OPS_TOKEN}"},
            },
        ],
    )
    env = {"OPS_WEBHOOK_SECRET": ENV_SECRET, "OPS_TOKEN": TOKEN}
    bridge = await bridges.start(path, env=env)
    await send_message(bridge.milter, rcpts=["a@example.net", "b@example.net"])
    await bridge.wait_log("connection closed")
    # SIGHUP re-reads the file and logs the reload: that path must not leak either.
    bridge.send_signal(signal.SIGHUP)
    await bridge.wait_log("config reloaded")
    bridge.send_signal(signal.SIGTERM)
    assert await bridge.wait_exit() == 0

    # The secrets really were in use: the endpoint got both signatures and the header.
    signed = webhooks.requests_for(path="/hook", event="eom")[0]
    assert signed.headers["Authorization"] == f"Bearer {TOKEN}"
    assert len(signed.headers["webhook-signature"].split()) == 2
    assert webhooks.requests_for(path="/broken")
    output = bridge.stdout() + bridge.stderr()
    assert "broken" in output  # the failure was logged ...
    for secret in (SECRET, SECRET_B64, ENV_SECRET, ENV_SECRET_B64, TOKEN, f"Bearer {TOKEN}"):
        assert secret not in output  # ... without any credential
    assert [r for r in bridge.records() if r["level"] == "debug"], "debug level should log per-event lines"


# -- drain -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sigterm_drains_in_flight_messages(tmp_path, bridges, webhooks):
    """SIGTERM: /readyz 503 at once, new connections refused, in-flight messages answered, exit 0."""
    delay = 0.8
    webhooks.set_default(tag("slow").after(delay), event="eom")
    drain_timeout = 5.0
    path = write_config(tmp_path, drain_timeout=drain_timeout, endpoints=[policy_endpoint(webhooks)])
    bridge = await bridges.start(path)
    host, port = bridge.milter.removeprefix("inet:").rsplit(":", 1)

    # An open session without a message: Postfix's SMTP session is still in flight.
    idle = await MilterClient.open(bridge.milter)
    await idle.negotiate()
    await idle.open_session(Envelope())

    count = 4
    sends = [asyncio.create_task(send_message(bridge.milter, queue_id=f"D{n}")) for n in range(count)]
    try:
        await webhooks.wait_for(count, event="eom", timeout=WAIT_TIMEOUT)
        signalled = time.monotonic()
        bridge.send_signal(signal.SIGTERM)

        # /readyz turns 503 right away, while the messages are still in flight.
        status = 200
        while status == 200 and time.monotonic() - signalled < delay * 0.75:
            status, reason = await bridge.get("/readyz")
        assert status == 503
        assert "draining" in reason
        assert not any(task.done() for task in sends), "the slow messages ended before the drain was seen"

        # The listener is closed: a new connection is refused, not queued.
        assert await connection_refused(host, int(port))

        results = await asyncio.wait_for(asyncio.gather(*sends), WAIT_TIMEOUT)
    finally:
        for task in sends:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
    for result in results:
        assert isinstance(result.final, Continue)
        assert added_headers(result) == {"X-Ops": "slow"}

    # The open session is still served during the drain (closing it would make Postfix apply
    # milter_default_action to its next command); the drain ends when it quits.
    try:
        late = await asyncio.wait_for(
            idle.send_transaction(Envelope(), b"Subject: late\r\n\r\nstill served\r\n"), WAIT_TIMEOUT
        )
        assert isinstance(late.final, Continue)
        assert added_headers(late) == {"X-Ops": "slow"}
        await idle.quit()
    finally:
        await idle.aclose()

    code = await bridge.wait_exit(timeout=drain_timeout)
    assert code == 0
    assert time.monotonic() - signalled < drain_timeout
    outcomes = [r["outcome"] for r in bridge.logs("message ") if "outcome" in r]
    assert outcomes == ["accepted"] * (count + 1)
    assert bridge.logs("draining")
    assert bridge.logs("stopped")


@pytest.mark.asyncio
async def test_sigint_stops_like_sigterm(tmp_path, bridges):
    """SIGINT (Ctrl-C) drains and exits 0 like SIGTERM, without a KeyboardInterrupt traceback."""
    bridge = await bridges.start(write_config(tmp_path, server=NO_ENDPOINTS))
    bridge.send_signal(signal.SIGINT)
    assert await bridge.wait_exit() == 0
    assert bridge.logs("stopped")
    assert "Traceback" not in bridge.stderr()


@pytest.mark.asyncio
async def test_drain_deadline_cuts_a_stuck_message(tmp_path, bridges, webhooks):
    """A message still pending at drain_timeout is cut, and the process still exits 0 in time."""
    webhooks.set_default(FakeResponse.never_answer(), event="eom")
    drain_timeout = 0.5
    path = write_config(tmp_path, drain_timeout=drain_timeout, endpoints=[policy_endpoint(webhooks, timeout=20)])
    bridge = await bridges.start(path)
    send = asyncio.create_task(send_message(bridge.milter))
    try:
        await webhooks.wait_for(1, event="eom")
        signalled = time.monotonic()
        bridge.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit(timeout=drain_timeout + 5.0) == 0
        assert time.monotonic() - signalled < drain_timeout + 3.0
    finally:
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
    assert bridge.logs("drain deadline")


# -- reload ------------------------------------------------------------------------------


async def reloaded(bridge: BridgeProcess, message: str) -> None:
    """SIGHUP and wait for the next log line starting with ``message``."""
    seen = len(bridge.logs(message))
    bridge.send_signal(signal.SIGHUP)
    await bridge.wait_log(message, count=seen + 1)


@pytest.mark.asyncio
async def test_sighup_reload_switches_endpoints_without_dropping_sessions(tmp_path, bridges, webhooks):
    """After SIGHUP new messages use the new endpoint; a session opened before keeps working."""
    webhooks.set_default(tag("old"), path="/old")
    webhooks.set_default(tag("new"), path="/new")
    config = tmp_path / "milterbridge.toml"
    config.write_text(config_text(endpoints=[policy_endpoint(webhooks, "/old")]))
    bridge = await bridges.start(config)
    assert added_headers(await send_message(bridge.milter)) == {"X-Ops": "old"}

    # A session that exists before the reload ...
    envelope = Envelope(queue_id=b"QEARLY")
    early = await MilterClient.open(bridge.milter)
    try:
        await early.negotiate()
        await early.open_session(envelope)

        config.write_text(config_text(endpoints=[policy_endpoint(webhooks, "/new")]))
        await reloaded(bridge, "config reloaded")

        late = await send_message(bridge.milter, queue_id="QLATE")
        assert added_headers(late) == {"X-Ops": "new"}
        assert webhooks.requests_for(path="/new", event="eom")[-1].json["message"]["queue_id"] == "QLATE"

        # ... still gets its message through, with the endpoints it started with.
        async with asyncio.timeout(WAIT_TIMEOUT):
            result = await early.send_transaction(envelope, MESSAGE)
            await early.quit()
    finally:
        await early.aclose()
    assert isinstance(result.final, Continue)
    assert added_headers(result) == {"X-Ops": "old"}
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_config_reloads_total", result="ok") == 1
    assert metric_value(text, "milterbridge_config_reloads_total", result="refused") == 0


@pytest.mark.asyncio
async def test_sighup_with_an_invalid_config_keeps_the_old_one(tmp_path, bridges, webhooks):
    """An invalid file on SIGHUP is refused in the log, counted, and the running config keeps serving."""
    webhooks.set_default(tag("old"), path="/old")
    webhooks.set_default(tag("new"), path="/new")
    config = tmp_path / "milterbridge.toml"
    config.write_text(config_text(endpoints=[policy_endpoint(webhooks, "/old")]))
    bridge = await bridges.start(config)

    # A timeout too long for rcpt: valid TOML, invalid config.
    config.write_text(config_text(endpoints=[policy_endpoint(webhooks, "/new", events=["rcpt", "eom"], timeout=45)]))
    await reloaded(bridge, "config reload refused")
    refused = bridge.logs("config reload refused")[-1]
    assert refused["level"] == "error"
    assert "endpoints.policy.timeout" in refused["msg"]

    config.write_text("this is = = not toml")
    await reloaded(bridge, "config reload refused")

    # A CA file that exists but holds no certificate: the config loads, the TLS context does not.
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    endpoint = policy_endpoint(webhooks, "/new", tls={"ca_file": str(bad_ca)})
    config.write_text(config_text(endpoints=[endpoint]))
    await reloaded(bridge, "config reload refused")

    assert added_headers(await send_message(bridge.milter)) == {"X-Ops": "old"}
    assert not webhooks.requests_for(path="/new")
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_config_reloads_total", result="refused") == 3
    assert metric_value(text, "milterbridge_config_reloads_total", result="ok") == 0
    assert (await bridge.get("/readyz"))[0] == 200


def make_unusable(config: Path, case: str, webhooks: FakeWebhooks) -> str:
    """Turn the config file into the named bad config; return what the refusal must say."""
    match case:
        case "empty":  # a config-management write caught half-way
            config.write_text("")
            return "the config has no endpoints (the file"
        case "unreadable":
            config.unlink()
            config.mkdir()  # root reads any file whatever its mode; a directory cannot be read as one
            return "cannot read config file"
        case "invalid":
            config.write_text(config_text(endpoints=[policy_endpoint(webhooks, "/new")]) + "[server\n")
            return "is not valid TOML"
        case "no-enforcing-endpoint":
            config.write_text(config_text(endpoints=[policy_endpoint(webhooks, "/new", mode="observe")]))
            return "server.allow_no_endpoints: the config has only observe endpoints"
    raise AssertionError(case)


def restore(config: Path, text: str) -> None:
    """Put a good file back where ``make_unusable`` left a bad one (or a directory)."""
    if config.is_dir():
        config.rmdir()
    config.write_text(text)


@pytest.mark.asyncio
async def test_sighup_refuses_every_config_that_would_not_filter(tmp_path, bridges, webhooks):
    """Empty, unreadable, invalid or no enforcing endpoint: refused at error, counted, the old endpoint decides."""
    webhooks.set_default(tag("old"), path="/old")
    webhooks.set_default(tag("new"), path="/new")
    config = tmp_path / "milterbridge.toml"
    good = config_text(endpoints=[policy_endpoint(webhooks, "/old")])
    config.write_text(good)
    bridge = await bridges.start(config)

    cases = ["empty", "unreadable", "invalid", "no-enforcing-endpoint"]
    for case in cases:
        reason = make_unusable(config, case, webhooks)
        await reloaded(bridge, "config reload refused")
        refused = bridge.logs("config reload refused")[-1]
        assert refused["level"] == "error"
        assert reason in refused["msg"], (case, refused["msg"])
        assert added_headers(await send_message(bridge.milter, queue_id=f"Q{len(case)}")) == {"X-Ops": "old"}, case
        restore(config, good)
    assert not webhooks.requests_for(path="/new")
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_config_reloads_total", result="refused") == len(cases)
    assert metric_value(text, "milterbridge_config_reloads_total", result="ok") == 0

    # Said explicitly, the same observe-only config is applied: nothing enforces any more.
    config.write_text(
        config_text(endpoints=[policy_endpoint(webhooks, "/new", mode="observe")], server={"allow_no_endpoints": True})
    )
    await reloaded(bridge, "config reloaded")
    result = await send_message(bridge.milter, queue_id="QOBSERVED")
    assert isinstance(result.final, Continue)
    assert added_headers(result) == {}
    await webhooks.wait_for(1, path="/new")
    text = await bridge.metrics()
    assert metric_value(text, "milterbridge_config_reloads_total", result="ok") == 1


@pytest.mark.asyncio
async def test_start_warnings_and_url_redaction_in_the_log(tmp_path, bridges, webhooks):
    """Readable inline secrets and tls.verify = false are logged as warnings; no log line shows URL credentials."""
    webhooks.set_default(tag("yes"), path="/hook")
    url = webhooks.url("/hook").replace("http://", "http://ops:hunter2@") + "?token=url-token-31337"
    config = tmp_path / "milterbridge.toml"
    good = config_text(
        endpoints=[{**policy_endpoint(webhooks), "url": url, "secret": SECRET, "tls": {"verify": False}}]
    )
    config.write_text(good)
    config.chmod(0o644)
    bridge = await bridges.start(config)

    warnings = [r["msg"] for r in bridge.records() if r["level"] == "warning"]
    assert any(str(config) in w and "endpoints.policy.secret" in w and "endpoints.policy.url" in w for w in warnings)
    assert any("endpoints.policy.tls.verify is false" in w for w in warnings), warnings
    assert added_headers(await send_message(bridge.milter)) == {"X-Ops": "yes"}
    assert webhooks.requests_for(path="/hook")[0].query == "token=url-token-31337"  # the real URL was used

    # A refused reload names the bad URL, redacted.
    config.write_text(good.replace("127.0.0.1", "filters.example"))  # plain http off loopback: refused
    await reloaded(bridge, "config reload refused")
    assert "http://<redacted>@filters.example:" in bridge.logs("config reload refused")[-1]["msg"]
    # An accepted reload logs the warnings again.
    config.write_text(good)
    await reloaded(bridge, "config reloaded")
    assert len([r for r in bridge.records() if "tls.verify is false" in r["msg"]]) == 2

    output = bridge.stdout() + bridge.stderr()
    for secret in ("hunter2", "url-token-31337", SECRET, SECRET_B64):
        assert secret not in output
