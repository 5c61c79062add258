"""Standard Webhooks v1 signatures (the ``webhook-signature`` header, design.md §3.2).

The signed content is ``f"{id}.{timestamp}."`` followed by the exact body bytes; the key is
the base64 text after ``whsec_``. During key rotation an endpoint has several secrets and the
header carries one ``v1,<base64>`` signature per secret, space separated, so a receiver that
knows either key accepts the call.

``Signer`` decodes the keys once; ``sign`` and ``verify`` are conveniences for one-off use
(tests, examples). Secrets never appear in messages or reprs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable, Sequence

__all__ = ["SECRET_PREFIX", "DEFAULT_TOLERANCE", "Signer", "sign", "verify"]

SECRET_PREFIX = "whsec_"
#: Seconds a received timestamp may differ from now (the Standard Webhooks reference value).
DEFAULT_TOLERANCE = 300.0


def _decode_secret(secret: str, position: int) -> bytes:
    text = secret.removeprefix(SECRET_PREFIX)
    # Some issuers drop the base64 padding; the reference libraries accept that, so do we.
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # The secret itself must never reach a log line, so only its position is named.
        raise ValueError(f"webhook secret #{position + 1} is not valid base64") from None
    if not key:
        raise ValueError(f"webhook secret #{position + 1} is empty")
    return key


class Signer:
    """Signs (and verifies) Standard Webhooks v1 signatures with pre-decoded keys."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Iterable[str]) -> None:
        """Decode ``secrets`` (``"whsec_<base64>"``; the prefix is optional) once.

        Raises ``ValueError`` when there is no secret or one does not decode.
        """
        self._keys = tuple(_decode_secret(secret, i) for i, secret in enumerate(secrets))
        if not self._keys:
            raise ValueError("at least one webhook secret is needed to sign")

    def __repr__(self) -> str:
        return f"Signer(<{len(self._keys)} key(s)>)"

    def _digests(self, msg_id: str, timestamp: int, body: bytes | Iterable[bytes]) -> list[bytes]:
        prefix = f"{msg_id}.{timestamp}.".encode()
        # update() per piece instead of prefix + body: bodies can carry a whole message at
        # eom (even streamed from disk), and concatenation would copy it once per key.
        macs = [hmac.new(key, prefix, hashlib.sha256) for key in self._keys]
        for piece in (body,) if isinstance(body, bytes | bytearray) else body:
            for mac in macs:
                mac.update(piece)
        return [mac.digest() for mac in macs]

    def sign(self, msg_id: str, timestamp: int, body: bytes | Iterable[bytes]) -> str:
        """Return the ``webhook-signature`` header value for one request."""
        return " ".join("v1," + base64.b64encode(d).decode("ascii") for d in self._digests(msg_id, timestamp, body))

    def verify(
        self,
        msg_id: str,
        timestamp: int | str,
        body: bytes,
        signature: str,
        *,
        tolerance: float | None = DEFAULT_TOLERANCE,
        now: float | None = None,
    ) -> bool:
        """Whether ``signature`` (a header value) holds a v1 signature by one of our keys.

        ``timestamp`` is the ``webhook-timestamp`` value; with a ``tolerance`` (seconds) a
        timestamp further than that from ``now`` (default: the wall clock) fails, which is
        what stops replays. Unknown versions and malformed entries are skipped.
        """
        try:
            ts = int(timestamp)
        except ValueError:
            return False
        if tolerance is not None:
            current = time.time() if now is None else now
            if abs(current - ts) > tolerance:
                return False
        offered: list[bytes] = []
        for entry in signature.split():
            version, _, encoded = entry.partition(",")
            if version != "v1":
                continue
            try:
                offered.append(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError):
                continue
        expected = self._digests(msg_id, ts, body)
        return any(hmac.compare_digest(e, o) for e in expected for o in offered)


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` value for ``body`` (one ``v1,`` entry per secret)."""
    return Signer(secrets).sign(msg_id, timestamp, body)


def verify(
    secrets: Sequence[str],
    msg_id: str,
    timestamp: int | str,
    body: bytes,
    signature: str,
    *,
    tolerance: float | None = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether ``signature`` was made by any of ``secrets``; see ``Signer.verify``."""
    return Signer(secrets).verify(msg_id, timestamp, body, signature, tolerance=tolerance, now=now)
