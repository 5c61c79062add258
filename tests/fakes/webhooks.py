"""FakeWebhooks: a real webhook endpoint server on 127.0.0.1 for the whole test suite.

It is an ``aiohttp.web`` app run by ``aiohttp.test_utils.TestServer`` on a free port. Every
request is recorded on the instance (``fake.requests``) and answered from a script.

Start and stop::

    async with FakeWebhooks() as fake:           # or: fake = await FakeWebhooks.start()
        url = fake.url("/hook")                 # "http://127.0.0.1:PORT/hook"
        endpoint = fake.endpoint("policy", path="/hook", events=frozenset({Event.RCPT}))
        prepared = fake.prepared("policy")      # an endpoint ready for WebhookClient.post
        ...                                     # (await fake.aclose() when started by hand)

    # pytest fixtures (enable with ``pytest_plugins = ("tests.fakes.webhooks",)`` in conftest):
    async def test_x(fake_webhooks): ...                  # one started server
    async def test_y(fake_webhooks_factory):              # several, or with TLS
        fake = await fake_webhooks_factory(ssl_context=server_ctx)

Script the answers with ``FakeResponse`` values (or callables taking the ``RecordedRequest``
and returning one, sync or async)::

    fake.set_default(FakeResponse.decision("reject", reply={"code": 550, "text": "no"}))
    fake.set_default(FakeResponse.no_content(), path="/observer")
    fake.set_default(FakeResponse.decision("tempfail"), event="rcpt")
    fake.enqueue(FakeResponse.status_code(503), FakeResponse.decision("accept"))   # one-shot, in order
    fake.enqueue(FakeResponse.decision("continue").after(2.0), event="eom", path="/slow")
    fake.set_default(lambda req: FakeResponse.decision(
        "reject" if req.json["data"]["address"] == "bad@x" else "continue"), event="rcpt")

The answer for a request is the first match of: queued for (path, event), (any path, event),
(path, any event), (any, any); then the defaults in the same order; then ``fake.default``
(``{"action": "continue"}``). The event is the ``"event"`` key of the JSON request body.

Answers: ``decision``/``json`` (200 JSON), ``empty`` (200, no body), ``no_content`` (204),
``status_code`` (any status, optional body), ``raw`` (any bytes), ``redirect``, ``trickle`` (body
sent ``chunk_bytes`` at a time every ``interval`` s), ``huge`` (``size_bytes`` of filler, with
or without Content-Length), ``close_connection`` (the socket is cut, no answer),
``never_answer`` (hangs until the client leaves or the server stops). ``.after(seconds)``
delays any of them.

Inspect: ``fake.requests`` (all ``RecordedRequest``), ``fake.requests_for(path=, event=)``,
``fake.events(path=)``, ``await fake.wait_for(n, path=, event=, timeout=)`` for calls that
arrive in the background (notifications such as abort/close), ``fake.cancelled`` (requests
whose client went away before the answer, e.g. a webhook cancelled because the MTA left),
``await fake.wait_until(lambda: len(fake.cancelled) == 1)`` and ``fake.clear()``.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Self

import orjson
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from milterbridge.config import EndpointSettings
from milterbridge.webhook.client import PreparedEndpoint, prepare_endpoint

__all__ = [
    "Behaviour",
    "FakeResponse",
    "RecordedRequest",
    "FakeWebhooks",
    "Script",
    "fake_webhooks",
    "fake_webhooks_factory",
]

#: Seconds the server waits for in-flight handlers when it stops (hanging ones are woken first).
_SHUTDOWN_TIMEOUT = 0.5
_FILLER_CHUNK_BYTES = 64 * 1024


class Behaviour(enum.Enum):
    """How a ``FakeResponse`` is delivered."""

    RESPOND = "respond"  # status, headers and body at once
    TRICKLE = "trickle"  # body in small pieces with pauses
    HUGE = "huge"  # size_bytes of filler
    CLOSE = "close"  # cut the connection without answering
    HANG = "hang"  # never answer


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeResponse:
    """One scripted answer; build it with the class methods."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    #: Seconds to wait before doing anything (answering, trickling, closing).
    delay: float = 0.0
    behaviour: Behaviour = Behaviour.RESPOND
    #: TRICKLE: bytes per write; HUGE: filler size.
    chunk_bytes: int = 1
    #: TRICKLE: seconds between writes.
    interval: float = 0.0
    #: HUGE: total bytes of filler.
    size_bytes: int = 0
    #: HUGE/TRICKLE: send without Content-Length (chunked encoding).
    chunked: bool = False

    def after(self, delay: float) -> FakeResponse:
        """The same answer, sent ``delay`` seconds after the request arrived."""
        return replace(self, delay=delay)

    @classmethod
    def decision(cls, action: str = "continue", **fields: Any) -> FakeResponse:
        """200 with ``{"action": action, **fields}`` (e.g. ``reply=``, ``modifications=``)."""
        return cls.json({"action": action, **fields})

    @classmethod
    def json(cls, document: Any, *, status: int = 200) -> FakeResponse:
        """Any JSON document with any status."""
        return cls(status=status, body=orjson.dumps(document))

    @classmethod
    def empty(cls) -> FakeResponse:
        """200 with an empty body (means continue)."""
        return cls(status=200, content_type=None)

    @classmethod
    def no_content(cls) -> FakeResponse:
        """204 (means continue)."""
        return cls(status=204, content_type=None)

    @classmethod
    def status_code(cls, status: int, body: bytes = b"", *, content_type: str | None = "text/plain") -> FakeResponse:
        """A bare status such as 500 or 503, with an optional body."""
        return cls(status=status, body=body, content_type=content_type)

    @classmethod
    def raw(cls, body: bytes, *, status: int = 200, content_type: str | None = "application/json") -> FakeResponse:
        """Exact body bytes (invalid JSON, wrong types, ...)."""
        return cls(status=status, body=body, content_type=content_type)

    @classmethod
    def redirect(cls, location: str, *, status: int = 302) -> FakeResponse:
        """A redirect to ``location`` (a client must not follow it)."""
        return cls(status=status, content_type=None, headers=(("Location", location),))

    @classmethod
    def trickle(
        cls, body: bytes, *, chunk_bytes: int = 1, interval: float = 0.05, chunked: bool = False
    ) -> FakeResponse:
        """200 whose body arrives ``chunk_bytes`` at a time, ``interval`` seconds apart."""
        return cls(body=body, behaviour=Behaviour.TRICKLE, chunk_bytes=chunk_bytes, interval=interval, chunked=chunked)

    @classmethod
    def huge(cls, size_bytes: int, *, chunked: bool = False) -> FakeResponse:
        """200 with ``size_bytes`` of filler; ``chunked`` hides the size from the client."""
        return cls(behaviour=Behaviour.HUGE, size_bytes=size_bytes, chunked=chunked)

    @classmethod
    def close_connection(cls) -> FakeResponse:
        """Cut the TCP connection after reading the request, without any answer."""
        return cls(behaviour=Behaviour.CLOSE)

    @classmethod
    def never_answer(cls) -> FakeResponse:
        """Hold the request until the client gives up or the server stops."""
        return cls(behaviour=Behaviour.HANG)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedRequest:
    """One request as the fake server saw it."""

    method: str
    path: str
    query: str
    #: Case-insensitive: ``headers["webhook-id"]``.
    headers: Mapping[str, str]
    body: bytes
    #: The parsed JSON body, or None when the body is not JSON.
    json: Any
    #: Event-loop time (``loop.time()``) when the request head arrived.
    received_at: float
    #: Count of requests recorded before this one.
    index: int = field(default=0)
    #: The client's source port: equal ports mean a reused keep-alive connection.
    peer_port: int | None = None

    @property
    def event(self) -> str | None:
        """The ``event`` key of the JSON body, if any."""
        if isinstance(self.json, dict):
            event = self.json.get("event")
            return event if isinstance(event, str) else None
        return None


