"""Deployment files: Kubernetes manifests, the compose demo and the HAProxy snippet.

Structural checks with pyyaml that tie the files together (probes on the admin port, selectors
that match, configs that the real loader accepts). When ``kubernetes-validate`` is installed,
every manifest is also validated against the Kubernetes schemas it ships (no network).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from milterbridge.config import Config, load_config
from tests.conftest import missing_prerequisite

ROOT = Path(__file__).resolve().parents[1]
KUBE_DIR = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "docker" / "compose.yaml"
HAPROXY = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KUBERNETES_VERSION = "1.30"  # the oldest minor still commonly supported; schemas from kubernetes-validate
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a made-up test value, not a real secret
LABELS = {"app.kubernetes.io/name": "milterbridge", "app.kubernetes.io/component": "milter"}


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBE_DIR.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def _configmap_config(tmp_path: Path) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(_one("ConfigMap")["data"]["config.toml"])
    secret = tmp_path / "policy-secret"
    secret.write_text(SECRET)
    # The Deployment mounts the Secret there; point the loader at a local copy instead.
    return load_config(path, environ={"MILTERBRIDGE_ENDPOINTS__POLICY__SECRET_FILE": str(secret)})


# --- Kubernetes ----------------------------------------------------------------------------


def test_manifests_hold_every_kind_once_and_kustomization_lists_them():
    """ConfigMap, Deployment, Service, PDB, HPA and two NetworkPolicies exist, and kustomization.yaml
    names every file."""
    kinds = sorted(doc["kind"] for doc in _documents())
    expected = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Kustomization",
        "NetworkPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
    ]
    assert kinds == expected
    listed = set(_one("Kustomization")["resources"])
    assert listed == {p.name for p in KUBE_DIR.glob("*.yaml")} - {"kustomization.yaml"}


def test_selectors_match_the_pod_labels():
    """Deployment, Service and PDB select exactly the pods the Deployment labels; HPA targets it."""
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels == LABELS
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert _one("Service")["spec"]["selector"] == LABELS
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == LABELS
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_probes_use_livez_and_readyz_on_the_admin_port():
    """Liveness asks /livez and readiness /readyz, both on the admin port 8891."""
    container = _container()
    assert _port(container, "admin") == 8891
    assert _port(container, "milter") == 8890
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("admin", 8891)


def test_service_routes_the_milter_port():
    """The Service's milter port reaches containerPort 8890 and its admin port 8891."""
    container = _container()
    ports = {p["name"]: p for p in _one("Service")["spec"]["ports"]}
    assert ports["milter"]["port"] == 8890
    assert ports["milter"]["protocol"] == "TCP"
    assert _port(container, ports["milter"]["targetPort"]) == 8890
    assert _port(container, ports["admin"]["targetPort"]) == 8891


