"""deploy/systemd/milterbridge.service: checked by systemd-analyze, and stopped and reloaded as systemd does.

No systemd runs here as PID 1, so the unit is checked statically (``systemd-analyze verify``
and the offline ``systemd-analyze security``), and what systemd would do with it is done by
hand to a real ``serve --workers 2``: ``ExecReload``'s SIGHUP and, under ``KillMode=mixed``,
SIGTERM to the supervisor alone, which must drain every worker well inside ``TimeoutStopSec``.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from milterbridge.background import SHUTDOWN_GRACE
from milterbridge.config import load_config
from milterbridge.settings import ServerSettings
from milterbridge.tracing import SHUTDOWN_TIMEOUT as TRACING_SHUTDOWN
from tests.conftest import required_tool
from tests.fakes.webhooks import FakeResponse

from .conftest import WAIT_TIMEOUT, free_port, send_message, write_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "milterbridge.service"
OPERATIONS = ROOT / "docs" / "operations.md"
#: The unit's worst acceptable exposure score from ``systemd-analyze security`` (0 best, 10 worst).
MAX_EXPOSURE = 2.0


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (a key may repeat), comments and section lines left out."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def one(key: str) -> str:
    (value,) = unit_settings()[key]
    return value


def seconds(value: str) -> float:
    """A systemd time span of the forms the unit uses: ``45s``, ``2min``, ``45``."""
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def systemd_analyze() -> str:
    return required_tool("systemd-analyze", "scripts/install-test-tools installs systemd")


def installed_unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointed at this environment's ``milterbridge`` script.

    verify checks that the command exists; everything else is the shipped file as is.
    """
    script = Path(sys.executable).parent / "milterbridge"
    assert script.exists(), script
    text = UNIT.read_text().replace("/opt/milterbridge/bin/milterbridge", str(script))
    path = tmp_path / "milterbridge.service"
    path.write_text(text)
    return path


def test_systemd_analyze_verify_passes(tmp_path):
    result = subprocess.run(
        [systemd_analyze(), "verify", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # verify reports problems on stderr, even warnings


def test_the_sandbox_scores_ok(tmp_path):
    """``systemd-analyze security`` rates the unit's exposure at most MAX_EXPOSURE ("OK")."""
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for milterbridge\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_the_unit_runs_serve_as_its_own_user_and_stops_after_the_drain():
    settings = unit_settings()
    assert one("User") == "milterbridge"
    assert shlex.split(one("ExecStart"))[1:] == ["serve", "--config", "/etc/milterbridge/milterbridge.toml"]
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    assert one("KillMode") == "mixed"  # SIGTERM to the supervisor only: it drains the workers itself
    drain = ServerSettings().drain_timeout
    # The drain, the background calls' grace, the last spans' export: then systemd's SIGKILL.
    assert seconds(one("TimeoutStopSec")) > drain + SHUTDOWN_GRACE + TRACING_SHUTDOWN
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("PrivateTmp") == "yes"  # where body spool files and the workers' admin sockets go
    # The one writable path is the socket directory that docs/operations.md and docs/postfix.md use.
    (socket_dir,) = settings["ReadWritePaths"]
    assert f"unix:{socket_dir}/milter.sock" in OPERATIONS.read_text()


@pytest.mark.asyncio
async def test_reload_and_stop_as_systemd_does(tmp_path, bridges, webhooks):
    """ExecReload's SIGHUP reaches both workers; SIGTERM to the supervisor alone drains them while
    the admin port says "draining", and the process exits 0 well before TimeoutStopSec."""
    delay = 1.0
    webhooks.set_default(FakeResponse.decision("continue").after(delay), event="eom")
    endpoint = {"name": "policy", "url": webhooks.url("/hook"), "events": ["eom"], "timeout": 5}
    path = write_config(
        tmp_path, listen=[f"inet:127.0.0.1:{free_port()}"], admin=f"127.0.0.1:{free_port()}", endpoints=[endpoint]
    )
    bridge = await bridges.start(path, workers=2)
    await bridge.wait_log("started the admin view")

    bridge.send_signal(signal.SIGHUP)  # ExecReload
    await bridge.wait_log("config reloaded", count=2)

    sends = [asyncio.create_task(send_message(bridge.milter, queue_id=f"S{n}")) for n in range(4)]
    try:
        await webhooks.wait_for(4, event="eom", timeout=WAIT_TIMEOUT)
        signalled = time.monotonic()
        bridge.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        status, reason = 200, ""
        while status == 200 and time.monotonic() - signalled < delay:
            status, reason = await bridge.get("/readyz")
        assert status == 503
        assert "draining" in reason
        results = await asyncio.wait_for(asyncio.gather(*sends), WAIT_TIMEOUT)
    finally:
        for task in sends:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
    assert all(result.final is not None for result in results)
    assert await bridge.wait_exit(timeout=seconds(one("TimeoutStopSec"))) == 0
    outcomes = [r["outcome"] for r in bridge.logs("message ") if "outcome" in r]
    assert outcomes == ["accepted"] * 4


def host_install_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("## Host install (systemd)")
    return text[start : text.index("\n## ", start + 1)]


def test_the_host_install_config_loads(tmp_path):
    """The config that docs/operations.md's host install writes is one the bridge accepts."""
    (block,) = re.findall(r"```toml\n(.*?)```", host_install_section(), flags=re.DOTALL)
    block = "\n".join(line.removeprefix("   ") for line in block.splitlines())
    path = tmp_path / "milterbridge.toml"
    path.write_text(block)
    secret = tmp_path / "policy.secret"
    secret.write_text("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")  # a made-up value
    config = load_config(path, environ={"MILTERBRIDGE_ENDPOINTS__POLICY__SECRET_FILE": str(secret)})
    (socket_dir,) = unit_settings()["ReadWritePaths"]
    assert config.server.listen == (f"unix:{socket_dir}/milter.sock",)
    assert [e.name for e in config.endpoints] == ["policy"]
    assert f"install -m 0644 deploy/systemd/{UNIT.name} /etc/systemd/system/" in host_install_section()
