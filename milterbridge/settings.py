"""Frozen, validated settings, and the declaration of every config key.

A key is declared once, on the field it fills: ``setting(default, check, doc)`` gives its
default, the check that turns the value TOML (or JSON, from an environment override) gives
into the field's value, and its one-line description. ``declared_keys`` lists them for the
loader in ``config.py``, which reads the file and the environment. docs/configuration.md
gives each key the same type and default and starts its row with the same description
(tests/test_config_docs.py holds the two together).

Everything here is pure: checks look at one value and never read files or the environment.
They raise ``InvalidValue``, which the loader reports as a ``ConfigError`` naming the key.
The settings classes come last, after the checks their declarations use.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from yarl import URL

from milterbridge.milter.address import parse_listen_address, split_host_port
from milterbridge.milter.constants import Event
from milterbridge.milter.mta import STOCK_CF_HEADER_LINES, Mta, SendmailTimeouts
from milterbridge.mtahooks.request import PROPERTIES as HOOK_PROPERTIES
from milterbridge.policy.conditions import Condition, ConditionError, parse_condition
from milterbridge.policy.model import ALL_OPS, Mode, ModOp, OnError, OnOversize

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)

REDACTED: Final = "<redacted>"
#: An HTTP header name (RFC 9110 token); the webhook client checks names with it too.
HTTP_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Headers the webhook client sets itself (lower case); a configured value would break signing or framing.
RESERVED_HEADERS: Final = frozenset(
    {
        *("content-type", "content-length", "host", "transfer-encoding", "connection", "accept-encoding"),
        *("webhook-id", "webhook-timestamp", "webhook-signature"),
        *("x-mta-hooks-registration", "x-mta-hooks-request-id"),
    }
)


class EndpointProtocol(enum.StrEnum):
    """The HTTP contract an endpoint speaks (``protocol``)."""

    #: The bridge's own webhooks (openapi/milterbridge.yaml).
    MILTERBRIDGE = "milterbridge"
    #: MTA Hooks -01 (docs/mta-hooks.md): registration, then hook calls.
    MTA_HOOKS = "mta-hooks"
    #: Stalwart's shipped hook format (docs/mta-hooks.md).
    STALWART = "stalwart"


class InvalidValue(ValueError):
    """A value fails its check. ``part`` names the piece at fault inside a table (a header name)."""

    def __init__(self, message: str, part: str = "") -> None:
        super().__init__(message)
        self.part = part


# -- declarations --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """How one key's value is checked, and the type the docs give it (``kind``).

    ``convert`` takes the value as TOML or JSON gives it and returns the field's value, or
    raises ``InvalidValue``.
    """

    kind: str
    convert: Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Key:
    """One config key: its name in the TOML table, the field it fills, its check, default and description."""

    name: str
    field: str
    check: Check
    doc: str
    #: The field's default; ``dataclasses.MISSING`` for a required key and for keys joined into one field.
    default: Any
    #: How the docs write the default when it is no value one could write ("unset", "every op").
    shown: str | None = None
    #: One of several keys whose values (tuples) are joined, in declaration order, into one field.
    joined: bool = False

    @property
    def required(self) -> bool:
        """The key has no default and must be given."""
        return self.default is MISSING and not self.joined


_METADATA: Final = "milterbridge.settings"


def declare(check: Check, doc: str) -> Mapping[str, Any]:
    """Field metadata declaring the key named like the field, for a field without a default (a required key)."""
    return {_METADATA: (Key("", "", check, doc, MISSING),)}


def setting(default: T, check: Check, doc: str, *, shown: str | None = None, hidden: bool = False) -> T:
    """A dataclass field that is also a config key: its default, check and one-line description.

    ``hidden`` keeps the value out of ``repr()`` (credentials, tokens).
    """
    return field(default=default, repr=not hidden, metadata={_METADATA: (Key("", "", check, doc, MISSING, shown),)})


def joined(*keys: tuple[str, Check, str]) -> Mapping[str, Any]:
    """Field metadata for a field filled from several keys (name, check, doc), joined in this order."""
    return {_METADATA: tuple(Key(name, "", check, doc, MISSING, joined=True) for name, check, doc in keys)}


@functools.cache
def declared_keys(cls: type) -> Mapping[str, Key]:
    """The config keys of a settings class by name, in declaration order."""
    out: dict[str, Key] = {}
    for item in fields(cls):
        for key in item.metadata.get(_METADATA, ()):
            default = MISSING if key.joined else item.default
            out[key.name or item.name] = replace(key, name=key.name or item.name, field=item.name, default=default)
    return out


def _check(kind: str) -> Callable[[Callable[[Any], Any]], Check]:
    """Make the decorated conversion a ``Check`` whose type the docs call ``kind``."""
    return lambda convert: Check(kind, convert)


# -- checks of single values ---------------------------------------------------------


def show_value(value: Any) -> str:
    """``repr(value)`` for an error message, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def type_name(value: Any) -> str:
    """The TOML name of the value's type, with its article ("an integer")."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


#: A URL in free text: scheme, optional user info, the rest of the authority and path, optional query.
#: Quotes and angle brackets end a URL, so the text around it survives.
_URL = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"<>]*@)?"
    r"(?P<rest>[^?#\s'\"<>]*)(?P<query>\?[^#\s'\"<>]*)?"
)


def _redact_url_match(match: re.Match[str]) -> str:
    userinfo = f"{REDACTED}@" if match.group("userinfo") else ""
    query = f"?{REDACTED}" if match.group("query") else ""
    return f"{match.group('scheme')}{userinfo}{match.group('rest')}{query}"


def redact_urls(text: str) -> str:
    """``text`` with the user info and the query string of every URL in it replaced by ``<redacted>``.

    ``https://user:pw@host/p?token=x`` becomes ``https://<redacted>@host/p?<redacted>``; the
    scheme, host and path stay, so the text still says where a call went. Endpoint URLs may
    carry credentials; log.py applies this to every log line as well.
    """
    if "://" not in text:  # the common case: no URL, no regex
        return text
    return _URL.sub(_redact_url_match, text)


def show_url(url: str) -> str:
    """The URL for an error message, its user info and query (credentials, tokens) as ``<redacted>``."""
    # Without a scheme (a common slip) the text is redacted as if it had one.
    return show_value(redact_urls(url) if "://" in url else redact_urls(f"x://{url}")[4:])


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"expected a string, got {type_name(value)} {show_value(value)}")
    return value


@_check("boolean")
def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(f"expected true or false, got {type_name(value)} {show_value(value)}")
    return value


def _whole(value: Any, minimum: int) -> int:
    # bool is a subclass of int in Python, but `true` is no count of anything.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"expected an integer, got {type_name(value)} {show_value(value)}")
    if value < minimum:
        raise InvalidValue(f"{value} is below the minimum of {minimum}")
    return value


def _integer(minimum: int) -> Check:
    return Check(f"integer ≥ {minimum}", functools.partial(_whole, minimum=minimum))


def _duration(value: Any, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValue(f"expected a number of seconds, got {type_name(value)} {show_value(value)}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise InvalidValue(f"{show_value(value)} must be {'zero or more' if zero_ok else 'greater than zero'}")
    return float(value)


_SECONDS: Final = Check("seconds > 0", functools.partial(_duration, zero_ok=False))
_SECONDS_OR_ZERO: Final = Check("seconds ≥ 0", functools.partial(_duration, zero_ok=True))


@_check("number, 0 < rate ≤ 1")
def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValue(f"expected a number, got {type_name(value)} {show_value(value)}")
    if not 0 < value <= 1:
        raise InvalidValue(f"{show_value(value)} must be greater than 0 and at most 1")
    return float(value)


def _choice(choices: Iterable[str], cast: Callable[[str], Any] = str) -> Check:
    """A string from a fixed lower-case set, matched ignoring case; ``cast`` makes the stored value."""
    allowed = tuple(choices)

    def convert(value: Any) -> Any:
        text = _text(value).lower()
        if text not in allowed:
            raise InvalidValue(f"{show_value(value)} is not one of {', '.join(allowed)}")
        return cast(text)

    return Check(" | ".join(f"`{choice}`" for choice in allowed), convert)


def _text_list(value: Any, *, single_ok: bool = False) -> list[str]:
    if single_ok and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidValue(f"expected an array of strings, got {show_value(value)}")
    return value


def _unique(items: list[Any]) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise InvalidValue(f"{show_value(item)} is listed twice")
        seen.add(item)


@_check("string or array of strings")
def _listen(value: Any) -> tuple[str, ...]:
    items = _text_list(value, single_ok=True)
    if not items:
        raise InvalidValue("needs at least one address")
    out = []
    for item in items:
        try:
            out.append(str(parse_listen_address(item)))  # canonical form for the listener and logs
        except ValueError as exc:
            raise InvalidValue(str(exc)) from None
    _unique(out)
    return tuple(out)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@_check("string or array of strings")
def _networks(value: Any) -> tuple[Network, ...]:
    items = _text_list(value, single_ok=True)
    if not items:
        raise InvalidValue("needs at least one network (leave the key out to accept every client)")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip()))  # a plain address is a /32 or /128
        except ValueError as exc:
            raise InvalidValue(f"{show_value(item)} is not an address or a CIDR network: {exc}") from None
    _unique([str(network) for network in out])
    return tuple(out)


@_check("string")
def _host_port(value: Any) -> str:
    text = _text(value)
    try:
        split_host_port(text)
    except ValueError as exc:
        raise InvalidValue(str(exc)) from None
    return text


@_check("integer (octal)")
def _socket_mode(value: Any) -> int:
    if isinstance(value, str):  # from the environment: "0o660" or "0660" (not JSON), read as octal
        try:
            value = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise InvalidValue(f"{show_value(value)} is not an octal mode like 0o660") from None
    mode = _whole(value, 0)
    if mode > 0o777:
        raise InvalidValue(f"{mode} (0o{mode:o}) is not a permission mode (write it in octal, e.g. 0o660)")
    if mode & 0o002:
        raise InvalidValue(f"0o{mode:o} lets every local user write to the milter socket; drop the o+w bit")
    return mode


_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MACRO = re.compile(r"\{[A-Za-z0-9_]+\}|[A-Za-z0-9_]")


@_check("string")
def _name(value: Any) -> str:
    text = _text(value)
    if not _NAME.fullmatch(text):
        raise InvalidValue(f"{show_value(text)} may only contain letters, digits, '_', '.' and '-'")
    return text


@_check("string")
def _url(value: Any) -> str:
    text = _text(value)
    shown = show_url(text)
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a malformed port or IPv6 address
        raise InvalidValue(f"{shown} is not an http:// or https:// URL with a host") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InvalidValue(f"{shown} is not an http:// or https:// URL with a host")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InvalidValue(f"{shown} contains whitespace or control characters")
    try:
        URL(text)  # as the HTTP client will parse it, host name encoding (IDNA) included
    except ValueError as exc:  # UnicodeError too
        raise InvalidValue(f"{shown} is not a URL the HTTP client accepts ({type(exc).__name__})") from None
    return text


def _members(cls: type[E], what: str, *, empty: str | None = None) -> Check:
    """An array of distinct values of the enum ``cls`` (``what`` names one); ``empty`` refuses none."""

    def convert(value: Any) -> frozenset[E]:
        items = _text_list(value)
        if not items and empty is not None:
            raise InvalidValue(empty)
        known = [member.value for member in cls]
        for item in items:
            if item not in known:
                raise InvalidValue(f"{show_value(item)} is not {what} (known: {', '.join(known)})")
        _unique(items)
        return frozenset(cls(item) for item in items)

    return Check("array of strings", convert)


@_check("array of strings")
def _macros(value: Any) -> tuple[str, ...]:
    items = _text_list(value)
    for item in items:
        if not _MACRO.fullmatch(item):
            raise InvalidValue(f"{show_value(item)} is not a macro name (like i, j or {{auth_authen}})")
    _unique(items)
    return tuple(items)


def _strings(value: Any, *, secret: bool) -> tuple[str, ...]:
    """A string or an array of strings, as a tuple; a secret value is never shown."""
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        shown = REDACTED if secret else show_value(value)
        raise InvalidValue(f"expected a string or an array of strings, got {type_name(value)} {shown}")
    return (value,) if isinstance(value, str) else tuple(value)


_STRINGS: Final = Check("string or array of strings", functools.partial(_strings, secret=False))
_SECRETS: Final = Check("string or array of strings", functools.partial(_strings, secret=True))


@_check("table")
def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    """Header names to values as written (``${VAR}`` not yet expanded); values are never shown."""
    if not isinstance(value, dict):
        raise InvalidValue(f"expected a table of header names to values, got {type_name(value)}")
    seen: set[str] = set()
    for name, raw in value.items():
        if not HTTP_TOKEN.fullmatch(name):
            raise InvalidValue(f"{show_value(name)} is not a valid HTTP header name", name)
        if name.lower() in RESERVED_HEADERS:
            raise InvalidValue(f"{name} is set by milterbridge itself and cannot be configured", name)
        if name.lower() in seen:
            raise InvalidValue(f"header {name} is given twice (header names ignore case)", name)
        seen.add(name.lower())
        if not isinstance(raw, str):
            raise InvalidValue(f"expected a string, got {type_name(raw)} {REDACTED}", name)
    return tuple(value.items())


@_check("array of strings")
def _hook_properties(value: Any) -> tuple[str, ...]:
    """MTA Hooks properties (JSON Pointers such as ``/envelope``) the bridge offers, in the order given."""
    items = _text_list(value)
    for item in items:
        if item == "/rawMessage":
            raise InvalidValue("/rawMessage is sent when include_body = true; drop it here")
        if item not in HOOK_PROPERTIES:
            offered = ", ".join(p for p in HOOK_PROPERTIES if p != "/rawMessage")
            raise InvalidValue(f"{show_value(item)} is not a property the bridge sends (known: {offered})")
    _unique(items)
    return tuple(items)


@_check("table")
def _event_timeouts(value: Any) -> tuple[tuple[Event, float], ...]:
    """Event names to seconds > 0, in the order of ``Event``."""
    if not isinstance(value, dict):
        raise InvalidValue(f"expected a table of event names to seconds, got {type_name(value)}")
    known = [member.value for member in Event]
    for name, seconds in value.items():
        if name not in known:
            raise InvalidValue(f"{show_value(name)} is not an event (known: {', '.join(known)})", name)
        try:
            _duration(seconds, zero_ok=False)
        except InvalidValue as exc:
            raise InvalidValue(str(exc), name) from None
    return tuple((event, float(value[event.value])) for event in Event if event.value in value)


@_check("table")
def _when(value: Any) -> Condition:
    """A ``when`` table (milterbridge.policy.conditions); a key at fault is named as the part."""
    if not isinstance(value, dict):
        raise InvalidValue(f"expected a table, got {type_name(value)}")
    try:
        return parse_condition(value)
    except ConditionError as exc:
        raise InvalidValue(str(exc), exc.key) from None


#: ``[server] mta``: one MTA, or told apart per connection.
MTA_AUTO: Final = "auto"


@_check("string (Sendmail's T= syntax)")
def _sendmail_timeouts(value: Any) -> SendmailTimeouts:
    try:
        return SendmailTimeouts.parse(_text(value))
    except ValueError as exc:
        raise InvalidValue(f"{exc} (copy the T= value of your INPUT_MAIL_FILTER line)") from None


@_check("table")
def _table(value: Any) -> dict[str, Any]:
    """A table of its own, such as tls: the loader reads it by its own keys."""
    if not isinstance(value, dict):
        raise InvalidValue(f"expected a table, got {type_name(value)}")
    return value


_PATH: Final = Check("string (path)", _text)


# -- the settings ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """TLS options of one endpoint (verification is on unless turned off)."""

    ca_file: str | None = setting(None, _PATH, "CA bundle (PEM) used to verify the endpoint's certificate.")
    cert_file: str | None = setting(None, _PATH, "Client certificate (PEM) for mutual TLS; needs key_file.")
    key_file: str | None = setting(None, _PATH, "Key of the client certificate (PEM); needs cert_file.")
    verify: bool = setting(True, _boolean, "Whether the endpoint's certificate is verified.")


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSettings:
    """One webhook endpoint ([[endpoints]] in the TOML)."""

    name: str = field(metadata=declare(_name, "The endpoint's name in logs, metric labels and environment overrides."))
    #: May carry credentials or tokens in its userinfo or query: kept out of repr().
    url: str = field(repr=False, metadata=declare(_url, "The URL the webhooks are posted to."))
    protocol: EndpointProtocol = setting(
        EndpointProtocol.MILTERBRIDGE,
        _choice(EndpointProtocol, EndpointProtocol),
        "The HTTP contract the endpoint speaks.",
    )
    #: MTA Hooks: the properties asked for at registration; None: every one (``/rawMessage`` with include_body).
    properties: tuple[str, ...] | None = setting(
        None, _hook_properties, "mta-hooks: the request properties to ask for.", shown="every property"
    )
    events: frozenset[Event] = setting(
        frozenset({Event.EOM}),
        _members(Event, "an event", empty="needs at least one event"),
        "The events this endpoint is called for.",
    )
    mode: Mode = setting(Mode.ENFORCE, _choice(Mode, Mode), "Whether the endpoint's answers are applied or observed.")
    on_error: OnError = setting(OnError.TEMPFAIL, _choice(OnError, OnError), "What a failure counts as.")
    timeout: float = setting(5.0, _SECONDS, "The whole budget for one event, retry included.")
    #: Budgets of single events that replace ``timeout`` for them, in the order of ``Event``.
    timeouts: tuple[tuple[Event, float], ...] = setting(
        (), _event_timeouts, "The budget of single events, replacing timeout for them."
    )
    max_concurrency: int = setting(0, _integer(0), "Calls to this endpoint in flight at once, per worker; 0 is no cap.")
    include_body: bool = setting(False, _boolean, "Send the message body (base64) in the eom payload.")
    max_body_bytes: int = setting(10 * 1024 * 1024, _integer(1), "Body bytes sent to this endpoint.")
    macros: tuple[str, ...] = setting((), _macros, "Extra Postfix macros to request, spelled as Postfix spells them.")
    #: Standard Webhooks secrets ("whsec_..."), several during rotation; never logged. The loader
    #: reads them from the three keys below and joins them in that order.
    secrets: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata=joined(
            ("secret", _SECRETS, "Signing secret(s), written inline."),
            ("secret_env", _STRINGS, "Names of environment variables that hold secrets."),
            ("secret_file", _STRINGS, "Files that hold one secret each (surrounding whitespace is stripped)."),
        ),
    )
    #: Values with their ${VAR} references expanded; never logged (they may hold tokens).
    headers: tuple[tuple[str, str], ...] = setting(
        (), _headers, "Extra HTTP headers, with ${VAR} expansion.", hidden=True
    )
    tls: TlsSettings = setting(TlsSettings(), _table, "TLS options.")
    allow_insecure_http: bool = setting(False, _boolean, "Allow plain http:// to a host that is not loopback.")
    max_response_bytes: int = setting(1024 * 1024, _integer(1), "Largest response body accepted.")
    retry: bool = setting(True, _boolean, "Retry once, inside timeout, on connection errors and on 429/502/503/504.")
    breaker_failure_rate: float = setting(
        0.5, _rate, "Share of failed calls in the last breaker_window seconds that opens the circuit breaker."
    )
    breaker_min_calls: int = setting(
        20, _integer(0), "Calls the window must hold before the rate can open the breaker."
    )
    breaker_window: float = setting(10.0, _SECONDS, "How far back the breaker looks.")
    breaker_probe: float = setting(1.0, _SECONDS, "How long an open breaker waits before one trial call.")
    breaker_reset: float = setting(30.0, _SECONDS, "The longest wait between trial calls.")
    max_modifications: int = setting(1000, _integer(1), "Most modifications accepted in one response.")
    max_background: int = setting(
        100,
        _integer(0),
        "Observe-mode and notification (abort, close) calls to this endpoint running at once, per worker.",
    )
    # An empty list is valid: an endpoint that may decide but never modify.
    allowed_ops: frozenset[ModOp] = setting(
        ALL_OPS, _members(ModOp, "a modification op"), "Modification ops this endpoint may ask for.", shown="every op"
    )
    when: Condition | None = setting(
        None, _when, "Conditions under which the endpoint is called at all.", shown="unset"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The milter listener ([server])."""

    listen: tuple[str, ...] = setting(("inet:127.0.0.1:8890",), _listen, "Milter addresses to listen on.")
    max_connections: int = setting(1000, _integer(1), "Concurrent MTA connections.")
    max_message_bytes: int = setting(50 * 1024 * 1024, _integer(1), "Hard cap on the body size the bridge receives.")
    on_oversize: OnOversize = setting(
        OnOversize.TEMPFAIL, _choice(OnOversize, OnOversize), "What happens to a message over any per-message limit."
    )
    body_memory_bytes: int = setting(
        1024 * 1024,
        _integer(1),
        "Bodies above this size are spooled to a temporary file instead of being kept in memory.",
    )
    drain_timeout: float = setting(
        30.0, _SECONDS_OR_ZERO, "On SIGTERM: how long in-flight sessions may run before they are cancelled."
    )
    idle_timeout: float = setting(
        3600.0, _SECONDS, "How long a milter connection may sit idle between commands before it is closed."
    )
    negotiate_timeout: float = setting(
        10.0, _SECONDS, "How long after accept the MTA has to send its option negotiation."
    )
    allowed_clients: tuple[Network, ...] = setting(
        (),
        _networks,
        "Networks inet peers must come from; unix-socket listeners are not filtered.",
        shown="unset",
    )
    # Postfix body chunks are 65535 bytes (milter-protocol.md §1.4).
    max_frame_bytes: int = setting(1024 * 1024, _integer(65535), "Largest inbound milter packet payload.")
    max_recipients: int = setting(10_000, _integer(1), "Recipients kept per message; more: on_oversize.")
    max_headers: int = setting(10_000, _integer(1), "Headers kept per message; more: on_oversize.")
    max_header_bytes: int = setting(
        16 * 1024 * 1024, _integer(1), "Total header bytes (names and values) kept per message; more: on_oversize."
    )
    max_macros: int = setting(
        1_000, _integer(1), "Macros kept per connection (connect and HELO stages) and per message."
    )
    max_buffered_bytes: int = setting(
        256 * 1024 * 1024,
        _integer(1024 * 1024),
        "Header, recipient and in-memory body bytes all connections of one worker may hold together.",
    )
    socket_mode: int = setting(0o660, _socket_mode, "Permissions of unix socket files.")
    progress_interval: float = setting(
        1.0,
        _SECONDS,
        "While an end-of-message webhook is slow, how often a keep-alive (SMFIR_PROGRESS) goes to the MTA.",
    )
    allow_no_endpoints: bool = setting(
        False, _boolean, "Serve a config without an enforcing endpoint, where every message passes unfiltered."
    )
    mta: str = setting(
        MTA_AUTO,
        _choice((MTA_AUTO, *Mta)),
        "The MTA that connects (postfix, sendmail), or auto: told apart per connection by its v macro.",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SendmailSettings:
    """What the bridge must know of a Sendmail's configuration ([sendmail])."""

    timeouts: SendmailTimeouts = setting(
        SendmailTimeouts(),
        _sendmail_timeouts,
        "The T= of the INPUT_MAIL_FILTER line for the bridge: how long Sendmail waits for it.",
        shown='`"S:10s;R:10s;E:5m"` (Sendmail\'s defaults)',
    )
    header_lines: int = setting(
        STOCK_CF_HEADER_LINES, _integer(1), "How many H lines sendmail.cf has (grep -c '^H' sendmail.cf)."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    """The admin HTTP listener ([admin]): /livez /readyz /metrics."""

    listen: str = setting("127.0.0.1:8891", _host_port, "HTTP listener for /livez, /readyz and /metrics.")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """Logging ([log])."""

    level: str = setting("info", _choice(("debug", "info", "warning", "error")), "How much is logged.")


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """OpenTelemetry tracing ([tracing]); where spans go is set by the standard OTEL_* variables."""

    enabled: bool = setting(
        False, _boolean, "Trace every message with OpenTelemetry (needs pip install 'milterbridge[otel]')."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration."""

    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    sendmail: SendmailSettings = SendmailSettings()
    tracing: TracingSettings = TracingSettings()
    endpoints: tuple[EndpointSettings, ...] = ()
    #: Path of the TOML file loaded; None when built from defaults and environment only
    #: (the CLI runs the demo then).
    source: str | None = None
    #: Dotted keys whose secret value is written in the file itself (for ``config_warnings``).
    inline_secrets: tuple[str, ...] = ()
    #: Secret files read (``secret_file``), absolute paths (for ``config_warnings``).
    secret_files: tuple[str, ...] = ()
