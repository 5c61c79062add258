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

Registrations are published per endpoint name and settings (``fingerprint``): a connection
uses the one made for the config it started with, and after a reload that changed an endpoint
the old registration stays in use for a while (``RETIRE_AFTER``).

A call to an MTA Hooks endpoint with no usable registration sends nothing and fails
(``not_registered``): its ``on_error`` applies, so the gate stays closed while the scanner is
away. A hook call answered 404 or 410 reports the registration gone, and the registrar
registers again.
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
#: The shortest wait before a renewal (seconds), whatever expiresAt says.
RENEW_FLOOR: Final = 1.0
#: A registration lost sooner than this after it was made is made again only after a pause (seconds).
QUICK_LOSS: Final = 10.0
#: How long a registration of an endpoint changed or removed at a reload stays in use (seconds).
RETIRE_AFTER: Final = 120.0
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
    before = _before(request)
    if settings.protocol is EndpointProtocol.STALWART:
        translate_stalwart: Callable[[object], object] = lambda answer: stalwart_decision(answer, before)  # noqa: E731
        encoded = pl.encode(stalwart_request(_with_body(request, settings, body), event))
        return encoded, HookCall(endpoint, b"", translate_stalwart)
    translate: Callable[[object], object] = lambda answer: to_decision(answer, before)  # noqa: E731
    active = None if book is None else book.get(settings)
    if active is None:  # nothing is sent: the body is not read
        return b"", HookCall(None, b"", translate, unavailable="not registered with the scanner")
    registration, http = active
    headers = f"X-MTA-Hooks-Registration: {registration.id}\r\nX-MTA-Hooks-Request-Id: {webhook_id}\r\n".encode()
    encoded = pl.encode(hook_request(_with_body(request, settings, body), event, registration.properties))
    return encoded, HookCall(http, headers, translate, registration.id)


# -- registrations, as the calls see them ---------------------------------------------


def fingerprint(settings: EndpointSettings) -> str:
    """What a registration depends on, hashed: a registration is used only by settings with the same."""
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
    """A registration as the registrar publishes it: for the endpoint ``name`` with these settings."""

    name: str
    fingerprint: str
    registration: Registration


#: Entries of ``HookBook``'s per-settings caches before they are emptied (each reload adds some).
_CACHE_LIMIT: Final = 64


class HookBook:
    """The registrations this process's calls use.

    An endpoint's calls use the registration published for its name and settings
    (``fingerprint``): connections still on the snapshot before a reload keep theirs while the
    registrar keeps it. ``report_gone`` tells the registrar that a hook call was answered 404
    or 410.
    """

    def __init__(self, report_gone: Callable[[str, str], None] = lambda name, registration: None) -> None:
        self._published: dict[tuple[str, str], Registration] = {}
        self._report_gone = report_gone
        #: id(settings) -> (the settings, their fingerprint): computed once per snapshot's endpoint.
        self._fingerprints: dict[int, tuple[EndpointSettings, str]] = {}
        #: (id(settings), registration id) -> (the settings, the hook endpoint prepared for their calls).
        self._prepared: dict[tuple[int, str], tuple[EndpointSettings, PreparedEndpoint]] = {}

    def publish(self, published: Iterable[Published]) -> None:
        self._published = {(p.name, p.fingerprint): p.registration for p in published}
        live = {registration.id for registration in self._published.values()}
        self._prepared = {key: value for key, value in self._prepared.items() if key[1] in live}

    def _fingerprint(self, settings: EndpointSettings) -> str:
        known = self._fingerprints.get(id(settings))
        if known is None or known[0] is not settings:
            if len(self._fingerprints) >= _CACHE_LIMIT:
                self._fingerprints.clear()
            known = self._fingerprints[id(settings)] = (settings, fingerprint(settings))
        return known[1]

    def get(self, settings: EndpointSettings) -> tuple[Registration, PreparedEndpoint] | None:
        """The registration for these settings and the hook endpoint prepared from them, or None."""
        registration = self._published.get((settings.name, self._fingerprint(settings)))
        if registration is None:
            return None
        key = (id(settings), registration.id)
        prepared = self._prepared.get(key)
        if prepared is None or prepared[0] is not settings:
            http = prepare_endpoint(dataclasses.replace(settings, url=registration.hook_endpoint))
            prepared = self._prepared[key] = (settings, http)
        return registration, prepared[1]

    def missing(self, endpoints: Iterable[EndpointSettings]) -> list[str]:
        """The names of the MTA Hooks endpoints of ``endpoints`` that have no registration."""
        return [name for name, registered in self.registered(endpoints).items() if not registered]

    def registered(self, endpoints: Iterable[EndpointSettings]) -> dict[str, bool]:
        """For each MTA Hooks endpoint of ``endpoints``: whether its calls have a registration."""
        return {e.name: self.get(e) is not None for e in mta_hooks_endpoints(endpoints)}

    def report_gone(self, name: str, registration: str) -> None:
        if any(key[0] == name and r.id == registration for key, r in self._published.items()):
            self._report_gone(name, registration)


