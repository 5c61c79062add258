"""Smoke tests of the benchmark (bench/): a few hundred messages, so the bench cannot rot.

The real benchmark is ``python -m bench.run`` and is not part of the test run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import RawTestServer, TestClient

from bench import costs, procs
from bench import run as bench_run
from bench.endpoint import HOOK_PATH, build_handler
from bench.loadgen import idle_connections, run_load
from bench.profiles import ALL_EVENTS, BENCH_HEADER_NAME, PROFILES, build_message
from bench.reference_milter import running
from bench.report import IdlePoint, Results, SinglePoint, SweepPoint, median_point, render, target_lines
from bench.run import pymilter_available
from tests.conftest import assert_no_leaked_tasks, missing_prerequisite, running_server
from tests.fakes.handlers import StaticHandler

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ["inet:127.0.0.1:0"]


def test_profile_message_has_the_requested_shape():
    """Profile (a)'s message has exactly 10 headers and a 4 KiB body."""
    profile = PROFILES["a"]
    message = build_message(profile)
    head, body = message.split(b"\r\n\r\n", 1)
    assert len(head.split(b"\r\n")) == profile.headers == 10
    assert len(body) == profile.body_bytes == 4096


def test_reference_milter_takes_no_reply_events_without_answering_them():
    """--no-reply events are asked for and negotiated no-reply (what the bridge does for its payload)."""
    from bench.reference_milter import requirements_for
    from milterbridge.milter.constants import Event

    got = requirements_for(("rcpt",), ("connect", "header"))
    assert got.events == {Event.RCPT, Event.CONNECT, Event.HEADER}
    assert got.reply_events == {Event.RCPT}


def test_include_body_profiles_make_references_read_the_body():
    """A reference milter asks for body chunks when the bridge forwards the body (profile c)."""
    assert "body" in PROFILES["c"].milter_events
    assert "body" not in PROFILES["a"].milter_events
    assert PROFILES["b"].milter_events == PROFILES["b"].events


@pytest.mark.asyncio
@pytest.mark.parametrize("events", [("eom",), ALL_EVENTS], ids=["eom-only", "every-event"])
async def test_loadgen_against_reference_milter(events):
    """200 messages over 4 connections through our minimal milter: all counted, none failed."""
    async with running(LOOPBACK, events) as server:
        result = await run_load(server.bound[0], PROFILES["a"], concurrency=4, max_messages=200, duration_seconds=20)
    assert (result.messages, result.errors) == (200, 0), result.error_samples
    assert result.connections >= 200 // PROFILES["a"].messages_per_connection
    assert len(result.latencies_seconds) == 200
    assert 0 < result.percentile_seconds(50) <= result.percentile_seconds(90) <= result.percentile_seconds(99)
    assert result.messages_per_second > 0
    assert_no_leaked_tasks()


@pytest.mark.asyncio
async def test_loadgen_counts_a_missing_bench_header_as_an_error():
    """A milter that accepts without adding the bench header fails every message."""
    async with running_server(StaticHandler) as server:
        result = await run_load(server.bound[0], PROFILES["a"], concurrency=2, max_messages=20, duration_seconds=20)
    assert result.messages == 0
    assert result.errors == 20
    assert any(BENCH_HEADER_NAME in text for text in result.error_samples)


@pytest.mark.asyncio
async def test_idle_connections_stay_open_then_quit():
    """Idle connections are all open at once inside the block and all gone after it."""
    async with running(LOOPBACK, ("eom",)) as server:
        async with idle_connections(server.bound[0], 30, batch=10) as clients:
            assert len(clients) == 30
            await asyncio.sleep(0.05)
            assert len(server.state.connections) == 30
        async with asyncio.timeout(5):
            await server.state.idle.wait()
        assert not server.state.connections


