"""Security defaults: where the bridge may send data, what it trusts, and what it never reveals.

* Endpoints come only from the config: no answer (redirect) and no MTA data (headers,
  HELO, macros that look like URLs) makes the bridge call anything else.
* Plain ``http://`` is allowed only to loopback unless ``allow_insecure_http``; URL
  tricks that point elsewhere are refused.
* TLS verification is on by default; the admin port listens on loopback; the milter unix
  socket is created 0660.
* Secrets (webhook secrets, header tokens, URL passwords and query tokens) never appear in
  logs, metrics, error messages or ``check-config`` output.
* Header and reply injection: CR/LF/NUL in anything that reaches the SMTP wire makes the
  response invalid and nothing of it is applied.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yarl

from milterbridge.client import Envelope
from milterbridge.config import (
    AdminSettings,
    Config,
    ConfigError,
    EndpointSettings,
    ServerSettings,
    TlsSettings,
    load_config,
)
from milterbridge.log import JsonFormatter
from milterbridge.metrics import Metrics
from milterbridge.milter import messages as m
from milterbridge.milter.address import split_host_port
from milterbridge.milter.constants import Event
from milterbridge.policy.model import OnError
from milterbridge.server import MilterServer
from milterbridge.webhook.client import build_ssl_context
from tests.fakes.handlers import StaticHandler
from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.hostile import MESSAGE, Bridge, endpoint

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY="  # base64 of a test-only key
TOKEN = "tok-7f3a9c-never-log-me"
PASSWORD = "pw-51b2e0-never-log-me"
QUERY_TOKEN = "q-0c9d1e-never-log-me"
SENSITIVE = (SECRET, SECRET.removeprefix("whsec_"), TOKEN, PASSWORD, QUERY_TOKEN)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------
# endpoints come only from the config


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_never_reaches_its_target(status: int) -> None:
    """A redirect answer is a failure; the target (another server) never gets a request."""
    async with FakeWebhooks() as fake, FakeWebhooks() as target:
        fake.set_default(FakeResponse.redirect(target.url("/collect"), status=status))
        ep = endpoint(fake, "policy", events=frozenset({Event.RCPT, Event.EOM}), on_error=OnError.TEMPFAIL)
        async with Bridge(fake, ep) as bridge:
            client = await bridge.client()
            result = await client.send_message(Envelope(), MESSAGE)
            await client.quit()
        assert target.requests == []
    assert isinstance(result.rcpt[0], m.TempFail | m.ReplyCode)


@pytest.mark.asyncio
async def test_mta_data_cannot_choose_the_endpoint() -> None:
    """URLs in HELO, headers, macros and addresses are data: only the configured URL is called."""
    async with FakeWebhooks() as fake, FakeWebhooks() as target:
        steal = target.url("/steal")
        envelope = Envelope(
            helo=steal.encode(),
            mail_from=f"<{steal}>".encode(),
            recipients=(b"<rcpt@example.net>",),
            connect_macros=((b"{daemon_name}", steal.encode()), (b"j", steal.encode())),
        )
        message = f"X-Webhook-Url: {steal}\r\nLocation: {steal}\r\nHost: {steal}\r\n\r\n{steal}\r\n".encode()
        ep = endpoint(fake, "policy", events=frozenset(Event) - {Event.ABORT, Event.CLOSE}, include_body=True)
        async with Bridge(fake, ep) as bridge:
            client = await bridge.client()
            result = await client.send_message(envelope, message)
            await client.quit()
        assert target.requests == []
        assert fake.requests
        assert {r.path for r in fake.requests} == {"/policy"}
    assert result.eom is not None


# --------------------------------------------------------------------------
# plain http only to loopback


def _write_config(tmp_path: Path, url: str, extra: str = "") -> Path:
    path = tmp_path / "milterbridge.toml"
    path.write_text(f'[[endpoints]]\nname = "policy"\nurl = "{url}"\n{extra}', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "url",
    [
        "http://filters.example.org/milter",
        "http://192.0.2.10:8080/milter",
        "http://0.0.0.0/x",
        "http://[2001:db8::1]/x",
        "http://127.0.0.1.nip.io/x",  # a name that merely starts like loopback
        "http://localhost.evil.example/x",
        "http://127.0.0.1%2f@evil.example/x",  # userinfo trick: the host is evil.example
        "http://127.0.0.1:8080@evil.example/x",
        "http://evil.example#@127.0.0.1/x",
        "http://evil.example?@127.0.0.1/x",
        "http://2130706433/x",  # 127.0.0.1 as a number: refused (not obviously loopback)
    ],
)
def test_plain_http_elsewhere_needs_allow_insecure_http(tmp_path: Path, url: str) -> None:
    """http:// to anything but loopback is a config error naming the key; allowed with allow_insecure_http."""
    with pytest.raises(ConfigError) as info:
        load_config(_write_config(tmp_path, url), environ={})
    assert info.value.key == "endpoints.policy.url"
    assert "allow_insecure_http" in str(info.value)
    config = load_config(_write_config(tmp_path, url, "allow_insecure_http = true\n"), environ={})
    assert config.endpoints[0].url == url
    # What the config checked is what the HTTP client would connect to.
    assert not _is_loopback(yarl.URL(url).host or "")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/hook",
        "http://127.8.9.10/hook",
        "http://localhost:9000/hook",
        "http://[::1]:9000/hook",
        "http://user@evil.example@127.0.0.1/x",  # userinfo with an @: the host really is 127.0.0.1
        "https://filters.example.org/milter",
    ],
)
def test_loopback_http_and_https_are_allowed(tmp_path: Path, url: str) -> None:
    """Loopback http and any https URL load without allow_insecure_http."""
    config = load_config(_write_config(tmp_path, url), environ={})
    host = yarl.URL(url).host or ""
    assert config.endpoints[0].url == url
    assert url.startswith("https://") or _is_loopback(host)