def _encode_published(published: Iterable[Published]) -> bytes:
    entries = [{"name": p.name, "fingerprint": p.fingerprint, "registration": p.registration.json()} for p in published]
    # Typed here: where orjson is not installed (mypyc's build) its functions are Any.
    encoded: bytes = orjson.dumps(entries)
    return encoded


def _decode_published(data: bytes) -> list[Published]:
    return [
        Published(str(entry["name"]), str(entry["fingerprint"]), Registration.from_json(entry["registration"]))
        for entry in orjson.loads(data)
    ]


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden file beside it, so a reader sees all of it or the old file."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def _read_file(path: str) -> bytes | None:
    """The shared file's bytes; None when there is none, or it cannot be read (logged)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the shared MTA Hooks registrations %s: %s", path, exc)  # noqa: TRY400
        return None


def _parse(data: bytes, path: str) -> list[Published] | None:
    """The registrations in the shared file's ``data``; None when they do not parse (logged)."""
    try:
        return _decode_published(data)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("the shared MTA Hooks registrations %s do not parse: %s", path, exc)  # noqa: TRY400
        return None


def read_published(path: str) -> list[Published]:
    """The registrations the shared file at ``path`` holds (none when it is absent or unusable)."""
    data = _read_file(path)
    return (_parse(data, path) or []) if data is not None else []


