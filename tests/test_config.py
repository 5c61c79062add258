"""Configuration loader: TOML plus environment overrides; every error names its key."""

from __future__ import annotations

import ast
import base64
import os
import sys
from pathlib import Path

import pytest

from milterbridge.config import (
    AdminSettings,
    Config,
    ConfigError,
    EndpointSettings,
    LogSettings,
    ServerSettings,
    TlsSettings,
    load_config,
)
from milterbridge.milter.address import ListenAddress, parse_listen_address, split_host_port
from milterbridge.milter.constants import Event
from milterbridge.policy.model import Mode, OnError, OnOversize
from milterbridge.serving import check_enforcing, config_warnings, load_serving_config

SECRET_A = "whsec_" + base64.b64encode(b"A" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"B" * 24).decode()
SECRET_C = "whsec_" + base64.b64encode(b"C" * 40).decode()
TOKEN = "tok-9f8e7d6c5b4a"

NAMED = '[[endpoints]]\nname = "policy"\n'
ENDPOINT = NAMED + 'url = "https://hooks.example/milter"\n'


def write(tmp_path: Path, text: str, name: str = "milterbridge.toml") -> Path:
    """Write a config file under tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    """Load a config given as TOML text, with an explicit (possibly empty) environment."""
    return load_config(write(tmp_path, text), environ or {})


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    """Load a config that must fail and return the error."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return info.value


# -- whole files ------------------------------------------------------------------


def test_full_example_loads_to_expected_objects(tmp_path):
    """Every key of every section, as in docs/configuration.md, becomes the expected settings."""
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("PEM\n")
    (tmp_path / "archive.secret").write_text(SECRET_C + "\n")
    text = f"""
[server]
listen = ["inet:127.0.0.1:8890", "unix:/run/milterbridge/milter.sock", "inet:8891@::1"]
max_connections = 200
max_message_bytes = 1000000
on_oversize = "reject"
body_memory_bytes = 65536
drain_timeout = 10
idle_timeout = 600.5
max_frame_bytes = 262144
max_recipients = 500
max_headers = 2000
max_header_bytes = 1048576
max_macros = 100
socket_mode = 0o600
progress_interval = 2.5

[admin]
listen = "[::1]:9000"

[log]
level = "debug"

[[endpoints]]
name = "policy"
url = "https://filters.internal/milter"
events = ["rcpt", "eom"]
mode = "enforce"
on_error = "continue"
timeout = 5.0
include_body = true
max_body_bytes = 4096
macros = ["{{auth_authen}}", "i"]
secret_env = "POLICY_WEBHOOK_SECRET"
headers = {{ Authorization = "Bearer ${{POLICY_TOKEN}}", X-Tenant = "mail" }}
tls = {{ ca_file = "ca.pem", cert_file = "client.pem", key_file = "client.key", verify = false }}
allow_insecure_http = false
max_response_bytes = 2048
retry = false
breaker_failure_rate = 0.25
breaker_min_calls = 0
breaker_window = 30
breaker_probe = 0.5
breaker_reset = 12
max_modifications = 50

[[endpoints]]
name = "archive-v2"
url = "http://archive.lan:8080/hook"
events = ["eom", "close"]
mode = "observe"
timeout = 120
secret = "{SECRET_A}"
secret_file = ["archive.secret"]
allow_insecure_http = true
"""
    path = write(tmp_path, text)
    config = load_config(path, {"POLICY_WEBHOOK_SECRET": SECRET_B, "POLICY_TOKEN": TOKEN})
    expected = Config(
        server=ServerSettings(
            listen=("inet:127.0.0.1:8890", "unix:/run/milterbridge/milter.sock", "inet:[::1]:8891"),
            max_connections=200,
            max_message_bytes=1000000,
            on_oversize=OnOversize.REJECT,
            body_memory_bytes=65536,
            drain_timeout=10.0,
            idle_timeout=600.5,
            max_frame_bytes=262144,
            max_recipients=500,
            max_headers=2000,
            max_header_bytes=1048576,
            max_macros=100,
            socket_mode=0o600,
            progress_interval=2.5,
        ),
        admin=AdminSettings(listen="[::1]:9000"),
        log=LogSettings(level="debug"),
        endpoints=(
            EndpointSettings(
                name="policy",
                url="https://filters.internal/milter",
                events=frozenset({Event.RCPT, Event.EOM}),
                mode=Mode.ENFORCE,
                on_error=OnError.CONTINUE,
                timeout=5.0,
                include_body=True,
                max_body_bytes=4096,
                macros=("{auth_authen}", "i"),
                secrets=(SECRET_B,),
                headers=(("Authorization", f"Bearer {TOKEN}"), ("X-Tenant", "mail")),
                tls=TlsSettings(
                    ca_file=str(tmp_path / "ca.pem"),
                    cert_file=str(tmp_path / "client.pem"),
                    key_file=str(tmp_path / "client.key"),
                    verify=False,
                ),
                allow_insecure_http=False,
                max_response_bytes=2048,
                retry=False,
                breaker_failure_rate=0.25,
                breaker_min_calls=0,
                breaker_window=30.0,
                breaker_probe=0.5,
                breaker_reset=12.0,
                max_modifications=50,
            ),
            EndpointSettings(
                name="archive-v2",
                url="http://archive.lan:8080/hook",
                events=frozenset({Event.EOM, Event.CLOSE}),
                mode=Mode.OBSERVE,
                timeout=120.0,
                secrets=(SECRET_A, SECRET_C),
                allow_insecure_http=True,
            ),
        ),
        source=str(path),
        # Written in the file itself: an inline header value and an inline secret (not the ${VAR} one).
        inline_secrets=("endpoints.policy.headers.X-Tenant", "endpoints.archive-v2.secret"),
        secret_files=(str(tmp_path / "archive.secret"),),
    )
    assert config == expected
    assert isinstance(config.server.drain_timeout, float)


