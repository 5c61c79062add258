"""The HTTP/1.1 client of webhook/http.py against raw servers on 127.0.0.1 that answer scripted bytes.

An aiohttp server cannot send malformed or unusual HTTP, so these servers read each request
head and body themselves and write exactly the bytes a test gives them.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from milterbridge.body import SpoolError
from milterbridge.config import EndpointSettings
from milterbridge.webhook import WebhookClient, WebhookConnectionError, WebhookStatusError, prepare_endpoint
from milterbridge.webhook.http import (
    MAX_HEAD_BYTES,
    HttpDisconnectedError,
    HttpPool,
    HttpProtocolError,
    HttpTooLargeError,
    Origin,
    _Connection,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Received:
    """One request as the raw server read it."""

    head: bytes
    body: bytes
    peer_port: int


@dataclass(frozen=True)
class Cut:
    """A scripted reply after which the server closes the connection."""

    data: bytes


@dataclass
class RawServer:
    """Answers each request with the next scripted reply: bytes, ``Cut`` or None (close, no answer)."""

    replies: list[bytes | Cut | None] = field(default_factory=list)
    default: bytes = OK
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer_port = writer.get_extra_info("peername")[1]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(Received(head, body, peer_port))
                reply = self.replies.pop(0) if self.replies else self.default
                if reply is None:
                    break
                writer.write(reply.data if isinstance(reply, Cut) else reply)
                await writer.drain()
                if isinstance(reply, Cut):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def origin(self) -> Origin:
        return Origin("127.0.0.1", self.port)


@pytest_asyncio.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server
        listener.close()


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[HttpPool]:
    http = HttpPool(keepalive_timeout=4.0)
    yield http
    await http.aclose()


HEAD = b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\n"


async def post(pool: HttpPool, raw: RawServer, *, max_body_bytes: int = 1000) -> tuple[int, bytes]:
    response = await pool.request(raw.origin(), HEAD, b"ping", max_body_bytes=max_body_bytes)
    return response.status, response.body


@pytest.mark.parametrize(
    ("reply", "status", "body"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello", id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            200,
            b"hello",
            id="chunked",
        ),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, b"ok", id="interim-100"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", id="204"),
    ],
)
@pytest.mark.asyncio
async def test_response_framings(pool: HttpPool, raw: RawServer, reply: bytes, status: int, body: bytes) -> None:
    """Length, chunks and interim answers are parsed, and the connection is kept for the next call."""
    raw.replies = [reply]
    assert await post(pool, raw) == (status, body)
    assert await post(pool, raw) == (200, b"ok")
    assert raw.connections == 1


@pytest.mark.asyncio
async def test_body_until_close(pool: HttpPool, raw: RawServer) -> None:
    """A response without a length ends with the connection, which is then not reused."""
    raw.replies = [Cut(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")]
    assert await post(pool, raw) == (200, b"all of it")
    assert await post(pool, raw) == (200, b"ok")
    assert raw.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", id="connection-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="http-1.0"),
        pytest.param(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nzz", id="unasked-second-response"),
    ],
)
@pytest.mark.asyncio
async def test_connection_not_reused(pool: HttpPool, raw: RawServer, reply: bytes) -> None:
    """Connection: close, HTTP/1.0 and bytes after the response each retire the connection."""
    raw.replies = [reply]
    assert await post(pool, raw) == (200, b"ok")
    assert await post(pool, raw) == (200, b"ok")
    assert raw.connections == 2


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        pytest.param(b"HTTP/1.1 2OO OK\r\n\r\n", HttpProtocolError, "malformed", id="bad-status"),
        pytest.param(b"SSH-2.0-OpenSSH\r\n", HttpProtocolError, "malformed", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok",
            HttpProtocolError,
            "content coding",
            id="gzip-not-asked-for",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
            HttpProtocolError,
            "head larger",
            id="huge-head",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"X-Pad: a\r\n" * (MAX_HEAD_BYTES // 10),
            HttpProtocolError,
            "head larger",
            id="endless-head",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", HttpTooLargeError, "1000", id="declared-large"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"100\r\n" + b"x" * 256 + b"\r\n") * 5,
            HttpTooLargeError,
            "1000",
            id="chunks-grow-past",
        ),
        pytest.param(
            Cut(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), HttpDisconnectedError, "closed|lost", id="cut"
        ),
        pytest.param(None, HttpDisconnectedError, "closed|lost", id="no-answer"),
    ],
)
@pytest.mark.asyncio
async def test_bad_responses(
    pool: HttpPool, raw: RawServer, reply: bytes | Cut | None, error: type[Exception], text: str
) -> None:
    """Each broken answer is its own error, the connection is dropped, and the next call works."""
    raw.replies = [reply]
    with pytest.raises(error, match=text):
        await post(pool, raw)
    assert await post(pool, raw) == (200, b"ok")
    assert raw.connections == 2


@pytest.mark.asyncio
async def test_error_body_is_cut_off_not_failed(pool: HttpPool, raw: RawServer) -> None:
    """A large body of a non-200 answer still reports the status; the connection is not kept."""
    raw.replies = [b"HTTP/1.1 503 Busy\r\nContent-Length: 100000\r\n\r\n" + b"e" * 100000]
    response = await pool.request(raw.origin(), HEAD, b"ping", max_body_bytes=10, max_error_body_bytes=100)
    assert response.status == 503
    assert response.truncated
    assert len(response.body) <= 100
    assert await post(pool, raw) == (200, b"ok")
    assert raw.connections == 2


@pytest.mark.asyncio
async def test_idle_connections_expire(raw: RawServer) -> None:
    """A connection idle past keepalive_timeout is not reused, and the sweep closes it."""
    pool = HttpPool(keepalive_timeout=0.05)
    try:
        assert await post(pool, raw) == (200, b"ok")
        assert await post(pool, raw) == (200, b"ok")
        assert raw.connections == 1
        assert pool.idle_connections == 1
        await asyncio.sleep(0.2)
        assert pool.idle_connections == 0  # swept without a new request
        assert await post(pool, raw) == (200, b"ok")
        assert raw.connections == 2
    finally:
        await pool.aclose()
    with pytest.raises(HttpDisconnectedError, match="closed"):
        await post(pool, raw)


@pytest.mark.asyncio
async def test_streamed_body_under_flow_control(pool: HttpPool, raw: RawServer) -> None:
    """A body given as pieces arrives whole, in order, and each piece is produced when asked for."""
    pieces = [bytes([65 + n % 26]) * 65536 for n in range(80)]  # 5 MiB
    produced: list[int] = []

    def chunks() -> Iterator[bytes]:
        for n, piece in enumerate(pieces):
            produced.append(n)
            yield piece

    total = sum(map(len, pieces))
    head = b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total
    body: Callable[[], Iterator[bytes]] = chunks
    response = await pool.request(raw.origin(), head, body, max_body_bytes=100)
    assert response.status == 200
    assert raw.requests[0].body == b"".join(pieces)
    assert produced == list(range(80))


@pytest.mark.asyncio
async def test_request_head_from_the_endpoint_url(raw: RawServer) -> None:
    """Path, query, Host with port, URL credentials as Basic auth, the fixed and the configured headers."""
    url = f"http://us%40er:p%3Ass@127.0.0.1:{raw.port}/a/b%20c?x=1&y=a%26b"
    endpoint = prepare_endpoint(
        EndpointSettings(name="raw", url=url, headers=(("X-Extra", "yes"), ("user-agent", "filter-test/1")))
    )
    async with WebhookClient() as client:
        response = await client.post(endpoint, b"{}", webhook_id="evt_1")
    assert response.body == b"ok"
    lines = raw.requests[0].head.decode().split("\r\n")
    assert lines[0] == "POST /a/b%20c?x=1&y=a%26b HTTP/1.1"
    names = [line.split(": ", 1)[0].lower() for line in lines[1:] if line]
    assert len(names) == len(set(names))  # a configured User-Agent replaces the default one
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    assert headers["user-agent"] == "filter-test/1"
    assert headers["Host"] == f"127.0.0.1:{raw.port}"
    assert base64.b64decode(headers["Authorization"].removeprefix("Basic ")) == b"us@er:p:ss"
    assert headers["X-Extra"] == "yes"
    assert headers["Accept-Encoding"] == "identity"
    assert headers["Content-Length"] == "2"
    assert headers["webhook-id"] == "evt_1"


@pytest.mark.asyncio
async def test_client_maps_http_errors(raw: RawServer) -> None:
    """Malformed answers are connection errors without retry; an error status after a cut is retried."""
    endpoint = prepare_endpoint(EndpointSettings(name="raw", url=f"http://127.0.0.1:{raw.port}/hook"))
    async with WebhookClient() as client:
        raw.replies = [b"garbage\r\n\r\n"]
        with pytest.raises(WebhookConnectionError, match="malformed") as info:
            await client.post(endpoint, b"{}", webhook_id="evt_1")
        assert info.value.attempts == 1
        raw.replies = [None, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"]
        with pytest.raises(WebhookStatusError) as status_info:
            await client.post(endpoint, b"{}", webhook_id="evt_2")
        assert status_info.value.attempts == 2
    assert [r.head.count(b"evt_2") for r in raw.requests[1:]] == [1, 1]


def test_header_values_are_checked() -> None:
    """An endpoint header with CR or LF cannot be turned into a request (no header injection)."""
    endpoint = EndpointSettings(name="bad", url="http://127.0.0.1:1/", headers=(("X-A", "a\r\nX-Injected: 1"),))
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        prepare_endpoint(endpoint)


def test_under_uvloop() -> None:
    """The bridge runs on uvloop when installed: a kept-alive exchange and a bad answer there too."""
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> tuple[int, list[tuple[int, bytes]]]:
        raw = RawServer(replies=[OK, OK, b"nonsense\r\n\r\n"])
        listener = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        raw.port = listener.sockets[0].getsockname()[1]
        pool = HttpPool()
        try:
            answers = [await post(pool, raw), await post(pool, raw)]
            with pytest.raises(HttpProtocolError):
                await post(pool, raw)
            answers.append(await post(pool, raw))
            return raw.connections, answers
        finally:
            await pool.aclose()
            listener.close()
            await listener.wait_closed()

    connections, answers = uvloop.run(exchange())
    assert answers == [(200, b"ok")] * 3
    assert connections == 2


# -- answers that arrive early, late or wrong (found in review) ------------------------------------


@dataclass
class EarlyServer:
    """Reads a request head and ``read_bytes`` of its body, answers ``reply``, then reads the rest or idles."""

    reply: bytes
    read_bytes: int = 0
    read_rest: bool = False
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                first = min(self.read_bytes, length)
                await reader.readexactly(first)
                writer.write(self.reply)
                await writer.drain()
                if not self.read_rest:
                    await asyncio.sleep(30)  # keep the connection open, read nothing more
                await reader.readexactly(length - first)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _streamed_post(pool: HttpPool, port: int, pieces: int = 400) -> tuple[int, float]:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (65536 * pieces)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        response = await pool.request(
            Origin("127.0.0.1", port), head, lambda: iter([b"x" * 65536] * pieces), max_body_bytes=100
        )
    return response.status, loop.time() - started


@pytest.mark.parametrize(
    ("read_bytes", "read_rest", "reply", "status"),
    [
        pytest.param(0, False, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n", 413, id="answers-unread"),
        pytest.param(1 << 20, True, OK, 200, id="answers-then-reads-on"),
    ],
)
@pytest.mark.asyncio
async def test_answer_before_the_streamed_body_is_sent(
    pool: HttpPool, read_bytes: int, read_rest: bool, reply: bytes, status: int
) -> None:
    """An answer while a 25 MiB body is still being written ends the call at once; that connection is dropped."""
    server = EarlyServer(reply, read_bytes=read_bytes, read_rest=read_rest)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        got, seconds = await _streamed_post(pool, port)
        assert got == status
        assert seconds < 2.0  # not held until the budget runs out
        # The server may read the unsent rest as a next request: the next call must not reuse it.
        server.reply, server.read_bytes, server.read_rest = OK, 1 << 30, True
        assert await _streamed_post(pool, port, pieces=2) == (200, pytest.approx(0, abs=2.0))
        assert server.connections == 2
        listener.close()


@pytest.mark.asyncio
async def test_body_cut_by_a_reset_is_not_a_response(pool: HttpPool) -> None:
    """A body delimited by the connection's end counts only when the end is clean, not a reset."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(4)
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"action": "contin')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST instead of FIN

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with listener:
        origin = Origin("127.0.0.1", listener.sockets[0].getsockname()[1])
        with pytest.raises(HttpDisconnectedError, match="lost"):
            await pool.request(origin, HEAD, b"ping", max_body_bytes=1000)
        listener.close()


