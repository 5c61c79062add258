"""The ``milterbridge`` commands as a user runs them: exit codes and output (design.md §5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import milterbridge
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

from .conftest import BridgeLauncher, child_env, config_text, free_port, run_cli, write_config

#: A Standard Webhooks secret and a bearer token that must never show up in any output.
SECRET = "whsec_b3BzLXRlc3Qtc2lnbmluZy1rZXktbmV2ZXItcHJpbnRlZA=="
TOKEN = "ops-token-7f3a9c1e"
BLOCKED = "blocked@example.net"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``milterbridge ARGS`` with a clean environment (no MILTERBRIDGE_* variables)."""
    return subprocess.run(
        [sys.executable, "-m", "milterbridge", *args],
        capture_output=True,
        text=True,
        env=child_env(env),
        timeout=30,
        check=False,
    )


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    """A user error is a one-line message, never a Python traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


# -- --version, --help -------------------------------------------------------------------


def test_version_prints_the_package_version():
    """--version prints "milterbridge <version>" and exits 0."""
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"milterbridge {milterbridge.__version__}"


def test_help_lists_every_command():
    """--help exits 0 and names serve, check-config and send."""
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check-config", "send", "--version"):
        assert command in result.stdout


def test_no_command_prints_usage_and_exits_2():
    """Without a command the usage is printed and the exit code says it was a usage error."""
    result = cli()
    assert result.returncode == 2
    assert "usage: milterbridge" in result.stdout + result.stderr


def test_unknown_option_is_a_usage_error():
    """An unknown option exits 2 with argparse's message."""
    result = cli("serve", "--no-such-option")
    assert result.returncode == 2
    assert "--no-such-option" in result.stderr


# -- check-config ------------------------------------------------------------------------


def good_config(tmp_path: Path) -> Path:
    """A valid config with an inline secret and an Authorization header from the environment."""
    return write_config(
        tmp_path,
        listen=["inet:127.0.0.1:8890", f"unix:{tmp_path}/m.sock"],
        admin="127.0.0.1:8891",
        endpoints=[
            {
                "name": "policy",
                "url": "http://127.0.0.1:9/hook",
                "events": ["rcpt", "eom"],
                "timeout": 3,
                "secret": SECRET,
                "headers": {"Authorization": "Bearer ${OPS_TOKEN}"},
            },
            {"name": "shadow", "url": "http://127.0.0.1:9/shadow", "mode": "observe"},
        ],
    )


def test_check_config_summary_names_budgets_caps_and_conditions(tmp_path):
    """An endpoint's per-event budgets, its concurrency cap and the keys of its when are in the summary."""
    endpoint = {
        **POLICY,
        "events": ["rcpt", "eom"],
        "timeouts": {"rcpt": 2.0, "eom": 20.0},
        "max_concurrency": 4,
        "when": {"authenticated": True, "recipient_domains": ["example.com"]},
    }
    result = cli("check-config", "--config", str(write_config(tmp_path, endpoints=[endpoint])))
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("  endpoint policy")]
    assert "timeouts={rcpt: 2.0s, eom: 20.0s}" in line
    assert "max_concurrency=4" in line
    assert "when=[authenticated, recipient_domains]" in line
    assert "protocol=" not in line  # the default goes unsaid


def test_check_config_summary_names_a_hook_protocol(tmp_path):
    endpoint = {**POLICY, "protocol": "mta-hooks", "url": "http://127.0.0.1:9/.well-known/mta-hooks"}
    result = cli("check-config", "--config", str(write_config(tmp_path, endpoints=[endpoint])))
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("  endpoint policy")]
    assert line.endswith(" protocol=mta-hooks")


