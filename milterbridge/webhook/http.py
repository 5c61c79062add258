"""A small HTTP/1.1 client for webhook POSTs: kept-alive connections, one request at a time each.

Why not ``aiohttp.ClientSession``: a webhook is a POST of a few KiB to a known origin, and
aiohttp's general request machinery (request and response objects, multidict headers, the
connector's bookkeeping, its tracing hooks) cost 150-200 µs of CPU per call on our 2-core
machine; this client does the same POST in about 40 µs (``python -m bench.costs`` prints
both). At one request per message that is a third of the bridge's CPU per message.

What it does and no more:

- The caller hands in the request head, already serialised (the endpoint's static lines are
  built once, see ``webhook.client``), and the body as bytes or as an iterator of pieces;
  the head and a bytes body leave in one write. Pieces are written under flow control, so
  a 50 MiB body never sits in the socket's buffer at once.
- Responses are parsed by httptools (llhttp, the parser of Node.js): content length,
  chunked encoding, body until EOF, 1xx interim answers. Only the status, ``Location`` and
  ``Content-Encoding`` are kept; the head is bounded by ``MAX_HEAD_BYTES``; the body of a
  200 by the caller's limit (one byte more fails the call and drops the connection); other
  answers' bodies are read up to ``max_error_body_bytes`` and then cut off.
- The request asks for ``identity``; a response with another content coding is refused.
- One idle list per origin (scheme, host, port, TLS context), most recent first. An idle
  connection older than ``keepalive_timeout`` is never reused (the next request skips and
  closes it, a sweep closes the rest), so the server's own idle timeout cannot close it
  under a new request. A request is never repeated here: the caller's retry rule decides.

Errors (all ``HttpError``, never with the URL or a header value in the text)::

    HttpError
    ├── HttpConnectError        could not connect (refused, unreachable, name not resolved)
    ├── HttpTlsError            handshake or certificate failure
    ├── HttpDisconnectedError   the connection ended before the response was complete
    ├── HttpProtocolError       not a valid HTTP/1.1 response (or an unsupported one)
    └── HttpTooLargeError       a 200 body over the caller's limit
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, cast

import httptools

__all__ = [
    "MAX_HEAD_BYTES",
    "describe_os_error",
    "HttpConnectError",
    "HttpDisconnectedError",
    "HttpError",
    "HttpPool",
    "HttpProtocolError",
    "HttpResponse",
    "HttpTlsError",
    "HttpTooLargeError",
    "Origin",
]

#: Status line plus headers of one response; aiohttp's limit per line is 8 KiB.
MAX_HEAD_BYTES: Final = 64 * 1024


#: Lengths of the header names read: location, content-length, -encoding, transfer-encoding.
_WANTED_NAME_LENGTHS: Final = frozenset({8, 14, 16, 17})


class HttpError(Exception):
    """A request failed below HTTP semantics; the text names the cause, never the URL.

    The webhook client retries a connect error or a lost connection once (the request may not
    have been processed), and no other (``WebhookClient._attempt``).
    """


class HttpConnectError(HttpError):
    pass


class HttpTlsError(HttpError):
    pass


class HttpDisconnectedError(HttpError):
    pass


class HttpProtocolError(HttpError):
    pass


class HttpTooLargeError(HttpError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a connection goes; connections are pooled per origin."""

    host: str
    port: int
    #: None for plain http.
    ssl: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    #: The Location header of a redirect, as sent (latin-1 decoded), else None.
    location: str | None = None
    #: The body of a non-200 answer was cut at ``max_error_body_bytes``.
    truncated: bool = False


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the reason is in ``_Connection.error``."""


def describe_os_error(exc: OSError) -> str:
    """``ConnectionRefusedError: Connection refused``: the class and the OS text, no address."""
    return f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else type(exc).__name__


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: at most one request in flight, its response parsed as it arrives."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        #: A response is awaited (set by ``start``, cleared when it ends).
        self.waiter: asyncio.Future[HttpResponse] | None = None
        self.idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self.max_body_bytes = self.max_error_body_bytes = 0
        self._reset()

    def _reset(self) -> None:
        """State of one response (``start``)."""
        self.received = 0  # bytes of this response so far
        #: ``received`` when the parser last showed progress (a field, body bytes, a chunk).
        self.progress_mark = 0
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.truncated = False
        self.complete = False
        self.reusable = True
        self.error: HttpError | None = None
        self._reset_head()

    def _reset_head(self) -> None:
        """State of one response head (again after a 1xx interim answer)."""
        self.head_done = False
        self.status = 0
        self.location: str | None = None
        self.content_encoding: bytes | None = None
        self.content_length: int | None = None
        self.transfer_encoding: bytes | None = None
        self.limit = 0

    # ------------------------------------------------------------- request side

    def start(self, loop: asyncio.AbstractEventLoop, max_body_bytes: int, max_error_body_bytes: int) -> None:
        """Get ready for the response to a request about to be written."""
        self.max_body_bytes = max_body_bytes
        self.max_error_body_bytes = max_error_body_bytes
        self._reset()
        self.waiter = loop.create_future()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (or until the response ends)."""
        if self._paused and not self.closed and not self.complete:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.complete:
            # Bytes nobody asked for: the next response could not be told from them.
            self.abort()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as callback_error:
            # httptools reports an exception in a callback as this, the original as context.
            if not isinstance(callback_error.__context__, _Stop):
                self._fail(HttpProtocolError("response could not be handled"))
        except httptools.HttpParserUpgrade:
            self._fail(HttpProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(HttpProtocolError(f"malformed HTTP response ({type(exc).__name__})"))
        if self.error is not None:
            self._fail(self.error)
        elif not self.complete:
            # httptools buffers a header or trailer field until it is complete: an unfinished
            # head, and bytes after the head that bring no progress, are bounded here to
            # MAX_HEAD_BYTES plus one read (checked after the read is parsed: a read may hold
            # the end of a field and the body).
            pending = self.received - self.progress_mark if self.head_done else self.received
            if pending > MAX_HEAD_BYTES:
                where = "response head" if not self.head_done else "response framing or trailer"
                self._fail(HttpProtocolError(f"{where} larger than {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_drain()
        if self.waiter is None or self.waiter.done():
            return
        delimited_by_eof = self.content_length is None and self.transfer_encoding is None
        if exc is None and self.head_done and delimited_by_eof and self.status not in (204, 304):
            self._finish()  # a body delimited by a clean end of the connection (not by a reset)
        elif isinstance(exc, ssl.SSLError):
            self._fail(HttpTlsError(f"TLS error: {exc.reason or type(exc).__name__}"))
        elif isinstance(exc, OSError):
            self._fail(HttpDisconnectedError(f"connection lost ({describe_os_error(exc)})"))
        else:
            self._fail(HttpDisconnectedError("connection closed before the response was complete"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after the response in the same read: the next response could not be told
            # from them. The response is delivered already; retire the connection.
            self.reusable = False
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.progress_mark = self.received
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            self._stop(HttpProtocolError(f"response head larger than {MAX_HEAD_BYTES} bytes"))
        if self.head_done or len(name) not in _WANTED_NAME_LENGTHS:
            # A trailer (after a chunked body: counted, never read) or a header we skip
            # (Date, Server, Content-Type ...) without lower-casing it.
            return
        name = name.lower()
        if name == b"content-length":
            self.content_length = int(value) if value.strip().isdigit() else -1  # llhttp refuses a bad one
        elif name == b"transfer-encoding":
            self.transfer_encoding = value.strip().lower()
        elif name == b"location":
            self.location = value.decode("latin-1")
        elif name == b"content-encoding":
            self.content_encoding = value.strip().lower()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:
            return  # an interim answer (100 Continue ...): the real one follows
        self.head_done = True
        self.progress_mark = self.received
        if self.content_encoding not in (None, b"identity"):
            self._stop(HttpProtocolError("the response has a content coding, but identity was asked for"))
        if self.transfer_encoding is not None and not self.transfer_encoding.endswith(b"chunked"):
            # llhttp would read such a body up to the end of the connection.
            self._stop(HttpProtocolError("the response has a transfer coding other than chunked"))
        self.limit = self.max_body_bytes if self.status == 200 else self.max_error_body_bytes
        if self.status == 200 and self.content_length is not None and self.content_length > self.limit:
            self._stop(HttpTooLargeError(f"response body larger than {self.limit} bytes"))

    def on_chunk_header(self) -> None:
        self.progress_mark = self.received

    def on_chunk_complete(self) -> None:
        # A method, not an alias of on_chunk_header: a compiled class keeps no such alias.
        self.progress_mark = self.received

    def on_body(self, body: bytes) -> None:
        self.progress_mark = self.received
        self.body_bytes += len(body)
        if self.body_bytes > self.limit:
            if self.status == 200:
                self._stop(HttpTooLargeError(f"response body larger than {self.limit} bytes"))
            # Another status: what was read is enough to report it; drop the rest with the connection.
            self.truncated = True
            self.reusable = False
            self._finish()
            raise _Stop
        self.body.append(body)

    def on_message_complete(self) -> None:
        # No _Stop here: a parser stopped by a callback cannot parse the next response.
        if self.status < 200:
            self._reset_head()
            return
        if not self.parser.should_keep_alive():
            self.reusable = False
        self._finish()

    # ------------------------------------------------------------------- endings

    def _stop(self, error: HttpError) -> None:
        self.error = error
        raise _Stop

    def _finish(self) -> None:
        self.complete = True
        self._wake_drain()  # a request body still being sent stops: the answer is here
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        waiter.set_result(HttpResponse(self.status, body, self.location, self.truncated))

    def _fail(self, error: HttpError) -> None:
        self.complete = True
        self.reusable = False
        self._wake_drain()
        self.abort()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


class HttpPool:
    """Kept-alive connections per origin, and the one verb that uses them: ``request``.

    Nothing starts in ``__init__``; ``aclose()`` closes every idle connection (requests in
    flight close theirs when they end).
    """

    def __init__(self, *, keepalive_timeout: float = 4.0) -> None:
        self._keepalive_timeout = keepalive_timeout
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def idle_connections(self) -> int:
        """Connections kept alive, waiting for their next request."""
        return sum(len(idle) for idle in self._idle.values())

    async def request(
        self,
        origin: Origin,
        head: bytes,
        body: bytes | Callable[[], Iterator[bytes]],
        *,
        max_body_bytes: int,
        max_error_body_bytes: int = 4096,
    ) -> HttpResponse:
        """Send one request (``head`` ends with the blank line) and return its response.

        ``body`` follows ``head``: bytes in the same write, or a function giving the pieces,
        written one by one under flow control. ``max_body_bytes`` bounds the body of a 200.
        Raises ``HttpError``; when the call fails or is cancelled, its connection is closed.
        """
        if self._closed:
            raise HttpDisconnectedError("the HTTP pool is closed")
        loop = asyncio.get_running_loop()
        conn = self._take(origin, loop.time()) or await self._connect(loop, origin)
        return await self._exchange(loop, conn, head, body, max_body_bytes, max_error_body_bytes)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        head: bytes,
        body: bytes | Callable[[], Iterator[bytes]],
        max_body_bytes: int,
        max_error_body_bytes: int,
    ) -> HttpResponse:
        conn.start(loop, max_body_bytes, max_error_body_bytes)
        waiter = conn.waiter
        assert waiter is not None
        released = False
        sent_all = True
        try:
            if isinstance(body, bytes):
                conn.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.write(body)
            else:
                conn.write(head)
                for piece in body():
                    if waiter.done() or conn.closed:
                        # Answered (or gone) before the body was sent: stop sending. The server
                        # may still read the rest as the next request, so the connection is dropped.
                        sent_all = False
                        break
                    conn.write(piece)
                    await conn.drain()
            response = await waiter
            if sent_all and conn.reusable and not conn.closed and not self._closed:
                self._release(conn, loop.time())
                released = True
            return response
        finally:
            conn.waiter = None
            if not released:
                conn.abort()

    def _take(self, origin: Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            fresh = now - conn.idle_since < self._keepalive_timeout
            if fresh and not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, now: float) -> None:
        conn.idle_since = now
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = []
        idle.append(conn)
        # Expired connections are closed by the sweep, and never handed out by _take.
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections idle past the keep-alive timeout, also when no requests come."""
        self._sweep = None
        loop_now = asyncio.get_running_loop().time()
        left = False
        for origin, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if not conn.closed and loop_now - conn.idle_since < self._keepalive_timeout:
                    keep.append(conn)
                else:
                    conn.close()
            if keep:
                self._idle[origin] = keep
                left = True
            else:
                del self._idle[origin]
        if left:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive_timeout, self._sweep_idle)

    async def _connect(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> _Connection:
        conn = _Connection(origin)
        try:
            await loop.create_connection(
                lambda: conn,
                origin.host,
                origin.port,
                ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl is not None else None,
            )
        except ssl.SSLCertVerificationError as unverified:
            raise HttpTlsError(f"certificate verify failed: {unverified.verify_message}") from None
        except ssl.SSLError as tls_error:
            raise HttpTlsError(f"TLS handshake failed: {tls_error.reason or type(tls_error).__name__}") from None
        except OSError as exc:
            raise HttpConnectError(f"cannot connect ({describe_os_error(exc)})") from None
        except BaseException:
            conn.abort()
            raise
        return conn

    async def aclose(self) -> None:
        """Close the idle connections; the pool takes no new requests after this."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for conn in connections:
                conn.close()
        if idle:
            await asyncio.sleep(0)  # let the transports finish closing