def test_the_design_example_loads(tmp_path):
    """The example of design.md §4 (with its placeholder paths made real) is valid."""
    (tmp_path / "ca.pem").write_text("PEM\n")
    text = """
[server]
listen = ["inet:127.0.0.1:8890", "unix:/run/milterbridge/milter.sock"]
max_connections = 1000
max_message_bytes = 52428800
on_oversize = "tempfail"
body_memory_bytes = 1048576
drain_timeout = 30.0
[admin]
listen = "127.0.0.1:8891"
[log]
level = "info"
[[endpoints]]
name = "policy"
url = "https://filters.internal/milter"
events = ["rcpt", "eom"]
mode = "enforce"
on_error = "tempfail"
timeout = 5.0
include_body = true
macros = ["{auth_authen}", "{client_addr}"]
secret_env = "POLICY_WEBHOOK_SECRET"
headers = { Authorization = "Bearer ${POLICY_TOKEN}" }
tls = { ca_file = "ca.pem", verify = true }
allow_insecure_http = false
"""
    config = load_text(tmp_path, text, {"POLICY_WEBHOOK_SECRET": SECRET_A, "POLICY_TOKEN": TOKEN})
    assert config.endpoints[0].include_body is True
    assert config.endpoints[0].tls.ca_file == str(tmp_path / "ca.pem")


def test_documented_example_loads(tmp_path):
    """The complete example in docs/configuration.md is valid (with its files made real)."""
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    section = doc.split("## Complete example", 1)[1]
    text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    for absolute in ("/etc/ssl/internal-ca.pem", "/etc/milterbridge/client.pem", "/etc/milterbridge/client.key"):
        text = text.replace(absolute, absolute.rsplit("/", 1)[1])
        (tmp_path / absolute.rsplit("/", 1)[1]).write_text("PEM\n")
    text = text.replace("/run/secrets/classifier", "classifier.key")
    (tmp_path / "classifier.key").write_text(SECRET_C)
    environ = {"POLICY_WEBHOOK_SECRET": SECRET_A, "POLICY_WEBHOOK_SECRET_OLD": SECRET_B, "POLICY_TOKEN": TOKEN}
    config = load_text(tmp_path, text, environ)
    assert [ep.name for ep in config.endpoints] == ["policy", "classifier-next"]
    assert config.endpoints[0].secrets == (SECRET_A, SECRET_B)
    assert config.endpoints[1].secrets == (SECRET_C,)
    assert config.server == ServerSettings(listen=config.server.listen)


def test_no_path_and_no_env_gives_defaults():
    """Without a file or overrides the loader returns the dataclass defaults, with no source."""
    assert load_config(None, {}) == Config()
    assert load_config(None, {"MILTERBRIDGE_CONFIG": ""}).source is None


def test_empty_file_gives_defaults(tmp_path):
    """An empty TOML file is valid and means every default."""
    path = write(tmp_path, "")
    assert load_config(path, {}) == Config(source=str(path))


def test_config_path_from_environment(tmp_path):
    """MILTERBRIDGE_CONFIG names the file when no path is given; an explicit path wins."""
    from_env = write(tmp_path, '[log]\nlevel = "error"\n', "env.toml")
    explicit = write(tmp_path, '[log]\nlevel = "warning"\n', "explicit.toml")
    environ = {"MILTERBRIDGE_CONFIG": str(from_env)}
    assert load_config(None, environ).log.level == "error"
    assert load_config(explicit, environ).log.level == "warning"


def test_os_environ_is_the_default(tmp_path, monkeypatch):
    """Without an environ argument the process environment is read."""
    monkeypatch.setenv("MILTERBRIDGE_LOG__LEVEL", "warning")
    assert load_config(write(tmp_path, "")).log.level == "warning"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(None, "cannot read config file", id="missing-file"),
        pytest.param("[server\nlisten = 1", "not valid TOML", id="bad-toml"),
    ],
)
def test_unreadable_file(tmp_path, content, fragment):
    """A missing or malformed file is a ConfigError naming the file."""
    path = tmp_path / "absent.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == ""
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


# -- environment overrides ------------------------------------------------------------


TWO_ENDPOINTS = ENDPOINT + '[[endpoints]]\nname = "spam-check"\nurl = "https://spam.example/m"\n'


