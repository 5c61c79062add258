"""WebhookClient against real aiohttp servers on 127.0.0.1 (tests/fakes/webhooks.py).

The circuit breaker is not the client's: its behaviour through real calls is in tests/test_endpoint.py.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
from standardwebhooks.webhooks import Webhook

import milterbridge
from milterbridge.config import EndpointSettings, TlsSettings
from milterbridge.webhook import (
    AttemptOutcome,
    WebhookClient,
    WebhookConnectionError,
    WebhookError,
    WebhookRedirectError,
    WebhookResponseTooLargeError,
    WebhookStatusError,
    WebhookTimeoutError,
    WebhookTlsError,
    prepare_endpoint,
    redact_url,
)
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest

SECRET = "whsec_" + base64.b64encode(b"test-secret-0123456789ab").decode()
BODY = orjson.dumps({"event": "eom", "id": "msg_1", "data": {}})
#: Scheduling slack allowed beyond a budget on a loaded 2-core machine.
SLACK = 0.25


@dataclass
class RecordingObserver:
    """Collects on_attempt calls."""

    calls: list[tuple[str, int, AttemptOutcome, float]] = field(default_factory=list)

    def on_attempt(self, endpoint: str, attempt: int, outcome: AttemptOutcome, elapsed: float) -> None:
        self.calls.append((endpoint, attempt, outcome, elapsed))

    @property
    def outcomes(self) -> list[tuple[int, AttemptOutcome]]:
        return [(attempt, outcome) for _, attempt, outcome, _ in self.calls]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeWebhooks]:
    async with FakeWebhooks() as server:
        yield server


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest_asyncio.fixture
async def client(observer: RecordingObserver) -> AsyncIterator[WebhookClient]:
    async with WebhookClient(observer=observer) as webhook_client:
        yield webhook_client


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- success ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_200_json_decision(fake: FakeWebhooks, client: WebhookClient, observer: RecordingObserver) -> None:
    """A 200 JSON answer comes back as bytes, after one attempt."""
    fake.set_default(FakeResponse.decision("reject", reason="spam"))
    response = await client.post(fake.prepared(), BODY, webhook_id="msg_1")
    assert response.status == 200
    assert response.attempts == 1
    assert 0 < response.elapsed < 5
    assert orjson.loads(response.body) == {"action": "reject", "reason": "spam"}
    assert observer.outcomes == [(1, AttemptOutcome.OK)]
    assert fake.requests[0].body == BODY


@pytest.mark.parametrize(
    "answer",
    [pytest.param(FakeResponse.no_content(), id="204"), pytest.param(FakeResponse.empty(), id="empty-200")],
)
@pytest.mark.asyncio
async def test_no_content_is_success(fake: FakeWebhooks, client: WebhookClient, answer: FakeResponse) -> None:
    """204 and an empty 200 are successes with an empty body."""
    fake.set_default(answer)
    response = await client.post(fake.prepared(), BODY, webhook_id="msg_1")
    assert response.status == answer.status
    assert response.body == b""


@pytest.mark.asyncio
async def test_headers_and_signature(fake: FakeWebhooks, client: WebhookClient) -> None:
    """The fixed headers are sent, extra headers too, and the signature verifies."""
    endpoint = fake.prepared(
        secrets=(SECRET,),
        headers=(("Authorization", "Bearer t0ken"), ("webhook-id", "forged"), ("content-type", "text/plain")),
    )
    before = int(time.time())
    await client.post(endpoint, BODY, webhook_id="msg_42")
    (request,) = fake.requests
    headers = request.headers
    assert request.method == "POST"
    assert request.path == "/hook"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == f"milterbridge/{milterbridge.__version__}"
    assert headers["Authorization"] == "Bearer t0ken"
    assert headers.getall("webhook-id") == ["msg_42"]  # type: ignore[attr-defined]
    assert headers.getall("content-type") == ["application/json"]  # type: ignore[attr-defined]
    assert before <= int(headers["webhook-timestamp"]) <= int(time.time())
    verified = Webhook(SECRET).verify(request.body, dict(headers))
    assert verified == {"event": "eom", "id": "msg_1", "data": {}}


@pytest.mark.asyncio
async def test_no_signature_without_secret(fake: FakeWebhooks, client: WebhookClient) -> None:
    """An endpoint without a secret gets no webhook-signature header."""
    await client.post(fake.prepared(), BODY, webhook_id="msg_1")
    assert "webhook-signature" not in fake.requests[0].headers
    assert fake.requests[0].headers["webhook-id"] == "msg_1"


@pytest.mark.asyncio
async def test_keep_alive_connection_is_reused(fake: FakeWebhooks, client: WebhookClient) -> None:
    """Consecutive calls to one endpoint share one pooled connection."""
    endpoint = fake.prepared()
    for i in range(3):
        await client.post(endpoint, BODY, webhook_id=f"msg_{i}")
    ports = {request.peer_port for request in fake.requests}
    assert len(ports) == 1


# -- time budget -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(FakeResponse.decision("continue").after(5.0), id="slow"),
        pytest.param(FakeResponse.never_answer(), id="never"),
        pytest.param(FakeResponse.trickle(b'{"action":"continue"}' + b" " * 100, interval=0.05), id="trickle"),
    ],
)
@pytest.mark.asyncio
async def test_timeout_within_budget(
    fake: FakeWebhooks, client: WebhookClient, observer: RecordingObserver, answer: FakeResponse
) -> None:
    """A slow, silent or trickling endpoint fails with a timeout inside its budget, no retry."""
    fake.set_default(answer)
    budget = 0.3
    started = time.monotonic()
    with pytest.raises(WebhookTimeoutError) as info:
        await client.post(fake.prepared(timeout=budget), BODY, webhook_id="msg_1")
    elapsed = time.monotonic() - started
    assert budget <= elapsed < budget + SLACK
    assert isinstance(info.value, TimeoutError)
    assert info.value.attempts == 1
    assert info.value.timeout == budget
    assert len(fake.requests) == 1
    assert observer.outcomes == [(1, AttemptOutcome.TIMEOUT)]


@pytest.mark.asyncio
async def test_timeout_argument_overrides_endpoint(fake: FakeWebhooks, client: WebhookClient) -> None:
    """post(timeout=...) replaces the endpoint's budget (what is left of a phase)."""
    fake.set_default(FakeResponse.never_answer())
    started = time.monotonic()
    with pytest.raises(WebhookTimeoutError):
        await client.post(fake.prepared(timeout=5.0), BODY, webhook_id="msg_1", timeout=0.2)
    assert time.monotonic() - started < 0.2 + SLACK


