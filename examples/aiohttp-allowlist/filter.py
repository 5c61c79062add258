"""Example filter (milterbridge.sdk on aiohttp): a recipient allowlist and a spam-keyword tagger.

Subscribe it to ``rcpt`` and ``eom`` (with ``include_body = true``):

* at ``rcpt`` a recipient outside ALLOWED_DOMAINS is refused with 550 5.7.1
  (only that recipient; the others go on);
* at ``eom`` the subject and body are searched for SPAM_WORDS; a hit adds
  ``X-Spam-Flag: YES`` and ``X-Spam-Words`` and, with three hits or more,
  the message is quarantined.

The environment variable FILTER_SECRET must hold the endpoint's ``whsec_`` secret
(two, space-separated, during a key rotation); without it the filter does not start.
Every request must carry a valid Standard Webhooks signature over a
``webhook-timestamp`` at most five minutes away from this machine's clock, and a
webhook-id is accepted once; anything else (unsigned, badly signed, or an old request
replayed) gets a 401, which the bridge counts as a failure of the endpoint (its
``on_error`` applies).

Run: ``FILTER_SECRET=whsec_... python filter.py --port 8080`` and point an endpoint at
``http://127.0.0.1:8080/milter``.
"""

from __future__ import annotations

import argparse
import os

from aiohttp import web

from milterbridge import sdk

ALLOWED_DOMAINS = {"example.com", "example.net"}
SPAM_WORDS = ("viagra", "lottery", "winner", "crypto giveaway")


def decide(request: sdk.Request) -> sdk.Decision:
    """The decision for one webhook request."""
    if isinstance(request, sdk.RcptRequest):
        domain = request.data.address.rpartition("@")[2].lower()
        if domain not in ALLOWED_DOMAINS:
            return sdk.reject(550, "5.7.1", f"relaying to {domain} is not allowed")
        return sdk.continue_()
    if isinstance(request, sdk.EomRequest) and request.message is not None:
        message = request.message
        text = " ".join(h.value for h in message.headers if h.name.lower() == "subject")
        if message.body is not None:
            text += " " + message.body.bytes.decode("utf-8", "replace")
        hits = [word for word in SPAM_WORDS if word in text.lower()]
        if not hits:
            return sdk.continue_()
        tags = [sdk.add_header("X-Spam-Flag", "YES"), sdk.add_header("X-Spam-Words", ", ".join(hits))]
        if len(hits) >= 3:
            return sdk.quarantine(f"spam words: {', '.join(hits)}", modifications=tags)
        return sdk.continue_(modifications=tags)
    return sdk.continue_()


def make_app(secret: str) -> web.Application:
    """The filter on ``POST /milter``, verifying with ``secret`` (``whsec_...``, space-separated for several)."""
    secrets = secret.split()
    if not secrets:
        raise ValueError("no secret given: every request must be verified")
    return sdk.make_app(decide, secrets=secrets, path="/milter")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args()
    secret = os.environ.get("FILTER_SECRET", "")
    if not secret.split():
        parser.error("set FILTER_SECRET to the endpoint's whsec_ secret (two, space-separated, during a rotation)")
    web.run_app(make_app(secret), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