@pytest.mark.parametrize(
    ("environ", "get", "expected"),
    [
        pytest.param(
            {"MILTERBRIDGE_SERVER__LISTEN": "unix:/run/mb.sock"},
            lambda c: c.server.listen,
            ("unix:/run/mb.sock",),
            id="server-listen-single-string",
        ),
        pytest.param(
            {"MILTERBRIDGE_SERVER__LISTEN": '["inet:0.0.0.0:8890", "inet6:[::]:8890"]'},
            lambda c: c.server.listen,
            ("inet:0.0.0.0:8890", "inet:[::]:8890"),
            id="server-listen-json-list",
        ),
        pytest.param(
            {"MILTERBRIDGE_SERVER__MAX_CONNECTIONS": "17"}, lambda c: c.server.max_connections, 17, id="json-number"
        ),
        pytest.param(
            {"MILTERBRIDGE_SERVER__DRAIN_TIMEOUT": "2.5"}, lambda c: c.server.drain_timeout, 2.5, id="json-float"
        ),
        pytest.param(
            {"MILTERBRIDGE_SERVER__SOCKET_MODE": "0o600"}, lambda c: c.server.socket_mode, 0o600, id="octal-mode"
        ),
        pytest.param(
            {"MILTERBRIDGE_SERVER__SOCKET_MODE": "0640"}, lambda c: c.server.socket_mode, 0o640, id="octal-mode-zero"
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__MODE": "OBSERVE"},
            lambda c: c.endpoints[0].mode,
            Mode.OBSERVE,
            id="enum-ignores-case",
        ),
        pytest.param({"MILTERBRIDGE_LOG__LEVEL": "debug"}, lambda c: c.log.level, "debug", id="log-level"),
        pytest.param({"MILTERBRIDGE_ADMIN__LISTEN": "0.0.0.0:9"}, lambda c: c.admin.listen, "0.0.0.0:9", id="admin"),
        pytest.param(
            {"MILTERBRIDGE_ADMIN__LISTEN": "[::1]:9"}, lambda c: c.admin.listen, "[::1]:9", id="not-json-stays-string"
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__URL": '"https://quoted.example/"'},
            lambda c: c.endpoints[0].url,
            "https://quoted.example/",
            id="json-string",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__TIMEOUT": "2"},
            lambda c: c.endpoints[0].timeout,
            2.0,
            id="endpoint-upper-case-name",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__SPAM_CHECK__MODE": "observe"},
            lambda c: c.endpoints[1].mode,
            Mode.OBSERVE,
            id="endpoint-dash-written-as-underscore",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__policy__EVENTS": '["connect", "eom"]'},
            lambda c: c.endpoints[0].events,
            frozenset({Event.CONNECT, Event.EOM}),
            id="endpoint-json-list",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__INCLUDE_BODY": "true"},
            lambda c: c.endpoints[0].include_body,
            True,
            id="endpoint-json-bool",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__HEADERS": '{"X-Env": "1"}'},
            lambda c: c.endpoints[0].headers,
            (("X-Env", "1"),),
            id="endpoint-json-table",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__TLS__VERIFY": "false"},
            lambda c: c.endpoints[0].tls.verify,
            False,
            id="endpoint-tls-key",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__SECRET": f'["{SECRET_A}", "{SECRET_B}"]'},
            lambda c: c.endpoints[0].secrets,
            (SECRET_A, SECRET_B),
            id="endpoint-secret-list",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__SPAM_CHECK__NAME": "spam"},
            lambda c: c.endpoints[1].name,
            "spam",
            id="endpoint-rename",
        ),
        pytest.param(
            {"MILTERBRIDGE_WORKERS": "4", "OTHER__THING": "x"}, lambda c: c.server, ServerSettings(), id="not-overrides"
        ),
    ],
)
def test_environment_override(tmp_path, environ, get, expected):
    """Each override form reaches the right setting, parsed as JSON when it looks like JSON."""
    assert get(load_text(tmp_path, TWO_ENDPOINTS, environ)) == expected


def test_override_without_a_file():
    """Overrides apply to the defaults when no file is given."""
    config = load_config(None, {"MILTERBRIDGE_SERVER__MAX_HEADERS": "9"})
    assert config.server.max_headers == 9
    assert config.source is None


@pytest.mark.parametrize(
    ("environ", "key", "fragment"),
    [
        pytest.param({"MILTERBRIDGE_ENDPOINTS__NOPE__TIMEOUT": "1"}, "endpoints.nope", "NOPE", id="no-such-endpoint"),
        pytest.param({"MILTERBRIDGE_ENDPOINTS__TIMEOUT": "1"}, "endpoints.", "no configured endpoint", id="no-name"),
        pytest.param({"MILTERBRIDGE_SERVR__LISTEN": "x"}, "servr", "MILTERBRIDGE_SERVR__LISTEN", id="unknown-section"),
        pytest.param(
            {"MILTERBRIDGE_SERVER__LISTN": "unix:/x"}, "server.listn", "MILTERBRIDGE_SERVER__LISTN", id="unknown-key"
        ),
        pytest.param(
            {"MILTERBRIDGE_SERVER__MAX_CONNECTIONS": "many"},
            "server.max_connections",
            "MILTERBRIDGE_SERVER__MAX_CONNECTIONS",
            id="wrong-type-names-variable",
        ),
        pytest.param(
            {"MILTERBRIDGE_ENDPOINTS__POLICY__EVENTS": "[rcpt, eom]"},
            "endpoints.policy.events",
            "expected an array of strings, got '[rcpt, eom]' (set by MILTERBRIDGE_ENDPOINTS__POLICY__EVENTS)",
            id="broken-json-stays-a-string",
        ),
    ],
)
def test_environment_override_errors(tmp_path, environ, key, fragment):
    """Bad overrides fail with the key and, for values, the variable that set them."""
    err = load_error(tmp_path, ENDPOINT, environ)
    assert err.key == key
    assert key in str(err)
    assert fragment in str(err)


# -- secrets and headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(f'secret = "{SECRET_A}"', (SECRET_A,), id="literal"),
        pytest.param(f'secret = ["{SECRET_A}", "{SECRET_B}"]', (SECRET_A, SECRET_B), id="literal-rotation"),
        pytest.param('secret_env = "S1"', (SECRET_B,), id="env"),
        pytest.param('secret_env = ["S1", "S2"]', (SECRET_B, SECRET_C), id="env-rotation"),
        pytest.param('secret_file = "a.key"', (SECRET_A,), id="file-relative-to-config"),
        pytest.param('secret_file = ["a.key", "c.key"]', (SECRET_A, SECRET_C), id="file-rotation"),
        pytest.param(
            f'secret_file = "c.key"\nsecret_env = "S1"\nsecret = "{SECRET_A}"',
            (SECRET_A, SECRET_B, SECRET_C),
            id="order-secret-env-file",
        ),
        pytest.param("secret = []", (), id="empty-list"),
    ],
)
def test_secret_sources(tmp_path, lines, expected):
    """secret, secret_env and secret_file (each possibly a list) collect in that order."""
    (tmp_path / "a.key").write_text(f"  {SECRET_A}\n")
    (tmp_path / "c.key").write_text(SECRET_C)
    config = load_text(tmp_path, ENDPOINT + lines, {"S1": SECRET_B + "\n", "S2": SECRET_C})
    assert config.endpoints[0].secrets == expected