@pytest.mark.asyncio
async def test_retry_stays_inside_budget(
    fake: FakeWebhooks, client: WebhookClient, observer: RecordingObserver
) -> None:
    """A retry that would overrun the budget is cut at the deadline: one budget in total."""
    fake.enqueue(FakeResponse.status_code(503).after(0.2), FakeResponse.decision().after(2.0))
    budget = 0.4
    started = time.monotonic()
    with pytest.raises(WebhookTimeoutError) as info:
        await client.post(fake.prepared(timeout=budget), BODY, webhook_id="msg_1")
    assert time.monotonic() - started < budget + SLACK
    assert info.value.attempts == 2
    assert observer.outcomes == [(1, AttemptOutcome.STATUS_ERROR), (2, AttemptOutcome.TIMEOUT)]


# -- connection errors and retry -------------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_refused_retries_once(client: WebhookClient, observer: RecordingObserver) -> None:
    """A refused connection is retried once, then fails as a WebhookConnectionError in budget."""
    endpoint = prepare_endpoint(
        EndpointSettings(name="down", url=f"http://127.0.0.1:{_closed_port()}/hook", timeout=2.0)
    )
    started = time.monotonic()
    with pytest.raises(WebhookConnectionError) as info:
        await client.post(endpoint, BODY, webhook_id="msg_1")
    assert time.monotonic() - started < 2.0
    assert isinstance(info.value, ConnectionError)
    assert info.value.attempts == 2
    assert info.value.endpoint == "down"
    assert observer.outcomes == [(1, AttemptOutcome.CONNECTION_ERROR), (2, AttemptOutcome.CONNECTION_ERROR)]


@pytest.mark.asyncio
async def test_no_retry_when_disabled(client: WebhookClient) -> None:
    """retry = false makes a single attempt."""
    endpoint = prepare_endpoint(
        EndpointSettings(name="down", url=f"http://127.0.0.1:{_closed_port()}/hook", retry=False)
    )
    with pytest.raises(WebhookConnectionError) as info:
        await client.post(endpoint, BODY, webhook_id="msg_1")
    assert info.value.attempts == 1


