"""The webhook HTTP client: one connection pool for the process, one POST per event.

``WebhookClient.post`` sends a JSON body (already encoded, bytes) to one endpoint and returns a
``WebhookResponse`` for 200 / 204, or raises a ``WebhookError`` (see ``errors``). The rules it
enforces come from design.md §3.2 and §3.5:

- The endpoint's ``timeout`` is the whole budget for the call, retry included: one deadline,
  enforced with ``asyncio.timeout_at`` around everything (connect, send, read, retry).
- At most one retry, immediately, only after a connection error or a 429/502/503/504, and only
  while time remains; ``Retry-After`` is not honoured (the budget is seconds, not minutes).
  The retry keeps the ``webhook-id`` and gets a fresh ``webhook-timestamp`` and signature.
- Status 200 and 204 are success (200 with an empty body too). Any other status is a
  ``WebhookStatusError``, including 2xx such as 201 or 202: the contract allows only 200 and
  204, and a 202 "accepted for later" would silently mean "continue". 3xx is a
  ``WebhookRedirectError`` and is never followed (the request carries secrets and tokens).
- The response body is read in chunks up to ``max_response_bytes``; one byte more and the
  connection is closed and ``WebhookResponseTooLargeError`` raised.
- A circuit breaker per endpoint (``webhook.breaker``) is asked before the call and told the
  result after. It judges the endpoint, not the mail: a response over ``max_response_bytes``
  and a spooled body the bridge cannot read count neither way, and an answer the dispatcher
  finds invalid is a success here (the endpoint answered in time).

Per-endpoint work (the request head up to the per-call headers, signer, TLS context, redacted
URL) is done once and cached by endpoint name; a reload that hands in changed settings
rebuilds the entry. The HTTP/1.1 exchange itself is ``webhook.http`` (why not aiohttp's
client: see there).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self

import orjson
from yarl import URL

import milterbridge
from milterbridge.body import SpoolError
from milterbridge.config import HTTP_TOKEN, RESERVED_HEADERS, EndpointSettings, TlsSettings
from milterbridge.webhook.breaker import CircuitBreaker
from milterbridge.webhook.errors import (
    AttemptOutcome,
    WebhookBreakerOpenError,
    WebhookConnectionError,
    WebhookError,
    WebhookInvalidBodyError,
    WebhookRedirectError,
    WebhookResponseTooLargeError,
    WebhookStatusError,
    WebhookTimeoutError,
    WebhookTlsError,
    redact_url,
)
from milterbridge.webhook.http import (
    HttpConnectError,
    HttpDisconnectedError,
    HttpError,
    HttpPool,
    HttpTlsError,
    HttpTooLargeError,
    Origin,
    describe_os_error,
)
from milterbridge.webhook.signing import Signer

__all__ = [
    "USER_AGENT",
    "RETRY_STATUSES",
    "WebhookResponse",
    "WebhookObserver",
    "WebhookClient",
    "build_ssl_context",
    "decode_json",
]

USER_AGENT: Final = f"milterbridge/{milterbridge.__version__}"
#: Statuses worth one retry (design.md §3.5): overload and gateway trouble, nothing else.
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_SUCCESS_STATUSES: Final = frozenset({200, 204})
#: A retry with less time than this left could not finish; fail with the first error instead.
_MIN_RETRY_BUDGET: Final = 0.005
#: Error bodies up to this size are read so the keep-alive connection can be reused; larger
#: ones are cut off with the connection.
_DRAIN_ERROR_BODY_BYTES: Final = 4096
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_DEFAULT_HEADERS: Final = (("User-Agent", USER_AGENT), ("Accept", "application/json"))


class BodySource(Protocol):
    """A request body produced piece by piece (a large message at eom), re-readable per attempt."""

    def __len__(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


#: Endpoint settings of old snapshots kept prepared at once (sessions opened before reloads).
_MAX_STALE_ENDPOINTS: Final = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookResponse:
    """A successful answer: status 200 or 204, the raw body, and how it went."""

    status: int
    body: bytes
    #: HTTP requests made (2 when the retry was needed).
    attempts: int
    #: Seconds from the call to the end of the body, retry included.
    elapsed: float


class WebhookObserver(Protocol):
    """Hook for metrics: told about every attempt, so webhook/ needs no metrics import."""

    def on_attempt(self, endpoint: str, attempt: int, outcome: AttemptOutcome, elapsed: float) -> None:
        """One attempt ended. ``attempt`` is 1, or 2 for the retry, or 0 when the breaker
        refused the call (``outcome`` breaker_open, nothing sent); ``elapsed`` is the seconds
        this attempt took. Must not raise or block."""


def decode_json(body: bytes) -> object:
    """Parse a response body with orjson; an empty (or blank) body is ``None``.

    Anything orjson refuses (invalid JSON, invalid UTF-8, nesting deeper than its limit of
    1024) raises ``WebhookInvalidBodyError``, without the body in the message.
    """
    if not body or body.isspace():
        return None
    try:
        return orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        # JSONDecodeError's text quotes the offending document; keep only the position.
        position = getattr(exc, "pos", None)
        where = f" at byte {position}" if position is not None else ""
        raise WebhookInvalidBodyError(f"response body is not valid JSON{where}") from None


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """The system trust store with hostname checks; built once (loading the store takes ms)."""
    return ssl.create_default_context()


def build_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The TLS context for an https endpoint with settings ``tls``.

    Endpoints without their own files share one context that verifies against the system
    store. A ``ca_file`` replaces the system trust store for that endpoint (an internal CA
    is usually the only one it should trust); ``cert_file``/``key_file`` add a client
    certificate (mTLS); ``verify = false`` turns certificate and hostname checks off.
    Raises ``OSError``/``ssl.SSLError`` when a file cannot be loaded.
    """
    if tls.ca_file is None and tls.cert_file is None and tls.verify:
        return _default_ssl_context()
    context = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _header_line(name: str, value: str) -> bytes:
    line = f"{name}: {value}\r\n"
    if any(ch in value for ch in "\r\n\0") or not HTTP_TOKEN.fullmatch(name):
        raise ValueError(f"header {name!r} cannot be sent (invalid name, or CR, LF or NUL in the value)")
    return line.encode("latin-1")


