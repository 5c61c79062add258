"""Endpoints that speak MTA Hooks or Stalwart's hook format: their requests, answers and registrations.

A hook endpoint is called like any endpoint (``endpoint.call_endpoint``: budget, retry,
breaker, metrics, ``on_error``); what differs is made here:

- ``hook_call`` encodes the request in the endpoint's format and returns a ``HookCall``: where
  to post it, the headers of the call, and how to turn the answer into the bridge's decision.
- An MTA Hooks endpoint needs a registration with its scanner (``mtahooks.registration``):
  the ``Registrar`` makes, renews and deletes them, one per endpoint and instance, and
  publishes them to the ``HookBook`` each process's calls read. In a single process the
  registrar feeds the book directly; under ``--workers`` a process of its own does, through a
  file in the instance's private directory (``FileHookBook``).

A call to an MTA Hooks endpoint with no active registration sends nothing and fails
(``not_registered``): its ``on_error`` applies, so the gate stays closed while the scanner is
away. A hook call answered 404 or 410 reports the registration gone, and the registrar
registers again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from milterbridge import __version__
from milterbridge import payload as pl
from milterbridge.body import BodyBuffer
from milterbridge.milter.constants import Event
from milterbridge.mtahooks import Before, hook_request, to_decision
from milterbridge.mtahooks.registration import (
    DISCOVERY_PATH,
    Registration,
    RegistrationError,
    discovered_registration_url,
    parse_registration,
    registration_request,
    renew_after,
)
from milterbridge.mtahooks.request import PROPERTIES, STAGES
from milterbridge.mtahooks.stalwart import stalwart_decision, stalwart_request
from milterbridge.settings import EndpointProtocol, EndpointSettings
from milterbridge.webhook.client import PreparedEndpoint, build_ssl_context, prepare_endpoint
from milterbridge.webhook.errors import redact_url

log = logging.getLogger("milterbridge.hooks")

#: Statuses of a hook call that mean the scanner no longer knows the registration (-01).
GONE_STATUSES: Final = frozenset({404, 410})
#: Seconds between two tries to register after a failure: doubled each time, up to the maximum.
RETRY_FIRST: Final = 1.0
RETRY_MAX: Final = 30.0
#: How long the deletion of a registration may take at shutdown or reload (seconds).
DEREGISTER_TIMEOUT: Final = 3.0
#: How often a worker looks at the shared registrations file, and the registrar for reports (seconds).
POLL_INTERVAL: Final = 0.5
#: How long a start waits for the registrations before it serves anyway (seconds).
REGISTRATION_WAIT: Final = 5.0
#: The shared file of registrations, and the prefix of a worker's "gone" reports, in the private directory.
SHARED_FILE: Final = "mta-hooks.json"
GONE_PREFIX: Final = "mta-hooks-gone-"


# -- requests and answers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HookCall:
    """How to make one call to a hook endpoint (``endpoint.call_endpoint`` takes it)."""

    #: Where to post; None when the call cannot be made (``unavailable`` says why).
    http: PreparedEndpoint | None
    #: Header lines (CRLF-terminated) sent with every attempt of the call.
    headers: bytes
    #: The answer, decoded from JSON, to the bridge's decision document (raises ValueError).
    translate: Callable[[object], object]
    #: The registration the call uses, to report it gone (MTA Hooks only).
    registration: str | None = None
    unavailable: str = ""


def wanted_properties(settings: EndpointSettings) -> tuple[str, ...]:
    """The properties an MTA Hooks endpoint asks for: ``properties`` or all, ``/rawMessage`` with include_body."""
    chosen = settings.properties if settings.properties is not None else PROPERTIES
    kept = tuple(p for p in chosen if p != "/rawMessage")
    return (*kept, "/rawMessage") if settings.include_body else kept


def wanted_stages(settings: EndpointSettings) -> tuple[str, ...]:
    """The stages an MTA Hooks endpoint registers for, in the order of ``Event``."""
    return tuple(STAGES[event] for event in Event if event in settings.events)


def _before(request: Mapping[str, Any]) -> Before:
    message = request.get("message") or {}
    headers = tuple((h["name"], h["value"]) for h in message.get("headers") or ())
    rcpts = tuple(r["address"] for r in message.get("rcpt_to") or ())
    return Before(headers, rcpts)


def _with_body(request: pl.JSON, settings: EndpointSettings, body: BodyBuffer | None) -> pl.JSON:
    """The request with its whole body as ``message.body``, when the endpoint has it sent and it fits."""
    if body is None or not settings.include_body:
        return request
    part = pl.BodyPart(body, settings.max_body_bytes, stream=False)
    if part.truncated:  # a cut message is no message: rawMessage and contents stay null
        return request
    return {**request, "message": {**request["message"], "body": part.json()}}


def hook_call(
    request: pl.JSON,
    event: Event,
    endpoint: PreparedEndpoint,
    webhook_id: str,
    body: BodyBuffer | None,
    book: HookBook | None,
) -> tuple[bytes, HookCall]:
    """The encoded request and the ``HookCall`` of one call to a hook endpoint.

    ``webhook_id`` is the call's ``X-MTA-Hooks-Request-Id`` (the same on its retry). Raises
    SpoolError when the body cannot be read.
    """
    settings = endpoint.settings
    ours = _with_body(request, settings, body)
    before = _before(request)
    if settings.protocol is EndpointProtocol.STALWART:
        translate_stalwart: Callable[[object], object] = lambda answer: stalwart_decision(answer, before)  # noqa: E731
        return pl.encode(stalwart_request(ours, event)), HookCall(endpoint, b"", translate_stalwart)
    translate: Callable[[object], object] = lambda answer: to_decision(answer, before)  # noqa: E731
    active = None if book is None else book.get(settings)
    if active is None:
        return b"", HookCall(None, b"", translate, unavailable="not registered with the scanner")
    registration, http = active
    headers = f"X-MTA-Hooks-Registration: {registration.id}\r\nX-MTA-Hooks-Request-Id: {webhook_id}\r\n".encode()
    encoded = pl.encode(hook_request(ours, event, registration.properties))
    return encoded, HookCall(http, headers, translate, registration.id)


# -- registrations, as the calls see them ---------------------------------------------


def fingerprint(settings: EndpointSettings) -> str:
    """What a registration depends on, hashed: a registration is reused only while this stays the same."""
    parts = (
        settings.name,
        settings.url,
        sorted(settings.headers),
        wanted_stages(settings),
        wanted_properties(settings),
        repr(settings.tls),
        settings.allow_insecure_http,
    )
    return hashlib.sha256(orjson.dumps(parts, default=str)).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Published:
    """One endpoint's registration as the registrar publishes it."""

    fingerprint: str
    registration: Registration


