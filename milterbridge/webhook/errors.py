"""Errors of the webhook client, and the outcome names used for metrics.

Every failure of a webhook request is a ``WebhookError``; the endpoint call step
(``milterbridge.endpoint``) turns any of them into the endpoint's ``on_error`` action
(design.md §3.5). Leaves also inherit a builtin where generic handlers benefit, as aiohttp's
client exceptions do::

    WebhookError
    ├── WebhookTimeoutError            (also TimeoutError)  budget spent, retry included
    ├── WebhookConnectionError         (also ConnectionError) refused, reset, closed mid-body
    │   └── WebhookTlsError            certificate or handshake failure; never retried
    ├── WebhookStatusError             a status other than 200 / 204 (and not 3xx)
    ├── WebhookRedirectError           a 3xx answer; redirects are never followed
    └── WebhookResponseTooLargeError   body over the endpoint's max_response_bytes

The endpoint's circuit breaker counts every one as a failure of the endpoint unless its
``endpoint_failure`` is False: ``WebhookResponseTooLargeError`` (the endpoint answered; the
answer concerns one message), the timeout of a call that had no time left before it
started (the caller's phase ran out) and that of a call that found no free ``max_concurrency``
slot within its budget (raised by ``milterbridge.endpoint``; nothing was sent). Those count
neither way. A spooled body the bridge
cannot read is no ``WebhookError`` at all (``milterbridge.body.SpoolError``).

Messages are safe to log: URLs go through ``redact_url`` (no userinfo, query or fragment),
and no secret or header value ever appears in them. The one piece of a response body they
carry is the start of an error answer's body (``WebhookStatusError``, through
``body_preview``: at most ``STATUS_BODY_BYTES``, control characters escaped), because that is
where a filter says what it disliked ("bad signature").
"""

from __future__ import annotations

import enum
import re
from typing import ClassVar, Final, TypedDict, Unpack
from urllib.parse import urlsplit

__all__ = [
    "AttemptOutcome",
    "WebhookError",
    "WebhookTimeoutError",
    "WebhookConnectionError",
    "WebhookTlsError",
    "WebhookStatusError",
    "WebhookRedirectError",
    "WebhookResponseTooLargeError",
    "STATUS_BODY_BYTES",
    "body_preview",
    "redact_url",
]

#: Bytes of an error answer's body that ``WebhookStatusError`` quotes.
STATUS_BODY_BYTES: Final = 200
#: C0 and C1 control characters and DEL: they would forge or garble log lines.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class AttemptOutcome(enum.StrEnum):
    """How one HTTP attempt or call ended; a bounded metrics label.

    The client reports attempts with the transport and HTTP outcomes; ``invalid_body``,
    ``invalid_decision``, ``breaker_open`` and ``not_registered`` are set by the endpoint call step, which decodes
    and validates answers and keeps the breaker.
    """

    OK = "ok"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TLS_ERROR = "tls_error"
    STATUS_ERROR = "status_error"
    REDIRECT = "redirect"
    TOO_LARGE = "too_large"
    INVALID_BODY = "invalid_body"
    INVALID_DECISION = "invalid_decision"
    BREAKER_OPEN = "breaker_open"
    #: An MTA Hooks endpoint without an active registration: nothing was sent.
    NOT_REGISTERED = "not_registered"
    #: The caller cancelled the call (e.g. the MTA went away); not the endpoint's fault.
    CANCELLED = "cancelled"


def redact_url(url: str) -> str:
    """Return ``url`` without userinfo, query string or fragment, for logs and messages."""
    try:
        parts = urlsplit(url)
        # .hostname lower-cases and drops IPv6 brackets; keep the netloc as written instead,
        # minus everything up to the last "@" (userinfo may itself contain ":").
        netloc = parts.netloc.rpartition("@")[2]
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not netloc:
        return "<invalid url>"
    return f"{parts.scheme}://{netloc}{parts.path}"


def body_preview(body: bytes, limit: int) -> str:
    """The first ``limit`` bytes of ``body`` as text for a log line: UTF-8, with invalid bytes
    and control characters (newlines included) written as ``\\xNN``; ``...`` marks a cut."""
    text = body[:limit].decode("utf-8", "backslashreplace")
    text = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
    return text + "..." if len(body) > limit else text


class _ErrorContext(TypedDict, total=False):
    """The keyword arguments every ``WebhookError`` accepts (see its docstring)."""

    endpoint: str
    url: str
    attempts: int
    retryable: bool


class WebhookError(Exception):
    """Root of the webhook errors: the call to one endpoint failed.

    ``endpoint`` is the configured name, ``url`` the redacted URL, ``attempts`` the number of
    HTTP requests made (0 when none was sent).
    """

    outcome: ClassVar[AttemptOutcome] = AttemptOutcome.CONNECTION_ERROR
    #: Whether the circuit breaker counts this as the endpoint's failure (see the module docstring);
    #: the client sets it False on the instance for a call that had no time left.
    endpoint_failure: bool = True
    #: Whether the client may retry after this error (design.md §3.5); set by the client.
    retryable: bool
    #: The HTTP status of the answer that failed, when the failure is an answer (status, redirect).
    status: int | None

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        url: str = "",
        attempts: int = 0,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.url = url
        self.attempts = attempts
        self.retryable = retryable
        self.status = None

    def __str__(self) -> str:
        message = str(self.args[0]) if self.args else ""
        if self.endpoint:
            where = f"webhook {self.endpoint!r}" + (f" ({self.url})" if self.url else "")
            message = f"{where}: {message}"
        if self.attempts > 1:
            message += f" (after {self.attempts} attempts)"
        return message


class WebhookTimeoutError(WebhookError, TimeoutError):
    """The endpoint did not answer within its budget (retry included)."""

    outcome = AttemptOutcome.TIMEOUT

    def __init__(self, message: str, *, timeout: float, **kwargs: Unpack[_ErrorContext]) -> None:
        super().__init__(message, **kwargs)
        self.timeout = timeout


class WebhookConnectionError(WebhookError, ConnectionError):
    """Connecting, sending or receiving failed (refused, reset, closed mid-response)."""

    outcome = AttemptOutcome.CONNECTION_ERROR


class WebhookTlsError(WebhookConnectionError):
    """The TLS handshake failed (certificate not trusted, wrong host, client cert refused)."""

    outcome = AttemptOutcome.TLS_ERROR


class WebhookStatusError(WebhookError):
    """The endpoint answered with a status other than 200, 204 or a redirect."""

    outcome = AttemptOutcome.STATUS_ERROR

    def __init__(self, message: str, *, status: int, **kwargs: Unpack[_ErrorContext]) -> None:
        super().__init__(message, **kwargs)
        self.status: int = status


class WebhookRedirectError(WebhookError):
    """The endpoint answered 3xx; redirects are never followed (the secret would travel)."""

    outcome = AttemptOutcome.REDIRECT

    def __init__(
        self, message: str, *, status: int, location: str | None = None, **kwargs: Unpack[_ErrorContext]
    ) -> None:
        super().__init__(message, **kwargs)
        self.status: int = status
        #: The redacted Location header, if any.
        self.location = location


class WebhookResponseTooLargeError(WebhookError):
    """The response body exceeded the endpoint's ``max_response_bytes``."""

    outcome = AttemptOutcome.TOO_LARGE
    #: One message's answer was too big; the endpoint itself is up.
    endpoint_failure = False

    def __init__(self, message: str, *, max_bytes: int, **kwargs: Unpack[_ErrorContext]) -> None:
        super().__init__(message, **kwargs)
        self.max_bytes = max_bytes