def test_pod_runs_non_root_read_only_with_resources():
    """runAsNonRoot with the image's uid, no privilege escalation, read-only root, requests and limits."""
    spec = _one("Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    container = _container()
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    # Bodies spool to temporary files, so a read-only root needs a writable /tmp.
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_configmap_config_loads_and_matches_the_pod(tmp_path):
    """The ConfigMap's TOML passes the real loader, listens on every address, fits the grace period."""
    config = _configmap_config(tmp_path)
    container = _container()
    assert config.server.listen == (f"inet:0.0.0.0:{_port(container, 'milter')}",)
    assert config.admin.listen == f"0.0.0.0:{_port(container, 'admin')}"
    assert [e.name for e in config.endpoints] == ["policy"]
    spec = _one("Deployment")["spec"]["template"]["spec"]
    pre_stop_seconds = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert config.server.drain_timeout + pre_stop_seconds < spec["terminationGracePeriodSeconds"]


def _network_policy(name: str) -> dict[str, Any]:
    (policy,) = [d for d in _documents() if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name]
    return policy


def test_only_the_mta_reaches_the_milter_port_and_only_the_bridge_the_filters(tmp_path):
    """The bridge's policy lets the MTA's pods in on the milter port only (Prometheus on the admin port
    only) and lets the bridge out to the filter port and DNS only; the filters' policy lets only the
    bridge's pods in, on the port the ConfigMap's endpoint URL names."""
    bridge = _network_policy("milterbridge")
    assert bridge["spec"]["podSelector"]["matchLabels"] == LABELS
    assert sorted(bridge["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    container = _container()
    by_port = {_port(container, rule["ports"][0]["port"]): rule for rule in bridge["spec"]["ingress"]}
    assert set(by_port) == {8890, 8891}
    assert all(len(rule["ports"]) == 1 for rule in bridge["spec"]["ingress"])
    assert by_port[8890]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postfix"}}}]
    (prometheus,) = by_port[8891]["from"]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}

    url = urlsplit(_configmap_config(tmp_path).endpoints[0].url)
    filter_rule, dns_rule = bridge["spec"]["egress"]
    filter_labels = filter_rule["to"][0]["podSelector"]["matchLabels"]
    assert filter_labels == {"app.kubernetes.io/name": url.hostname}
    assert [p["port"] for p in filter_rule["ports"]] == [url.port]
    assert {(p["port"], p["protocol"]) for p in dns_rule["ports"]} == {(53, "UDP"), (53, "TCP")}

    filters = _network_policy("milter-filter")
    assert filters["spec"]["podSelector"]["matchLabels"] == filter_labels
    assert filters["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = filters["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": LABELS}}]
    assert [p["port"] for p in rule["ports"]] == [url.port]


def test_deployment_mounts_the_config_where_the_args_point():
    """--config names a file in the ConfigMap volume's mount path, and the volume names the ConfigMap."""
    container = _container()
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    config_volume = next(name for name, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert str(config_path.parent) == mounts[config_volume]
    assert config_path.name in _one("ConfigMap")["data"]
    assert args[args.index("--workers") + 1] == "1"  # one process per pod: probes see all of it


def test_manifests_validate_against_kubernetes_schemas():
    """Every manifest is valid (strict: no unknown fields) for the pinned Kubernetes version."""
    try:
        import kubernetes_validate
    except ImportError:
        missing_prerequisite("kubernetes-validate (pip install kubernetes-validate)")
    checked = 0
    for doc in _documents():
        if doc["kind"] == "Kustomization":  # a kustomize file, not a Kubernetes resource
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked == 7


# --- compose -------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_build_from_existing_files():
    """milterbridge, filter and postfix exist; every build context and Dockerfile is in the repo."""
    services = _compose()["services"]
    assert set(services) == {"milterbridge", "filter", "postfix"}
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
    assert services["milterbridge"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_publishes_on_loopback_only():
    """Published ports bind 127.0.0.1, so the demo is not an open relay on the host's network."""
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_pieces_point_at_each_other(tmp_path):
    """Postfix's milter address, the bridge's listener and the filter's URL agree on names and ports."""
    compose = _compose()
    services = compose["services"]
    bridge = services["milterbridge"]
    assert bridge["depends_on"]["filter"]["condition"] == "service_started"
    assert services["postfix"]["depends_on"]["milterbridge"]["condition"] == "service_healthy"
    (source,) = bridge["configs"]
    assert source["target"] == "/etc/milterbridge/config.toml"
    path = tmp_path / "config.toml"
    path.write_text(compose["configs"][source["source"]]["content"])
    config = load_config(path, environ={"FILTER_SECRET": SECRET})
    (listen,) = config.server.listen
    assert listen.startswith("inet:0.0.0.0:")
    milter_port = listen.rpartition(":")[2]
    assert config.admin.listen == "0.0.0.0:8891"  # what the image's HEALTHCHECK asks

    main_cf = (COMPOSE.parent / "postfix" / "main.cf").read_text()
    assert re.search(rf"^smtpd_milters = inet:milterbridge:{milter_port}$", main_cf, re.MULTILINE)

    (endpoint,) = config.endpoints
    filter_dockerfile = (COMPOSE.parent / "example-filter" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", filter_dockerfile, re.MULTILINE).group(1))
    filter_port = entrypoint[entrypoint.index("--port") + 1]
    assert endpoint.url == f"http://filter:{filter_port}/milter"
    filter_script = entrypoint[1].removeprefix("/app/")
    assert (ROOT / "examples" / "aiohttp-allowlist" / filter_script).is_file()


def test_postfix_master_cf_has_no_chroot_and_a_postlog_service():
    """Every master.cf service runs unchrooted, and postlogd exists for maillog_file."""
    lines = [
        line.split()
        for line in (COMPOSE.parent / "postfix" / "master.cf").read_text().splitlines()
        if line.strip() and not line.startswith(("#", " "))
    ]
    assert all(fields[4] == "n" for fields in lines), [f for f in lines if f[4] != "n"]
    assert ["postlog", "unix-dgram"] in [fields[:2] for fields in lines]


# --- HAProxy -------------------------------------------------------------------------------


def test_haproxy_balances_tcp_and_checks_readyz_on_the_admin_port():
    """TCP mode, leastconn, an HTTP check of /readyz sent to port 8891."""
    text = HAPROXY.read_text()
    lines = {line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}
    assert "mode tcp" in lines
    assert "balance leastconn" in lines
    assert "option httpchk" in lines
    assert any(line.startswith("http-check send meth GET uri /readyz") for line in lines)
    assert "http-check expect status 200" in lines
    assert any(line.startswith("default-server check port 8891") for line in lines)
    # Draining replicas must keep their sessions: no killing of sessions when a check fails.
    assert "shutdown-sessions" not in " ".join(lines)


def test_haproxy_config_is_valid():
    """haproxy -c accepts the snippet (unresolvable server names only warn, thanks to init-addr)."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        missing_prerequisite("haproxy (scripts/install-test-tools installs it)")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
