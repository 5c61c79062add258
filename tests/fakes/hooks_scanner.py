"""An MTA Hooks scanner, written from the text of draft-degennaro-mta-hooks-01 alone.

It serves what -01 has a scanner serve, on 127.0.0.1:

- ``GET /.well-known/mta-hooks``: the discovery document (unauthenticated);
- ``POST /v1/hooks/register``: registration, with a bearer token; ``201`` and ``Location``;
- ``GET /v1/hooks/register/{id}``: the registration's status;
- ``DELETE /v1/hooks/register/{id}``: deregistration;
- ``POST /v1/hooks/invoke/{id}``: the hook endpoint. Every call must carry the token,
  ``X-MTA-Hooks-Registration`` naming the registration the endpoint belongs to and an
  ``X-MTA-Hooks-Request-Id`` of at most 128 unreserved characters; the body must hold only
  the negotiated properties.

``answer`` decides each hook call: a function of the request body returning the answer body
(None for ``204``), or a ``(status, body)`` pair. ``forget()`` drops every registration, as a
restarted scanner would, so that hook calls get ``404 REGISTRATION_NOT_FOUND``.
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

TOKEN = "scanner-token-for-tests"
STAGES = ["connect", "ehlo", "mail", "rcpt", "data"]
PROPERTIES = [
    "/stage", "/action", "/timestamp", "/protocol", "/envelope", "/client", "/queue",
    "/tls", "/auth", "/server", "/message", "/rawMessage",
]  # fmt: skip
_REQUEST_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")

Answer = Callable[[dict[str, Any]], "dict[str, Any] | tuple[int, dict[str, Any] | None] | None"]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _stamp(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class ScannerRegistration:
    id: str
    name: str
    stages: list[str]
    properties: list[str]
    expires_at: datetime.datetime
    active: bool = True
    calls: list[dict[str, Any]] = field(default_factory=list)


class HooksScanner:
    """The scanner; ``async with HooksScanner() as scanner`` serves it."""

    def __init__(self, *, ttl: float = 3600.0, answer: Answer | None = None, properties: list[str] | None = None):
        self.ttl = ttl
        self.answer: Answer = answer or (lambda request: None)
        #: The properties this scanner agrees to (a subset of what is asked, like a real one narrowing it).
        self.supported = properties or PROPERTIES
        self.registrations: dict[str, ScannerRegistration] = {}
        self.deregistered: list[str] = []
        #: Every hook call: (registration id, request id, body).
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        #: Problems found in what the MTA sent (a test asserts this stays empty).
        self.violations: list[str] = []
        self._server: TestServer | None = None

    async def __aenter__(self) -> HooksScanner:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/.well-known/mta-hooks", self._discovery)
        app.router.add_post("/v1/hooks/register", self._register)
        app.router.add_get("/v1/hooks/register/{id}", self._status)
        app.router.add_delete("/v1/hooks/register/{id}", self._deregister)
        app.router.add_post("/v1/hooks/invoke/{id}", self._invoke)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server(shutdown_timeout=0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.close()

    def url(self, path: str = "/.well-known/mta-hooks") -> str:
        assert self._server is not None
        return str(self._server.make_url(path))

    def forget(self) -> None:
        self.registrations.clear()

    def active(self) -> list[ScannerRegistration]:
        return [r for r in self.registrations.values() if r.active]

    # -- handlers -----------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def _discovery(self, request: web.Request) -> web.Response:
        inbound = {
            "stages": STAGES,
            "actions": ["accept", "reject", "discard", "quarantine", "disconnect"],
            "fetchProperties": self.supported,
            "updateProperties": ["/action", "/response", "/message/headers", "/envelope/from", "/envelope/to",
                                 "/rawMessage"],
        }  # fmt: skip
        return web.json_response(
            {
                "version": "1.0",
                "endpoints": {
                    "registration": "/v1/hooks/register",
                    "deregistration": "/v1/hooks/register/{registration_id}",
                },
                "serialization": ["json"],
                "capabilities": {"inbound": inbound, "outbound": None},
                "limits": {"maxMessageSize": 50 * 1024 * 1024, "maxRegistrations": 16, "timeoutMs": 30000},
                "extensions": None,
            }
        )

    async def _register(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "INVALID_CREDENTIALS", "missing or wrong bearer token")
        body = await request.json()
        inbound = body.get("inbound")
        if body.get("serialization") != "json" or not isinstance(inbound, dict):
            return _error(400, "INVALID_REQUEST", "json and inbound hooks only")
        stages = inbound.get("stages") or []
        if not stages:
            return _error(400, "NO_STAGES_REQUESTED", "no stages")
        if any(stage not in STAGES for stage in stages):
            return _error(400, "INVALID_STAGE", f"unknown stage in {stages}")
        asked = inbound.get("properties")
        properties = [p for p in (self.supported if asked is None else asked) if p in self.supported]
        registration = ScannerRegistration(
            id=f"reg_{uuid.uuid4().hex}",
            name=str(body.get("name")),
            stages=stages,
            properties=properties,
            expires_at=_now() + datetime.timedelta(seconds=self.ttl),
        )
        self.registrations[registration.id] = registration
        here = f"/v1/hooks/register/{registration.id}"
        answer = {
            "registrationId": registration.id,
            "status": "active",
            "createdAt": _stamp(_now()),
            "expiresAt": _stamp(registration.expires_at),
            "hookEndpoint": f"/v1/hooks/invoke/{registration.id}",
            "negotiated": {
                "serialization": "json",
                "inbound": {"stages": stages, "properties": properties},
                "outbound": None,
            },
            "endpoints": {"status": here, "deregistration": here},
        }
        return web.json_response(answer, status=201, headers={"Location": here})

    def _known(self, request: web.Request) -> ScannerRegistration | web.Response:
        if not self._authorized(request):
            return _error(401, "INVALID_CREDENTIALS", "missing or wrong bearer token")
        registration = self.registrations.get(request.match_info["id"])
        if registration is None:
            return _error(404, "REGISTRATION_NOT_FOUND", "no such registration")
        if not registration.active:
            return _error(410, "REGISTRATION_DEREGISTERED", "deregistered")
        return registration

    async def _status(self, request: web.Request) -> web.Response:
        known = self._known(request)
        if isinstance(known, web.Response):
            return known
        return web.json_response({"registrationId": known.id, "status": "active"})

    async def _deregister(self, request: web.Request) -> web.Response:
        known = self._known(request)
        if isinstance(known, web.Response):
            return known
        known.active = False
        self.deregistered.append(known.id)
        return web.json_response(
            {"registrationId": known.id, "status": "deregistered", "deregisteredAt": _stamp(_now())}
        )

    async def _invoke(self, request: web.Request) -> web.Response:
        known = self._known(request)
        if isinstance(known, web.Response):
            return known
        if request.headers.get("X-MTA-Hooks-Registration") != known.id:
            return _error(403, "REGISTRATION_MISMATCH", "X-MTA-Hooks-Registration is not this endpoint's")
        request_id = request.headers.get("X-MTA-Hooks-Request-Id", "")
        if not _REQUEST_ID.fullmatch(request_id):
            return _error(400, "MISSING_REQUEST_ID", "X-MTA-Hooks-Request-Id is missing or malformed")
        body = await request.json()
        extra = sorted(set(body) - {p.removeprefix("/") for p in known.properties})
        if extra:
            self.violations.append(f"properties not negotiated: {extra}")
        if body.get("stage") not in known.stages:
            self.violations.append(f"stage {body.get('stage')!r} not registered")
        self.calls.append((known.id, request_id, body))
        known.calls.append(body)
        answer = self.answer(body)
        status, payload = answer if isinstance(answer, tuple) else (200, answer)
        if payload is None:
            return web.Response(status=204 if status == 200 else status)
        return web.json_response(payload, status=status)
