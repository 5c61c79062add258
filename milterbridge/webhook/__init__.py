"""The HTTP side of milterbridge: signed webhook requests with a budget and a retry.

``WebhookClient`` owns the process's one connection pool (``http``) and posts to endpoints
``prepare_endpoint`` made ready; ``signing`` makes the Standard Webhooks headers; ``errors``
holds the ``WebhookError`` tree; ``breaker`` the circuit breaker that ``milterbridge.endpoint``
keeps per endpoint.
"""

from __future__ import annotations

from milterbridge.webhook.breaker import BreakerState, CircuitBreaker
from milterbridge.webhook.client import (
    RETRY_STATUSES,
    USER_AGENT,
    BodySource,
    PreparedEndpoint,
    WebhookClient,
    WebhookObserver,
    WebhookResponse,
    build_ssl_context,
    prepare_endpoint,
)
from milterbridge.webhook.errors import (
    AttemptOutcome,
    WebhookConnectionError,
    WebhookError,
    WebhookRedirectError,
    WebhookResponseTooLargeError,
    WebhookStatusError,
    WebhookTimeoutError,
    WebhookTlsError,
    redact_url,
)
from milterbridge.webhook.signing import Signer, sign, verify

__all__ = [
    "WebhookClient",
    "WebhookResponse",
    "WebhookObserver",
    "BodySource",
    "PreparedEndpoint",
    "prepare_endpoint",
    "AttemptOutcome",
    "build_ssl_context",
    "USER_AGENT",
    "RETRY_STATUSES",
    "Signer",
    "sign",
    "verify",
    "BreakerState",
    "CircuitBreaker",
    "WebhookError",
    "WebhookTimeoutError",
    "WebhookConnectionError",
    "WebhookTlsError",
    "WebhookStatusError",
    "WebhookRedirectError",
    "WebhookResponseTooLargeError",
    "redact_url",
]
