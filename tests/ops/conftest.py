"""Fixtures for the operations tests: the real ``milterbridge`` command as processes on loopback.

Every bridge is ``sys.executable -m milterbridge serve ...`` in its own process group (so
forked workers belong to it too), with stdout (the JSON log) and stderr written to files in
``tmp_path``. The ``bridges`` fixture kills every group it started when the test ends, whatever
happened. Nothing waits without a bound: every wait is a short poll with a deadline that
fails the test with the process's output attached.

Helpers::

    config = write_config(tmp_path, endpoints=[{"name": "policy", "url": webhooks.url("/hook")}])
    bridge = await bridges.start(config)          # --workers 1; waits for the "ready" line
    result = await send_message(bridge.milter)    # milterbridge.client, in this loop
    text = await bridge.metrics()                 # GET /metrics on the bridge's admin port
    metric_value(text, "milterbridge_messages_total", outcome="accepted")
    cli = await run_cli("send", "msg.eml", "--milter", bridge.milter)   # the command, in a thread

Fake endpoints (``webhooks``) are ``tests.fakes.webhooks.FakeWebhooks`` in the test's loop;
blocking work (the CLI) runs in a thread so that loop keeps answering them.
"""

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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

import milterbridge
from milterbridge.client import Envelope, MilterClient, TransactionResult
from tests.fakes.webhooks import FakeWebhooks

#: The directory that holds the ``milterbridge`` package, put on the children's PYTHONPATH.
SOURCE_ROOT = str(Path(milterbridge.__file__).resolve().parent.parent)
#: A small message with a subject and a body.
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello there.\r\n"
#: ``server=`` for a config without endpoints: ``serve`` refuses one unless told (design.md §3.7).
NO_ENDPOINTS = {"allow_no_endpoints": True}
#: Longest any single wait in these tests may take; a healthy run needs a fraction of it.
WAIT_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02


# -- ports, environment, config ------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now (SO_REUSEADDR like the servers, so TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``MILTERBRIDGE_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILTERBRIDGE_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = SOURCE_ROOT if not path else os.pathsep.join((SOURCE_ROOT, path))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def config_text(
    *,
    listen: Sequence[str] = ("inet:127.0.0.1:0",),
    admin: str = "127.0.0.1:0",
    drain_timeout: float = 5.0,
    log_level: str = "info",
    endpoints: Iterable[Mapping[str, Any]] = (),
    server: Mapping[str, Any] | None = None,
) -> str:
    """A milterbridge TOML config (``server`` adds more ``[server]`` keys)."""
    lines = ["[server]", f"listen = {_toml_value(list(listen))}", f"drain_timeout = {drain_timeout!r}"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in (server or {}).items()]
    lines += ["", "[admin]", f"listen = {_toml_value(admin)}", "", "[log]", f"level = {_toml_value(log_level)}"]
    for endpoint in endpoints:
        lines += ["", "[[endpoints]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in endpoint.items()]
    return "\n".join(lines) + "\n"


def write_config(directory: Path, name: str = "milterbridge.toml", **settings: Any) -> Path:
    """Write ``config_text(**settings)`` to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(config_text(**settings))
    return path


# -- output, metrics, HTTP ------------------------------------------------------------------


def parse_log(text: str) -> list[dict[str, Any]]:
    """Every complete stdout line as a JSON object; a line that is not one fails the test."""
    records = []
    for number, line in enumerate(text.split("\n")[:-1], start=1):  # the last piece may be half written
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stdout line {number} is not JSON: {line!r}")
        assert isinstance(record, dict), f"stdout line {number} is not a JSON object: {line!r}"
        records.append(record)
    return records


def metric_value(text: str, sample: str, **labels: str) -> float:
    """Sum of the samples called ``sample`` whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def http_get(url: str, *, timeout: float = 3.0, unix: str | None = None) -> tuple[int, str]:
    """GET ``url`` (over the unix socket at ``unix`` if given): (status, body text)."""
    connector = aiohttp.UnixConnector(path=unix) if unix else None
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector) as session,
        session.get(url) as response,
    ):
        return response.status, await response.text()


# -- the MTA side ---------------------------------------------------------------------------


async def send_message(
    milter: str,
    *,
    rcpts: Sequence[str] = ("rcpt@example.net",),
    queue_id: str = "4ABC123DEF",
    message: bytes = MESSAGE,
    timeout: float = WAIT_TIMEOUT,
) -> TransactionResult:
    """One connection, one message, QUIT, as Postfix would (milterbridge.client)."""
    envelope = Envelope(recipients=tuple(f"<{r}>".encode() for r in rcpts), queue_id=queue_id.encode())
    async with asyncio.timeout(timeout):
        client = await MilterClient.open(milter)
        try:
            await client.negotiate()
            result = await client.send_message(envelope, message)
            await client.quit()
        finally:
            await client.aclose()
    return result


