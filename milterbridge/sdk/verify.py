"""Standard Webhooks verification for filters: signatures, key rotation, timestamps, replays.

:class:`Verifier` checks the ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
headers of a request against its body with the bridge's own signer
(:mod:`milterbridge.webhook.signing`):

* the signature must be made by one of ``secrets`` (during a key rotation the bridge signs
  with every key of the endpoint, and the filter may know the old key, the new one, or both);
* the timestamp must lie within ``tolerance`` seconds of the filter's clock;
* a webhook-id already accepted is refused while its timestamp is still within the
  tolerance (a replay); older ids are forgotten, since the timestamp check refuses them
  anyway, and at most ``max_ids`` are kept (the ones closest to expiry are dropped first).

The bridge keeps the webhook-id on its one retry (after a connection error, 429, 502, 503
or 504). A retry that follows a request the filter already accepted is refused like a
replay, and the bridge applies the endpoint's ``on_error`` to that call.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Final

from milterbridge.webhook.signing import DEFAULT_TOLERANCE, Signer

__all__ = ["DEFAULT_TOLERANCE", "DEFAULT_MAX_IDS", "SignatureError", "Verifier"]

#: Webhook-ids remembered for replay refusal (about 100 bytes each).
DEFAULT_MAX_IDS: Final = 100_000


class SignatureError(ValueError):
    """A request is not authentic (bad or missing signature, stale timestamp, replay)."""


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        # Plain dicts are case-sensitive; HTTP header names are not.
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if value is None:
        raise SignatureError(f"the {name} header is missing")
    return value


class Verifier:
    """Checks Standard Webhooks v1 signatures and refuses replays; see the module docstring."""

    __slots__ = ("_expiry", "_lock", "_max_ids", "_seen", "_signer", "_tolerance")

    def __init__(
        self, secrets: Sequence[str], tolerance: float = DEFAULT_TOLERANCE, *, max_ids: int = DEFAULT_MAX_IDS
    ) -> None:
        """``secrets`` are ``whsec_<base64>`` keys; raises ``ValueError`` if there is none or one does not decode."""
        if isinstance(secrets, str):
            raise TypeError("secrets is a list of secrets, not one string")
        if tolerance <= 0 or max_ids < 1:
            raise ValueError("tolerance and max_ids must be positive")
        self._signer = Signer(secrets)
        self._tolerance = float(tolerance)
        self._max_ids = max_ids
        #: webhook-id -> the time after which its timestamp is stale.
        self._seen: dict[str, float] = {}
        #: (expiry, webhook-id), a min-heap over ``_seen``.
        self._expiry: list[tuple[float, str]] = []
        #: The replay memory is shared by the threads of a threaded WSGI server.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Verifier({self._signer!r}, tolerance={self._tolerance})"

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> str:
        """Check one request and return its webhook-id; raise :class:`SignatureError` if it is not authentic.

        ``now`` (Unix seconds) defaults to the wall clock. A request that passes is
        remembered, so the same webhook-id is refused from then on while it is fresh.
        """
        msg_id = _header(headers, "webhook-id")
        timestamp = _header(headers, "webhook-timestamp")
        signature = _header(headers, "webhook-signature")
        current = time.time() if now is None else now
        try:
            ts = int(timestamp)
        except ValueError:
            raise SignatureError("the webhook-timestamp header is not a number of seconds") from None
        if abs(current - ts) > self._tolerance:
            raise SignatureError(f"the webhook-timestamp is more than {self._tolerance:g} s from now")
        if not self._signer.verify(msg_id, ts, body, signature, tolerance=None):
            raise SignatureError("no valid signature by a known secret")
        with self._lock:
            self._forget_expired(current)
            if msg_id in self._seen:
                raise SignatureError(f"webhook-id {msg_id!r} was already received (a replay)")
            self._remember(msg_id, ts + self._tolerance)
        return msg_id

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            expiry, msg_id = heapq.heappop(self._expiry)
            if self._seen.get(msg_id) == expiry:
                del self._seen[msg_id]

    def _remember(self, msg_id: str, expiry: float) -> None:
        while len(self._seen) >= self._max_ids:
            old_expiry, old_id = heapq.heappop(self._expiry)
            if self._seen.get(old_id) == old_expiry:
                del self._seen[old_id]
        self._seen[msg_id] = expiry
        heapq.heappush(self._expiry, (expiry, msg_id))
