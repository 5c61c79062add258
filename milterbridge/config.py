"""Frozen, validated settings and their loader (TOML file plus environment).

The settings types below are the contract other modules read. The loader
(``load_config``) is called once, from ``app.py`` or ``cli.py``; every key, its
default and the override rules are in ``docs/configuration.md``.

The loader is data-driven: each section has a table of field specs (key ->
converter) read by one function, and only the checks that span several keys
(plain http, pre-eom timeouts, tls pairs, unique names) are written out.

Errors::

    ConfigError        the only exception; ``key`` is the dotted path of the bad key
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

from milterbridge.log import redact_urls
from milterbridge.milter.address import is_loopback_host, parse_listen_address, split_host_port
from milterbridge.milter.constants import Event
from milterbridge.policy.model import ALL_OPS, Mode, ModOp, OnError, OnOversize


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """TLS options of one endpoint (verification is on unless turned off)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSettings:
    """One webhook endpoint ([[endpoints]] in the TOML)."""

    name: str
    #: May carry credentials or tokens in its userinfo or query: kept out of repr().
    url: str = field(repr=False)
    events: frozenset[Event] = frozenset({Event.EOM})
    mode: Mode = Mode.ENFORCE
    on_error: OnError = OnError.TEMPFAIL
    #: Whole budget for one event, retry included, in seconds.
    timeout: float = 5.0
    include_body: bool = False
    #: Body bytes sent to this endpoint at eom; a larger body is cut (and flagged).
    max_body_bytes: int = 10 * 1024 * 1024
    #: Macro names as Postfix spells them, e.g. "{auth_authen}", "i".
    macros: tuple[str, ...] = ()
    #: Standard Webhooks secrets ("whsec_..."), several during rotation; never logged.
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: Extra HTTP headers, ${VAR} already expanded; never logged (may hold tokens).
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    tls: TlsSettings = TlsSettings()
    allow_insecure_http: bool = False
    #: Largest response body accepted.
    max_response_bytes: int = 1024 * 1024
    #: Retry once (inside the timeout) on connection errors and 429/502/503/504.
    retry: bool = True
    #: Share of failed calls in the breaker window that opens the circuit breaker.
    breaker_failure_rate: float = 0.5
    #: Calls the window must hold before the rate counts (0 disables the breaker).
    breaker_min_calls: int = 20
    #: Seconds of calls the breaker judges (a sliding window).
    breaker_window: float = 10.0
    #: Seconds the open breaker waits before its first trial call (doubled after each failed one).
    breaker_probe: float = 1.0
    #: Longest wait between trial calls, in seconds.
    breaker_reset: float = 30.0
    #: Most modifications accepted in one response.
    max_modifications: int = 1000
    #: Observe and notification (abort, close) calls in flight at once, per worker; more are
    #: dropped and counted, never queued (they never hold a reply to the MTA).
    max_background: int = 100
    #: Modification ops this endpoint may ask for; any other makes its answer invalid.
    allowed_ops: frozenset[ModOp] = ALL_OPS


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The milter listener ([server])."""

    listen: tuple[str, ...] = ("inet:127.0.0.1:8890",)
    max_connections: int = 1000
    max_message_bytes: int = 50 * 1024 * 1024
    on_oversize: OnOversize = OnOversize.TEMPFAIL
    body_memory_bytes: int = 1024 * 1024
    drain_timeout: float = 30.0
    #: Seconds a milter connection may sit idle between commands (docs/postfix.md, "Timeouts").
    idle_timeout: float = 3600.0
    #: Seconds from accept to the MTA's option negotiation.
    negotiate_timeout: float = 10.0
    #: Networks inet peers must come from; empty: any (unix sockets are never filtered).
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Largest inbound milter frame payload.
    max_frame_bytes: int = 1024 * 1024
    max_recipients: int = 10_000
    max_headers: int = 10_000
    max_header_bytes: int = 16 * 1024 * 1024
    max_macros: int = 1_000
    #: Header, recipient and in-memory body bytes all connections of a worker may hold together.
    max_buffered_bytes: int = 256 * 1024 * 1024
    #: Mode of the unix socket file.
    socket_mode: int = 0o660
    #: Seconds between SMFIR_PROGRESS keep-alives while an eom webhook is slow.
    progress_interval: float = 1.0
    #: Serve (and reload to) a config without any enforcing endpoint; see ``check_enforcing``.
    allow_no_endpoints: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    """The admin HTTP listener ([admin]): /livez /readyz /metrics."""

    listen: str = "127.0.0.1:8891"


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """Logging ([log])."""

    level: str = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration."""

    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    endpoints: tuple[EndpointSettings, ...] = ()
    #: Path of the TOML file loaded; None when built from defaults and environment only
    #: (the CLI runs the demo then).
    source: str | None = None
    #: Dotted keys whose secret value is written in the file itself (for ``config_warnings``).
    inline_secrets: tuple[str, ...] = ()
    #: Secret files read (``secret_file``), absolute paths (for ``config_warnings``).
    secret_files: tuple[str, ...] = ()


