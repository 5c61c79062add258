"""Discovery and registration of MTA Hooks -01, the MTA's side.

In -01 the MTA is the HTTP client throughout: it may read the scanner's discovery document
(``GET /.well-known/mta-hooks``), registers by posting ``registration_request`` to the
scanner's registration endpoint, reads the answer with ``parse_registration``, sends hook
calls to the ``hookEndpoint`` it names with the registration's id, registers again before
``expiresAt`` (``renew_after``) and when a hook call answers 404 or 410, and deletes its
registration when it stops. (-00 had the scanner register with the MTA; -01 inverted that.)

Everything here is pure: the caller does the HTTP. Errors are ``RegistrationError``, whose
message says what the scanner sent that cannot be used.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urljoin, urlsplit, urlunsplit

__all__ = [
    "DISCOVERY_PATH",
    "Registration",
    "RegistrationError",
    "discovered_registration_url",
    "parse_registration",
    "registration_request",
    "renew_after",
]

JSON = dict[str, Any]

#: Where a scanner serves its discovery document.
DISCOVERY_PATH: Final = "/.well-known/mta-hooks"
#: The draft's registration id: ASCII letters and digits, ``-``, ``_`` and ``:``, at most 255.
_REGISTRATION_ID: Final = re.compile(r"[A-Za-z0-9_:-]{1,255}")
#: Renew when this share of the registration's lifetime is left ...
_RENEW_SHARE: Final = 0.2
#: ... but at least this long before it expires, when the lifetime allows (seconds).
_RENEW_MARGIN: Final = 60.0


class RegistrationError(ValueError):
    """A discovery document or registration answer the bridge cannot use; the message says why."""


@dataclass(frozen=True, slots=True)
class Registration:
    """An active registration: where to send hooks and what was agreed."""

    #: ``registrationId``: sent as ``X-MTA-Hooks-Registration`` on every hook call.
    id: str
    #: ``hookEndpoint``, made absolute against the registration URL.
    hook_endpoint: str
    #: ``expiresAt`` as a POSIX time; None when it does not expire.
    expires_at: float | None
    #: ``endpoints.deregistration``, absolute; None when the scanner gave none.
    deregistration: str | None
    #: ``negotiated.inbound.stages``.
    stages: tuple[str, ...]
    #: ``negotiated.inbound.properties``: what the requests carry.
    properties: tuple[str, ...]

    def json(self) -> JSON:
        """The registration as a JSON object (``from_json`` reads it back)."""
        return {
            "id": self.id,
            "hook_endpoint": self.hook_endpoint,
            "expires_at": self.expires_at,
            "deregistration": self.deregistration,
            "stages": list(self.stages),
            "properties": list(self.properties),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Registration:
        return cls(
            id=str(obj["id"]),
            hook_endpoint=str(obj["hook_endpoint"]),
            expires_at=None if obj.get("expires_at") is None else float(obj["expires_at"]),
            deregistration=None if obj.get("deregistration") is None else str(obj["deregistration"]),
            stages=tuple(obj["stages"]),
            properties=tuple(obj["properties"]),
        )


def registration_request(
    name: str, version: str, timeout_ms: int, stages: Sequence[str], properties: Sequence[str]
) -> JSON:
    """The body of the registration POST: inbound ``stages`` and ``properties``, JSON, no outbound hooks."""
    return {
        "name": name,
        "version": version,
        "timeoutMs": timeout_ms,
        "serialization": "json",
        "inbound": {"stages": list(stages), "properties": list(properties)},
        "outbound": None,
    }


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RegistrationError(f"{what}: expected an object, got {type(value).__name__}")
    return value


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _origin(url: str, what: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise RegistrationError(f"{what}: {parts.scheme}://{parts.hostname} has no valid port") from None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def _url(value: object, base: str, what: str) -> str:
    """``value`` made absolute against ``base``; it must have the same origin (the credentials go there too).

    The user info of ``base`` (credentials in the URL) goes with it; the query of ``base`` does not.
    """
    if not isinstance(value, str) or not value:
        raise RegistrationError(f"{what}: expected a URL, got {value!r:.80}")
    url = urljoin(base, value)
    here, there = _origin(base, "the url"), _origin(url, what)
    if here != there:
        raise RegistrationError(
            f"{what}: {there[0]}://{there[1]}:{there[2]} is not the origin of the url "
            f"({here[0]}://{here[1]}:{here[2]}); the bridge sends its credentials only there"
        )
    base_parts, parts = urlsplit(base), urlsplit(url)
    if "@" in base_parts.netloc and "@" not in parts.netloc:
        parts = parts._replace(netloc=base_parts.netloc)
    return urlunsplit(parts)


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RegistrationError(f"{what}: expected an array of strings, got {value!r}")
    return tuple(value)


def discovered_registration_url(document: object, discovery_url: str, stages: Collection[str]) -> str:
    """The registration endpoint a discovery document names, after checking it offers JSON and ``stages``."""
    doc = _object(document, "discovery document")
    serialization = doc.get("serialization")
    if isinstance(serialization, list) and "json" not in serialization:
        raise RegistrationError(f"discovery document: serialization {serialization!r} has no json")
    capabilities = _object(doc.get("capabilities"), "discovery document: capabilities")
    inbound = capabilities.get("inbound")
    if inbound is None:
        raise RegistrationError("discovery document: the scanner offers no inbound hooks")
    offered = _strings(_object(inbound, "capabilities.inbound").get("stages"), "capabilities.inbound.stages")
    missing = [stage for stage in stages if stage not in offered]
    if missing:
        raise RegistrationError(f"discovery document: the scanner offers no stage {', '.join(missing)}")
    endpoints = _object(doc.get("endpoints"), "discovery document: endpoints")
    return _url(endpoints.get("registration"), discovery_url, "endpoints.registration")


def _timestamp(value: object, what: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RegistrationError(f"{what}: expected an RFC 3339 time, got {value!r}")
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise RegistrationError(f"{what}: {value!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise RegistrationError(f"{what}: {value!r} has no time zone")
    return moment.timestamp()


def parse_registration(
    answer: object,
    registration_url: str,
    stages: Sequence[str],
    properties: Sequence[str],
    *,
    now: float | None = None,
) -> Registration:
    """The registration a scanner's 201 answer grants, checked against what was asked.

    The negotiated stages must be those asked (a stage the scanner dropped would go uncalled,
    so the registration is refused rather than half used); the negotiated properties may be
    fewer than asked, never others. With ``now`` (a POSIX time), an ``expiresAt`` that is not
    after it is refused (a clock off, or a scanner's bug: renewing would never end).
    """
    body = _object(answer, "registration answer")
    registration_id = body.get("registrationId")
    if not isinstance(registration_id, str) or not _REGISTRATION_ID.fullmatch(registration_id):
        raise RegistrationError(f"registrationId: {registration_id!r} is not 1-255 of A-Z a-z 0-9 - _ :")
    if body.get("status") != "active":
        raise RegistrationError(f"status: the registration is {body.get('status')!r}, not active")
    negotiated = _object(body.get("negotiated"), "negotiated")
    if negotiated.get("serialization", "json") != "json":
        raise RegistrationError(f"negotiated.serialization: {negotiated.get('serialization')!r}, not json")
    inbound = _object(negotiated.get("inbound"), "negotiated.inbound")
    granted = _strings(inbound.get("stages"), "negotiated.inbound.stages")
    if sorted(granted) != sorted(stages):
        raise RegistrationError(f"negotiated.inbound.stages: {list(granted)} are not the stages asked, {list(stages)}")
    agreed = inbound.get("properties")
    kept = tuple(properties) if agreed is None else _strings(agreed, "negotiated.inbound.properties")
    others = [p for p in kept if p not in properties]
    if others:
        raise RegistrationError(f"negotiated.inbound.properties: {others} were not asked for")
    endpoints = body.get("endpoints")
    deregistration = None
    if isinstance(endpoints, dict) and endpoints.get("deregistration") is not None:
        deregistration = _url(endpoints["deregistration"], registration_url, "endpoints.deregistration")
    expires_at = _timestamp(body.get("expiresAt"), "expiresAt")
    if expires_at is not None and now is not None and expires_at <= now:
        raise RegistrationError(f"expiresAt: {body.get('expiresAt')} is already past (is a clock off?)")
    return Registration(
        id=registration_id,
        hook_endpoint=_url(body.get("hookEndpoint"), registration_url, "hookEndpoint"),
        expires_at=expires_at,
        deregistration=deregistration,
        stages=granted,
        properties=kept,
    )


def renew_after(registration: Registration, now: float) -> float | None:
    """Seconds from ``now`` until the registration should be renewed; None when it does not expire."""
    if registration.expires_at is None:
        return None
    left = registration.expires_at - now
    margin = min(max(left * _RENEW_SHARE, min(_RENEW_MARGIN, left / 2)), left)
    return max(0.0, left - margin)