# --------------------------------------------------------------------------
# TLS, admin listener, unix socket


def test_tls_verification_is_on_by_default(tmp_path: Path) -> None:
    """Endpoints verify certificates unless told otherwise, in code and from a config file."""
    assert TlsSettings().verify is True
    assert EndpointSettings(name="x", url="https://a.example").tls.verify is True
    config = load_config(_write_config(tmp_path, "https://a.example/x"), environ={})
    assert config.endpoints[0].tls.verify is True
    context = build_ssl_context(config.endpoints[0].tls)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    unverified = build_ssl_context(TlsSettings(verify=False))
    assert unverified.verify_mode is ssl.CERT_NONE


def test_admin_listens_on_loopback_by_default(tmp_path: Path) -> None:
    """/metrics and /readyz are not exposed beyond the host unless configured."""
    host, _ = split_host_port(AdminSettings().listen)
    assert _is_loopback(host)
    config = load_config(_write_config(tmp_path, "https://a.example/x"), environ={})
    host, _ = split_host_port(config.admin.listen)
    assert _is_loopback(host)


def test_milter_listens_on_loopback_by_default() -> None:
    """The milter port itself defaults to loopback too."""
    for address in ServerSettings().listen:
        if address.startswith("inet"):
            host = address.split(":", 1)[1].rsplit(":", 1)[0].strip("[]")
            assert _is_loopback(host)


@pytest.mark.asyncio
async def test_unix_socket_is_0660_by_default(tmp_path: Path) -> None:
    """A milter unix socket is created group-writable only, never world-writable."""
    path = tmp_path / "milter.sock"
    assert ServerSettings().socket_mode == 0o660
    server = MilterServer([f"unix:{path}"], StaticHandler)
    await server.start()
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    finally:
        await server.shutdown(timeout=1.0)
    assert mode == 0o660