@pytest.mark.asyncio
async def test_abrupt_close_is_retried(fake: FakeWebhooks, client: WebhookClient) -> None:
    """A connection cut before the answer is a connection error, retried with the same id."""
    fake.enqueue(FakeResponse.close_connection())
    response = await client.post(fake.prepared(), BODY, webhook_id="msg_9")
    assert response.attempts == 2
    assert [r.headers["webhook-id"] for r in fake.requests] == ["msg_9", "msg_9"]


@pytest.mark.parametrize("status", [429, 502, 503, 504])
@pytest.mark.asyncio
async def test_retryable_status_then_success(
    fake: FakeWebhooks, client: WebhookClient, observer: RecordingObserver, status: int
) -> None:
    """429/502/503/504 get exactly one retry, with the same webhook-id and a valid signature."""
    fake.enqueue(FakeResponse.status_code(status, b"busy"))
    response = await client.post(fake.prepared(secrets=(SECRET,)), BODY, webhook_id="msg_7")
    assert response.status == 200
    assert response.attempts == 2
    assert len(fake.requests) == 2
    for request in fake.requests:
        assert request.headers["webhook-id"] == "msg_7"
        Webhook(SECRET).verify(request.body, dict(request.headers))
    assert observer.outcomes == [(1, AttemptOutcome.STATUS_ERROR), (2, AttemptOutcome.OK)]


@pytest.mark.asyncio
async def test_retryable_status_twice_fails(fake: FakeWebhooks, client: WebhookClient) -> None:
    """A second 503 ends the call: never a third request."""
    fake.set_default(FakeResponse.status_code(503))
    with pytest.raises(WebhookStatusError) as info:
        await client.post(fake.prepared(), BODY, webhook_id="msg_1")
    assert info.value.status == 503
    assert info.value.attempts == 2
    assert len(fake.requests) == 2


@pytest.mark.parametrize("status", [500, 400, 404, 201, 202])
@pytest.mark.asyncio
async def test_other_status_fails_without_retry(fake: FakeWebhooks, client: WebhookClient, status: int) -> None:
    """500, 4xx and 2xx other than 200/204 are status errors, not retried."""
    fake.set_default(FakeResponse.status_code(status, b'{"action":"continue"}'))
    with pytest.raises(WebhookStatusError) as info:
        await client.post(fake.prepared(), BODY, webhook_id="msg_1")
    assert info.value.status == status
    assert info.value.attempts == 1
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.asyncio
async def test_redirect_is_not_followed(fake: FakeWebhooks, client: WebhookClient, status: int) -> None:
    """A 3xx is a WebhookRedirectError; the target is never requested; Location is redacted."""
    target = fake.url("/elsewhere").replace("://", "://user:pw@") + "?token=abc"
    fake.set_default(FakeResponse.redirect(target, status=status), path="/hook")
    with pytest.raises(WebhookRedirectError) as info:
        await client.post(fake.prepared(), BODY, webhook_id="msg_1")
    assert info.value.status == status
    assert info.value.location == fake.url("/elsewhere")
    assert "token" not in str(info.value)
    assert fake.requests_for(path="/elsewhere") == []
    assert len(fake.requests) == 1


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(FakeResponse.huge(200_000), id="content-length"),
        pytest.param(FakeResponse.huge(200_000, chunked=True), id="chunked"),
        pytest.param(FakeResponse.trickle(b" " * 1500, chunk_bytes=500, chunked=True), id="grows-past"),
    ],
)
@pytest.mark.asyncio
async def test_oversized_response(
    fake: FakeWebhooks, client: WebhookClient, observer: RecordingObserver, answer: FakeResponse
) -> None:
    """A body over max_response_bytes fails without a retry, and the client still works after."""
    endpoint = fake.prepared(max_response_bytes=1000)
    fake.enqueue(answer)
    with pytest.raises(WebhookResponseTooLargeError) as info:
        await client.post(endpoint, BODY, webhook_id="msg_1")
    assert info.value.max_bytes == 1000
    assert info.value.attempts == 1
    assert observer.outcomes == [(1, AttemptOutcome.TOO_LARGE)]
    response = await client.post(endpoint, BODY, webhook_id="msg_2")
    assert orjson.loads(response.body) == {"action": "continue"}


@pytest.mark.asyncio
async def test_body_at_the_limit_is_accepted(fake: FakeWebhooks, client: WebhookClient) -> None:
    """Exactly max_response_bytes is still accepted."""
    document = b'{"action":"continue"}'
    fake.set_default(FakeResponse.raw(document + b" " * (100 - len(document))))
    response = await client.post(fake.prepared(max_response_bytes=100), BODY, webhook_id="msg_1")
    assert len(response.body) == 100


