"""The HTTP side of milterbridge: signed webhook calls with a budget, a retry and a breaker.

``WebhookClient`` owns the process's one connection pool (``http``); ``signing`` makes the
Standard Webhooks headers; ``errors`` holds the ``WebhookError`` tree; ``breaker`` the
per-endpoint circuit breaker.
"""

from __future__ import annotations

from milterbridge.webhook.breaker import BreakerState, CircuitBreaker
from milterbridge.webhook.client import (
    RETRY_STATUSES,
    USER_AGENT,
    WebhookClient,
    WebhookObserver,
    WebhookResponse,
    build_ssl_context,
    decode_json,
)
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
from milterbridge.webhook.signing import Signer, sign, verify

__all__ = [
    "WebhookClient",
    "WebhookResponse",
    "WebhookObserver",
    "AttemptOutcome",
    "decode_json",
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
    "WebhookInvalidBodyError",
    "WebhookBreakerOpenError",
    "redact_url",
]