class _Endpoint:
    """What is precomputed for one endpoint (see the module docstring)."""

    __slots__ = ("breaker", "head", "name", "origin", "safe_url", "settings", "signer")

    def __init__(self, settings: EndpointSettings, tls: ssl.SSLContext | None, breaker: CircuitBreaker) -> None:
        self.settings = settings
        self.name = settings.name
        url = URL(settings.url)
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise ValueError(f"endpoint {self.name!r}: the url must be http:// or https:// with a host")
        self.safe_url = redact_url(settings.url)
        self.origin = Origin(url.raw_host, url.port, tls if url.scheme == "https" else None)
        self.breaker = breaker
        self.signer = Signer(settings.secrets) if settings.secrets else None
        host = f"[{url.raw_host}]" if ":" in url.raw_host else url.raw_host
        if url.explicit_port is not None and url.explicit_port != _DEFAULT_PORTS[url.scheme]:
            host = f"{host}:{url.explicit_port}"
        extra = [(name, value) for name, value in settings.headers if name.lower() not in RESERVED_HEADERS]
        configured = {name.lower() for name, _ in extra}
        lines = [f"POST {url.raw_path_qs or '/'} HTTP/1.1\r\n".encode("ascii"), _header_line("Host", host)]
        # User-Agent and Accept are defaults an endpoint's headers may replace.
        lines.extend(_header_line(n, v) for n, v in _DEFAULT_HEADERS if n.lower() not in configured)
        lines.append(b"Accept-Encoding: identity\r\nContent-Type: application/json\r\n")
        if url.user is not None or url.password is not None:
            if "authorization" in configured:
                raise ValueError(f"endpoint {self.name!r}: credentials in the URL and an Authorization header conflict")
            credentials = f"{url.user or ''}:{url.password or ''}".encode()
            extra.append(("Authorization", "Basic " + base64.b64encode(credentials).decode("ascii")))
        lines.extend(_header_line(name, value) for name, value in extra)
        #: The request head up to the per-attempt headers (webhook-*, Content-Length).
        self.head = b"".join(lines)

    def head_for(self, webhook_id: str, body: bytes | BodySource) -> bytes:
        """The request head of one attempt; the timestamp is taken now (design.md §3.2)."""
        timestamp = int(time.time())
        signature = b""
        if self.signer is not None:
            pieces = body if isinstance(body, bytes) else body.chunks()
            signature = b"webhook-signature: %s\r\n" % self.signer.sign(webhook_id, timestamp, pieces).encode("ascii")
        return b"%swebhook-id: %s\r\nwebhook-timestamp: %d\r\n%sContent-Length: %d\r\n\r\n" % (
            self.head,
            webhook_id.encode("ascii"),
            timestamp,
            signature,
            len(body),
        )