# -- cancellation and lifecycle --------------------------------------------------------------


@pytest.mark.asyncio
async def test_cancellation_propagates(fake: FakeWebhooks, client: WebhookClient, observer: RecordingObserver) -> None:
    """Cancelling a call raises CancelledError, closes the request, and is reported as cancelled."""
    endpoint = fake.prepared("slow")
    fake.set_default(FakeResponse.never_answer())
    task = asyncio.create_task(client.post(endpoint, BODY, webhook_id="msg_1"))
    await fake.wait_for(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_until(lambda: len(fake.cancelled) == 1)
    assert observer.outcomes == [(1, AttemptOutcome.CANCELLED)]


@pytest.mark.asyncio
async def test_post_before_start_is_an_error() -> None:
    """Using the client before start() is a programming error, not a webhook failure."""
    client = WebhookClient()
    with pytest.raises(RuntimeError, match="start"):
        await client.post(prepare_endpoint(EndpointSettings(name="x", url="http://127.0.0.1:1/")), BODY, webhook_id="m")
    await client.aclose()


# -- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """Self-signed server and client certificates in PEM files."""

    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _self_signed(directory: Path, name: str, subject_alt_name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    command = ["openssl", "req", "-x509", "-nodes", "-days", "2"]
    command += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-subj", f"/CN={name}", "-addext", f"subjectAltName={subject_alt_name}"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory = tmp_path_factory.mktemp("certs")
    server_cert, server_key = _self_signed(directory, "server", "IP:127.0.0.1")
    client_cert, client_key = _self_signed(directory, "client", "DNS:client.test")
    return Certs(server_cert, server_key, client_cert, client_key)


def _server_context(certs: Certs, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs.client_cert)
    return context


@pytest.mark.asyncio
async def test_tls_self_signed_fails_by_default(certs: Certs, client: WebhookClient) -> None:
    """An untrusted certificate is a WebhookTlsError, not retried."""
    async with FakeWebhooks(ssl_context=_server_context(certs)) as fake:
        with pytest.raises(WebhookTlsError) as info:
            await client.post(fake.prepared(), BODY, webhook_id="msg_1")
        assert isinstance(info.value, WebhookConnectionError)
        assert info.value.attempts == 1
        assert fake.requests == []


@pytest.mark.parametrize("tls_kind", ["ca_file", "no-verify"])
@pytest.mark.asyncio
async def test_tls_with_ca_file_or_without_verification(certs: Certs, client: WebhookClient, tls_kind: str) -> None:
    """Trusting the certificate through ca_file, or verify = false, makes the call work."""
    tls = TlsSettings(ca_file=str(certs.server_cert)) if tls_kind == "ca_file" else TlsSettings(verify=False)
    async with FakeWebhooks(ssl_context=_server_context(certs)) as fake:
        assert fake.url().startswith("https://")
        response = await client.post(fake.prepared(tls=tls), BODY, webhook_id="msg_1")
        assert response.status == 200
        assert len(fake.requests) == 1


@pytest.mark.asyncio
async def test_tls_client_certificate(certs: Certs, client: WebhookClient) -> None:
    """mTLS: the server demanding a client certificate gets ours when configured."""
    async with FakeWebhooks(ssl_context=_server_context(certs, require_client_cert=True)) as fake:
        trusted = TlsSettings(ca_file=str(certs.server_cert))
        with pytest.raises(WebhookConnectionError):
            await client.post(fake.prepared("anon", tls=trusted), BODY, webhook_id="msg_1")
        mutual = TlsSettings(
            ca_file=str(certs.server_cert), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
        )
        response = await client.post(fake.prepared("mtls", tls=mutual), BODY, webhook_id="msg_2")
        assert response.status == 200
        assert [r.headers["webhook-id"] for r in fake.requests] == ["msg_2"]


# -- redaction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("https://filters.internal/milter", "https://filters.internal/milter", id="plain"),
        pytest.param("https://u:p@h.example:8443/x?token=1#f", "https://h.example:8443/x", id="userinfo-query"),
        pytest.param("http://a:b@c@[::1]:80/p", "http://[::1]:80/p", id="ipv6-at-in-password"),
        pytest.param("http://host:99999/", "<invalid url>", id="bad-port"),
        pytest.param("not a url", "<invalid url>", id="garbage"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """URLs lose userinfo, query and fragment; broken ones are not echoed."""
    assert redact_url(url) == expected


@pytest.mark.asyncio
async def test_error_messages_hide_secrets(client: WebhookClient) -> None:
    """Error text names the endpoint and a redacted URL, never credentials or header values."""
    endpoint = prepare_endpoint(
        EndpointSettings(
            name="down",
            url=f"http://admin:hunter2@127.0.0.1:{_closed_port()}/hook?token=s3cret",
            secrets=(SECRET,),
            headers=(("X-Api-Key", "xyzzy"),),
        )
    )
    with pytest.raises(WebhookError) as info:
        await client.post(endpoint, BODY, webhook_id="msg_1")
    text = str(info.value)
    assert "'down'" in text
    assert "/hook" in text
    for secret in ("hunter2", "admin", "s3cret", "xyzzy", SECRET.removeprefix("whsec_")):
        assert secret not in text


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        pytest.param(
            EndpointSettings(name="both", url="http://u:p@127.0.0.1:1/hook", headers=(("Authorization", "Bearer x"),)),
            "conflict",
            id="credentials-and-authorization",
        ),
        pytest.param(
            EndpointSettings(name="secret", url="http://127.0.0.1:1/hook", secrets=("whsec_!!!",)),
            "secret",
            id="bad-secret",
        ),
        pytest.param(EndpointSettings(name="ftp", url="ftp://127.0.0.1/hook"), "http://", id="scheme"),
    ],
)
def test_bad_endpoint_settings(settings: EndpointSettings, error: str) -> None:
    """Unusable settings fail prepare_endpoint with a ValueError that does not echo the secret."""
    with pytest.raises(ValueError, match=error) as info:
        prepare_endpoint(settings)
    assert "!!!" not in str(info.value)


def test_unreadable_tls_file(tmp_path: Path) -> None:
    """A CA file that cannot be read fails prepare_endpoint with an OSError."""
    settings = EndpointSettings(
        name="b", url="https://127.0.0.1:1/hook", tls=TlsSettings(ca_file=str(tmp_path / "missing.pem"))
    )
    with pytest.raises(OSError):
        prepare_endpoint(settings)


@pytest.mark.asyncio
async def test_no_budget_left_sends_nothing(fake: FakeWebhooks, client: WebhookClient) -> None:
    """A zero budget fails at once as a timeout that is not the endpoint's failure, and sends nothing."""
    endpoint = fake.prepared("late")
    with pytest.raises(WebhookTimeoutError) as info:
        await client.post(endpoint, BODY, webhook_id="msg_1", timeout=0.0)
    assert info.value.attempts == 0
    assert info.value.endpoint_failure is False
    assert fake.requests == []


# -- the fake server itself ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fake_script_precedence(fake: FakeWebhooks, client: WebhookClient) -> None:
    """Queues beat defaults; (path, event) beats event beats path beats the global default."""

    async def by_address(request: RecordedRequest) -> FakeResponse:
        return FakeResponse.decision("reject" if request.json["data"] == "bad" else "accept")

    fake.set_default(FakeResponse.decision("tempfail"), path="/p")
    fake.set_default(by_address, event="rcpt")
    fake.enqueue(FakeResponse.decision("discard"), path="/p", event="rcpt")

    async def action(path: str, event: str, data: str = "") -> object:
        body = orjson.dumps({"event": event, "data": data})
        response = await client.post(fake.prepared(path=path), body, webhook_id="m")
        return orjson.loads(response.body)

    assert await action("/p", "rcpt") == {"action": "discard"}
    assert await action("/p", "rcpt", "bad") == {"action": "reject"}
    assert await action("/p", "rcpt", "good") == {"action": "accept"}
    assert await action("/p", "eom") == {"action": "tempfail"}
    assert await action("/q", "eom") == {"action": "continue"}
    assert fake.events(path="/p") == ["rcpt", "rcpt", "rcpt", "eom"]
    assert [r.index for r in fake.requests] == [0, 1, 2, 3, 4]
    assert fake.pending(path="/p", event="rcpt") == 0


@pytest.mark.asyncio
async def test_fake_wait_for_background_calls(fake: FakeWebhooks, client: WebhookClient) -> None:
    """wait_for returns once the expected requests arrived, and times out otherwise."""
    body = orjson.dumps({"event": "close"})
    task = asyncio.create_task(client.post(fake.prepared(), body, webhook_id="m"))
    (request,) = await fake.wait_for(1, event="close")
    assert request.headers["webhook-id"] == "m"
    await task
    with pytest.raises(TimeoutError):
        await fake.wait_for(2, event="close", timeout=0.05)
    fake.clear()
    assert fake.requests == []