def _run_cli_blocking(
    args: Sequence[str], env: Mapping[str, str] | None, cwd: Path | None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterbridge", *args],
        capture_output=True,
        text=True,
        env=child_env(env),
        cwd=cwd,
        timeout=30,
        check=False,
    )


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``milterbridge ARGS`` to completion, in a thread (the loop keeps serving fake endpoints)."""
    return await asyncio.to_thread(_run_cli_blocking, args, env, cwd)


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == pid:
                        found.add(int(entry.name))
                    break
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- bridge processes -----------------------------------------------------------------------


class BridgeProcess:
    """One ``milterbridge serve`` process (and its workers), its log and its addresses."""

    def __init__(self, proc: subprocess.Popen[bytes], stdout_path: Path, stderr_path: Path) -> None:
        self.proc = proc
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        #: The first bound milter address, from the "ready" line.
        self.milter = ""
        #: Every bound milter address, from the "ready" line.
        self.listen: list[str] = []
        #: ``host:port`` of the admin listener, from the "admin listening" line.
        self.admin = ""

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.proc.pid

    def stdout(self) -> str:
        """Everything written to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Everything written to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log so far."""
        return parse_log(self.stdout())

    def logs(self, msg_prefix: str) -> list[dict[str, Any]]:
        """Log records whose ``msg`` starts with ``msg_prefix``."""
        return [r for r in self.records() if str(r.get("msg", "")).startswith(msg_prefix)]

    def describe(self) -> str:
        """The output so far, for assertion messages."""
        return (
            f"exit={self.proc.poll()}\n--- stdout ---\n{self.stdout()[-4000:]}\n--- stderr ---\n{self.stderr()[-2000:]}"
        )

    async def wait_until(
        self, predicate: Callable[[], bool], what: str, *, timeout: float = WAIT_TIMEOUT, allow_exit: bool = False
    ) -> None:
        """Poll ``predicate`` until it holds; fail naming ``what`` on timeout or if the process dies."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if not allow_exit and self.proc.poll() is not None:
                pytest.fail(f"milterbridge exited while waiting for {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.describe()}")
            await asyncio.sleep(_POLL_INTERVAL)

    async def wait_log(self, msg_prefix: str, *, count: int = 1, timeout: float = WAIT_TIMEOUT) -> list[dict[str, Any]]:
        """Wait for ``count`` log lines whose ``msg`` starts with ``msg_prefix``; return them all."""
        await self.wait_until(
            lambda: len(self.logs(msg_prefix)) >= count, f"{count} x log {msg_prefix!r}", timeout=timeout
        )
        return self.logs(msg_prefix)

    async def wait_ready(self, *, workers: int = 1) -> None:
        """Wait for ``workers`` "ready" lines and note the addresses the (first) one bound."""
        ready = await self.wait_log("milterbridge ", count=workers)
        self.listen = list(ready[0]["listen"])
        self.milter = self.listen[0]
        admin = [r for r in self.logs("admin listening on") if "port" in r]
        if admin:
            self.admin = f"127.0.0.1:{admin[0]['port']}"

    async def wait_exit(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Wait for the process to end; its exit code (negative: killed by that signal)."""
        await self.wait_until(
            lambda: self.proc.poll() is not None, "the process to exit", timeout=timeout, allow_exit=True
        )
        return self.proc.returncode

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the (parent) process."""
        self.proc.send_signal(sig)

    def worker_admins(self) -> list[str]:
        """Every worker's private admin socket (``unix:/path``) logged so far, in start order."""
        return [f"unix:{r['path']}" for r in self.logs("admin listening on") if "path" in r]

    async def get(self, path: str, *, admin: str | None = None) -> tuple[int, str]:
        """GET ``path`` on the admin listener (or on ``admin``: ``host:port`` or a worker's ``unix:/path``)."""
        admin = admin or self.admin
        if admin.startswith("unix:"):
            return await http_get(f"http://worker{path}", unix=admin.removeprefix("unix:"))
        return await http_get(f"http://{admin}{path}")

    async def metrics(self, *, admin: str | None = None) -> str:
        """The /metrics page."""
        status, text = await self.get("/metrics", admin=admin)
        assert status == 200, text
        return text


def _spawn(
    args: Sequence[str], stdout_path: Path, stderr_path: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start ``args`` with output to files, in a new process group (teardown reaches forked workers too)."""
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
        )


class BridgeLauncher:
    """Starts bridges for one test and kills whatever is left of them afterwards."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[BridgeProcess] = []

    async def start(
        self,
        config: Path | None,
        *,
        workers: int | None = 1,
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
    ) -> BridgeProcess:
        """``milterbridge serve [--config CONFIG] [--workers N]``; waits for "ready" unless told not to.

        ``workers=1`` is the default because ``serve`` otherwise starts one worker per CPU.
        """
        args = [sys.executable, "-m", "milterbridge", "serve"]
        if config is not None:
            args += ["--config", str(config)]
        if workers is not None:
            args += ["--workers", str(workers)]
        n = len(self.started)
        stdout_path = self.directory / f"bridge{n}.stdout"
        stderr_path = self.directory / f"bridge{n}.stderr"
        proc = _spawn(args, stdout_path, stderr_path, child_env(env), self.directory)
        bridge = BridgeProcess(proc, stdout_path, stderr_path)
        self.started.append(bridge)
        if wait_ready:
            await bridge.wait_ready(workers=workers or 1)
        return bridge

    def kill_all(self) -> None:
        """SIGKILL every process group this launcher started, and reap the parents."""
        for bridge in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(bridge.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                bridge.proc.wait(timeout=5)


@pytest_asyncio.fixture
async def bridges(tmp_path: Path) -> AsyncIterator[BridgeLauncher]:
    """Start ``milterbridge serve`` processes; all of them are killed when the test ends."""
    launcher = BridgeLauncher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()


@pytest_asyncio.fixture
async def webhooks() -> AsyncIterator[FakeWebhooks]:
    """A scripted fake webhook endpoint server on 127.0.0.1, in the test's loop."""
    async with FakeWebhooks() as fake:
        yield fake


@pytest.fixture
def message_file(tmp_path: Path) -> Path:
    """``MESSAGE`` written to a file, for ``milterbridge send``."""
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    return path