def test_world_writable_socket_mode_is_refused(tmp_path: Path) -> None:
    """socket_mode with the o+w bit is a config error."""
    path = tmp_path / "c.toml"
    path.write_text("[server]\nsocket_mode = 0o666\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="every local user"):
        load_config(path, environ={})


# --------------------------------------------------------------------------
# secrets never leak


def _check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterbridge", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def _assert_clean(text: str, where: str) -> None:
    for secret in SENSITIVE:
        assert secret not in text, f"{secret!r} appears in {where}"


def test_check_config_output_has_no_secrets(tmp_path: Path) -> None:
    """check-config prints a summary without secrets, tokens, URL passwords or query strings."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    path = tmp_path / "ok.toml"
    path.write_text(
        f"""
[[endpoints]]
name = "signed"
url = "https://filters.example.org/milter?token={QUERY_TOKEN}"
secret = "{SECRET}"
headers = {{ Authorization = "Bearer ${{POLICY_TOKEN}}" }}

[[endpoints]]
name = "basic"
url = "https://svc:{PASSWORD}@filters.example.org/other"
secret_file = "{secret_file}"
""",
        encoding="utf-8",
    )
    done = _check_config(path, {"POLICY_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert "config ok" in done.stdout
    _assert_clean(done.stdout + done.stderr, "check-config output")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        pytest.param(f'secret = "{SECRET}!!"', "secret", id="malformed-secret"),
        pytest.param(f'secret = ["{SECRET}", 7]', "secret", id="secret-list-with-number"),
        pytest.param(f'headers = {{ Authorization = "Bearer {TOKEN}\\r\\nX: y" }}', "headers", id="crlf-in-header"),
        pytest.param(f'headers = {{ Authorization = 7, X = "{TOKEN}" }}', "headers", id="header-not-string"),
        pytest.param('url = "ftp://svc:' + PASSWORD + '@filters.example.org/"', "url", id="bad-url-with-password"),
        pytest.param("timeout = -1", "timeout", id="other-error-nearby"),
    ],
)
def test_check_config_errors_have_no_secrets(tmp_path: Path, body: str, key: str) -> None:
    """A config error near a secret names the key but never shows the secret."""
    url = "" if body.startswith("url") else f'url = "https://svc:{PASSWORD}@filters.example.org/x?t={QUERY_TOKEN}"\n'
    path = tmp_path / "bad.toml"
    path.write_text(f'[[endpoints]]\nname = "signed"\n{url}secret_env = "S"\n{body}\n', encoding="utf-8")
    done = _check_config(path, {"S": SECRET})
    assert done.returncode == 1
    assert f"endpoints.signed.{key}" in done.stderr, done.stderr
    _assert_clean(done.stdout + done.stderr, "check-config error")


@pytest.mark.asyncio
async def test_failing_signed_endpoint_leaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Logs (JSON-formatted), metrics and errors of failing signed/authenticated endpoints hold no secret."""
    caplog.set_level(logging.DEBUG)
    metrics = Metrics()
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.status_code(500, b"internal error"))
        signed = endpoint(
            fake,
            "signed",
            events=frozenset({Event.RCPT, Event.EOM}),
            on_error=OnError.CONTINUE,  # so that the message goes on to the eom endpoints
            secrets=(SECRET,),
            headers=(("Authorization", f"Bearer {TOKEN}"), ("X-Api-Token", TOKEN)),
        )
        signed = replace(signed, url=signed.url + f"?t={QUERY_TOKEN}")
        basic_url = fake.url("/basic").replace("http://", f"http://svc:{PASSWORD}@") + f"?token={QUERY_TOKEN}"
        basic = EndpointSettings(
            name="basic", url=basic_url, secrets=(SECRET,), breaker_min_calls=1, breaker_probe=30.0
        )
        gone = EndpointSettings(
            name="gone", url=f"http://127.0.0.1:9/x?token={QUERY_TOKEN}", secrets=(SECRET,), timeout=0.5
        )
        async with Bridge(fake, signed, basic, gone, metrics=metrics) as bridge:
            for _ in range(3):  # the third call finds basic's breaker open
                client = await bridge.client()
                await client.send_message(Envelope(), MESSAGE)
                await client.quit()
        # The endpoints did receive the credentials: that is where they belong.
        assert any(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in fake.requests)
    formatter = JsonFormatter()
    # Only the bridge's loggers: the fake endpoint's own access log shows its URL, as any server's would.
    ours = [record for record in caplog.records if record.name.startswith("milterbridge")]
    logged = "\n".join(formatter.format(record) for record in ours)
    assert "endpoint signed failed" in logged
    assert "endpoint gone failed" in logged
    _assert_clean(logged, "logs")
    exposition, _ = metrics.render()
    _assert_clean(exposition.decode(), "metrics")
    assert b'endpoint="basic"' in exposition  # the endpoint is labelled by name, never by URL


