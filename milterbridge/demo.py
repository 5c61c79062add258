"""The built-in demo: a small filter service, run in-process by ``milterbridge serve`` without a config.

The filter answers the webhook contract like any real one would:

* at ``rcpt`` it refuses the recipient ``blocked@example.com`` (550 5.7.1);
* at ``eom`` it tags every message with ``X-Milterbridge-Demo: tagged`` and,
  when the subject contains "spam", adds ``X-Spam-Flag: YES`` and prefixes
  the subject with ``[SPAM]``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from milterbridge.config import AdminSettings, Config, EndpointSettings, ServerSettings
from milterbridge.milter.constants import Event

DEMO_MILTER = "inet:127.0.0.1:8890"
DEMO_ADMIN = "127.0.0.1:8891"
DEMO_FILTER_HOST = "127.0.0.1"
DEMO_FILTER_PORT = 8892
BLOCKED_RECIPIENT = "blocked@example.com"


def demo_config(filter_url: str, milter: str = DEMO_MILTER, admin: str = DEMO_ADMIN) -> Config:
    """The demo's configuration: one enforcing endpoint at ``filter_url``."""
    return Config(
        server=ServerSettings(listen=(milter,)),
        admin=AdminSettings(listen=admin),
        endpoints=(
            EndpointSettings(
                name="demo",
                url=filter_url,
                events=frozenset({Event.RCPT, Event.EOM}),
                timeout=5.0,
            ),
        ),
    )


def decide(request: dict[str, Any]) -> dict[str, Any]:
    """The demo filter's decision for one webhook request."""
    event = request.get("event")
    if event == "rcpt":
        address = str(request["data"].get("address", "")).lower()
        if address == BLOCKED_RECIPIENT:
            return {
                "action": "reject",
                "reply": {"code": 550, "enhanced": "5.7.1", "text": f"<{address}> is blocked by the demo filter"},
            }
        return {"action": "continue"}
    if event == "eom":
        mods: list[dict[str, Any]] = [{"op": "add_header", "name": "X-Milterbridge-Demo", "value": "tagged"}]
        headers = (request.get("message") or {}).get("headers", [])
        subjects = [(n, h) for n, h in enumerate(headers) if h["name"].lower() == "subject"]
        if subjects and "spam" in subjects[0][1]["value"].lower():
            value = subjects[0][1]["value"].strip()
            mods.append({"op": "add_header", "name": "X-Spam-Flag", "value": "YES"})
            mods.append({"op": "change_header", "name": "Subject", "index": 1, "value": f"[SPAM] {value}"})
        return {"action": "continue", "modifications": mods}
    return {"action": "continue"}


def filter_app() -> web.Application:
    """The demo filter as an aiohttp application (POST /milter)."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(decide(await request.json()))

    app = web.Application()
    app.router.add_post("/milter", handle)
    return app


class DemoFilter:
    """The demo filter service on loopback, started inside the bridge's loop."""

    def __init__(self, host: str = DEMO_FILTER_HOST, port: int = DEMO_FILTER_PORT) -> None:
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/milter"

    async def start(self) -> None:
        self._runner = web.AppRunner(filter_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def banner(milter: str, admin: str) -> str:
    """How to try the demo, printed at start."""
    return f"""\
milterbridge demo: no config given, so a demo filter runs in-process.
  milter listener : {milter}
  admin (metrics) : http://{admin}/metrics
  demo filter     : tags every message with X-Milterbridge-Demo, marks subjects with "spam",
                    and refuses the recipient {BLOCKED_RECIPIENT}
Try it from another terminal:
  printf 'Subject: spam offer\\r\\n\\r\\nhello\\r\\n' > /tmp/demo.eml
  milterbridge send /tmp/demo.eml --milter {milter} --rcpt alice@example.com --rcpt {BLOCKED_RECIPIENT}
Or point Postfix at it (main.cf):
  smtpd_milters = {milter}
  milter_default_action = tempfail
"""
