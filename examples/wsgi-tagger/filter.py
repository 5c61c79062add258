"""Example filter as a plain WSGI app (standard library only): tag and archive.

At ``eom`` it adds ``X-Filtered-By: wsgi-tagger`` and a header with the
number of recipients, and adds an archive copy recipient with
``NOTIFY=NEVER`` for mail from the domain ARCHIVE_DOMAIN. Any other event:
continue. Serve it with any WSGI server; for a try:
``python filter.py --port 8081`` (wsgiref).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

ARCHIVE_DOMAIN = "example.com"
ARCHIVE_ADDRESS = "archive@example.com"


def decide(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("event") != "eom":
        return {"action": "continue"}
    message = request["message"]
    mods: list[dict[str, Any]] = [
        {"op": "add_header", "name": "X-Filtered-By", "value": "wsgi-tagger"},
        {"op": "add_header", "name": "X-Recipient-Count", "value": str(len(message["rcpt_to"]))},
    ]
    if message["mail_from"]["address"].lower().endswith("@" + ARCHIVE_DOMAIN):
        mods.append({"op": "add_rcpt", "address": ARCHIVE_ADDRESS, "args": ["NOTIFY=NEVER"]})
    return {"action": "continue", "modifications": mods}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":
        start_response("405 Method Not Allowed", [("Content-Type", "text/plain")])
        return [b"POST only\n"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    request = json.loads(environ["wsgi.input"].read(length))
    body = json.dumps(decide(request)).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    with make_server(args.host, args.port, app) as server:
        server.serve_forever()
