"""The trivial webhook endpoint the bridge calls during the benchmark (its own process).

It reads and parses every request, as any real endpoint would, and answers
``{"action": "continue"}``, adding the bench header at ``eom``. Keep-alive
connections and no access log, so what is measured is the bridge, not this.

    python -m bench.endpoint --port 9900
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

import orjson
from aiohttp import web

from bench import eventloop
from bench.profiles import BENCH_HEADER_NAME, BENCH_HEADER_VALUE

HOOK_PATH = "/hook"

_CONTINUE = orjson.dumps({"action": "continue"})
_EOM = orjson.dumps(
    {
        "action": "continue",
        "modifications": [{"op": "add_header", "name": BENCH_HEADER_NAME, "value": BENCH_HEADER_VALUE}],
    }
)


def build_handler(counts: dict[str, int]) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    """The endpoint as a handler of aiohttp's low-level server: POST /hook answers, GET /stats shows ``counts``.

    The low-level server (``web.Server``) skips the application's router, middlewares and
    signals: a trivial filter needs none of them, and the core this runs on is shared with
    the load generator, so what it saves goes into the load.
    """

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.method == "POST" and request.path == HOOK_PATH:
            # content.read() has no size cap (a 50 MiB body arrives base64 in JSON).
            payload = orjson.loads(await request.content.read())
            event = payload.get("event", "?") if isinstance(payload, dict) else "?"
            counts[event] = counts.get(event, 0) + 1
            return web.Response(body=_EOM if event == "eom" else _CONTINUE, content_type="application/json")
        if request.method == "GET" and request.path == "/stats":
            return web.Response(body=orjson.dumps(counts), content_type="application/json")
        return web.Response(status=404)

    return handle


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = web.Server(build_handler({}), access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, host, port, backlog=1024)
    print("ready", f"http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        await server.shutdown(1.0)
        await listener.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.endpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    eventloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