@pytest.mark.parametrize(
    ("lines", "key", "fragment"),
    [
        pytest.param('secret = "whsec_!!notbase64!!"', "endpoints.policy.secret", "base64", id="bad-base64"),
        pytest.param('secret = "sk_live_123456"', "endpoints.policy.secret", "whsec_", id="bad-prefix"),
        pytest.param('secret = "whsec_"', "endpoints.policy.secret", "whsec_", id="empty-key"),
        # A number no temporary path contains (pytest's tmp_path holds a run counter: pytest-42).
        pytest.param("secret = 9876543210123", "endpoints.policy.secret", "expected a string", id="wrong-type"),
        pytest.param('secret_env = "MISSING"', "endpoints.policy.secret_env", "MISSING", id="env-unset"),
        pytest.param('secret_env = "BAD"', "endpoints.policy.secret_env", "BAD", id="env-invalid"),
        pytest.param('secret_file = "absent.key"', "endpoints.policy.secret_file", "absent.key", id="file-missing"),
        pytest.param('secret_file = "bad.key"', "endpoints.policy.secret_file", "bad.key", id="file-invalid"),
    ],
)
def test_secret_errors_never_show_the_secret(tmp_path, lines, key, fragment):
    """Secret errors name the key and the source, and show <redacted> instead of the value."""
    (tmp_path / "bad.key").write_text("whsec_!!notbase64!!")
    err = load_error(tmp_path, ENDPOINT + lines, {"BAD": "sk_live_123456"})
    assert err.key == key
    assert key in str(err)
    assert fragment in str(err)
    for secret in ("notbase64", "sk_live_123456", "9876543210123"):
        assert secret not in str(err)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param('{ A = "Bearer ${T}" }', (("A", f"Bearer {TOKEN}"),), id="expand"),
        pytest.param('{ A = "${T}${T}" }', (("A", TOKEN * 2),), id="expand-twice"),
        pytest.param('{ A = "$${T} $5 $" }', (("A", "${T} $5 $"),), id="escape-and-lone-dollar"),
        pytest.param('{ X-A = "1", "X_B" = "2" }', (("X-A", "1"), ("X_B", "2")), id="several-in-order"),
        pytest.param("{}", (), id="empty"),
    ],
)
def test_header_expansion(tmp_path, table, expected):
    """${VAR} is expanded from the environment; $${ writes a literal ${."""
    config = load_text(tmp_path, ENDPOINT + f"headers = {table}", {"T": TOKEN})
    assert config.endpoints[0].headers == expected


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        pytest.param('{ A = "Bearer ${NOPE}" }', "endpoints.policy.headers.A", "NOPE", id="unset-variable"),
        pytest.param('{ A = "Bearer ${T" }', "endpoints.policy.headers.A", "malformed", id="unclosed-reference"),
        pytest.param('{ A = "x${CRLF}" }', "endpoints.policy.headers.A", "CR, LF", id="crlf-after-expansion"),
        pytest.param('{ A = "a\\nb" }', "endpoints.policy.headers.A", "CR, LF", id="newline"),
        pytest.param('{ "Bad Name" = "1" }', "endpoints.policy.headers.Bad Name", "header name", id="bad-name"),
        pytest.param(
            '{ webhook-signature = "v1,x" }', "endpoints.policy.headers.webhook-signature", "itself", id="reserved"
        ),
        pytest.param('{ Connection = "close" }', "endpoints.policy.headers.Connection", "itself", id="connection"),
        pytest.param(
            '{ Accept-Encoding = "gzip" }', "endpoints.policy.headers.Accept-Encoding", "itself", id="accept-encoding"
        ),
        pytest.param('{ a = "1", A = "2" }', "endpoints.policy.headers.A", "twice", id="duplicate-ignoring-case"),
        pytest.param("{ A = 7 }", "endpoints.policy.headers.A", "expected a string", id="not-a-string"),
        pytest.param('"A: 1"', "endpoints.policy.headers", "table", id="not-a-table"),
    ],
)
def test_header_errors_never_show_values(tmp_path, table, key, fragment):
    """Header errors name the header's key and never print its value."""
    err = load_error(tmp_path, ENDPOINT + f"headers = {table}", {"T": TOKEN, "CRLF": "\r\nX: y"})
    assert err.key == key
    assert key in str(err)
    assert fragment in str(err)
    assert TOKEN not in str(err)
    assert "Bearer" not in str(err)
    assert "7" not in str(err).replace(key, "")