class HookBook:
    """The registrations this process's calls use, by endpoint name.

    ``report_gone`` is called when a hook call was answered 404 or 410; the registrar reacts.
    """

    def __init__(self, report_gone: Callable[[str, str], None] = lambda name, registration: None) -> None:
        self._published: dict[str, Published] = {}
        self._report_gone = report_gone
        #: (name, registration id, fingerprint) -> the hook endpoint prepared for calls.
        self._prepared: dict[tuple[str, str, str], PreparedEndpoint] = {}

    def publish(self, published: Mapping[str, Published]) -> None:
        self._published = dict(published)
        live = {(name, p.registration.id, p.fingerprint) for name, p in published.items()}
        self._prepared = {key: value for key, value in self._prepared.items() if key in live}

    def get(self, settings: EndpointSettings) -> tuple[Registration, PreparedEndpoint] | None:
        """The endpoint's active registration and its prepared hook endpoint, or None."""
        published = self._published.get(settings.name)
        if published is None:
            return None
        expected = fingerprint(settings)
        if published.fingerprint != expected:  # made for other settings (a reload on its way)
            return None
        registration = published.registration
        key = (settings.name, registration.id, expected)
        http = self._prepared.get(key)
        if http is None:
            http = self._prepared[key] = prepare_endpoint(dataclasses.replace(settings, url=registration.hook_endpoint))
        return registration, http

    def states(self) -> dict[str, str]:
        return {name: p.registration.id for name, p in self._published.items()}

    def report_gone(self, name: str, registration: str) -> None:
        published = self._published.get(name)
        if published is not None and published.registration.id == registration:
            self._report_gone(name, registration)


def _encode_published(published: Mapping[str, Published]) -> bytes:
    return orjson.dumps(
        {name: {"fingerprint": p.fingerprint, "registration": p.registration.json()} for name, p in published.items()}
    )


def _decode_published(data: bytes) -> dict[str, Published]:
    obj = orjson.loads(data)
    return {
        name: Published(entry["fingerprint"], Registration.from_json(entry["registration"]))
        for name, entry in obj.items()
    }


def write_atomically(path: str, data: bytes) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


