"""Large bodies pass with bounded memory: spooled to disk past body_memory_bytes, never held whole."""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import Iterator

import pytest

from milterbridge.client import Envelope, EomResult, MilterClient
from milterbridge.config import ServerSettings
from milterbridge.milter.constants import CHUNK_SIZE
from milterbridge.milter.messages import Continue, ReplyCode
from milterbridge.policy.model import OnOversize
from tests.engine.conftest import Engine

MIB = 1024 * 1024
BODY_BYTES = 50 * MIB
#: Far below the body: what the bridge may allocate at its peak while the body streams through.
MAX_PEAK_BYTES = 20 * MIB


_FILLER = (b"The quick brown fox jumps over the lazy dog, 0123456789.\r\n" * 1200)[:CHUNK_SIZE]


def body_chunks(total: int) -> Iterator[bytes]:
    """``total`` body bytes in milter-sized chunks, made one at a time (never the whole body at once)."""
    for n, start in enumerate(range(0, total, CHUNK_SIZE)):
        chunk = b"chunk %08d\r\n" % n + _FILLER  # numbered, so a misplaced chunk shows
        yield chunk[: min(CHUNK_SIZE, total - start)]


def body_prefix(size: int) -> bytes:
    """The first ``size`` bytes :func:`body_chunks` produces."""
    out = bytearray()
    for chunk in body_chunks(size):
        out += chunk
    return bytes(out)


async def stream_message(client: MilterClient, total: int) -> EomResult:
    """One transaction whose body of ``total`` bytes is generated while it is sent; the eom result."""
    await client.open_session(Envelope())
    await client.mail_from(b"<big@example.org>")
    await client.rcpt_to(b"<r@example.net>")
    await client.data()
    await client.header(b"Subject", b" big")
    await client.end_of_headers()
    for chunk in body_chunks(total):
        reply = await client.body_chunk(chunk)
        assert reply is None or reply == Continue()
    return await client.end_of_message()


