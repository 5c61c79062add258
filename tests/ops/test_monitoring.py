"""deploy/grafana and deploy/prometheus: every query is valid PromQL and names only series a live bridge exports.

The series names are checked against the ``/metrics`` page of a real ``serve --workers 2``
(the instance view, so ``milterbridge_workers`` is there too) after a message went through
an endpoint. The rules are checked and unit-tested with promtool (Debian's prometheus
package; scripts/install-test-tools installs it).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from milterbridge.milter.messages import Continue
from tests.conftest import required_tool
from tests.fakes.hooks_scanner import TOKEN, HooksScanner
from tests.fakes.webhooks import FakeResponse

from .conftest import free_port, metric_value, send_message, write_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "milterbridge-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "milterbridge-rules.yaml"
RULES_TESTS = ROOT / "tests" / "prometheus" / "rules_test.yaml"
#: Series a query may use that the bridge does not export: Prometheus writes ``up`` per target.
PROMETHEUS_SERIES = {"up"}
SERIES = re.compile(r"\b((?:milterbridge|process)_[a-z0-9_]+|up)\b")
#: Grafana's variables, as a query sees them once Grafana filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def promtool() -> str:
    return required_tool("promtool", "Debian's prometheus package; scripts/install-test-tools installs it")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        queries.extend(target["expr"] for target in panel["targets"])
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def filled_in(query: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        query = query.replace(name, value)
    assert "$" not in query, query
    return query


def test_rules_pass_promtool_check():
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in result.stdout


def test_rules_fire_as_their_unit_tests_say():
    """promtool runs tests/prometheus/rules_test.yaml: each alert fires on the series it is about, and
    only on them (an ok endpoint, a closed breaker, calls well inside their budget stay quiet)."""
    result = subprocess.run(
        [promtool(), "test", "rules", RULES_TESTS.name],
        cwd=RULES_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query, with Grafana's variables filled in, passes promtool as a recording rule."""
    queries = dashboard_queries()
    recorded = [{"record": f"panel:query{n}", "expr": filled_in(query)} for n, query in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.asyncio
async def test_every_series_queried_is_exported(tmp_path, bridges, webhooks):
    """Every series name in the dashboard and the rules is on a live instance's /metrics page."""
    webhooks.set_default(FakeResponse.decision("continue"), event="eom")
    endpoint = {"name": "policy", "url": webhooks.url("/hook"), "events": ["eom"], "timeout": 3, "max_concurrency": 4}
    async with HooksScanner() as scanner:
        hooks = {
            "name": "scanner",
            "url": scanner.url(),
            "protocol": "mta-hooks",
            "mode": "observe",
            "headers": {"Authorization": f"Bearer {TOKEN}"},
        }
        listen, admin = [f"inet:127.0.0.1:{free_port()}"], f"127.0.0.1:{free_port()}"
        path = write_config(tmp_path, listen=listen, admin=admin, endpoints=[endpoint, hooks])
        bridge = await bridges.start(path, workers=2)
        await bridge.wait_log("started the admin view")
        result = await send_message(bridge.milter)
        assert isinstance(result.final, Continue)
        page = await bridge.metrics()
    exported = {sample.name for family in text_string_to_metric_families(page) for sample in family.samples}
    assert metric_value(page, "milterbridge_mta_hooks_registered", endpoint="scanner") == 1
    queried = {name for query in dashboard_queries() + rule_queries() for name in SERIES.findall(query)}
    assert "milterbridge_workers" in queried
    missing = sorted(queried - exported - PROMETHEUS_SERIES)
    assert not missing, f"queried but not exported: {missing}"
    assert PROMETHEUS_SERIES & queried <= {name for query in rule_queries() for name in SERIES.findall(query)}