class FileHookBook(HookBook):
    """A worker's book under ``--workers``: read from the registrar's file; gone reports written beside it."""

    def __init__(self, directory: str) -> None:
        super().__init__(self._write_gone)
        self.directory = directory
        self.path = os.path.join(directory, SHARED_FILE)
        self._seen: tuple[int, int] | None = None

    def _write_gone(self, name: str, registration: str) -> None:
        with contextlib.suppress(OSError):
            write_atomically(os.path.join(self.directory, GONE_PREFIX + name), registration.encode())

    def refresh(self) -> None:
        """Read the file again if it changed."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return
        seen = (stat.st_mtime_ns, stat.st_ino)
        if seen == self._seen:
            return
        try:
            with open(self.path, "rb") as f:
                self.publish(_decode_published(f.read()))
        except (OSError, ValueError, KeyError, TypeError):
            log.exception("cannot read the shared MTA Hooks registrations %s", self.path)
            return
        self._seen = seen

    async def wait_for(self, names: Iterable[str], timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the file to hold a registration of each of ``names``."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if wanted <= set(self.states()) or time.monotonic() >= deadline:
                return
            await asyncio.sleep(POLL_INTERVAL / 5)

    async def watch(self) -> None:
        """Refresh every ``POLL_INTERVAL`` until cancelled."""
        while True:
            self.refresh()
            await asyncio.sleep(POLL_INTERVAL)


# -- the registrar ----------------------------------------------------------------------


class _Scanner:
    """The registration of one MTA Hooks endpoint, kept up by its own task."""

    def __init__(self, registrar: Registrar, settings: EndpointSettings) -> None:
        self.registrar = registrar
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        self.registration: Registration | None = None
        self.gone = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    @property
    def name(self) -> str:
        return self.settings.name

    async def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                registration = await self.registrar.register(self.settings)
            except (RegistrationError, aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
                log.error(  # noqa: TRY400 - the message says what failed
                    "MTA Hooks endpoint %s: registration failed, trying again in %gs: %s",
                    self.name,
                    delay,
                    exc,
                    extra={"fields": {"endpoint": self.name, "url": redact_url(self.settings.url)}},
                )
                self.registered.set()  # the start waits no longer
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self.registration = registration
            self.gone.clear()
            self.registrar.publish()
            self.registered.set()
            log.info(
                "MTA Hooks endpoint %s: registered as %s",
                self.name,
                registration.id,
                extra={
                    "fields": {
                        "endpoint": self.name,
                        "registration": registration.id,
                        "expires_at": registration.expires_at,
                        "properties": list(registration.properties),
                    }
                },
            )
            wait = renew_after(registration, self.registrar.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.gone.wait()
            if self.gone.is_set():
                log.warning(
                    "MTA Hooks endpoint %s: the scanner no longer knows registration %s; registering again",
                    self.name,
                    registration.id,
                    extra={"fields": {"endpoint": self.name, "registration": registration.id}},
                )
                self.registration = None
                self.registrar.publish()


class Registrar:
    """Keeps one registration per MTA Hooks endpoint of the config, and publishes them.

    ``update`` (at start and at each reload) starts, keeps or ends registrations: an endpoint
    whose settings did not change keeps its registration. ``aclose`` deletes them all.
    """

    def __init__(
        self,
        publish: Callable[[Mapping[str, Published]], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._publish = publish
        self.clock = clock
        self._scanners: dict[str, _Scanner] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ssl: dict[Any, Any] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                headers={"User-Agent": f"milterbridge/{__version__}"},
            )
        return self._session

    def publish(self) -> None:
        self._publish(
            {
                name: Published(scanner.fingerprint, scanner.registration)
                for name, scanner in self._scanners.items()
                if scanner.registration is not None
            }
        )

    def update(self, endpoints: Iterable[EndpointSettings]) -> None:
        """Register the MTA Hooks endpoints of a new config; keep the unchanged, drop the others."""
        wanted = {e.name: e for e in endpoints if e.protocol is EndpointProtocol.MTA_HOOKS}
        dropped = False
        for name, scanner in list(self._scanners.items()):
            settings = wanted.get(name)
            if settings is not None and fingerprint(settings) == scanner.fingerprint:
                scanner.settings = settings  # a change that does not touch the registration (a timeout)
                continue
            del self._scanners[name]
            self._end(scanner)
            dropped = True
        for name, settings in wanted.items():
            if name not in self._scanners:
                scanner = self._scanners[name] = _Scanner(self, settings)
                scanner.task = asyncio.create_task(scanner.run(), name=f"mta-hooks-register-{name}")
        if dropped:
            # Not otherwise: a registrar restarted under --workers leaves the published
            # registrations (still valid at the scanners) until its own replace them.
            self.publish()

    async def wait_registered(self, timeout: float) -> None:
        """Wait until every endpoint has registered or failed once, at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for scanner in list(self._scanners.values()):
                    await scanner.registered.wait()

    def gone(self, name: str, registration: str) -> None:
        """A hook call found ``registration`` unknown to the scanner: register again."""
        scanner = self._scanners.get(name)
        if scanner is not None and scanner.registration is not None and scanner.registration.id == registration:
            scanner.gone.set()

    def _end(self, scanner: _Scanner) -> None:
        if scanner.task is not None:
            scanner.task.cancel()
        if scanner.registration is not None:
            task = asyncio.create_task(self.deregister(scanner.settings, scanner.registration))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Stop renewing and delete every registration (each within ``DEREGISTER_TIMEOUT``)."""
        scanners = list(self._scanners.values())
        self._scanners.clear()
        for scanner in scanners:
            self._end(scanner)
        tasks = [s.task for s in scanners if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.publish()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP ------------------------------------------------------------------------

    def _request_options(self, settings: EndpointSettings) -> dict[str, Any]:
        options: dict[str, Any] = {
            "headers": dict(settings.headers),
            "timeout": aiohttp.ClientTimeout(total=settings.timeout),
            "allow_redirects": False,
        }
        if settings.url[:6].lower() == "https:":
            context = self._ssl.get(settings.tls)
            if context is None:
                context = self._ssl[settings.tls] = build_ssl_context(settings.tls)
            options["ssl"] = context
        return options

    async def _json(self, method: str, url: str, settings: EndpointSettings, body: object = None) -> tuple[int, object]:
        options = self._request_options(settings)
        if body is not None:
            options["json"] = body
        async with self._client().request(method, url, **options) as response:
            data = await response.read()
            try:
                return response.status, (orjson.loads(data) if data.strip() else None)
            except orjson.JSONDecodeError:
                return response.status, data[:200].decode("utf-8", "replace")

    async def register(self, settings: EndpointSettings) -> Registration:
        """Discover (when ``url`` is a discovery document) and register; raises RegistrationError and client errors."""
        stages = wanted_stages(settings)
        properties = wanted_properties(settings)
        url = settings.url
        if url.split("?", 1)[0].endswith(DISCOVERY_PATH):
            status, document = await self._json("GET", url, settings)
            if status != 200:
                raise RegistrationError(f"discovery {redact_url(url)} answered {status}: {document!r}")
            url = discovered_registration_url(document, url, stages)
        budget_ms = int(max((settings.timeout, *(seconds for _, seconds in settings.timeouts))) * 1000)
        body = registration_request(f"milterbridge {settings.name}", __version__, budget_ms, stages, properties)
        status, answer = await self._json("POST", url, settings, body)
        if status not in (200, 201):
            raise RegistrationError(f"registration {redact_url(url)} answered {status}: {answer!r}")
        return parse_registration(answer, url, stages, properties)

    async def deregister(self, settings: EndpointSettings, registration: Registration) -> None:
        """Delete ``registration`` at the scanner, logging how it went; never raises for the scanner's sake."""
        if registration.deregistration is None:
            return
        options = self._request_options(settings)
        options["headers"]["X-MTA-Hooks-Registration"] = registration.id
        options["timeout"] = aiohttp.ClientTimeout(total=min(settings.timeout, DEREGISTER_TIMEOUT))
        fields = {"endpoint": settings.name, "registration": registration.id}
        try:
            async with self._client().delete(registration.deregistration, **options) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning(
                "MTA Hooks endpoint %s: deregistration failed: %s", settings.name, exc, extra={"fields": fields}
            )
            return
        if status in (200, 204, 404, 410):
            log.info("MTA Hooks endpoint %s: deregistered %s", settings.name, registration.id, extra={"fields": fields})
        else:
            log.warning(
                "MTA Hooks endpoint %s: deregistration answered %d", settings.name, status, extra={"fields": fields}
            )


def file_publisher(directory: str) -> Callable[[Mapping[str, Published]], None]:
    """Publish registrations to the workers of an instance: the shared file in ``directory``."""
    path = os.path.join(directory, SHARED_FILE)
    return lambda published: write_atomically(path, _encode_published(published))


def take_gone_reports(directory: str) -> list[tuple[str, str]]:
    """The workers' "gone" reports in ``directory`` as (endpoint, registration id); each is read once."""
    reports = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(GONE_PREFIX) and not entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    with open(entry.path, "rb") as f:
                        registration = f.read().decode("ascii", "replace")
                    os.unlink(entry.path)
                    reports.append((entry.name.removeprefix(GONE_PREFIX), registration))
    return reports


async def collect_gone_reports(directory: str, registrar: Registrar) -> None:
    """Hand the workers' "gone" reports to ``registrar`` every ``POLL_INTERVAL`` until cancelled."""
    while True:
        for name, registration in take_gone_reports(directory):
            registrar.gone(name, registration)
        await asyncio.sleep(POLL_INTERVAL)


def has_hook_endpoints(endpoints: Sequence[EndpointSettings]) -> bool:
    return any(e.protocol is EndpointProtocol.MTA_HOOKS for e in endpoints)