Script = FakeResponse | Callable[[RecordedRequest], "FakeResponse | Awaitable[FakeResponse]"]
_Key = tuple[str | None, str | None]  # (path, event); None matches any


class FakeWebhooks:
    """A scripted, recording webhook endpoint server (see the module docstring)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.requests: list[RecordedRequest] = []
        self.cancelled: list[RecordedRequest] = []
        #: The answer when nothing else matches.
        self.default: Script = FakeResponse.decision("continue")
        self._ssl_context = ssl_context
        self._host = host
        self._queues: dict[_Key, deque[Script]] = {}
        self._defaults: dict[_Key, Script] = {}
        self._server: TestServer | None = None
        self._changed: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def start(cls, *, ssl_context: ssl.SSLContext | None = None) -> FakeWebhooks:
        """Create and start a server; stop it with ``aclose()``."""
        fake = cls(ssl_context=ssl_context)
        await fake.serve()
        return fake

    async def serve(self) -> None:
        """Start listening (idempotent)."""
        if self._server is not None:
            return
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024 * 1024)  # tests send bodies of many MiB
        app.router.add_route("*", "/{tail:.*}", self._handle)
        server = TestServer(app, host=self._host)
        await server.start_server(ssl=self._ssl_context, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        self._server = server

    async def aclose(self) -> None:
        """Stop the server; hanging and delayed handlers are woken and cut first."""
        server, self._server = self._server, None
        if server is None:
            return
        assert self._stopping is not None
        self._stopping.set()
        await server.close()

    async def __aenter__(self) -> Self:
        await self.serve()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port."""
        assert self._server is not None, "FakeWebhooks is not started"
        assert self._server.port is not None
        return self._server.port

    @property
    def scheme(self) -> str:
        """``http``, or ``https`` with an ssl_context."""
        return "https" if self._ssl_context is not None else "http"

    def url(self, path: str = "/hook") -> str:
        """Absolute URL of ``path`` on this server."""
        if not path.startswith("/"):
            path = "/" + path
        return f"{self.scheme}://{self._host}:{self.port}{path}"

    def endpoint(self, name: str = "fake", *, path: str = "/hook", **overrides: Any) -> EndpointSettings:
        """``EndpointSettings`` pointing at ``path`` here; other fields from ``overrides``."""
        return EndpointSettings(name=name, url=self.url(path), **overrides)

    def prepared(self, name: str = "fake", *, path: str = "/hook", **overrides: Any) -> PreparedEndpoint:
        """``endpoint(...)`` made ready for ``WebhookClient.post``."""
        return prepare_endpoint(self.endpoint(name, path=path, **overrides))

    # -- script ------------------------------------------------------------------------------

    def set_default(self, response: Script, *, path: str | None = None, event: str | None = None) -> None:
        """Answer every matching request with ``response`` (until changed)."""
        if path is None and event is None:
            self.default = response
        else:
            self._defaults[(path, event)] = response

    def enqueue(self, *responses: Script, path: str | None = None, event: str | None = None) -> None:
        """Answer the next matching requests with ``responses``, one each, in order."""
        self._queues.setdefault((path, event), deque()).extend(responses)

    def pending(self, *, path: str | None = None, event: str | None = None) -> int:
        """How many queued answers for exactly this (path, event) are still unused."""
        return len(self._queues.get((path, event), ()))

    def _pick(self, path: str, event: str | None) -> Script:
        keys: tuple[_Key, ...] = ((path, event), (None, event), (path, None), (None, None))
        for key in keys:
            queue = self._queues.get(key)
            if queue:
                return queue.popleft()
        for key in keys[:3]:
            if key in self._defaults:
                return self._defaults[key]
        return self.default

    # -- inspection --------------------------------------------------------------------------

    def requests_for(self, *, path: str | None = None, event: str | None = None) -> list[RecordedRequest]:
        """Recorded requests to ``path`` and/or of ``event``."""
        return [r for r in self.requests if (path is None or r.path == path) and (event is None or r.event == event)]

    def events(self, *, path: str | None = None) -> list[str | None]:
        """The event names received, in arrival order."""
        return [r.event for r in self.requests_for(path=path)]

    async def wait_for(
        self, count: int = 1, *, path: str | None = None, event: str | None = None, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` matching requests arrived; return them all."""
        await self.wait_until(lambda: len(self.requests_for(path=path, event=event)) >= count, timeout=timeout)
        return self.requests_for(path=path, event=event)

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever a request arrives or is cancelled."""
        assert self._changed is not None, "FakeWebhooks is not started"
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def clear(self) -> None:
        """Forget recorded requests and the script (defaults back to continue)."""
        self.requests.clear()
        self.cancelled.clear()
        self._queues.clear()
        self._defaults.clear()
        self.default = FakeResponse.decision("continue")

    # -- the handler -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        received_at = loop.time()
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        body = await request.read()
        try:
            document: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            document = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            json=document,
            received_at=received_at,
            index=len(self.requests),
            peer_port=peer[1] if isinstance(peer, tuple) else None,
        )
        self.requests.append(record)
        self._notify()
        try:
            script = self._pick(record.path, record.event)
            answer = script(record) if callable(script) else script
            if inspect.isawaitable(answer):
                answer = await answer
            assert isinstance(answer, FakeResponse), f"script returned {answer!r}"
            return await self._deliver(request, answer)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client disconnects (handler_cancellation).
            self.cancelled.append(record)
            self._notify()
            raise

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server is stopping."""
        assert self._stopping is not None
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return
        raise _Stopping

    async def _deliver(self, request: web.Request, answer: FakeResponse) -> web.StreamResponse:
        try:
            await self._pause(answer.delay)
            match answer.behaviour:
                case Behaviour.RESPOND:
                    return web.Response(
                        status=answer.status,
                        body=answer.body if answer.status != 204 else None,
                        headers=CIMultiDict(answer.headers),
                        content_type=answer.content_type if answer.body else None,
                    )
                case Behaviour.TRICKLE | Behaviour.HUGE:
                    return await self._stream(request, answer)
                case Behaviour.CLOSE:
                    _cut(request)
                case Behaviour.HANG:
                    assert self._stopping is not None
                    await self._stopping.wait()
                    _cut(request)
        except _Stopping:
            _cut(request)
        # The transport is gone: aiohttp discards whatever is returned here.
        return web.Response(status=500)

    async def _stream(self, request: web.Request, answer: FakeResponse) -> web.StreamResponse:
        response = web.StreamResponse(status=answer.status, headers=CIMultiDict(answer.headers))
        if answer.content_type:
            response.content_type = answer.content_type
        if answer.behaviour is Behaviour.HUGE:
            total = answer.size_bytes
            step = _FILLER_CHUNK_BYTES
        else:
            total = len(answer.body)
            step = max(1, answer.chunk_bytes)
        if answer.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = total
        await response.prepare(request)
        try:
            sent = 0
            while sent < total:
                size = min(step, total - sent)
                if answer.behaviour is Behaviour.HUGE:
                    piece = b" " * size  # whitespace: valid JSON padding, so only the size is wrong
                else:
                    piece = answer.body[sent : sent + size]
                await response.write(piece)
                sent += size
                if answer.interval and sent < total:
                    await self._pause(answer.interval)
            await response.write_eof()
        except (ConnectionError, _Stopping):
            _cut(request)  # the client hung up (as it should, past its limit or deadline)
        return response


class _Stopping(Exception):
    """Raised inside a handler when the server stops during a pause."""


def _cut(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


@pytest_asyncio.fixture
async def fake_webhooks() -> AsyncIterator[FakeWebhooks]:
    """A started FakeWebhooks on 127.0.0.1 (plain HTTP), stopped after the test."""
    async with FakeWebhooks() as fake:
        yield fake


@pytest_asyncio.fixture
async def fake_webhooks_factory() -> AsyncIterator[Callable[..., Awaitable[FakeWebhooks]]]:
    """An async factory ``await make(ssl_context=None)``; every server is stopped after the test."""
    started: list[FakeWebhooks] = []

    async def make(*, ssl_context: ssl.SSLContext | None = None) -> FakeWebhooks:
        fake = await FakeWebhooks.start(ssl_context=ssl_context)
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.aclose()