# -- the loader -------------------------------------------------------------------

ENV_PREFIX = "MILTERBRIDGE_"
CONFIG_ENV = "MILTERBRIDGE_CONFIG"
REDACTED = "<redacted>"

Converter = Callable[[Any, str, "_Context"], Any]


class ConfigError(Exception):
    """A configuration value is missing, of the wrong type or invalid.

    ``key`` is the dotted path of the offending key (``server.listen``,
    ``endpoints.policy.timeout``), or ``""`` for the file as a whole. The
    message names the key and the bad value, except secrets and header values,
    which are shown as ``<redacted>``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(slots=True)
class _Context:
    environ: Mapping[str, str]
    base_dir: str | None
    #: Dotted key -> environment variable that set it, to say so in errors.
    sources: dict[str, str] = field(default_factory=dict)
    #: What ``Config.inline_secrets`` and ``Config.secret_files`` report.
    inline_secrets: list[str] = field(default_factory=list)
    secret_files: list[str] = field(default_factory=list)

    def error(self, key: str, message: str) -> ConfigError:
        probe = key
        while probe:
            if probe in self.sources:
                message += f" (set by {self.sources[probe]})"
                break
            probe = probe.rpartition(".")[0]
        return ConfigError(key, message)

    def path(self, text: str) -> str:
        """Resolve a file path: relative paths are relative to the config file's directory."""
        return os.path.normpath(os.path.join(self.base_dir or os.getcwd(), os.path.expanduser(text)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _str(value: Any, key: str, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise ctx.error(key, f"expected a string, got {_type(value)} {_show(value)}")
    return value


def _bool(value: Any, key: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(key, f"expected true or false, got {_type(value)} {_show(value)}")
    return value


def _int(minimum: int) -> Converter:
    def convert(value: Any, key: str, ctx: _Context) -> int:
        # bool is a subclass of int in Python, but `true` is no count of anything.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, f"expected an integer, got {_type(value)} {_show(value)}")
        if value < minimum:
            raise ctx.error(key, f"{value} is below the minimum of {minimum}")
        return value

    return convert


def _seconds(*, zero_ok: bool = False) -> Converter:
    def convert(value: Any, key: str, ctx: _Context) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ctx.error(key, f"expected a number of seconds, got {_type(value)} {_show(value)}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise ctx.error(key, f"{_show(value)} must be {'zero or more' if zero_ok else 'greater than zero'}")
        return float(value)

    return convert


def _fraction(value: Any, key: str, ctx: _Context) -> float:
    """A share above 0 and at most 1, such as a failure rate (0.5 is half)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.error(key, f"expected a number, got {_type(value)} {_show(value)}")
    if not 0 < value <= 1:
        raise ctx.error(key, f"{_show(value)} must be greater than 0 and at most 1")
    return float(value)


def _choice(choices: Iterable[str], cast: Callable[[str], Any] = str) -> Converter:
    """A string from a fixed lower-case set, matched ignoring case; ``cast`` makes the stored value."""
    allowed = tuple(choices)

    def convert(value: Any, key: str, ctx: _Context) -> Any:
        text = _str(value, key, ctx).lower()
        if text not in allowed:
            raise ctx.error(key, f"{_show(value)} is not one of {', '.join(allowed)}")
        return cast(text)

    return convert


def _str_list(value: Any, key: str, ctx: _Context, *, single_ok: bool = False) -> list[str]:
    if single_ok and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ctx.error(key, f"expected an array of strings, got {_show(value)}")
    return value


def _unique(items: list[Any], key: str, ctx: _Context) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise ctx.error(key, f"{_show(item)} is listed twice")
        seen.add(item)


def _listen(value: Any, key: str, ctx: _Context) -> tuple[str, ...]:
    items = _str_list(value, key, ctx, single_ok=True)
    if not items:
        raise ctx.error(key, "needs at least one address")
    out = []
    for item in items:
        try:
            out.append(str(parse_listen_address(item)))  # canonical form for the listener and logs
        except ValueError as exc:
            raise ctx.error(key, str(exc)) from None
    _unique(out, key, ctx)
    return tuple(out)


def _networks(value: Any, key: str, ctx: _Context) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    items = _str_list(value, key, ctx, single_ok=True)
    if not items:
        raise ctx.error(key, "needs at least one network (leave the key out to accept every client)")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip()))  # a plain address is a /32 or /128
        except ValueError as exc:
            raise ctx.error(key, f"{_show(item)} is not an address or a CIDR network: {exc}") from None
    _unique([str(network) for network in out], key, ctx)
    return tuple(out)


def _admin_listen(value: Any, key: str, ctx: _Context) -> str:
    text = _str(value, key, ctx)
    try:
        split_host_port(text)
    except ValueError as exc:
        raise ctx.error(key, str(exc)) from None
    return text


def _socket_mode(value: Any, key: str, ctx: _Context) -> int:
    if isinstance(value, str):  # from the environment: "0o660" or "0660" (not JSON), read as octal
        try:
            value = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise ctx.error(key, f"{_show(value)} is not an octal mode like 0o660") from None
    mode: int = _int(0)(value, key, ctx)
    if mode > 0o777:
        raise ctx.error(key, f"{mode} (0o{mode:o}) is not a permission mode (write it in octal, e.g. 0o660)")
    if mode & 0o002:
        raise ctx.error(key, f"0o{mode:o} lets every local user write to the milter socket; drop the o+w bit")
    return mode


_SERVER: dict[str, Converter] = {
    "listen": _listen,
    "max_connections": _int(1),
    "max_message_bytes": _int(1),
    "on_oversize": _choice(OnOversize, OnOversize),
    "body_memory_bytes": _int(1),
    "drain_timeout": _seconds(zero_ok=True),
    "idle_timeout": _seconds(),
    "negotiate_timeout": _seconds(),
    "allowed_clients": _networks,
    "max_frame_bytes": _int(65535),  # Postfix body chunks are 65535 bytes (milter-protocol.md §1.4)
    "max_recipients": _int(1),
    "max_headers": _int(1),
    "max_header_bytes": _int(1),
    "max_macros": _int(1),
    "max_buffered_bytes": _int(1024 * 1024),
    "socket_mode": _socket_mode,
    "progress_interval": _seconds(),
    "allow_no_endpoints": _bool,
}
_ADMIN: dict[str, Converter] = {"listen": _admin_listen}
_LOG: dict[str, Converter] = {"level": _choice(("debug", "info", "warning", "error"))}

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MACRO = re.compile(r"\{[A-Za-z0-9_]+\}|[A-Za-z0-9_]")
#: An HTTP header name (RFC 9110 token); the webhook client checks names with it too.
HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
#: Headers the webhook client sets itself (lower case); a configured value would break signing or framing.
RESERVED_HEADERS = frozenset(
    {
        *("content-type", "content-length", "host", "transfer-encoding", "connection", "accept-encoding"),
        *("webhook-id", "webhook-timestamp", "webhook-signature"),
    }
)
#: Events answered before end-of-message, where Postfix's milter_command_timeout applies.
_PRE_EOM = frozenset(Event) - {Event.EOM, Event.ABORT, Event.CLOSE}
POSTFIX_COMMAND_TIMEOUT = 30.0


def _name(value: Any, key: str, ctx: _Context) -> str:
    text = _str(value, key, ctx)
    if not _NAME.fullmatch(text):
        raise ctx.error(key, f"{_show(text)} may only contain letters, digits, '_', '.' and '-'")
    return text


def _show_url(url: str) -> str:
    """The URL for an error message, its user info and query (credentials, tokens) as ``<redacted>``."""
    # Without a scheme (a common slip) the text is redacted as if it had one.
    return _show(redact_urls(url) if "://" in url else redact_urls(f"x://{url}")[4:])


def _url(value: Any, key: str, ctx: _Context) -> str:
    text = _str(value, key, ctx)
    shown = _show_url(text)
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a malformed port or IPv6 address
        raise ctx.error(key, f"{shown} is not an http:// or https:// URL with a host") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ctx.error(key, f"{shown} is not an http:// or https:// URL with a host")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ctx.error(key, f"{shown} contains whitespace or control characters")
    try:
        URL(text)  # as the HTTP client will parse it, host name encoding (IDNA) included
    except ValueError as exc:  # UnicodeError too
        raise ctx.error(key, f"{shown} is not a URL the HTTP client accepts ({type(exc).__name__})") from None
    return text


def _events(value: Any, key: str, ctx: _Context) -> frozenset[Event]:
    items = _str_list(value, key, ctx)
    if not items:
        raise ctx.error(key, "needs at least one event")
    known = {e.value for e in Event}
    for item in items:
        if item not in known:
            raise ctx.error(key, f"{_show(item)} is not an event (known: {', '.join(e.value for e in Event)})")
    _unique(items, key, ctx)
    return frozenset(Event(item) for item in items)


def _ops(value: Any, key: str, ctx: _Context) -> frozenset[ModOp]:
    # An empty list is valid: an endpoint that may decide but never modify.
    items = _str_list(value, key, ctx)
    known = [op.value for op in ModOp]
    for item in items:
        if item not in known:
            raise ctx.error(key, f"{_show(item)} is not a modification op (known: {', '.join(known)})")
    _unique(items, key, ctx)
    return frozenset(ModOp(item) for item in items)


def _macros(value: Any, key: str, ctx: _Context) -> tuple[str, ...]:
    items = _str_list(value, key, ctx)
    for item in items:
        if not _MACRO.fullmatch(item):
            raise ctx.error(key, f"{_show(item)} is not a macro name (like i, j or {{auth_authen}})")
    _unique(items, key, ctx)
    return tuple(items)


def _check_secret(secret: str, key: str, ctx: _Context, where: str) -> str:
    # Standard Webhooks: the key is the base64 text after the "whsec_" prefix.
    try:
        ok = secret.startswith("whsec_") and bool(base64.b64decode(secret[6:], validate=True))
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise ctx.error(key, f"{where} {REDACTED} is not a Standard Webhooks secret ('whsec_' followed by base64)")
    return secret


def _secrets(source: str) -> Converter:
    def convert(value: Any, key: str, ctx: _Context) -> tuple[str, ...]:
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            shown = REDACTED if source == "secret" else _show(value)
            raise ctx.error(key, f"expected a string or an array of strings, got {_type(value)} {shown}")
        out = []
        for item in [value] if isinstance(value, str) else value:
            if source == "secret":
                out.append(_check_secret(item, key, ctx, "the secret"))
            elif source == "env":
                if item not in ctx.environ:
                    raise ctx.error(key, f"environment variable {_show(item)} is not set")
                out.append(_check_secret(ctx.environ[item].strip(), key, ctx, f"the value of {item}"))
            else:
                path = ctx.path(item)
                try:
                    with open(path, encoding="utf-8") as file:
                        text = file.read().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                    raise ctx.error(key, f"cannot read secret file {_show(path)}: {reason}") from None
                ctx.secret_files.append(path)
                out.append(_check_secret(text, key, ctx, f"the content of {path}"))
        return tuple(out)

    return convert


def _headers(value: Any, key: str, ctx: _Context) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ctx.error(key, f"expected a table of header names to values, got {_type(value)}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, raw in value.items():
        hkey = f"{key}.{name}"
        if not HTTP_TOKEN.fullmatch(name):
            raise ctx.error(hkey, f"{_show(name)} is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ctx.error(hkey, f"{name} is set by milterbridge itself and cannot be configured")
        if name.lower() in seen:
            raise ctx.error(hkey, f"header {name} is given twice (header names ignore case)")
        seen.add(name.lower())
        if not isinstance(raw, str):
            raise ctx.error(hkey, f"expected a string, got {_type(raw)} {REDACTED}")
        expanded = _VAR.sub(functools.partial(_expand, key=hkey, ctx=ctx), raw)
        if any(ch in expanded for ch in "\r\n\0"):
            raise ctx.error(hkey, f"the value {REDACTED} contains CR, LF or NUL (after ${{VAR}} expansion)")
        out.append((name, expanded))
    return tuple(out)


def _expand(match: re.Match[str], key: str, ctx: _Context) -> str:
    if match.group(0) == "$${":  # escape for a literal "${"
        return "${"
    var = match.group(1)
    if var is None:
        raise ctx.error(key, "malformed ${...} reference in the value (write ${NAME}, or $${ for a literal ${)")
    if var not in ctx.environ:
        raise ctx.error(key, f"environment variable {var} (from ${{{var}}}) is not set")
    return ctx.environ[var]


def _file(value: Any, key: str, ctx: _Context) -> str:
    path = ctx.path(_str(value, key, ctx))
    if not os.path.isfile(path):
        raise ctx.error(key, f"file {_show(path)} does not exist")
    return path


_TLS: dict[str, Converter] = {"ca_file": _file, "cert_file": _file, "key_file": _file, "verify": _bool}


def _tls(value: Any, key: str, ctx: _Context) -> TlsSettings:
    kwargs = _section(value, _TLS, key, ctx)
    if ("cert_file" in kwargs) != ("key_file" in kwargs):
        missing = "key_file" if "cert_file" in kwargs else "cert_file"
        raise ctx.error(f"{key}.{missing}", "cert_file and key_file must be given together (client certificate)")
    return TlsSettings(**kwargs)


_ENDPOINT: dict[str, Converter] = {
    "name": _name,
    "url": _url,
    "events": _events,
    "mode": _choice(Mode, Mode),
    "on_error": _choice(OnError, OnError),
    "timeout": _seconds(),
    "include_body": _bool,
    "max_body_bytes": _int(1),
    "macros": _macros,
    "secret": _secrets("secret"),
    "secret_env": _secrets("env"),
    "secret_file": _secrets("file"),
    "headers": _headers,
    "tls": _tls,
    "allow_insecure_http": _bool,
    "max_response_bytes": _int(1),
    "retry": _bool,
    "breaker_failure_rate": _fraction,
    "breaker_min_calls": _int(0),
    "breaker_window": _seconds(),
    "breaker_probe": _seconds(),
    "breaker_reset": _seconds(),
    "max_modifications": _int(1),
    "max_background": _int(0),
    "allowed_ops": _ops,
}
_SECTIONS = {"server": _SERVER, "admin": _ADMIN, "log": _LOG}


def _section(table: Any, specs: Mapping[str, Converter], prefix: str, ctx: _Context) -> dict[str, Any]:
    """Convert one table by its field specs; unknown keys are errors so that typos never pass."""
    if not isinstance(table, dict):
        raise ctx.error(prefix, f"expected a table, got {_type(table)}")
    for name in table:
        if name not in specs:
            close = difflib.get_close_matches(name, specs, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(specs)})"
            raise ctx.error(f"{prefix}.{name}", f"unknown key{hint}")
    return {name: specs[name](value, f"{prefix}.{name}", ctx) for name, value in table.items()}


def _inline_secrets(table: dict[str, Any], prefix: str, ctx: _Context) -> list[str]:
    """Keys of this (already validated) endpoint table whose secret value the config file itself holds.

    Values set from the environment are not in the file; a header value counts unless it
    takes something from a ``${VAR}``; a URL counts when it carries a password or a query.
    """
    keys = []
    if "secret" in table and f"{prefix}.secret" not in ctx.sources:
        keys.append(f"{prefix}.secret")
    if f"{prefix}.headers" not in ctx.sources:
        keys += [f"{prefix}.headers.{name}" for name, raw in table.get("headers", {}).items() if "${" not in raw]
    parts = urlsplit(table["url"])
    if f"{prefix}.url" not in ctx.sources and (parts.password or parts.query):
        keys.append(f"{prefix}.url")
    return keys


def _endpoint(table: Any, index: int, ctx: _Context) -> EndpointSettings:
    if not isinstance(table, dict):
        raise ctx.error(f"endpoints[{index}]", f"expected a table, got {_type(table)}")
    for required in ("name", "url"):
        if required not in table:
            raise ctx.error(f"endpoints[{index}].{required}", "is required")
    prefix = f"endpoints.{_name(table['name'], f'endpoints[{index}].name', ctx)}"
    kwargs = _section(table, _ENDPOINT, prefix, ctx)
    ctx.inline_secrets.extend(_inline_secrets(table, prefix, ctx))
    kwargs["secrets"] = kwargs.pop("secret", ()) + kwargs.pop("secret_env", ()) + kwargs.pop("secret_file", ())
    settings = EndpointSettings(**kwargs)
    parts = urlsplit(settings.url)
    if parts.scheme == "http" and not settings.allow_insecure_http and not is_loopback_host(parts.hostname or ""):
        why = "is plain http to a host that is not loopback; use https or set allow_insecure_http = true"
        raise ctx.error(f"{prefix}.url", f"{_show_url(settings.url)} {why}")
    if (parts.username or parts.password) and any(name.lower() == "authorization" for name, _ in settings.headers):
        # The HTTP client cannot send both, and refusing here beats failing every request.
        raise ctx.error(f"{prefix}.headers.Authorization", "cannot be combined with credentials in the url")
    early = sorted(e.value for e in settings.events & _PRE_EOM)
    if early and settings.timeout >= POSTFIX_COMMAND_TIMEOUT:
        raise ctx.error(
            f"{prefix}.timeout",
            f"{settings.timeout:g} seconds is too long for events before end-of-message ({', '.join(early)}): "
            f"Postfix waits at most milter_command_timeout (30s by default) for those replies and keep-alives "
            f"exist only at end-of-message; use less than {POSTFIX_COMMAND_TIMEOUT:g}",
        )
    return settings


def _env_value(text: str) -> Any:
    """Parse JSON when the text looks like JSON (arrays, tables, numbers, booleans); else a plain string.

    Text that starts like JSON but does not parse stays a string: ``[::1]:8891`` is an address.
    """
    stripped = text.strip()
    if stripped[:1] in set('[{"-0123456789') or stripped in ("true", "false"):
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return text


def _env_name(name: str) -> str:
    # Environment variable names cannot hold '-' or '.', so both may be written as '_'.
    return name.lower().replace("-", "_").replace(".", "_")


def _apply_env(data: dict[str, Any], ctx: _Context) -> None:
    """Merge MILTERBRIDGE_<SECTION>__<KEY> and MILTERBRIDGE_ENDPOINTS__<NAME>__<KEY> into the raw tables."""
    for var in sorted(ctx.environ):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        section = parts[0].lower()
        if section == "endpoints":
            # An optional TLS__<KEY> tail sets one key of the tls table.
            nested = len(parts) >= 4 and parts[-2].lower() == "tls"
            name = "__".join(parts[1:-2] if nested else parts[1:-1])
            path = ["tls", parts[-1].lower()] if nested else [parts[-1].lower()]
            endpoints = data.get("endpoints", [])
            matches = [
                ep for ep in endpoints if isinstance(ep, dict) and _env_name(str(ep.get("name"))) == _env_name(name)
            ]
            if not name or len(parts) < 3 or len(matches) != 1:
                why = "matches several endpoints" if len(matches) > 1 else "names no configured endpoint"
                raise ConfigError(f"endpoints.{name.lower()}", f"{var} {why} {_show(name)}")
            table = matches[0]
            key = f"endpoints.{table['name']}.{'.'.join(path)}"
            if nested:
                table = table.setdefault("tls", {})
                if not isinstance(table, dict):
                    raise ctx.error(key, f"{var} sets a key of tls, but tls is not a table")
        elif section in _SECTIONS and len(parts) == 2:
            path = [parts[1].lower()]
            key = f"{section}.{path[0]}"
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ctx.error(section, f"expected a table, got {_type(table)}")
        else:
            raise ConfigError(section, f"{var} is not MILTERBRIDGE_<SECTION>__<KEY> for a known section")
        table[path[-1]] = _env_value(ctx.environ[var])
        ctx.sources[key] = var


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration: TOML file (or defaults), then environment overrides.

    ``path`` None means ``$MILTERBRIDGE_CONFIG``, and when that is unset too the
    defaults (plus environment overrides) are used and ``Config.source`` is None.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    env = os.environ if environ is None else environ
    source = os.fspath(path) if path is not None else (env.get(CONFIG_ENV) or None)
    data: dict[str, Any] = {}
    if source is not None:
        try:
            with open(source, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {source!r}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"config file {source!r} is not valid TOML: {exc}") from None
    ctx = _Context(environ=env, base_dir=os.path.dirname(os.path.abspath(source)) if source else None)
    _apply_env(data, ctx)
    for name in data:
        if name not in (*_SECTIONS, "endpoints"):
            raise ctx.error(name, "unknown section (known: server, admin, log, endpoints)")
    sections = {name: _section(data.get(name, {}), specs, name, ctx) for name, specs in _SECTIONS.items()}
    raw_endpoints = data.get("endpoints", [])
    if not isinstance(raw_endpoints, list):
        raise ctx.error("endpoints", f"expected an array of tables ([[endpoints]]), got {_type(raw_endpoints)}")
    endpoints = tuple(_endpoint(table, i, ctx) for i, table in enumerate(raw_endpoints))
    seen: dict[str, str] = {}
    for i, ep in enumerate(endpoints):
        if ep.name.lower() in seen:
            other = seen[ep.name.lower()]
            raise ctx.error(f"endpoints[{i}].name", f"{ep.name!r} is already used by endpoint {other!r}")
        seen[ep.name.lower()] = ep.name
    return Config(
        server=ServerSettings(**sections["server"]),
        admin=AdminSettings(**sections["admin"]),
        log=LogSettings(**sections["log"]),
        endpoints=endpoints,
        source=source,
        inline_secrets=tuple(ctx.inline_secrets),
        secret_files=tuple(ctx.secret_files),
    )


# -- rules for a config that serves mail (design.md §3.7) ---------------------------


_NOTIFICATIONS = frozenset({Event.ABORT, Event.CLOSE})


def check_enforcing(config: Config) -> None:
    """Refuse a config in which no endpoint enforces, unless ``server.allow_no_endpoints`` says so.

    Such a config accepts every message unfiltered, which an empty or half-written file
    would do silently. ``serve``, ``check-config``, every SIGHUP reload and the worker
    supervisor call this, so they all apply the same rule.

    Raises:
        ConfigError: with the key ``server.allow_no_endpoints``.
    """
    if config.server.allow_no_endpoints or any(
        ep.mode is Mode.ENFORCE and ep.events - _NOTIFICATIONS for ep in config.endpoints
    ):
        return
    if not config.endpoints:
        what = "no endpoints"
    elif all(ep.mode is Mode.OBSERVE for ep in config.endpoints):
        what = "only observe endpoints"
    else:
        # An enforcing endpoint subscribed only to the notifications (abort, close) decides nothing.
        what = "no enforcing endpoint subscribed to an event other than abort and close"
    if config.source is not None and _is_empty_file(config.source):
        what += f" (the file {config.source!r} is empty)"
    raise ConfigError(
        "server.allow_no_endpoints",
        f"the config has {what}, so every message would pass unfiltered; add an endpoint with "
        f'mode = "enforce", or set allow_no_endpoints = true in [server] if that is intended',
    )


def _is_empty_file(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def load_serving_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """``load_config`` plus ``check_enforcing``: what a bridge may start or reload with."""
    config = load_config(path, environ)
    check_enforcing(config)
    return config


def _readable_by_others(path: str) -> str | None:
    """The file's mode as ``0o644`` when others, or a group other than this process's, may read it; else None.

    The process's own group is exempt: a Kubernetes secret volume can only reach a non-root
    container through its group (files owned by root, group ``fsGroup``, mode 0440).
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    mode = status.st_mode & 0o777
    loose = mode & 0o004 or (mode & 0o040 and status.st_gid != os.getegid())
    return f"0o{mode:o}" if loose else None


def config_warnings(config: Config) -> list[str]:
    """Things that load but weaken security: secrets others can read, TLS without verification.

    Printed by ``check-config`` and logged at warning level by ``serve`` (start and reload);
    they never stop either.
    """
    warnings = []
    mode = _readable_by_others(config.source) if config.source and config.inline_secrets else None
    if mode is not None:
        warnings.append(
            f"config file {config.source!r} is readable by group or others (mode {mode}) and holds secrets "
            f"inline ({', '.join(config.inline_secrets)}); chmod 600 it (owned by the user milterbridge "
            f"runs as), or take them from secret_env, secret_file or ${{VAR}}"
        )
    for path in dict.fromkeys(config.secret_files):
        mode = _readable_by_others(path)
        if mode is not None:
            warnings.append(
                f"secret file {path!r} is readable by group or others (mode {mode}); chmod 600 it "
                f"(owned by the user milterbridge runs as)"
            )
    warnings += [
        f"endpoints.{ep.name}.tls.verify is false: the endpoint's certificate is not checked, so anyone "
        f"on the network path can read the webhooks and answer them"
        for ep in config.endpoints
        if not ep.tls.verify
    ]
    return warnings