class FileHookBook(HookBook):
    """A worker's book under ``--workers``: read from the registrar's file; gone reports written beside it."""

    def __init__(self, directory: str) -> None:
        super().__init__(self._write_gone)
        self.directory = directory
        self.path = os.path.join(directory, SHARED_FILE)
        self._read: bytes | None = None

    def _write_gone(self, name: str, registration: str) -> None:
        try:
            write_atomically(os.path.join(self.directory, GONE_PREFIX + name), registration.encode())
        except OSError as exc:
            log.error("cannot report MTA Hooks registration %s gone: %s", registration, exc)  # noqa: TRY400

    def refresh(self) -> None:
        """Read the file (a few hundred bytes) and take its registrations when they changed."""
        data = _read_file(self.path)
        if data is None or data == self._read:
            return
        published = _parse(data, self.path)
        if published is not None:
            self.publish(published)
            self._read = data

    async def wait_for(self, endpoints: Sequence[EndpointSettings], timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the file to hold a registration for each MTA Hooks endpoint."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if not self.missing(endpoints) or time.monotonic() >= deadline:
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
        #: Set once the first registration succeeded or failed (what a start waits for).
        self.registered = asyncio.Event()

    @property
    def name(self) -> str:
        return self.settings.name

    async def run(self) -> None:
        delay = RETRY_FIRST
        fields = {"endpoint": self.name, "url": redact_url(self.settings.url)}
        while True:
            try:
                registration = await self.registrar.register(self.settings)
            except Exception as exc:
                if isinstance(exc, (RegistrationError, aiohttp.ClientError, TimeoutError, ValueError, OSError)):
                    log.error(  # noqa: TRY400 - the message says what failed
                        "MTA Hooks endpoint %s: registration failed, trying again in %gs: %s",
                        self.name,
                        delay,
                        exc or type(exc).__name__,
                        extra={"fields": fields},
                    )
                else:  # a bug: logged with its traceback, and tried again all the same
                    log.exception(
                        "bug: MTA Hooks endpoint %s: registration failed", self.name, extra={"fields": fields}
                    )
                self.registered.set()  # the start waits no longer
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            replaced, self.registration = self.registration, registration
            if replaced is not None:  # a renewal: the old one serves until every worker has the new one
                self.registrar.retire(self.settings, self.fingerprint, replaced, published=False)
            self.gone.clear()
            while not self.registrar.publish():  # noqa: ASYNC110 - the workers cannot use it before it is published
                await asyncio.sleep(RETRY_FIRST)
            self.registered.set()
            self._log_registered(registration)
            registered_at = time.monotonic()
            renew = renew_after(registration, self.registrar.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if renew is None else max(renew, RENEW_FLOOR)):
                    await self.gone.wait()
            if not self.gone.is_set():
                delay = RETRY_FIRST  # renewal: the published registration serves until the new one replaces it
                continue
            log.warning(
                "MTA Hooks endpoint %s: the scanner no longer knows registration %s; registering again",
                self.name,
                registration.id,
                extra={"fields": {**fields, "registration": registration.id}},
            )
            self.registration = None
            self.registrar.publish()
            if time.monotonic() - registered_at < QUICK_LOSS:  # lost as soon as made: do not hammer the scanner
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            else:
                delay = RETRY_FIRST

    def _log_registered(self, registration: Registration) -> None:
        fields = {
            "endpoint": self.name,
            "registration": registration.id,
            "expires_at": registration.expires_at,
            "properties": list(registration.properties),
        }
        log.info("MTA Hooks endpoint %s: registered as %s", self.name, registration.id, extra={"fields": fields})
        refused = [p for p in wanted_properties(self.settings) if p not in registration.properties]
        if refused:
            log.warning(
                "MTA Hooks endpoint %s: the scanner does not take %s; its requests go without",
                self.name,
                ", ".join(refused),
                extra={"fields": {**fields, "refused": refused}},
            )


@dataclass(slots=True)
class _Retiring:
    """A registration deleted ``RETIRE_AFTER`` seconds from now.

    Published, it still serves the connections that started before a reload changed or removed
    its endpoint (or, after a registrar restart, until the new registration is published).
    Unpublished, it was renewed: calls that took it before the new one was published may still
    be on their way.
    """

    settings: EndpointSettings
    fingerprint: str
    registration: Registration
    published: bool
    task: asyncio.Task[None] | None = None


class Registrar:
    """Keeps one registration per MTA Hooks endpoint of the config, and publishes them.

    ``update`` (at start and at each reload) starts, keeps or ends registrations: an endpoint
    whose registration-relevant settings did not change keeps its registration. One that
    changed or went away keeps its old registration published for ``RETIRE_AFTER`` seconds,
    for the connections that started before the reload, and then deletes it; so does a renewed
    registration, unpublished. ``adopt`` takes over the registrations a registrar before this
    one published. ``aclose`` deletes them all; ``update`` does nothing after it.
    """

    def __init__(
        self,
        publish: Callable[[Sequence[Published]], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._publish = publish
        self.clock = clock
        self._scanners: dict[str, _Scanner] = {}
        self._retiring: list[_Retiring] = []
        self._session: aiohttp.ClientSession | None = None
        self._ssl: dict[Any, Any] = {}
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                headers={"User-Agent": f"milterbridge/{__version__}"},
            )
        return self._session

    def publish(self) -> bool:
        """Publish the registrations in use; False (logged) when that failed."""
        # Retiring first: a current registration for the same settings wins (it comes later).
        published = [Published(r.settings.name, r.fingerprint, r.registration) for r in self._retiring if r.published]
        published += [
            Published(name, scanner.fingerprint, scanner.registration)
            for name, scanner in self._scanners.items()
            if scanner.registration is not None
        ]
        try:
            self._publish(published)
        except Exception:
            log.exception("cannot publish the MTA Hooks registrations")
            return False
        return True

    def update(self, endpoints: Iterable[EndpointSettings]) -> None:
        """Register the MTA Hooks endpoints of a new config; keep the unchanged, retire the others."""
        if self._closed:
            return
        self._ssl.clear()  # TLS files are read again, as for any endpoint at a reload
        wanted = {e.name: e for e in mta_hooks_endpoints(endpoints)}
        retired = False
        for name, scanner in list(self._scanners.items()):
            settings = wanted.get(name)
            if settings is not None and fingerprint(settings) == scanner.fingerprint:
                scanner.settings = settings  # a change that does not touch the registration (a timeout)
                continue
            del self._scanners[name]
            if scanner.task is not None:
                scanner.task.cancel()
            if scanner.registration is not None:
                self.retire(scanner.settings, scanner.fingerprint, scanner.registration, published=True)
                retired = True
        for name, settings in wanted.items():
            if name not in self._scanners:
                scanner = self._scanners[name] = _Scanner(self, settings)
                scanner.task = asyncio.create_task(scanner.run(), name=f"mta-hooks-register-{name}")
        if retired:
            # Not otherwise: a registrar restarted under --workers leaves the published
            # registrations (still valid at the scanners) until its own replace them.
            self.publish()

    def retire(self, settings: EndpointSettings, print_: str, registration: Registration, *, published: bool) -> None:
        """Delete ``registration`` in ``RETIRE_AFTER`` seconds; published meanwhile if ``published``."""
        retiring = _Retiring(settings, print_, registration, published)
        self._retiring.append(retiring)
        retiring.task = asyncio.create_task(self._retire_later(retiring), name="mta-hooks-retire")

    def adopt(self, published: Iterable[Published], endpoints: Iterable[EndpointSettings]) -> None:
        """Take over what an earlier registrar of this instance published (it died and was restarted).

        Each registration made for settings of ``endpoints`` stays published, and is deleted
        ``RETIRE_AFTER`` seconds from now: by then this registrar's own serve. One for settings
        no longer in the config cannot be deleted (its credentials are unknown) and expires.
        """
        settings_by_print = {(e.name, fingerprint(e)): e for e in mta_hooks_endpoints(endpoints)}
        for entry in published:
            settings = settings_by_print.get((entry.name, entry.fingerprint))
            if settings is not None:
                self.retire(settings, entry.fingerprint, entry.registration, published=True)
        if self._retiring:
            self.publish()

    async def _retire_later(self, retiring: _Retiring) -> None:
        await asyncio.sleep(RETIRE_AFTER)
        self._retiring.remove(retiring)
        self.publish()
        await self.deregister(retiring.settings, retiring.registration)

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

    async def aclose(self) -> None:
        """Stop renewing and delete every registration (each within ``DEREGISTER_TIMEOUT``)."""
        self._closed = True
        tasks = [s.task for s in self._scanners.values()] + [r.task for r in self._retiring]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        ending = [(s.settings, s.registration) for s in self._scanners.values() if s.registration is not None]
        ending += [(r.settings, r.registration) for r in self._retiring]
        self._scanners.clear()
        self._retiring.clear()
        await asyncio.gather(*(self.deregister(settings, registration) for settings, registration in ending))
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
        return parse_registration(answer, url, stages, properties, now=self.clock())

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


def file_publisher(directory: str) -> Callable[[Sequence[Published]], None]:
    """Publish registrations to the workers of an instance: the shared file in ``directory``."""
    path = os.path.join(directory, SHARED_FILE)
    return lambda published: write_atomically(path, _encode_published(published))


def take_gone_reports(directory: str) -> list[tuple[str, str]]:
    """The workers' "gone" reports in ``directory`` as (endpoint, registration id); each is read once."""
    reports = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(GONE_PREFIX):  # a file being written is hidden (write_atomically)
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


def mta_hooks_endpoints(endpoints: Iterable[EndpointSettings]) -> list[EndpointSettings]:
    """The endpoints of ``endpoints`` that speak MTA Hooks (and so need a registration)."""
    return [e for e in endpoints if e.protocol is EndpointProtocol.MTA_HOOKS]
