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
from collections.abc import Sequence

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
#: Requests answered so far, per event name.
COUNTS = web.AppKey("counts", dict[str, int])


def build_app() -> web.Application:
    """The endpoint app: POST /hook answers, GET /stats shows ``app[COUNTS]``."""
    counts: dict[str, int] = {}

    async def hook(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        event = payload.get("event", "?") if isinstance(payload, dict) else "?"
        counts[event] = counts.get(event, 0) + 1
        body = _EOM if event == "eom" else _CONTINUE
        return web.Response(body=body, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=256 * 1024 * 1024)  # a 50 MiB body arrives base64 in JSON
    app[COUNTS] = counts
    app.router.add_post(HOOK_PATH, hook)
    app.router.add_get("/stats", stats)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(build_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print("ready", site.name, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.endpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    eventloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
