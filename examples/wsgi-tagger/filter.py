"""Example filter as a plain WSGI app (milterbridge.sdk's Filter, no framework): tag and archive.

At ``eom`` it adds ``X-Filtered-By: wsgi-tagger`` and a header with the
number of recipients, and adds an archive copy recipient with
``NOTIFY=NEVER`` for mail from the domain ARCHIVE_DOMAIN. Any other event:
continue.

FILTER_SECRET must hold the endpoint's ``whsec_`` secret (two, space-separated,
during a key rotation); without it the filter does not start. A request that is
unsigned, badly signed, stale or replayed gets a 401 and the bridge applies the
endpoint's ``on_error``. Serve ``make_app(secrets)`` with any WSGI server; for a try:
``FILTER_SECRET=whsec_... python filter.py --port 8081`` (wsgiref).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import make_server

from milterbridge import sdk

ARCHIVE_DOMAIN = "example.com"
ARCHIVE_ADDRESS = "archive@example.com"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def decide(request: sdk.Request) -> sdk.Decision:
    """The decision for one webhook request."""
    if not isinstance(request, sdk.EomRequest) or request.message is None:
        return sdk.continue_()
    message = request.message
    mods = [
        sdk.add_header("X-Filtered-By", "wsgi-tagger"),
        sdk.add_header("X-Recipient-Count", str(len(message.rcpt_to))),
    ]
    if message.mail_from.address.lower().endswith("@" + ARCHIVE_DOMAIN):
        mods.append(sdk.add_rcpt(ARCHIVE_ADDRESS, ["NOTIFY=NEVER"]))
    return sdk.continue_(modifications=mods)


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    """The request's HTTP headers, lower-case names (``HTTP_WEBHOOK_ID`` -> ``webhook-id``)."""
    return {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}


def make_app(secrets: Sequence[str]) -> WsgiApp:
    """The filter as a WSGI application verifying every request with ``secrets`` (``whsec_...``)."""
    if not secrets:
        raise ValueError("no secret given: every request must be verified")
    filter_ = sdk.Filter(decide, secrets=secrets)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "POST":
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain")])
            return [b"POST only\n"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        status, body = filter_.handle(environ["wsgi.input"].read(length), _headers(environ))
        content_type = "application/json" if status == 200 else "text/plain"
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [("Content-Type", content_type), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8081")))
    args = parser.parse_args()
    secrets = os.environ.get("FILTER_SECRET", "").split()
    if not secrets:
        parser.error("set FILTER_SECRET to the endpoint's whsec_ secret (two, space-separated, during a rotation)")
    with make_server(args.host, args.port, make_app(secrets)) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