@pytest.mark.asyncio
async def test_trailers_are_bounded_and_ignored(pool: HttpPool, raw: RawServer) -> None:
    """A trailer cannot set Location, and one that never ends is refused like a huge head."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    raw.replies = [chunked + b"Location: http://evil.example/\r\n\r\n"]
    response = await pool.request(raw.origin(), HEAD, b"ping", max_body_bytes=1000)
    assert (response.status, response.body, response.location) == (200, b"ok", None)
    raw.replies = [chunked + b"X-Endless: " + b"a" * (2 * MAX_HEAD_BYTES)]
    with pytest.raises(HttpProtocolError, match="trailer"):
        await post(pool, raw)
    assert await post(pool, raw) == (200, b"ok")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz", "transfer coding other than chunked", id="te-gzip"
        ),
    ],
)
@pytest.mark.asyncio
async def test_transfer_coding_must_be_chunked(pool: HttpPool, raw: RawServer, reply: bytes, error: str) -> None:
    """A transfer coding llhttp would read up to EOF is refused, not retried as a disconnect."""
    raw.replies = [reply]
    with pytest.raises(HttpProtocolError, match=error):
        await post(pool, raw)


@pytest.mark.asyncio
async def test_interim_answer_after_the_response_retires_the_connection(pool: HttpPool, raw: RawServer) -> None:
    """200, then an unasked 100 and 503 in the same write: the 503 is never taken for the next answer."""
    raw.replies = [OK + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"]
    assert await post(pool, raw) == (200, b"ok")
    assert await post(pool, raw) == (200, b"ok")
    assert raw.connections == 2


class FailingBody:
    """A spooled body whose file read fails after the first piece."""

    def __len__(self) -> int:
        return 200_000

    def chunks(self) -> Iterator[bytes]:
        yield b"x" * 100_000
        raise OSError(5, "Input/output error")


@pytest.mark.asyncio
async def test_unreadable_body_is_the_bridges_fault(raw: RawServer) -> None:
    """An unreadable body fails the call as a SpoolError, not a WebhookError (the dispatcher then
    tempfails the message whatever on_error says), and the client works on (the breaker side:
    tests/test_endpoint.py)."""
    endpoint = prepare_endpoint(EndpointSettings(name="raw", url=f"http://127.0.0.1:{raw.port}/hook", retry=False))
    async with WebhookClient() as client:
        with pytest.raises(SpoolError, match="cannot read the message body: OSError: Input/output error"):
            await client.post(endpoint, FailingBody(), webhook_id="evt_1")
        assert (await client.post(endpoint, b"{}", webhook_id="evt_2")).body == b"ok"


def test_the_connection_offers_httptools_every_progress_callback() -> None:
    """httptools installs only the callbacks it finds with getattr: each must be a bound method
    in the compiled build too (mypyc drops a class-level alias of a method)."""
    conn = _Connection(Origin("127.0.0.1", 1))
    for name in ("on_header", "on_headers_complete", "on_chunk_header", "on_chunk_complete", "on_body"):
        assert callable(getattr(conn, name, None)), name