def server(**overrides: object) -> ServerSettings:
    settings: dict[str, object] = {"listen": ("inet:127.0.0.1:0",), "body_memory_bytes": MIB}
    settings.update(overrides)
    return ServerSettings(**settings)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_50_mib_body_with_bounded_memory(engine: Engine) -> None:
    """A 50 MiB body passes with the traced peak far under its size, spooled to a temporary file."""
    await engine.start(
        engine.endpoint("archive", include_body=True, max_body_bytes=64 * 1024),
        server=server(max_message_bytes=64 * MIB),
    )
    client = await engine.client()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = await stream_message(client, BODY_BYTES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < MAX_PEAK_BYTES, f"peak grew by {(peak - before) / MIB:.1f} MiB"
    assert result.reply == Continue()
    assert engine.metrics.registry.get_sample_value("milterbridge_body_spooled_total") == 1
    (eom,) = engine.bodies("archive", "eom")
    body = eom["message"]["body"]
    assert body["size"] == BODY_BYTES
    assert body["truncated"] is True
    assert base64.b64decode(body["base64"]) == body_prefix(64 * 1024)


@pytest.mark.asyncio
async def test_small_body_is_not_spooled(engine: Engine) -> None:
    """A body under body_memory_bytes stays in memory: nothing is spooled."""
    await engine.start(engine.endpoint("archive", include_body=True), server=server())
    client = await engine.client()
    result = await stream_message(client, MIB // 2)
    assert result.reply == Continue()
    assert not engine.metrics.registry.get_sample_value("milterbridge_body_spooled_total")
    (eom,) = engine.bodies("archive", "eom")
    assert base64.b64decode(eom["message"]["body"]["base64"]) == body_prefix(MIB // 2)


@pytest.mark.asyncio
async def test_body_not_kept_without_include_body(engine: Engine) -> None:
    """Without an include_body endpoint a large body is neither kept nor spooled."""
    await engine.start(engine.endpoint("policy"), server=server())
    client = await engine.client()
    result = await stream_message(client, 3 * MIB)
    assert result.reply == Continue()
    assert not engine.metrics.registry.get_sample_value("milterbridge_body_spooled_total")


@pytest.mark.asyncio
async def test_spool_gauge_returns_to_zero(engine: Engine) -> None:
    """After a spooled message ends, milterbridge_body_spool_bytes is back to 0."""
    await engine.start(engine.endpoint("archive", include_body=True), server=server())
    client = await engine.client()
    await stream_message(client, 3 * MIB)
    assert engine.metrics.registry.get_sample_value("milterbridge_body_spooled_total") == 1
    assert engine.metrics.registry.get_sample_value("milterbridge_body_spool_bytes") == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("on_oversize", "reply"),
    [
        pytest.param(
            OnOversize.TEMPFAIL,
            ReplyCode(text=b"451 4.3.4 Message size exceeds the mail filter's limit (max_message_bytes)"),
            id="tempfail",
        ),
        pytest.param(
            OnOversize.REJECT,
            ReplyCode(text=b"552 5.3.4 Message size exceeds the mail filter's limit (max_message_bytes)"),
            id="reject",
        ),
    ],
)
async def test_oversize_message_refused_without_calling_endpoints(
    engine: Engine, on_oversize: OnOversize, reply: ReplyCode
) -> None:
    """A body over max_message_bytes is refused by on_oversize at eom; the eom endpoint is not called."""
    await engine.start(
        engine.endpoint("archive", include_body=True),
        server=server(max_message_bytes=2 * MIB, on_oversize=on_oversize),
    )
    client = await engine.client()
    result = await stream_message(client, 3 * MIB)
    assert result.reply == reply
    assert engine.events("archive") == []


@pytest.mark.asyncio
async def test_oversize_continue_sends_eom_without_body(engine: Engine) -> None:
    """With on_oversize continue the endpoint is called with the size, no bytes and truncated true."""
    await engine.start(
        engine.endpoint("archive", include_body=True),
        server=server(max_message_bytes=2 * MIB, on_oversize=OnOversize.CONTINUE),
    )
    client = await engine.client()
    result = await stream_message(client, 3 * MIB)
    assert result.reply == Continue()
    (eom,) = engine.bodies("archive", "eom")
    assert eom["message"]["body"] == {"size": 3 * MIB, "base64": "", "truncated": True}


@pytest.mark.asyncio
async def test_include_body_request_over_1_mib(engine: Engine) -> None:
    """An include_body endpoint receives a 2 MiB body (a request over aiohttp's 1 MiB bytes threshold)."""
    await engine.start(engine.endpoint("archive", include_body=True), server=server())
    client = await engine.client()
    result = await stream_message(client, 2 * MIB)
    assert result.reply == Continue()
    (eom,) = engine.bodies("archive", "eom")
    assert eom["message"]["body"]["size"] == 2 * MIB


@pytest.mark.asyncio
async def test_streamed_body_is_exact_and_signed(engine: Engine) -> None:
    """A spooled body streamed into the eom request arrives byte-exact and the signature verifies."""
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    await engine.start(
        engine.endpoint("archive", include_body=True, secrets=(secret,), max_body_bytes=3 * MIB + 5),
        server=server(),
    )
    client = await engine.client()
    result = await stream_message(client, 3 * MIB + 7)
    assert result.reply == Continue()
    (request,) = engine.requests("archive", "eom")
    body = request.json["message"]["body"]
    assert body["size"] == 3 * MIB + 7
    assert body["truncated"] is True
    assert base64.b64decode(body["base64"]) == body_prefix(3 * MIB + 5)
    assert int(request.headers["Content-Length"]) == len(request.body)
    Webhook(secret).verify(request.body, dict(request.headers))


@pytest.mark.asyncio
async def test_observe_endpoint_gets_a_spooled_body(engine: Engine) -> None:
    """An observe endpoint with include_body receives a spooled body byte-exact (read positionally)."""
    from milterbridge.policy.model import Mode

    await engine.start(
        engine.endpoint("policy"),
        engine.endpoint("watch", include_body=True, mode=Mode.OBSERVE, max_body_bytes=3 * MIB),
        server=server(),
    )
    client = await engine.client()
    result = await stream_message(client, 2 * MIB + 1)
    await engine.settle()
    assert result.reply == Continue()
    (eom,) = engine.bodies("watch", "eom")
    assert base64.b64decode(eom["message"]["body"]["base64"]) == body_prefix(2 * MIB + 1)
