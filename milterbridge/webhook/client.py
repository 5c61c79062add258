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
  204, and a 202 "accepted for later" would silently mean "continue". Its message quotes the
  start of the answer's body (``errors.body_preview``). 3xx is a
  ``WebhookRedirectError`` and is never followed (the request carries secrets and tokens).
- The response body is read in chunks up to ``max_response_bytes``; one byte more and the
  connection is closed and ``WebhookResponseTooLargeError`` raised.
- A spooled body that cannot be read fails the call with ``SpoolError``: the bridge's fault,
  so it is no ``WebhookError``.

Per-endpoint work (the request head up to the per-call headers, signer, TLS context, redacted
URL) is done once, by ``prepare_endpoint``, when a config snapshot is built
(``milterbridge.endpoint.build_endpoints``). The client keeps no endpoints and no circuit
breaker: the caller holds both, and only it knows whether an answer was a valid decision
(``WebhookError.endpoint_failure`` tells it which failures are the endpoint's). The HTTP/1.1
exchange itself is ``webhook.http`` (why not aiohttp's client: see there).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self

from yarl import URL

import milterbridge
from milterbridge.body import SpoolError
from milterbridge.config import HTTP_TOKEN, REDACTED, RESERVED_HEADERS, EndpointSettings, TlsSettings
from milterbridge.webhook.errors import (
    STATUS_BODY_BYTES,
    AttemptOutcome,
    WebhookConnectionError,
    WebhookError,
    WebhookRedirectError,
    WebhookResponseTooLargeError,
    WebhookStatusError,
    WebhookTimeoutError,
    WebhookTlsError,
    body_preview,
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
    "BodySource",
    "PreparedEndpoint",
    "WebhookResponse",
    "WebhookObserver",
    "WebhookClient",
    "build_ssl_context",
    "prepare_endpoint",
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
        """One attempt ended. ``attempt`` is 1, or 2 for the retry; ``elapsed`` is the
        seconds this attempt took. Must not raise or block."""


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


#: Header values shorter than this are not scrubbed from quoted error bodies (too common to hide).
_MIN_SCRUBBED: Final = 4


def _scrubbed(text: str, values: Iterable[str]) -> str:
    """``text`` with every header value we sent (and its credentials part) replaced: an error page
    that echoes the request's headers must not put a token into the log."""
    for value in values:
        text = text.replace(value, REDACTED)
        _, _, credentials = value.partition(" ")  # "Bearer <token>", "Basic <base64>"
        if len(credentials) >= _MIN_SCRUBBED:
            text = text.replace(credentials, REDACTED)
    return text


class PreparedEndpoint:
    """What is precomputed for one endpoint: the request head, origin, signer and redacted URL.

    Build it with ``prepare_endpoint``; it does not change afterwards.
    """

    __slots__ = ("head", "name", "origin", "safe_url", "sent_values", "settings", "signer")

    def __init__(self, settings: EndpointSettings, tls: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.name = settings.name
        url = URL(settings.url)
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise ValueError(f"endpoint {self.name!r}: the url must be http:// or https:// with a host")
        self.safe_url = redact_url(settings.url)
        self.origin = Origin(url.raw_host, url.port, tls if url.scheme == "https" else None)
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
        #: Header values this endpoint is sent (tokens, credentials): never quoted back in a log.
        self.sent_values = tuple(
            sorted({value for _, value in extra if len(value) >= _MIN_SCRUBBED}, key=len, reverse=True)
        )
        #: The request head up to the per-attempt headers (webhook-*, Content-Length).
        self.head = b"".join(lines)

    def head_for(self, webhook_id: str, body: bytes | BodySource, extra: bytes = b"") -> bytes:
        """The request head of one attempt; the timestamp is taken now (design.md §3.2).

        ``extra``: header lines of the call (each ending in CRLF), e.g. its trace context.
        """
        timestamp = int(time.time())
        signature = b""
        if self.signer is not None:
            pieces = body if isinstance(body, bytes) else body.chunks()
            signature = b"webhook-signature: %s\r\n" % self.signer.sign(webhook_id, timestamp, pieces).encode("ascii")
        return b"%s%swebhook-id: %s\r\nwebhook-timestamp: %d\r\n%sContent-Length: %d\r\n\r\n" % (
            self.head,
            extra,
            webhook_id.encode("ascii"),
            timestamp,
            signature,
            len(body),
        )


def prepare_endpoint(
    settings: EndpointSettings, ssl_contexts: dict[TlsSettings, ssl.SSLContext] | None = None
) -> PreparedEndpoint:
    """The request state of one endpoint, for ``WebhookClient.post``.

    TLS files are read and secrets decoded here: a bad URL, secret, header or TLS file
    raises ``ValueError`` or ``OSError``. ``ssl_contexts`` is a cache shared while one
    snapshot's endpoints are prepared, so endpoints with equal TLS settings share a context.
    """
    context = None
    tls = settings.tls
    # TLS files are loaded (and so checked) even for an http:// URL, where they go unused.
    if settings.url[:6].lower() == "https:" or tls.ca_file is not None or tls.cert_file is not None:
        if ssl_contexts is None:
            context = build_ssl_context(tls)
        else:
            context = ssl_contexts.get(tls)
            if context is None:
                context = ssl_contexts[tls] = build_ssl_context(tls)
    return PreparedEndpoint(settings, context)


class WebhookClient:
    """Posts webhooks over one long-lived pool of kept-alive connections (``webhook.http``).

    Construct, then ``await start()`` (or ``async with``); ``aclose()`` closes the pool. The
    pool has no size limit (a pool wait would eat the endpoint's budget; the milter
    connections bound the calls in flight). ``keepalive_timeout`` stays under the 5 s idle
    timeout common in web servers so an idle connection is dropped by us before the server
    closes it under a new request.
    """

    def __init__(self, *, keepalive_timeout: float = 4.0, observer: WebhookObserver | None = None) -> None:
        self._keepalive_timeout = keepalive_timeout
        self._observer = observer
        self._pool: HttpPool | None = None

    async def start(self) -> None:
        """Open the pool."""
        if self._pool is None:
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

    def _observe(self, ep: PreparedEndpoint, attempt: int, outcome: AttemptOutcome, elapsed: float) -> None:
        if self._observer is not None:
            self._observer.on_attempt(ep.name, attempt, outcome, elapsed)

    async def post(
        self,
        endpoint: PreparedEndpoint,
        body: bytes | BodySource,
        *,
        webhook_id: str,
        # The retry decision needs the budget up front, which a caller's asyncio.timeout hides.
        timeout: float | None = None,
        headers: bytes = b"",
    ) -> WebhookResponse:
        """POST ``body`` (encoded JSON) to ``endpoint``; see the module docstring for the rules.

        ``timeout`` overrides the endpoint's ``timeout`` as the whole budget in seconds (e.g.
        what is left of a phase). ``headers`` are header lines (each ending in CRLF) sent with
        every attempt of this call, e.g. its ``traceparent``. Raises a ``WebhookError``, or
        ``SpoolError`` when a streamed body cannot be read; cancellation propagates unchanged.
        """
        if self._pool is None:
            raise RuntimeError("WebhookClient.start() has not been called")
        budget = endpoint.settings.timeout if timeout is None else timeout
        if budget <= 0:
            error = WebhookTimeoutError(
                "no time left for the call", timeout=budget, endpoint=endpoint.name, url=endpoint.safe_url
            )
            error.endpoint_failure = False  # the caller's phase ran out, not the endpoint
            raise error
        return await self._call(self._pool, endpoint, body, webhook_id, budget, headers)

    async def _call(
        self,
        pool: HttpPool,
        ep: PreparedEndpoint,
        body: bytes | BodySource,
        webhook_id: str,
        budget: float,
        headers: bytes,
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
                        status, data = await self._attempt(pool, ep, body, webhook_id, headers)
                    except WebhookError as failed:
                        now = loop.time()
                        self._observe(ep, attempt, failed.outcome, now - attempt_started)
                        retry = failed.retryable and attempt == 1 and ep.settings.retry
                        if retry and deadline - now > _MIN_RETRY_BUDGET:
                            continue
                        failed.attempts = attempt
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
        self, pool: HttpPool, ep: PreparedEndpoint, body: bytes | BodySource, webhook_id: str, headers: bytes
    ) -> tuple[int, bytes]:
        """One HTTP request: (status, body) for 200/204; otherwise a ``WebhookError``."""
        try:
            if isinstance(body, bytes) or ep.signer is None:
                head = ep.head_for(webhook_id, body, headers)
            else:
                # Signing a streamed body reads and hashes all of it (a large message at eom):
                # do it off the event loop so other sessions are not stalled meanwhile.
                head = await asyncio.to_thread(ep.head_for, webhook_id, body, headers)
            response = await pool.request(
                ep.origin,
                head,
                body if isinstance(body, bytes) else body.chunks,
                max_body_bytes=ep.settings.max_response_bytes,
                max_error_body_bytes=_DRAIN_ERROR_BODY_BYTES,
            )
        except HttpTooLargeError:
            raise _too_large(ep, ep.settings.max_response_bytes) from None
        except HttpTlsError as tls_error:
            raise WebhookTlsError(str(tls_error), endpoint=ep.name, url=ep.safe_url) from None
        except (HttpConnectError, HttpDisconnectedError) as lost:
            raise WebhookConnectionError(str(lost), endpoint=ep.name, url=ep.safe_url, retryable=True) from None
        except HttpError as bad_answer:
            # A malformed or unsupported answer: retrying would most likely see it again.
            raise WebhookConnectionError(str(bad_answer), endpoint=ep.name, url=ep.safe_url) from None
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
        answer = f"answered {status}"
        if response.body:
            answer = f"{answer}: {_scrubbed(body_preview(response.body, STATUS_BODY_BYTES), ep.sent_values)}"
        raise WebhookStatusError(
            answer,
            status=status,
            endpoint=ep.name,
            url=ep.safe_url,
            retryable=status in RETRY_STATUSES,
        )


def _too_large(ep: PreparedEndpoint, max_bytes: int) -> WebhookResponseTooLargeError:
    return WebhookResponseTooLargeError(
        f"response body larger than {max_bytes} bytes", max_bytes=max_bytes, endpoint=ep.name, url=ep.safe_url
    )