def test_repr_of_config_hides_secrets_and_headers(tmp_path):
    """repr(Config) never contains a secret or a header value."""
    lines = f'secret = "{SECRET_A}"\nsecret_env = "S"\nheaders = {{ Authorization = "Bearer ${{T}}" }}'
    config = load_text(tmp_path, ENDPOINT + lines, {"S": SECRET_B, "T": TOKEN})
    text = repr(config)
    assert config.endpoints[0].secrets == (SECRET_A, SECRET_B)
    for hidden in (SECRET_A, SECRET_B, SECRET_A[6:], TOKEN, "Authorization"):
        assert hidden not in text


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        # unknown keys and sections
        pytest.param("[sever]\n", "sever", "unknown section", id="unknown-section"),
        pytest.param("[server]\nlisten_on = 'unix:/x'", "server.listen_on", "did you mean listen", id="typo-hint"),
        pytest.param(ENDPOINT + "timout = 3", "endpoints.policy.timout", "unknown key", id="endpoint-typo"),
        pytest.param(ENDPOINT + "tls = { verfy = true }", "endpoints.policy.tls.verfy", "unknown", id="tls-typo"),
        pytest.param("server = 3", "server", "expected a table", id="section-not-table"),
        pytest.param("[endpoints]\nname = 'x'", "endpoints", "array of tables", id="endpoints-not-array"),
        pytest.param("endpoints = [3]", "endpoints[0]", "expected a table", id="endpoint-not-table"),
        # types
        pytest.param("[server]\nmax_connections = true", "server.max_connections", "integer", id="bool-not-int"),
        pytest.param("[server]\nmax_connections = 1.5", "server.max_connections", "1.5", id="float-not-int"),
        pytest.param("[server]\ndrain_timeout = '3'", "server.drain_timeout", "'3'", id="string-not-seconds"),
        pytest.param("[server]\ndrain_timeout = false", "server.drain_timeout", "boolean", id="bool-not-seconds"),
        pytest.param("[server]\ndrain_timeout = nan", "server.drain_timeout", "nan", id="nan-seconds"),
        pytest.param(ENDPOINT + "retry = 1", "endpoints.policy.retry", "true or false", id="int-not-bool"),
        # server
        pytest.param("[server]\nlisten = []", "server.listen", "at least one", id="listen-empty"),
        pytest.param("[server]\nlisten = 'tcp:1.2.3.4:5'", "server.listen", "tcp:1.2.3.4:5", id="listen-scheme"),
        pytest.param("[server]\nlisten = ['unix:rel.sock']", "server.listen", "absolute", id="listen-relative"),
        pytest.param("[server]\nlisten = [8890]", "server.listen", "array of strings", id="listen-number"),
        pytest.param(
            "[server]\nlisten = ['inet:1.2.3.4:5', 'inet:5@1.2.3.4']", "server.listen", "twice", id="listen-duplicate"
        ),
        pytest.param("[server]\nmax_connections = 0", "server.max_connections", "minimum of 1", id="zero-conns"),
        pytest.param("[server]\nmax_message_bytes = -1", "server.max_message_bytes", "-1", id="negative-size"),
        pytest.param("[server]\nmax_frame_bytes = 4096", "server.max_frame_bytes", "65535", id="small-frames"),
        pytest.param("[server]\nidle_timeout = 0", "server.idle_timeout", "greater than zero", id="zero-idle"),
        pytest.param("[server]\ndrain_timeout = -1", "server.drain_timeout", "zero or more", id="negative-drain"),
        pytest.param("[server]\non_oversize = 'drop'", "server.on_oversize", "'drop'", id="on-oversize"),
        pytest.param("[server]\nsocket_mode = 0o666", "server.socket_mode", "0o666", id="world-writable"),
        pytest.param("[server]\nsocket_mode = 660", "server.socket_mode", "octal", id="decimal-mode"),
        pytest.param("[server]\nsocket_mode = '0o6x0'", "server.socket_mode", "0o6x0", id="bad-octal-string"),
        # admin, log
        pytest.param("[admin]\nlisten = '8891'", "admin.listen", "'8891'", id="admin-no-host"),
        pytest.param("[admin]\nlisten = '::1:8891'", "admin.listen", "brackets", id="admin-bare-v6"),
        pytest.param("[admin]\nlisten = 'a:99999'", "admin.listen", "65535", id="admin-port"),
        pytest.param("[log]\nlevel = 'verbose'", "log.level", "'verbose'", id="log-level"),
        # endpoints
        pytest.param("[[endpoints]]\nurl = 'https://a/'", "endpoints[0].name", "required", id="name-missing"),
        pytest.param("[[endpoints]]\nname = 'a'", "endpoints[0].url", "required", id="url-missing"),
        pytest.param("[[endpoints]]\nname = 'a b'\nurl = 'https://a/'", "endpoints[0].name", "'a b'", id="bad-name"),
        pytest.param(ENDPOINT + ENDPOINT, "endpoints[1].name", "already used", id="duplicate-name"),
        pytest.param(
            ENDPOINT + ENDPOINT.replace("policy", "Policy"), "endpoints[1].name", "already used", id="dup-case"
        ),
        pytest.param(NAMED + "url = 'ftp://a/'", "endpoints.policy.url", "ftp://a/", id="url-scheme"),
        pytest.param(NAMED + "url = 'https:///x'", "endpoints.policy.url", "with a host", id="url-no-host"),
        pytest.param(NAMED + "url = 'https://a:99999/'", "endpoints.policy.url", "99999", id="url-bad-port"),
        pytest.param(NAMED + "url = 'https://a/b c'", "endpoints.policy.url", "whitespace", id="url-space"),
        pytest.param(
            NAMED + "url = 'https://a" + "é" * 70 + ".com/'", "endpoints.policy.url", "UnicodeError", id="url-idna"
        ),
        pytest.param(
            NAMED + "url = 'http://hooks.example/'", "endpoints.policy.url", "allow_insecure_http", id="plain-http"
        ),
        pytest.param(
            NAMED + "url = 'https://u:p@a/'\nheaders = { authorization = 'x' }",
            "endpoints.policy.headers.Authorization",
            "credentials in the url",
            id="auth-twice",
        ),
        pytest.param(ENDPOINT + "events = []", "endpoints.policy.events", "at least one", id="events-empty"),
        pytest.param(ENDPOINT + "events = 'eom'", "endpoints.policy.events", "array", id="events-string"),
        pytest.param(ENDPOINT + "events = ['envfrom']", "endpoints.policy.events", "'envfrom'", id="events-unknown"),
        pytest.param(ENDPOINT + "events = ['eom', 'eom']", "endpoints.policy.events", "twice", id="events-duplicate"),
        pytest.param(ENDPOINT + "mode = 'shadow'", "endpoints.policy.mode", "'shadow'", id="mode"),
        pytest.param(ENDPOINT + "on_error = 'discard'", "endpoints.policy.on_error", "'discard'", id="on-error"),
        pytest.param(ENDPOINT + "timeout = 0", "endpoints.policy.timeout", "greater than zero", id="timeout-zero"),
        pytest.param(
            ENDPOINT + "events = ['rcpt']\ntimeout = 30",
            "endpoints.policy.timeout",
            "milter_command_timeout",
            id="timeout-pre-eom",
        ),
        pytest.param(ENDPOINT + "max_body_bytes = 0", "endpoints.policy.max_body_bytes", "minimum", id="body-size"),
        pytest.param(ENDPOINT + "breaker_min_calls = -1", "endpoints.policy.breaker_min_calls", "minimum", id="brk"),
        pytest.param(
            ENDPOINT + "breaker_failure_rate = 0",
            "endpoints.policy.breaker_failure_rate",
            "greater than 0",
            id="brk-rate0",
        ),
        pytest.param(
            ENDPOINT + "breaker_failure_rate = 1.5", "endpoints.policy.breaker_failure_rate", "at most 1", id="brk-rate"
        ),
        pytest.param(
            ENDPOINT + "breaker_failure_rate = '50%'",
            "endpoints.policy.breaker_failure_rate",
            "number",
            id="brk-rate-str",
        ),
        pytest.param(
            ENDPOINT + "breaker_window = 0", "endpoints.policy.breaker_window", "greater than zero", id="brk-win"
        ),
        pytest.param(
            ENDPOINT + "breaker_probe = -1", "endpoints.policy.breaker_probe", "greater than zero", id="brk-probe"
        ),
        pytest.param(
            ENDPOINT + "breaker_failures = 5", "endpoints.policy.breaker_failures", "unknown key", id="brk-old-key"
        ),
        pytest.param(ENDPOINT + "macros = ['auth authen']", "endpoints.policy.macros", "macro name", id="macro-name"),
        pytest.param(ENDPOINT + "macros = ['i', 'i']", "endpoints.policy.macros", "twice", id="macro-duplicate"),
        pytest.param(
            ENDPOINT + "tls = { ca_file = 'absent.pem' }", "endpoints.policy.tls.ca_file", "absent.pem", id="tls-file"
        ),
        pytest.param(
            ENDPOINT + "tls = { cert_file = 'c.pem' }", "endpoints.policy.tls.key_file", "together", id="tls-no-key"
        ),
        pytest.param(
            ENDPOINT + "tls = { key_file = 'c.pem' }", "endpoints.policy.tls.cert_file", "together", id="tls-no-cert"
        ),
        pytest.param(ENDPOINT + "tls = 'yes'", "endpoints.policy.tls", "table", id="tls-not-table"),
    ],
)
def test_validation_error_names_its_key(tmp_path, text, key, fragment):
    """Each invalid value fails with err.key set to its dotted key, named in the message with the value."""
    (tmp_path / "c.pem").write_text("PEM\n")
    err = load_error(tmp_path, text)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("lines", "timeout"),
    [
        pytest.param("url = 'http://127.0.0.1:9000/x'", 5.0, id="http-ipv4-loopback"),
        pytest.param("url = 'http://127.8.9.10/x'", 5.0, id="http-loopback-net"),
        pytest.param("url = 'http://[::1]:9000/x'", 5.0, id="http-ipv6-loopback"),
        pytest.param("url = 'http://LocalHost:9000/x'", 5.0, id="http-localhost"),
        pytest.param("url = 'http://10.0.0.1/x'\nallow_insecure_http = true", 5.0, id="http-allowed"),
        pytest.param("events = ['eom']\ntimeout = 120", 120.0, id="long-timeout-at-eom"),
        pytest.param("events = ['eom', 'abort', 'close']\ntimeout = 60", 60.0, id="long-timeout-notifications"),
        pytest.param("events = ['rcpt']\ntimeout = 29.9", 29.9, id="just-under-30"),
    ],
)
def test_accepted_edge_cases(tmp_path, lines, timeout):
    """Loopback http, explicit insecure http and long eom-only timeouts are accepted."""
    base = NAMED if lines.startswith("url") else ENDPOINT
    config = load_text(tmp_path, base + lines)
    assert config.endpoints[0].timeout == timeout