@pytest.mark.asyncio
async def test_endpoint_adds_the_header_at_eom_only():
    """The trivial endpoint answers continue, plus one add_header at eom, and counts requests."""
    counts: dict[str, int] = {}
    async with TestClient(RawTestServer(build_handler(counts))) as client:
        eom = await client.post(HOOK_PATH, json={"event": "eom"})
        rcpt = await client.post(HOOK_PATH, json={"event": "rcpt"})
        stats = await client.get("/stats")
        assert eom.status == rcpt.status == 200
        assert await eom.json() == {
            "action": "continue",
            "modifications": [{"op": "add_header", "name": BENCH_HEADER_NAME, "value": "ok"}],
        }
        assert await rcpt.json() == {"action": "continue"}
        assert await stats.json() == {"eom": 1, "rcpt": 1}
        assert counts == {"eom": 1, "rcpt": 1}
        assert (await client.post("/elsewhere", json={"event": "eom"})).status == 404


def test_proc_measurements_see_this_process():
    """CPU time and memory read from /proc are positive for a live process and grow monotonically."""
    cpu = procs.cpu_seconds(os.getpid())
    assert procs.memory_bytes(os.getpid(), "VmHWM") >= procs.memory_bytes(os.getpid(), "VmRSS") > 0
    sum(range(200_000))  # burn a little CPU
    assert procs.cpu_seconds(os.getpid()) >= cpu > 0


def _point(target: str, msg_s: float, cpu_us: float, p99: float = 1.0, conc: int = 16) -> SweepPoint:
    return SweepPoint(
        profile="a",
        target=target,
        concurrency=conc,
        messages=100,
        errors=0,
        elapsed_seconds=1.0,
        messages_per_second=msg_s,
        p50_ms=0.5,
        p90_ms=0.8,
        p99_ms=p99,
        cpu_us_per_message=cpu_us,
        endpoint_cpu_us_per_message=None,
        rss_bytes=1,
        peak_rss_bytes=1,
        loadgen_busy=0.5,
        milter_busy=0.5,
    )


def test_rounds_are_merged_into_medians():
    """Each figure of a point measured in several rounds is the median; counts add up."""
    rounds = [_point("bridge", 500, 900, p99=3.0), _point("bridge", 700, 600, p99=1.0), _point("bridge", 100, 800)]
    merged = median_point(rounds)
    assert (merged.messages_per_second, merged.cpu_us_per_message, merged.p99_ms) == (500, 800, 1.0)
    assert (merged.messages, merged.errors, merged.elapsed_seconds) == (300, 0, 3.0)
    assert median_point(rounds[:1]) is rounds[0]


@pytest.mark.asyncio
async def test_a_target_failing_in_a_later_round_loses_its_earlier_points(monkeypatch, tmp_path):
    """A median of fewer rounds must not be compared with the others' as if it were the same.

    The targets' start and measurement are stood in for (the smoke runs below exercise them):
    what is tested is run_profile's bookkeeping when ``minimal`` fails to start in round 2.
    """
    starts: list[str] = []

    @contextlib.contextmanager
    def launch(target, profile, settings, layout, workdir):
        starts.append(target)
        if target == "minimal" and starts.count("minimal") == 2:
            raise procs.ProcessError("minimal died")
        yield bench_run.Launched(address="inet:127.0.0.1:1", pid=os.getpid())

    async def measure_sweep(target, profile, launched, settings, layout):
        return [_point(target, 100.0 * len(starts), 500.0, conc=c) for c in settings.concurrency]

    monkeypatch.setattr(bench_run, "launch", launch)
    monkeypatch.setattr(bench_run, "measure_sweep", measure_sweep)
    settings = bench_run.parse_args(["--profiles", "a", "--targets", "bridge,minimal", "--concurrency", "1,16"])
    settings = dataclasses.replace(settings, rounds=3)
    results = Results()
    await bench_run.run_profile(PROFILES["a"], settings, procs.CoreLayout.choose(False), tmp_path, results)
    assert starts == ["bridge", "minimal", "minimal", "bridge", "bridge"]
    assert sorted((p.target, p.concurrency) for p in results.sweeps) == [("bridge", 1), ("bridge", 16)]
    assert all(p.messages == 300 for p in results.sweeps)  # three rounds merged
    assert results.skipped == {"(a) minimal": "failed in round 2 of 3: minimal died"}
    assert results.failed