def test_endpoint_settings_repr_hides_url_credentials() -> None:
    """repr() of endpoint settings (and so of Config) holds no URL password or query token."""
    ep = EndpointSettings(
        name="x", url=f"https://svc:{PASSWORD}@filters.example.org/m?token={QUERY_TOKEN}", secrets=(SECRET,)
    )
    _assert_clean(repr(ep), "EndpointSettings repr")
    _assert_clean(repr(Config(endpoints=(ep,))), "Config repr")


# --------------------------------------------------------------------------
# header and reply injection


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"action": "reject", "reply": {"code": 550, "text": "no\r\n250 2.0.0 queued"}}, id="reply-crlf"),
        pytest.param({"action": "reject", "reply": {"code": 550, "text": ["ok", "x\n250 ok"]}}, id="reply-line-lf"),
        pytest.param({"action": "tempfail", "reply": {"code": 451, "text": "a\rb"}}, id="reply-cr"),
        pytest.param({"action": "reject", "reply": {"code": 550, "enhanced": "5.7.1\r\n"}}, id="enhanced-crlf"),
        pytest.param({"action": "quarantine", "reason": "x\r\nX-Evil: 1"}, id="quarantine-reason-crlf"),
        pytest.param(
            {"action": "accept", "modifications": [{"op": "add_header", "name": "X-A", "value": "v\r\nBcc: e@x"}]},
            id="header-value-crlf",
        ),
        pytest.param(
            {"action": "accept", "modifications": [{"op": "add_header", "name": "X-A", "value": "v\nBcc: e@x"}]},
            id="header-value-unfolded-lf",
        ),
        pytest.param(
            {"action": "accept", "modifications": [{"op": "add_header", "name": "Bcc:e@x\r\nX-A", "value": "v"}]},
            id="header-name-crlf",
        ),
        pytest.param(
            {"action": "accept", "modifications": [{"op": "change_header", "name": "Subject", "index": 1,
                                                    "value": "hi\u0000there"}]},
            id="header-value-nul",
        ),
        pytest.param(
            {"action": "accept", "modifications": [{"op": "add_rcpt", "address": "a@b>\r\nRCPT TO:<c@d"}]},
            id="rcpt-crlf",
        ),
        pytest.param(
            {"action": "accept", "modifications": [
                {"op": "add_header", "name": "X-Ok", "value": "fine"},
                {"op": "add_header", "name": "X-Bad", "value": "a\r\nb"},
            ]},
            id="one-bad-among-good",
        ),
    ],
)  # fmt: skip
async def test_injection_makes_the_response_invalid(answer: dict[str, object]) -> None:
    """CR/LF/NUL headed for the SMTP wire: the whole response is invalid, nothing applied, on_error used."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.json(answer), event="eom")
        async with Bridge(fake, endpoint(fake, "policy", on_error=OnError.TEMPFAIL)) as bridge:
            client = await bridge.client()
            result = await client.send_message(Envelope(), MESSAGE)
            await client.quit()
    assert result.eom is not None
    assert result.eom.modifications == ()
    reply = result.eom.reply
    assert isinstance(reply, m.TempFail) or (isinstance(reply, m.ReplyCode) and reply.smtp_code // 100 == 4)
    if isinstance(reply, m.ReplyCode):
        assert b"250" not in reply.text
        assert b"Evil" not in reply.text


@pytest.mark.asyncio
async def test_legal_fold_and_percent_reach_the_wire_safely() -> None:
    """The legal forms survive: a folded value goes out LF-joined, '%' in a reply is doubled."""
    async with FakeWebhooks() as fake:
        fake.set_default(
            FakeResponse.decision(
                "reject",
                reply={"code": 550, "enhanced": "5.7.1", "text": ["100% spam", "see policy"]},
            ),
            event="eom",
        )
        async with Bridge(fake, endpoint(fake, "policy")) as bridge:
            client = await bridge.client()
            result = await client.send_message(Envelope(), MESSAGE)
            await client.quit()
    assert result.eom is not None
    reply = result.eom.reply
    assert isinstance(reply, m.ReplyCode)
    assert reply.text == b"550-5.7.1 100%% spam\r\n550 5.7.1 see policy"