class WebhookClient:
    """Posts webhooks over one long-lived pool of kept-alive connections (``webhook.http``).

    Construct, then ``await start()`` (or ``async with``); ``aclose()`` closes the pool.
    ``endpoints`` given here are prepared at ``start()`` (TLS files load and secrets decode
    then, so bad ones fail start-up with ``ValueError``/``OSError``); others are prepared on
    first use, where the same problems become a ``WebhookError`` of that call. The pool has
    no size limit (a pool wait would eat the endpoint's budget; the milter connections bound
    the calls in flight). ``keepalive_timeout`` stays under the 5 s idle timeout common in
    web servers so an idle connection is dropped by us before the server closes it under a
    new request.
    """

    def __init__(
        self,
        endpoints: Iterable[EndpointSettings] = (),
        *,
        keepalive_timeout: float = 4.0,
        observer: WebhookObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._initial = tuple(endpoints)
        self._keepalive_timeout = keepalive_timeout
        self._observer = observer
        self._clock = clock
        self._pool: HttpPool | None = None
        self._endpoints: dict[str, _Endpoint] = {}
        self._stale: dict[EndpointSettings, _Endpoint] = {}
        self._ssl_cache: dict[TlsSettings, ssl.SSLContext] = {}

    async def start(self) -> None:
        """Open the pool and prepare the endpoints given to the constructor."""
        if self._pool is not None:
            return
        for settings in self._initial:
            self._prepare(settings)
        self._pool = HttpPool(keepalive_timeout=self._keepalive_timeout)

    async def aclose(self) -> None:
        """Close the pool and its idle connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def update_endpoints(self, endpoints: Iterable[EndpointSettings]) -> None:
        """Replace the prepared endpoints (SIGHUP reload).

        TLS files are read again (certificates get rotated under the same path); an endpoint
        whose URL and breaker settings are unchanged keeps its breaker state. Raises like
        ``start()``; on error the previous endpoints stay in place.
        """
        old, old_cache = self._endpoints, self._ssl_cache
        self._endpoints, self._ssl_cache = {}, {}
        try:
            for settings in endpoints:
                previous = old.get(settings.name)
                if previous is not None:
                    self._endpoints[settings.name] = previous
                self._prepare(settings, rebuild=True)
        except BaseException:
            self._endpoints, self._ssl_cache = old, old_cache
            raise

    def breaker_states(self) -> dict[str, str]:
        """Breaker state per endpoint name: ``closed``, ``open`` or ``half_open``."""
        return {name: str(ep.breaker.state) for name, ep in self._endpoints.items()}

    def _endpoint(self, settings: EndpointSettings) -> _Endpoint:
        ep = self._endpoints.get(settings.name)
        if ep is not None and ep.settings is settings:
            return ep
        if ep is None or ep.settings == settings:
            return self._prepare(settings)
        # Settings from before a reload (a session still on the old snapshot): serve them
        # from a side table, so the current endpoint (and its breaker) is not replaced
        # back and forth between old and new sessions.
        stale = self._stale.get(settings)
        if stale is None:
            if len(self._stale) >= _MAX_STALE_ENDPOINTS:
                self._stale.clear()
            stale = self._stale[settings] = self._build(settings, self._new_breaker(settings))
        return stale

    def _new_breaker(self, settings: EndpointSettings) -> CircuitBreaker:
        return CircuitBreaker(
            failure_rate=settings.breaker_failure_rate,
            min_calls=settings.breaker_min_calls,
            window=settings.breaker_window,
            probe_delay=settings.breaker_probe,
            max_delay=settings.breaker_reset,
            clock=self._clock,
        )

    def _build(self, settings: EndpointSettings, breaker: CircuitBreaker) -> _Endpoint:
        """An endpoint with its (cached) TLS context and the given breaker."""
        context = None
        tls = settings.tls
        # TLS files are loaded (and so checked) even for an http:// URL, where they go unused.
        if settings.url[:6].lower() == "https:" or tls.ca_file is not None or tls.cert_file is not None:
            context = self._ssl_cache.get(settings.tls)
            if context is None:
                context = self._ssl_cache[settings.tls] = build_ssl_context(settings.tls)
        return _Endpoint(settings, context, breaker)

    def _prepare(self, settings: EndpointSettings, *, rebuild: bool = False) -> _Endpoint:
        previous = self._endpoints.get(settings.name)
        if previous is not None and not rebuild and previous.settings == settings:
            previous.settings = settings  # identical content: next lookup takes the fast path
            return previous
        keep_breaker = (
            previous is not None
            and previous.settings.url == settings.url
            and _breaker_settings(previous.settings) == _breaker_settings(settings)
        )
        breaker = previous.breaker if keep_breaker and previous is not None else self._new_breaker(settings)
        ep = self._endpoints[settings.name] = self._build(settings, breaker)
        return ep

    def _observe(self, ep: _Endpoint, attempt: int, outcome: AttemptOutcome, elapsed: float) -> None:
        if self._observer is not None:
            self._observer.on_attempt(ep.name, attempt, outcome, elapsed)

    async def post(
        self,
        endpoint: EndpointSettings,
        body: bytes | BodySource,
        *,
        webhook_id: str,
        # The retry decision needs the budget up front, which a caller's asyncio.timeout hides.
        timeout: float | None = None,
    ) -> WebhookResponse:
        """POST ``body`` (encoded JSON) to ``endpoint``; see the module docstring for the rules.

        ``timeout`` overrides ``endpoint.timeout`` as the whole budget in seconds (e.g. what
        is left of a phase). Raises a ``WebhookError``; cancellation propagates unchanged.
        """
        if self._pool is None:
            raise RuntimeError("WebhookClient.start() has not been called")
        try:
            ep = self._endpoint(endpoint)
        except (ValueError, OSError) as exc:
            # Settings the config check should have refused (bad secret, unreadable TLS file):
            # fail this call through on_error instead of breaking the caller.
            raise WebhookError(f"cannot prepare the endpoint: {exc}", endpoint=endpoint.name) from None
        budget = endpoint.timeout if timeout is None else timeout
        if budget <= 0:
            # Nothing left of the caller's phase: not the endpoint's fault, so no breaker count.
            raise WebhookTimeoutError("no time left for the call", timeout=budget, endpoint=ep.name, url=ep.safe_url)
        breaker = ep.breaker
        ticket = breaker.allow()
        if not ticket:
            self._observe(ep, 0, AttemptOutcome.BREAKER_OPEN, 0.0)
            raise WebhookBreakerOpenError("circuit breaker is open; not called", endpoint=ep.name, url=ep.safe_url)
        try:
            response = await self._call(self._pool, ep, body, webhook_id, budget)
        except WebhookError as exc:
            if exc.endpoint_failure:
                breaker.record_failure(ticket)
            else:
                breaker.release(ticket)
            raise
        except BaseException:
            breaker.release(ticket)  # cancelled: says nothing about the endpoint
            raise
        breaker.record_success(ticket)
        return response

    async def _call(
        self, pool: HttpPool, ep: _Endpoint, body: bytes | BodySource, webhook_id: str, budget: float
    ) -> WebhookResponse:
        loop = asyncio.get_running_loop()
        started = attempt_started = loop.time()
        deadline = started + budget
        attempt = 0
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                while True:
                    attempt += 1
                    attempt_started = loop.time()
                    try:
                        status, data = await self._attempt(pool, ep, body, webhook_id)
                    except WebhookError as exc:
                        now = loop.time()
                        self._observe(ep, attempt, exc.outcome, now - attempt_started)
                        if exc.retryable and attempt == 1 and ep.settings.retry and deadline - now > _MIN_RETRY_BUDGET:
                            continue
                        exc.attempts = attempt
                        raise
                    now = loop.time()
                    self._observe(ep, attempt, AttemptOutcome.OK, now - attempt_started)
                    return WebhookResponse(status=status, body=data, attempts=attempt, elapsed=now - started)
        except TimeoutError as exc:
            if isinstance(exc, WebhookError) or not scope.expired():
                raise
            self._observe(ep, attempt, AttemptOutcome.TIMEOUT, loop.time() - attempt_started)
            raise WebhookTimeoutError(
                f"no answer within {budget:g} s",
                timeout=budget,
                endpoint=ep.name,
                url=ep.safe_url,
                attempts=attempt,
            ) from None
        except asyncio.CancelledError:
            self._observe(ep, attempt, AttemptOutcome.CANCELLED, loop.time() - attempt_started)
            raise

    async def _attempt(
        self, pool: HttpPool, ep: _Endpoint, body: bytes | BodySource, webhook_id: str
    ) -> tuple[int, bytes]:
        """One HTTP request: (status, body) for 200/204; otherwise a ``WebhookError``."""
        try:
            if isinstance(body, bytes) or ep.signer is None:
                head = ep.head_for(webhook_id, body)
            else:
                # Signing a streamed body reads and hashes all of it (a large message at eom):
                # do it off the event loop so other sessions are not stalled meanwhile.
                head = await asyncio.to_thread(ep.head_for, webhook_id, body)
            response = await pool.request(
                ep.origin,
                head,
                body if isinstance(body, bytes) else body.chunks,
                max_body_bytes=ep.settings.max_response_bytes,
                max_error_body_bytes=_DRAIN_ERROR_BODY_BYTES,
            )
        except HttpTooLargeError:
            raise _too_large(ep, ep.settings.max_response_bytes) from None
        except HttpTlsError as exc:
            raise WebhookTlsError(str(exc), endpoint=ep.name, url=ep.safe_url) from None
        except (HttpConnectError, HttpDisconnectedError) as exc:
            raise WebhookConnectionError(str(exc), endpoint=ep.name, url=ep.safe_url, retryable=True) from None
        except HttpError as exc:
            # A malformed or unsupported answer: retrying would most likely see it again.
            raise WebhookConnectionError(str(exc), endpoint=ep.name, url=ep.safe_url) from None
        except SpoolError:
            raise
        except OSError as exc:
            # Reading a spooled body failed (the request was cut off with its connection): the
            # bridge's fault, not the endpoint's, so it is no WebhookError: the breaker does not
            # count it and the dispatcher tempfails the message whatever on_error says.
            raise SpoolError(f"cannot read the message body: {describe_os_error(exc)}") from None
        status = response.status
        if status in _SUCCESS_STATUSES:
            return status, response.body if status == 200 else b""
        if 300 <= status < 400:
            location = response.location
            raise WebhookRedirectError(
                f"answered {status} (redirects are not followed)",
                status=status,
                location=redact_url(location) if location else None,
                endpoint=ep.name,
                url=ep.safe_url,
            )
        raise WebhookStatusError(
            f"answered {status}",
            status=status,
            endpoint=ep.name,
            url=ep.safe_url,
            retryable=status in RETRY_STATUSES,
        )


def _breaker_settings(settings: EndpointSettings) -> tuple[float, int, float, float, float]:
    return (
        settings.breaker_failure_rate,
        settings.breaker_min_calls,
        settings.breaker_window,
        settings.breaker_probe,
        settings.breaker_reset,
    )


def _too_large(ep: _Endpoint, max_bytes: int) -> WebhookResponseTooLargeError:
    return WebhookResponseTooLargeError(
        f"response body larger than {max_bytes} bytes", max_bytes=max_bytes, endpoint=ep.name, url=ep.safe_url
    )