def test_zero_endpoints_is_allowed(tmp_path):
    """A config without endpoints loads (the CLI decides what to do with it)."""
    config = load_text(tmp_path, "[log]\nlevel = 'WARNING'\n")
    assert config.endpoints == ()
    assert config.log.level == "warning"


def test_url_password_is_redacted(tmp_path):
    """A URL's password never appears in an error message."""
    err = load_error(tmp_path, NAMED + "url = 'http://user:hunter2@hooks.example/'")
    assert err.key == "endpoints.policy.url"
    assert "hunter2" not in str(err)
    assert "<redacted>" in str(err)


# -- listen addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        pytest.param("inet:127.0.0.1:8890", ListenAddress(kind="inet", host="127.0.0.1", port=8890), None, id="v4"),
        pytest.param("inet:milterbridge:8890", ListenAddress(kind="inet", host="milterbridge", port=8890), None),
        pytest.param("inet:mb_filter.local:1", ListenAddress(kind="inet", host="mb_filter.local", port=1), None),
        pytest.param("inet:0.0.0.0:0", ListenAddress(kind="inet", host="0.0.0.0", port=0), None, id="port-0"),
        pytest.param(
            "inet:8890@127.0.0.1", ListenAddress(kind="inet", host="127.0.0.1", port=8890), "inet:127.0.0.1:8890"
        ),
        pytest.param("inet:[::1]:8890", ListenAddress(kind="inet", host="::1", port=8890), None, id="v6-brackets"),
        pytest.param(
            "inet6:[::1]:8890", ListenAddress(kind="inet", host="::1", port=8890), "inet:[::1]:8890", id="inet6"
        ),
        pytest.param(
            "inet6:8890@::1", ListenAddress(kind="inet", host="::1", port=8890), "inet:[::1]:8890", id="inet6-at"
        ),
        pytest.param(
            "inet:[2001:DB8:0::1]:25",
            ListenAddress(kind="inet", host="2001:db8::1", port=25),
            "inet:[2001:db8::1]:25",
            id="v6-normalised",
        ),
        pytest.param("unix:/run/mb/milter.sock", ListenAddress(kind="unix", path="/run/mb/milter.sock"), None),
        pytest.param(
            "local:/run/m.sock", ListenAddress(kind="unix", path="/run/m.sock"), "unix:/run/m.sock", id="local"
        ),
    ],
)
def test_listen_address_forms(text, expected, canonical):
    """Every documented address form parses; str() gives the canonical Postfix form."""
    address = parse_listen_address(text)
    assert address == expected
    assert str(address) == (canonical or text)
    assert parse_listen_address(str(address)) == address


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("inet:", id="no-rest"),
        pytest.param("tcp:127.0.0.1:25", id="scheme"),
        pytest.param("inet:127.0.0.1", id="no-port"),
        pytest.param("inet:8890", id="port-only"),
        pytest.param("inet::8890", id="empty-host"),
        pytest.param("inet:127.0.0.1:http", id="named-port"),
        pytest.param("inet:127.0.0.1:65536", id="port-range"),
        pytest.param("inet:127.0.0.1:-1", id="negative-port"),
        pytest.param("inet:::1:8890", id="v6-without-brackets"),
        pytest.param("inet:[::1]8890", id="v6-no-colon"),
        pytest.param("inet:[::1:8890", id="v6-unclosed"),
        pytest.param("inet:[fe80::zz]:1", id="v6-invalid"),
        pytest.param("inet6:[127.0.0.1]:1", id="inet6-with-v4"),
        pytest.param("inet6:1@127.0.0.1", id="inet6-at-v4"),
        pytest.param("inet:bad host:1", id="host-space"),
        pytest.param("inet:-bad:1", id="host-leading-dash"),
        pytest.param("inet:1@", id="at-empty-host"),
        pytest.param("unix:relative.sock", id="unix-relative"),
        pytest.param("unix:/run/dir/", id="unix-directory"),
        pytest.param("unix:/" + "x" * 107, id="unix-too-long"),
        pytest.param("unix:/a\0b", id="unix-nul"),
    ],
)
def test_bad_listen_addresses_fail(text):
    """Malformed milter addresses raise ValueError quoting the text."""
    with pytest.raises(ValueError) as info:
        parse_listen_address(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:8891", ("127.0.0.1", 8891), id="v4"),
        pytest.param("[::1]:8891", ("::1", 8891), id="v6"),
        pytest.param("admin.internal:0", ("admin.internal", 0), id="name-port-0"),
    ],
)
def test_split_host_port(text, expected):
    """HTTP listen addresses split into host and port."""
    assert split_host_port(text) == expected


