"""Example filter (aiohttp): a recipient allowlist and a spam-keyword tagger.

Subscribe it to ``rcpt`` and ``eom``:

* at ``rcpt`` a recipient outside ALLOWED_DOMAINS is refused with 550 5.7.1
  (only that recipient; the others go on);
* at ``eom`` the subject and body are searched for SPAM_WORDS; a hit adds
  ``X-Spam-Flag: YES`` and ``X-Spam-Words`` and, with three hits or more,
  the message is quarantined.

Requests are verified with the Standard Webhooks signature when the
environment variable FILTER_SECRET holds the endpoint's ``whsec_`` secret.

Run: ``python filter.py --port 8080`` and point an endpoint at
``http://127.0.0.1:8080/milter``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
from typing import Any

from aiohttp import web

ALLOWED_DOMAINS = {"example.com", "example.net"}
SPAM_WORDS = ("viagra", "lottery", "winner", "crypto giveaway")


def verify(secret: str, headers: Any, body: bytes) -> bool:
    """Check the webhook-signature header (Standard Webhooks v1)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(sig.partition(",")[2], expected) for sig in headers.get("webhook-signature", "").split()
    )


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
            return web.Response(status=401, text="bad signature")
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