def test_check_config_good_file_prints_a_summary(tmp_path):
    """A valid file exits 0 with a summary of listeners and endpoints, and never prints a secret."""
    result = cli("check-config", "--config", str(good_config(tmp_path)), env={"OPS_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "config ok" in out
    assert "inet:127.0.0.1:8890" in out
    assert f"unix:{tmp_path}/m.sock" in out
    assert "127.0.0.1:8891" in out
    assert "endpoint policy" in out
    assert "endpoint shadow" in out
    assert "observe" in out
    everything = result.stdout + result.stderr
    assert SECRET not in everything
    assert SECRET.removeprefix("whsec_") not in everything
    assert TOKEN not in everything


def test_check_config_reads_milterbridge_config(tmp_path):
    """Without --config, MILTERBRIDGE_CONFIG names the file."""
    path = good_config(tmp_path)
    result = cli("check-config", env={"MILTERBRIDGE_CONFIG": str(path), "OPS_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert "endpoint policy" in result.stdout


def test_check_config_without_any_config_is_a_usage_error():
    """No --config and no MILTERBRIDGE_CONFIG: exit 2 and say how to give one."""
    result = cli("check-config")
    assert result.returncode == 2
    assert "--config" in result.stderr
    assert "MILTERBRIDGE_CONFIG" in result.stderr


@pytest.mark.parametrize(
    ("endpoint_keys", "env", "key", "hidden"),
    [
        pytest.param({"events": ["rcpt", "eom"], "timeout": 45}, {}, "endpoints.policy.timeout", None, id="timeout"),
        pytest.param({"timout": 3}, {}, "endpoints.policy.timout", None, id="typo"),
        pytest.param({"on_error": "explode"}, {}, "endpoints.policy.on_error", None, id="on-error"),
        pytest.param(
            {"secret": "notwhsec_b3BzLXNlY3JldC12YWx1ZQ=="},
            {},
            "endpoints.policy.secret",
            "b3BzLXNlY3JldC12YWx1ZQ==",
            id="bad-secret",
        ),
        pytest.param(
            {"secret_env": "OPS_SECRET"},
            {"OPS_SECRET": "whsec_!!not-base64-ops-value!!"},
            "endpoints.policy.secret_env",
            "!!not-base64-ops-value!!",
            id="bad-secret-env",
        ),
        pytest.param(
            {"headers": {"Authorization": "Bearer ${OPS_UNSET_TOKEN}"}},
            {},
            "endpoints.policy.headers",
            None,
            id="unset-header-variable",
        ),
    ],
)
def test_check_config_bad_file_names_the_key(tmp_path, endpoint_keys, env, key, hidden):
    """A bad value exits 1 with a one-line error that starts with the dotted key; secrets stay hidden."""
    endpoint = {"name": "policy", "url": "http://127.0.0.1:9/hook", **endpoint_keys}
    path = write_config(tmp_path, endpoints=[endpoint])
    result = cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"error: {key}"), result.stderr
    assert "config ok" not in result.stdout
    no_traceback(result)
    if hidden is not None:
        assert hidden not in result.stdout + result.stderr


def test_check_config_environment_override_error_names_the_variable(tmp_path):
    """An override that breaks the config is reported with the variable that set it."""
    path = write_config(tmp_path, endpoints=[{"name": "policy", "url": "http://127.0.0.1:9/hook", "events": ["rcpt"]}])
    result = cli("check-config", "--config", str(path), env={"MILTERBRIDGE_ENDPOINTS__POLICY__TIMEOUT": "45"})
    assert result.returncode == 1
    assert "endpoints.policy.timeout" in result.stderr
    assert "MILTERBRIDGE_ENDPOINTS__POLICY__TIMEOUT" in result.stderr


def test_check_config_invalid_toml_and_missing_file(tmp_path):
    """A file that is not TOML and a file that does not exist both exit 1 with a message."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nlisten = 'x'\n")
    result = cli("check-config", "--config", str(broken))
    assert result.returncode == 1
    assert result.stderr.startswith("error:")
    no_traceback(result)

    missing = tmp_path / "missing.toml"
    result = cli("check-config", "--config", str(missing))
    assert result.returncode == 1
    assert "missing.toml" in result.stderr
    no_traceback(result)


def test_serve_refuses_a_bad_config_before_starting(tmp_path):
    """``serve`` with a bad file exits 1 naming the key, without binding anything."""
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text(config_text(listen=[f"inet:127.0.0.1:{port}"], server={"max_connections": 0}))
    result = cli("serve", "--config", str(path), "--workers", "1")
    assert result.returncode == 1
    assert "server.max_connections" in result.stderr
    no_traceback(result)


# -- fail closed: a config that would let mail through unfiltered (design.md §3.7) --------

POLICY = {"name": "policy", "url": "http://127.0.0.1:9/hook"}
OBSERVER = {"name": "shadow", "url": "http://127.0.0.1:9/shadow", "mode": "observe"}


def make_unusable(path: Path, case: str) -> str:
    """Turn ``path`` into the named bad config; return what the error must say."""
    match case:
        case "empty":
            path.write_text("")
            return "server.allow_no_endpoints: the config has no endpoints (the file"
        case "unreadable":
            path.mkdir()  # root reads any file whatever its mode; a directory cannot be read as one
            return "cannot read config file"
        case "invalid-toml":
            path.write_text(config_text(endpoints=[POLICY]) + "[server\n")
            return "is not valid TOML"
        case "no-endpoints":
            path.write_text(config_text())
            return "server.allow_no_endpoints: the config has no endpoints"
        case "observe-only":
            path.write_text(config_text(endpoints=[OBSERVER]))
            return "server.allow_no_endpoints: the config has only observe endpoints"
    raise AssertionError(case)


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", ["empty", "unreadable", "invalid-toml", "no-endpoints", "observe-only"])
def test_a_config_that_would_not_filter_is_refused(tmp_path, command, case):
    """check-config and serve both exit 1 with a one-line error for each config that cannot filter mail."""
    path = tmp_path / "milterbridge.toml"
    expected = make_unusable(path, case)
    extra = ["--workers", "1"] if command == "serve" else []
    result = cli(command, "--config", str(path), *extra)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error:"), result.stderr
    assert expected in result.stderr
    assert "config ok" not in result.stdout
    no_traceback(result)


def test_check_config_and_serve_give_the_same_refusal(tmp_path):
    """The enforcing-endpoint rule is one rule: both commands print the same message."""
    path = write_config(tmp_path, endpoints=[OBSERVER])
    checked = cli("check-config", "--config", str(path))
    served = cli("serve", "--config", str(path), "--workers", "2")
    assert checked.returncode == served.returncode == 1
    assert checked.stderr == served.stderr
    assert "allow_no_endpoints = true" in checked.stderr


def test_allow_no_endpoints_accepts_a_config_without_enforcing_endpoints(tmp_path):
    """With server.allow_no_endpoints = true the same config passes, and the summary says what it means."""
    path = write_config(tmp_path, endpoints=[OBSERVER], server={"allow_no_endpoints": True})
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "no enforcing endpoint" in result.stdout
    assert "every message is accepted unchanged" in result.stdout


def test_allow_no_endpoints_must_be_a_boolean(tmp_path):
    """allow_no_endpoints = "yes" is a type error naming the key, not a truthy string."""
    path = write_config(tmp_path, server={"allow_no_endpoints": "yes"})
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: server.allow_no_endpoints: expected true or false"), result.stderr


def test_check_config_refuses_tls_files_the_client_cannot_use(tmp_path):
    """A CA file that holds no certificate fails check-config (and serve), not only a later reload."""
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    path = write_config(tmp_path, endpoints=[{**POLICY, "tls": {"ca_file": str(bad_ca)}}])
    for command in ("check-config", "serve"):
        result = cli(command, "--config", str(path), *(["--workers", "1"] if command == "serve" else []))
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith(f"error: cannot use config {path}"), result.stderr
        no_traceback(result)


def warnings_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``warning:`` lines check-config printed."""
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_check_config_warns_about_a_readable_file_with_inline_secrets(tmp_path):
    """An inline secret, header value or URL token in a file others can read is a warning; exit stays 0."""
    endpoint = {
        **POLICY,
        "url": "http://ops:hunter2@127.0.0.1:9/hook?token=url-token-31337",
        "secret": SECRET,
        "headers": {"X-Api-Key": TOKEN},
    }
    path = write_config(tmp_path, endpoints=[endpoint])
    path.chmod(0o644)
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    (warning,) = warnings_of(result)
    assert str(path) in warning
    assert "0o644" in warning
    for key in ("endpoints.policy.secret", "endpoints.policy.headers.X-Api-Key", "endpoints.policy.url"):
        assert key in warning
    # The summary shows where the endpoint is, without its credentials or query.
    assert "endpoint policy: http://127.0.0.1:9/hook enforce" in result.stdout
    everything = result.stdout + result.stderr
    for secret in (SECRET, TOKEN, "hunter2", "url-token-31337"):
        assert secret not in everything

    path.chmod(0o600)
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0
    assert warnings_of(result) == []


def test_check_config_no_warning_for_secrets_from_the_environment(tmp_path):
    """secret_env and ${VAR} header values keep the file free of secrets: no warning at mode 0644."""
    endpoint = {**POLICY, "secret_env": "OPS_SECRET", "headers": {"Authorization": "Bearer ${OPS_TOKEN}"}}
    path = write_config(tmp_path, endpoints=[endpoint])
    path.chmod(0o644)
    result = cli("check-config", "--config", str(path), env={"OPS_SECRET": SECRET, "OPS_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert warnings_of(result) == []


def test_check_config_warns_about_a_readable_secret_file_and_tls_verify_off(tmp_path):
    """A secret_file readable by another group, and tls.verify = false, each get a warning."""
    secret_file = tmp_path / "policy.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o640)
    os.chown(secret_file, -1, os.getegid() + 1)  # a group other than the bridge's own (we are root)
    path = write_config(tmp_path, endpoints=[{**POLICY, "secret_file": str(secret_file), "tls": {"verify": False}}])
    path.chmod(0o600)
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    file_warning, tls_warning = warnings_of(result)
    assert f"secret file '{secret_file}'" in file_warning
    assert "0o640" in file_warning
    assert "endpoints.policy.tls.verify is false" in tls_warning
    assert SECRET not in result.stdout + result.stderr

    secret_file.chmod(0o600)
    assert warnings_of(cli("check-config", "--config", str(path))) == [tls_warning]


def test_config_errors_redact_url_credentials_and_query(tmp_path):
    """A refused URL is shown without its user info or query string."""
    url = "http://ops:hunter2@filters.example/hook?token=url-token-31337"
    path = write_config(tmp_path, endpoints=[{**POLICY, "url": url}])
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "endpoints.policy.url: 'http://<redacted>@filters.example/hook?<redacted>' is plain http" in result.stderr
    assert "hunter2" not in result.stderr
    assert "url-token-31337" not in result.stderr


def test_serve_demo_and_config_exclude_each_other(tmp_path):
    """``serve --demo --config PATH`` is a usage error, not a silent choice of one."""
    result = cli("serve", "--demo", "--config", str(tmp_path / "x.toml"))
    assert result.returncode == 2
    assert "--demo" in result.stderr


# -- send --------------------------------------------------------------------------------


def script_policy(webhooks: FakeWebhooks, *, eom: FakeResponse | None = None) -> None:
    """rcpt: refuse BLOCKED; eom: tag the message and rewrite its subject (or ``eom``)."""

    def rcpt(request: RecordedRequest) -> FakeResponse:
        if request.json["data"]["address"] == BLOCKED:
            return FakeResponse.decision("reject", reply={"code": 550, "enhanced": "5.7.1", "text": "not here"})
        return FakeResponse.decision("continue")

    webhooks.set_default(rcpt, event="rcpt")
    webhooks.set_default(
        eom
        or FakeResponse.decision(
            "continue",
            modifications=[
                {"op": "add_header", "name": "X-Ops", "value": "checked"},
                {"op": "change_header", "name": "Subject", "index": 1, "value": "[ops] hello"},
            ],
        ),
        event="eom",
    )


async def start_policy_bridge(tmp_path: Path, bridges: BridgeLauncher, webhooks: FakeWebhooks) -> str:
    """A bridge with one enforcing endpoint on rcpt and eom; its milter address."""
    path = write_config(
        tmp_path,
        endpoints=[{"name": "policy", "url": webhooks.url("/hook"), "events": ["rcpt", "eom"], "timeout": 3}],
    )
    bridge = await bridges.start(path)
    return bridge.milter


@pytest.mark.asyncio
async def test_send_prints_decision_replies_and_modifications(tmp_path, bridges, webhooks, message_file):
    """``send`` prints each recipient's reply, the modifications and the final decision, exit 0."""
    script_policy(webhooks)
    milter = await start_policy_bridge(tmp_path, bridges, webhooks)
    result = await run_cli(
        "send", str(message_file), "--milter", milter, "--rcpt", "alice@example.net", "--rcpt", BLOCKED
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rcpt <alice@example.net> continue" in out
    assert f"rcpt <{BLOCKED}> reject" in out
    assert "550 5.7.1 not here" in out
    assert "add_header" in out
    assert "X-Ops" in out
    assert "change_header" in out
    assert "[ops] hello" in out
    assert "decision: continue (at eom)" in out
    assert [r.event for r in webhooks.requests] == ["rcpt", "rcpt", "eom"]


@pytest.mark.asyncio
async def test_send_json_output(tmp_path, bridges, webhooks, message_file):
    """``send --json`` prints one JSON document with decision, per-stage replies and modifications."""
    script_policy(webhooks)
    milter = await start_policy_bridge(tmp_path, bridges, webhooks)
    result = await run_cli(
        "send", str(message_file), "--milter", milter, "--rcpt", "alice@example.net", "--rcpt", BLOCKED, "--json"
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["decision"] == {"action": "continue"}
    assert document["stopped_at"] == "eom"
    rcpt = document["stages"]["rcpt"]
    assert rcpt[0] == {"action": "continue"}
    assert rcpt[1]["action"] == "reject"
    assert any("550 5.7.1 not here" in line for line in rcpt[1]["reply"])
    mods = {(m["op"], m["name"]): m for m in document["modifications"]}
    assert mods["add_header", "X-Ops"]["value"].strip() == "checked"
    assert mods["change_header", "Subject"]["value"].strip() == "[ops] hello"
    assert mods["change_header", "Subject"]["index"] == 1


@pytest.mark.asyncio
async def test_send_json_reports_a_rejected_message(tmp_path, bridges, webhooks, message_file):
    """A message refused at end-of-message shows as decision reject with the endpoint's reply."""
    script_policy(
        webhooks,
        eom=FakeResponse.decision("reject", reply={"code": 554, "enhanced": "5.7.1", "text": "policy says no"}),
    )
    milter = await start_policy_bridge(tmp_path, bridges, webhooks)
    result = await run_cli("send", str(message_file), "--milter", milter, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["decision"]["action"] == "reject"
    assert any("554 5.7.1 policy says no" in line for line in document["decision"]["reply"])
    assert document["modifications"] == []


@pytest.mark.asyncio
async def test_send_to_a_closed_port_fails_clearly(message_file):
    """Nothing listening: exit 2 with one line naming the address, no traceback."""
    address = f"inet:127.0.0.1:{free_port()}"
    result = await run_cli("send", str(message_file), "--milter", address)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {address}"), result.stderr
    assert result.stdout == ""
    no_traceback(result)


def test_send_missing_message_file(tmp_path):
    """A message file that does not exist: exit 2 naming the file."""
    missing = tmp_path / "nope.eml"
    result = cli("send", str(missing), "--milter", "inet:127.0.0.1:9")
    assert result.returncode == 2
    assert "nope.eml" in result.stderr
    no_traceback(result)


def test_send_requires_milter(message_file):
    """``send`` without --milter is a usage error."""
    result = cli("send", str(message_file))
    assert result.returncode == 2
    assert "--milter" in result.stderr
