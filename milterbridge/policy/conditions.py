"""Per-endpoint conditions (an endpoint's ``when`` table): whether it is called at all.

A :class:`Condition` holds the keys of one ``when`` table. Every key given must match; a
key's list matches when any of its plain entries matches (or it has none) and none of its
``!`` entries does. The keys and when they are known:

* ``client`` (connect): CIDR networks or single addresses, IPv4 or IPv6, of the SMTP client.
  An IPv4-mapped IPv6 client address is matched as the IPv4 address it maps; a client
  without an IP address (a unix socket, an unknown family) matches no network.
* ``daemon`` (connect): the MTA's ``{daemon_name}`` macro, compared exactly.
* ``authenticated`` (mail): ``true`` when the ``{auth_authen}`` macro is non-empty.
* ``sender_domains`` (mail), ``recipient_domains`` (rcpt): domain patterns, exact
  (``example.com``) or a suffix (``*.example.com``: any name below it, not the name
  itself), compared case-insensitively in their IDNA A-label form (Python's
  ``encodings.idna``, IDNA 2003), so a U-label and its A-label are the same domain. The
  null sender ``<>`` has no domain and matches no pattern.

Pure: it looks at values the caller hands it (addresses and macros as the MTA sent them).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from milterbridge.milter.constants import Event, MacroStage

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConditionKey(enum.StrEnum):
    """A key of a ``when`` table; also the ``reason`` an endpoint was skipped for."""

    CLIENT = "client"
    DAEMON = "daemon"
    AUTHENTICATED = "authenticated"
    SENDER_DOMAINS = "sender_domains"
    RECIPIENT_DOMAINS = "recipient_domains"


#: The first event at which each key can be known.
KNOWN_AT: Final[Mapping[ConditionKey, Event]] = {
    ConditionKey.CLIENT: Event.CONNECT,
    ConditionKey.DAEMON: Event.CONNECT,
    ConditionKey.AUTHENTICATED: Event.MAIL,
    ConditionKey.SENDER_DOMAINS: Event.MAIL,
    ConditionKey.RECIPIENT_DOMAINS: Event.RCPT,
}

#: The macro each key needs from the MTA, and the stage it is requested at.
MACROS: Final[Mapping[ConditionKey, tuple[MacroStage, bytes]]] = {
    ConditionKey.DAEMON: (MacroStage.CONNECT, b"{daemon_name}"),
    ConditionKey.AUTHENTICATED: (MacroStage.ENVFROM, b"{auth_authen}"),
}

#: How far into an SMTP session each event comes, for the keys known there
#: (``unknown`` may come before MAIL; ``abort`` and ``close`` are notifications).
_STAGE: Final[Mapping[Event, int]] = {
    Event.CONNECT: 0,
    Event.HELO: 0,
    Event.UNKNOWN: 0,
    Event.MAIL: 1,
    Event.RCPT: 2,
    Event.DATA: 2,
    Event.HEADER: 2,
    Event.EOH: 2,
    Event.BODY: 2,
    Event.EOM: 2,
}


class ConditionError(ValueError):
    """A ``when`` table is invalid; ``key`` names the key at fault (empty for the table)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Entries:
    """One key's list: the entries that select and those (written with ``!``) that exclude."""

    include: tuple[Any, ...]
    exclude: tuple[Any, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """The parsed ``when`` table of one endpoint; build it with :func:`parse_condition`."""

    client: Entries | None = None
    daemon: Entries | None = None
    authenticated: bool | None = None
    sender_domains: Entries | None = None
    recipient_domains: Entries | None = None

    @property
    def keys(self) -> tuple[ConditionKey, ...]:
        """The keys given, in the order of :class:`ConditionKey`."""
        return tuple(key for key in ConditionKey if getattr(self, key.value) is not None)

    @property
    def macros(self) -> tuple[tuple[MacroStage, bytes], ...]:
        """The macros this condition needs, with their stage."""
        return tuple(MACROS[key] for key in self.keys if key in MACROS)

    def connection_miss(self, address: bytes, daemon: bytes | None) -> ConditionKey | None:
        """The first connection key that does not match (``None``: all match, or none given).

        ``address`` is the client address from CONNECT (sendmail's ``IPv6:`` prefix allowed),
        ``daemon`` the ``{daemon_name}`` macro.
        """
        if self.client is not None and not _matches(self.client, _client_address(address), _in_network):
            return ConditionKey.CLIENT
        if self.daemon is not None and not _matches(self.daemon, (daemon or b"").decode("utf-8", "replace"), _equal):
            return ConditionKey.DAEMON
        return None

    def message_miss(self, auth_authen: bytes | None, mail_from: bytes) -> ConditionKey | None:
        """The first message key known at MAIL that does not match (``None``: all match, or none given).

        ``auth_authen`` is the ``{auth_authen}`` macro, ``mail_from`` the MAIL address as sent.
        """
        if self.authenticated is not None and bool(auth_authen) is not self.authenticated:
            return ConditionKey.AUTHENTICATED
        if self.sender_domains is not None and not _matches(self.sender_domains, address_domain(mail_from), _in_domain):
            return ConditionKey.SENDER_DOMAINS
        return None

    def recipient_matches(self, address: bytes) -> bool:
        """Whether one recipient (the RCPT address as sent) matches ``recipient_domains`` (true when not given)."""
        return self.recipient_domains is None or _matches(self.recipient_domains, address_domain(address), _in_domain)

    def any_recipient_matches(self, addresses: Iterable[bytes]) -> bool:
        """Whether any of ``addresses`` matches ``recipient_domains`` (true when not given)."""
        return self.recipient_domains is None or any(self.recipient_matches(address) for address in addresses)


def parse_condition(table: Mapping[str, Any]) -> Condition:
    """A :class:`Condition` from a ``when`` table as TOML (or JSON) gives it; raises ConditionError."""
    values: dict[str, Any] = {}
    for name, value in table.items():
        try:
            key = ConditionKey(name)
        except ValueError:
            known = ", ".join(ConditionKey)
            raise ConditionError(f"unknown key (known: {known})", name) from None
        if key is ConditionKey.AUTHENTICATED:
            if not isinstance(value, bool):
                raise ConditionError(f"expected true or false, got {_show(value)}", name)
            values[name] = value
        elif key is ConditionKey.CLIENT:
            values[name] = _entries(name, value, _network)
        elif key is ConditionKey.DAEMON:
            values[name] = _entries(name, value, _daemon)
        else:
            values[name] = _entries(name, value, _domain_pattern)
    return Condition(**values)


def unknown_at(condition: Condition, events: Iterable[Event]) -> tuple[ConditionKey, Event] | None:
    """A key of ``condition`` not yet known at the earliest of ``events``, with that event; or None.

    Notifications (``abort``, ``close``) are left out: they follow the calls the condition
    allowed.
    """
    staged = sorted((_STAGE[e], e.value, e) for e in events if e in _STAGE)
    if not staged:
        return None
    stage, _, earliest = staged[0]
    for key in condition.keys:
        if _STAGE[KNOWN_AT[key]] > stage:
            return key, earliest
    return None


def address_domain(address: bytes) -> str:
    """The domain of an envelope address as the MTA sent it (``<user@Example.COM>``), normalised; ``""`` if none."""
    text = address.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    at = text.rfind("@")
    if at < 0:
        return ""
    return normalise_domain(text[at + 1 :])


def normalise_domain(domain: str) -> str:
    """``domain`` lower-cased, without a trailing dot, in IDNA A-label form (kept as is if it has none)."""
    text = domain.strip().rstrip(".").lower()
    if text.isascii():
        return text
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return text


# -- matching -------------------------------------------------------------------------


def _matches(entries: Entries, value: Any, test: Any) -> bool:
    if entries.exclude and any(test(value, entry) for entry in entries.exclude):
        return False
    return not entries.include or any(test(value, entry) for entry in entries.include)


def _in_network(address: IPAddress | None, network: IPNetwork) -> bool:
    return address is not None and address in network


def _equal(value: str, entry: str) -> bool:
    return value == entry


def _in_domain(domain: str, pattern: str) -> bool:
    if not domain:
        return False
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def _client_address(raw: bytes) -> IPAddress | None:
    if raw[:5].lower() == b"ipv6:":
        raw = raw[5:]
    try:
        address = ipaddress.ip_address(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# -- parsing --------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entries(key: str, value: Any, parse: Any) -> Entries:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConditionError(f"expected a string or an array of strings, got {_show(value)}", key)
    if not items:
        raise ConditionError("needs at least one entry", key)
    if len(set(items)) != len(items):
        raise ConditionError(f"duplicate entries in {_show(value)}", key)
    include: list[Any] = []
    exclude: list[Any] = []
    for item in items:
        text = item.strip()
        negated = text.startswith("!")
        try:
            parsed = parse(text[1:].strip() if negated else text)
        except ValueError as exc:
            raise ConditionError(f"{_show(item)}: {exc}", key) from None
        (exclude if negated else include).append(parsed)
    return Entries(tuple(include), tuple(exclude))


def _network(text: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IP address or CIDR network ({exc})") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _daemon(text: str) -> str:
    if not text:
        raise ValueError("empty daemon name")
    return text


def _domain_pattern(text: str) -> str:
    suffix = text.startswith("*.")
    domain = text[2:] if suffix else text
    if not domain or "*" in domain or "@" in domain or any(c.isspace() for c in domain):
        raise ValueError("expected a domain (example.com) or a suffix pattern (*.example.com)")
    try:
        normal = domain.strip().rstrip(".").lower().encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"not a valid IDNA domain ({exc})") from None
    if not normal or ".." in normal:
        raise ValueError("expected a domain (example.com) or a suffix pattern (*.example.com)")
    return f"*.{normal}" if suffix else normal


__all__ = [
    "KNOWN_AT",
    "MACROS",
    "Condition",
    "ConditionError",
    "ConditionKey",
    "Entries",
    "address_domain",
    "normalise_domain",
    "parse_condition",
    "unknown_at",
]