def test_report_prints_the_issue_ratios():
    """Ratios, the p99 difference, the idle delta and the peak-RSS verdict come out of the numbers."""
    mib = 1024 * 1024
    results = Results(
        sweeps=[
            _point("bridge", 500, 900),
            _point("pymilter", 1000, 300),
            _point("pymilter-all", 400, 1200),
            _point("minimal-all", 800, 450),
            _point("bridge", 400, 900, p99=3.0, conc=1),
            _point("pymilter", 900, 300, p99=0.5, conc=1),
            _point("minimal", 900, 300, p99=1.0, conc=1),
        ],
        idle=[IdlePoint(target="bridge", connections=1000, rss_before_bytes=40 * mib, rss_after_bytes=50 * mib)],
        single=[
            SinglePoint(
                target="bridge",
                body_bytes=50 * mib,
                peak_rss_before_bytes=40 * mib,
                peak_rss_bytes=70 * mib,
                seconds=1.0,
                errors=0,
                body_memory_bytes=mib,
            )
        ],
    )
    lines = list(target_lines(results))
    assert "(a) throughput bridge / pymilter at 16 concurrent: 0.50x (500 vs 1000 msg/s)" in lines
    assert "(a) CPU/msg bridge / pymilter at 16 concurrent: 3.00x (900 vs 300 µs/msg)" in lines
    assert "(a) throughput bridge / pymilter-all at 16 concurrent: 1.25x (500 vs 400 msg/s)" in lines
    assert "(a) CPU/msg bridge / pymilter-all at 16 concurrent: 0.75x (900 vs 1200 µs/msg)" in lines
    assert "(a) CPU/msg bridge / minimal-all at 16 concurrent: 2.00x (900 vs 450 µs/msg)" in lines
    assert any(line.startswith("(a) p99 latency at 1 concurrent, bridge - minimal: +2.00 ms") for line in lines)
    assert any("10.0 MiB (10.2 KiB per connection)" in line for line in lines)
    assert any("70.0 MiB vs budget 62.0 MiB" in line and line.endswith("OVER") for line in lines)
    assert any(line.startswith("(b) throughput bridge / minimal: n/a") for line in lines)
    assert "Targets" in render(results)


def _module(name: str, *args: str) -> str:
    """Run ``python -m name args`` from the repository root; its output, after checking it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", name, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = _module("bench.run", "--smoke", "--no-pin", "--results-dir", str(tmp_path), *args)
    return out, json.loads((tmp_path / "results.json").read_text())


def test_bench_run_smoke_with_reference_milter(tmp_path):
    """``python -m bench.run --smoke`` drives the minimal milters in their own processes, in two rounds."""
    out, data = _bench(tmp_path, "--targets", "minimal,minimal-all", "--rounds", "2")
    assert "(a) eom-only webhook" in out
    assert "Targets" in out
    assert "2 rounds in alternating order, medians shown" in out
    points = data["sweeps"]
    assert [(p["target"], p["concurrency"], p["messages"], p["errors"]) for p in points] == [
        ("minimal", 1, 300, 0),
        ("minimal", 4, 300, 0),
        ("minimal-all", 1, 300, 0),
        ("minimal-all", 4, 300, 0),
    ]
    assert all(p["cpu_us_per_message"] > 0 and p["peak_rss_bytes"] > 0 for p in points)


def test_bench_run_smoke_with_bridge(tmp_path):
    """The bridge target: ``milterbridge serve`` with a generated config calling the bench endpoint."""
    _, data = _bench(tmp_path, "--targets", "bridge", "--bridge-workers", "1")
    points = data["sweeps"]
    assert [(p["target"], p["messages"], p["errors"]) for p in points] == [("bridge", 150, 0), ("bridge", 150, 0)]
    assert all(p["endpoint_cpu_us_per_message"] is not None for p in points)


def test_bench_run_smoke_with_pymilter(tmp_path):
    """Both pymilter references answer every message with the bench header, without libmilter's Nagle stall."""
    if not pymilter_available():
        if os.environ.get("CI") == "true":
            pytest.fail("pymilter is not installed: scripts/test runs bench/install-pymilter as root")
        pytest.skip("pymilter not installed (run bench/install-pymilter)")
    _, data = _bench(tmp_path, "--targets", "pymilter,pymilter-all")
    points = data["sweeps"]
    assert [(p["target"], p["messages"], p["errors"]) for p in points] == [("pymilter", 150, 0)] * 2 + [
        ("pymilter-all", 150, 0)
    ] * 2
    # Without TCP_NODELAY on its listener every message waits ~40 ms for a delayed ACK.
    assert points[0]["p50_ms"] < 20
    assert points[2]["p50_ms"] < 20