# -- the enforcing-endpoint rule and the security warnings -------------------------------


def serving_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    """Load a config for serving that must be refused and return the error."""
    with pytest.raises(ConfigError) as info:
        load_serving_config(write(tmp_path, text), environ or {})
    return info.value


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "no endpoints (the file"),
        ("[log]\nlevel = 'info'\n", "no endpoints,"),
        (ENDPOINT + "mode = 'observe'\n", "only observe endpoints"),
        (ENDPOINT + "events = ['abort', 'close']\n", "no enforcing endpoint subscribed to an event other"),
    ],
    ids=["empty-file", "no-endpoints", "observe-only", "notifications-only"],
)
def test_serving_needs_an_enforcing_endpoint(tmp_path, text, what):
    """No enforcing endpoint is refused under the key server.allow_no_endpoints, saying why."""
    err = serving_error(tmp_path, text)
    assert err.key == "server.allow_no_endpoints"
    assert what in str(err)
    assert load_text(tmp_path, text).endpoints == load_config(tmp_path / "milterbridge.toml", {}).endpoints


def test_allow_no_endpoints_from_file_or_environment(tmp_path):
    """allow_no_endpoints = true, in the file or from the environment, lets such a config serve."""
    config = load_serving_config(write(tmp_path, "[server]\nallow_no_endpoints = true\n"), {})
    assert config.server.allow_no_endpoints is True
    assert config.endpoints == ()
    env = {"MILTERBRIDGE_SERVER__ALLOW_NO_ENDPOINTS": "true"}
    assert load_serving_config(write(tmp_path, ENDPOINT + "mode = 'observe'\n"), env).server.allow_no_endpoints
    assert ServerSettings().allow_no_endpoints is False


def test_one_enforcing_endpoint_is_enough(tmp_path):
    """An enforcing endpoint next to observe ones passes check_enforcing."""
    text = ENDPOINT + '[[endpoints]]\nname = "shadow"\nurl = "https://shadow.example/"\nmode = "observe"\n'
    config = load_text(tmp_path, text)
    check_enforcing(config)
    with pytest.raises(ConfigError):
        check_enforcing(Config(endpoints=config.endpoints[1:]))


