"""Example filter (aiohttp): a recipient allowlist and a spam-keyword tagger.

Subscribe it to ``rcpt`` and ``eom``:

* at ``rcpt`` a recipient outside ALLOWED_DOMAINS is refused with 550 5.7.1
  (only that recipient; the others go on);
* at ``eom`` the subject and body are searched for SPAM_WORDS; a hit adds
  ``X-Spam-Flag: YES`` and ``X-Spam-Words`` and, with three hits or more,
  the message is quarantined.

When the environment variable FILTER_SECRET holds the endpoint's ``whsec_``
secret, every request must carry a valid Standard Webhooks signature over a
``webhook-timestamp`` at most five minutes away from this machine's clock;
anything else (unsigned, badly signed, or an old request replayed) gets a 401,
which the bridge counts as a failure of the endpoint (its ``on_error`` applies).

Run: ``python filter.py --port 8080`` and point an endpoint at
``http://127.0.0.1:8080/milter``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

ALLOWED_DOMAINS = {"example.com", "example.net"}
SPAM_WORDS = ("viagra", "lottery", "winner", "crypto giveaway")
#: A signed request older (or newer) than this is refused, so a captured one cannot be replayed later.
TIMESTAMP_TOLERANCE = 5 * 60


def verify(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Check the Standard Webhooks v1 headers: a recent timestamp and a signature by ``secret``."""
    webhook_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "").split()
    if not webhook_id or not signatures or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(time.time() - int(timestamp)) > TIMESTAMP_TOLERANCE:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = b"v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    # Several signatures arrive during a key rotation; one by our key is enough. Compared as
    # bytes: compare_digest refuses str with non-ASCII characters, which a header may hold.
    return any(hmac.compare_digest(sig.encode(errors="replace"), expected) for sig in signatures)


def decide(request: dict[str, Any]) -> dict[str, Any]:
    """The decision for one webhook request."""
    if request["event"] == "rcpt":
        address = request["data"]["address"]
        domain = address.rpartition("@")[2].lower()
        if domain not in ALLOWED_DOMAINS:
            return {
                "action": "reject",
                "reply": {"code": 550, "enhanced": "5.7.1", "text": f"relaying to {domain} is not allowed"},
            }
        return {"action": "continue"}
    if request["event"] == "eom":
        message = request["message"]
        text = " ".join(h["value"] for h in message["headers"] if h["name"].lower() == "subject")
        body = message.get("body")
        if body:
            text += " " + base64.b64decode(body["base64"]).decode("utf-8", "replace")
        hits = [word for word in SPAM_WORDS if word in text.lower()]
        if not hits:
            return {"action": "continue"}
        decision: dict[str, Any] = {
            "action": "continue",
            "modifications": [
                {"op": "add_header", "name": "X-Spam-Flag", "value": "YES"},
                {"op": "add_header", "name": "X-Spam-Words", "value": ", ".join(hits)},
            ],
        }
        if len(hits) >= 3:
            decision["action"] = "quarantine"
            decision["reason"] = f"spam words: {', '.join(hits)}"
        return decision
    return {"action": "continue"}


def make_app(secret: str | None = None) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        if secret and not verify(secret, request.headers, raw):
            return web.Response(status=401, text="missing, bad or expired signature")
        return web.json_response(decide(await request.json()))

    app = web.Application()
    app.router.add_post("/milter", handle)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    web.run_app(make_app(os.environ.get("FILTER_SECRET")), host=args.host, port=args.port)