def test_costs_breakdown_runs(tmp_path):
    """``python -m bench.costs`` measures the milter side, our webhook call and bare aiohttp."""
    out = _module("bench.costs", "--messages", "60", "--no-pin")
    figures = re.findall(r"(\d+\.\d) µs CPU per (message|call)", out)
    assert [kind for _, kind in figures] == ["message", "call", "call"], out
    assert all(float(value) > 0 for value, _ in figures)


def test_costs_milter_side_alone():
    """``--milter-only`` measures just the milter side (what ``--instructions`` runs under valgrind)."""
    out = _module("bench.costs", "--milter-only", "--messages", "40", "--no-pin", "--profile", "b")
    figures = re.findall(r"(\d+\.\d) µs CPU per (message|call)", out)
    assert [kind for _, kind in figures] == ["message"], out
    assert "(b) per-stage webhooks" in out


def test_whole_bridge_instructions_are_counted_under_valgrind(tmp_path):
    """One short ``--bridge-instructions`` run: the bridge under callgrind answers every message."""
    if shutil.which("valgrind") is None:
        missing_prerequisite("valgrind (scripts/install-test-tools installs it)")
    layout = procs.CoreLayout.choose(pin=False)
    count = costs._bridge_run_instructions(PROFILES["a"], 10, layout, tmp_path)
    # Start-up and imports alone are well over 10**8 instructions; 10 messages add about 10**7.
    assert count > 10**8


def test_callgrind_total_is_read_from_valgrinds_summary():
    """The instruction count comes from callgrind's exit summary, and a missing one is an error."""
    summary = (
        "==17349== Events    : Ir\n==17349== Collected : 2616075061\n"
        "==17349==\n==17349== I   refs:      2,616,075,061\n"
    )
    assert costs.parse_callgrind_total(summary) == 2_616_075_061
    assert costs.parse_callgrind_total("==1== Collected : 1,234\n") == 1234
    with pytest.raises(RuntimeError, match="no instruction count"):
        costs.parse_callgrind_total("valgrind: command not found")
    # milter_side replays a warm-up of up to 300 messages before the measured ones.
    assert (costs.replayed(100), costs.replayed(600)) == (200, 900)


def test_postfix_level_bench_runs_and_checks_deliveries():
    """``python -m bench.postfix`` sends through a private Postfix with no milter and with the bridge,
    checks that every message was delivered (with the bridge's header), and reports each part's CPU."""
    from tests.integration.postfix import prerequisites_problem

    problem = prerequisites_problem()
    if problem is not None:
        missing_prerequisite(f"a private Postfix: {problem}")
    args = ("--rounds", "1", "--messages", "40", "--sessions", "4", "--targets", "none,bridge")
    out = _module("bench.postfix", *args, "--per-session", "1,many")
    rows = re.findall(r"^(1|many)\s+(none|bridge)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)$", out, re.MULTILINE)
    assert [(per, target) for per, target, *_ in rows] == [
        ("1", "none"),
        ("1", "bridge"),
        ("many", "none"),
        ("many", "bridge"),
    ], out
    for _per, target, rate, machine, _postfix, milter, endpoint in rows:
        assert int(rate) > 0
        assert int(machine) > 0
        if target == "none":
            assert (milter, endpoint) == ("—", "—")
        else:
            assert int(milter) > 0
            assert int(endpoint) >= 0