def test_inline_secrets_are_recorded_only_when_the_file_holds_them(tmp_path):
    """Inline secret, literal header value and URL credentials count; environment values do not."""
    text = (
        NAMED
        + "url = 'https://u:pw@hooks.example/milter?token=x'\n"
        + f"secret = '{SECRET_A}'\n"
        + "headers = { X-Key = 'literal', X-Auth = 'Bearer ${TOKEN}' }\n"
    )
    config = load_text(tmp_path, text, {"TOKEN": TOKEN})
    assert config.inline_secrets == (
        "endpoints.policy.secret",
        "endpoints.policy.headers.X-Key",
        "endpoints.policy.url",
    )
    env = {"TOKEN": TOKEN, "MILTERBRIDGE_ENDPOINTS__POLICY__SECRET": SECRET_B}
    overridden = load_text(tmp_path, ENDPOINT + f"secret = '{SECRET_A}'\n", env)
    assert overridden.inline_secrets == ()


def foreign_group() -> int:
    """A group id other than this process's effective one, that this process may give a file."""
    if os.geteuid() == 0:
        return os.getegid() + 1
    others = [gid for gid in os.getgroups() if gid != os.getegid()]
    if not others:
        pytest.skip("needs root or a second group to chown a file to another group")
    return others[0]


def test_config_warnings(tmp_path):
    """Group/other-readable file with inline secrets, such a secret file, and tls.verify = false each warn."""
    secret_file = tmp_path / "policy.secret"
    secret_file.write_text(SECRET_B)
    path = write(
        tmp_path, ENDPOINT + f"secret = '{SECRET_A}'\nsecret_file = 'policy.secret'\ntls = {{ verify = false }}\n"
    )
    path.chmod(0o640)
    os.chown(path, -1, foreign_group())
    secret_file.chmod(0o604)
    warnings = config_warnings(load_config(path, {}))
    assert len(warnings) == 3
    assert str(path) in warnings[0]
    assert "0o640" in warnings[0]
    assert "endpoints.policy.secret" in warnings[0]
    assert str(secret_file) in warnings[1]
    assert "0o604" in warnings[1]
    assert warnings[2].startswith("endpoints.policy.tls.verify is false")
    assert not any(SECRET_A in w or SECRET_B in w for w in warnings)

    path.chmod(0o600)
    secret_file.chmod(0o400)
    assert config_warnings(load_config(path, {})) == [warnings[2]]
    # Readable by this process's own group only (a Kubernetes secret volume with fsGroup): no warning.
    os.chown(secret_file, -1, os.getegid())
    secret_file.chmod(0o440)
    assert config_warnings(load_config(path, {})) == [warnings[2]]


def test_no_warning_without_secrets_in_the_file(tmp_path):
    """A world-readable file is fine when its secrets come from the environment."""
    path = write(tmp_path, ENDPOINT + "secret_env = 'S'\nheaders = { Authorization = 'Bearer ${T}' }\n")
    path.chmod(0o644)
    assert config_warnings(load_config(path, {"S": SECRET_A, "T": TOKEN})) == []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@hooks.example/?token=abc123",  # plain http off loopback
        "ftp://user:hunter2@hooks.example/?token=abc123",  # not http
        "user:hunter2@hooks.example/?token=abc123",  # no scheme at all
        "http://user:hunter2@[::1/?token=abc123",  # unparseable: an error, not a traceback
    ],
)
def test_url_errors_redact_user_info_and_query(tmp_path, url):
    """Whatever is wrong with a URL, the error shows neither its password nor its query."""
    err = load_error(tmp_path, NAMED + f"url = '{url}'")
    assert err.key == "endpoints.policy.url"
    assert "hunter2" not in str(err)
    assert "abc123" not in str(err)
    assert "<redacted>" in str(err)


def test_unknown_key_far_from_any_lists_the_known_ones(tmp_path):
    """A key too unlike any known one gets the section's keys listed, in their documented order."""
    assert str(load_error(tmp_path, "[log]\nqqqq = 1\n")) == "log.qqqq: unknown key (known: level)"
    err = load_error(tmp_path, ENDPOINT + "qqqq = 1\n")
    known = (
        "name, url, protocol, properties, events, mode, on_error, timeout, timeouts, max_concurrency, include_body, "
        "max_body_bytes, macros, secret, secret_env, secret_file, headers, tls, allow_insecure_http, "
        "max_response_bytes, retry, breaker_failure_rate, breaker_min_calls, breaker_window, breaker_probe, "
        "breaker_reset, max_modifications, max_background, allowed_ops, when"
    )
    assert str(err) == f"endpoints.policy.qqqq: unknown key (known: {known})"


# -- the modules ------------------------------------------------------------------------------


def test_config_still_exports_what_other_modules_import():
    """The settings types and constants stay importable from milterbridge.config, as the same objects."""
    import milterbridge.config as config
    import milterbridge.log as log
    import milterbridge.settings as settings

    assert all(hasattr(config, name) for name in config.__all__)
    moved = ("Config", "ServerSettings", "AdminSettings", "LogSettings", "EndpointSettings", "TlsSettings")
    for name in (*moved, "HTTP_TOKEN", "RESERVED_HEADERS", "REDACTED"):
        assert name in config.__all__
        assert getattr(config, name) is getattr(settings, name)
    assert log.redact_urls is settings.redact_urls
    assert log.REDACTED == settings.REDACTED


def test_settings_module_is_pure():
    """settings.py reads no files or environment: stdlib without I/O modules, yarl, and the pure core."""
    source = Path(__file__).parent.parent / "milterbridge" / "settings.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    for name in names:
        top = name.split(".")[0]
        if top == "milterbridge":
            assert name.startswith(("milterbridge.milter.", "milterbridge.policy.", "milterbridge.mtahooks.")), name
        else:
            assert top in sys.stdlib_module_names or top == "yarl", name
            assert top not in {"os", "io", "pathlib", "asyncio", "socket", "logging", "tomllib"}, name
