"""The config loader: TOML file, environment overrides, secrets, and the checks that span keys.

``load_config`` is called once, from ``app.py`` or ``cli.py``. It reads the file (or starts
from the defaults), merges the ``MILTERBRIDGE_*`` overrides into it, and converts every table
by the keys declared in ``settings.py``, where each key's type, default, check and
description live. What one value cannot decide on its own is done here: secrets and other
values that name environment variables or files (``secret``, ``secret_env``, ``secret_file``,
``tls.*_file``), ``${VAR}`` expansion in header values, and the rules over several keys (plain
http, pre-eom timeouts and per-event budgets, TLS pairs, unique names, what a ``when`` can know
at an endpoint's first event). Whether a loaded config may serve mail (an enforcing endpoint)
and what weakens it are ``serving.py``'s. docs/configuration.md describes all of it for users.

The settings types, ``HTTP_TOKEN``, ``RESERVED_HEADERS`` and ``REDACTED`` live in ``settings``
and are importable from here too.

Errors::

    ConfigError        the only exception; ``key`` is the dotted path of the bad key
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from milterbridge.milter.address import is_loopback_host
from milterbridge.milter.constants import Event
from milterbridge.milter.mta import ANSWERED_BEFORE_EOM, POSTFIX_LIMITS, Mta, ReplyLimits, sendmail_limits
from milterbridge.mtahooks.request import STAGES
from milterbridge.policy.conditions import KNOWN_AT, unknown_at
from milterbridge.settings import (
    HTTP_TOKEN,
    MTA_AUTO,
    REDACTED,
    RESERVED_HEADERS,
    AdminSettings,
    Config,
    EndpointProtocol,
    EndpointSettings,
    InvalidValue,
    Key,
    LogSettings,
    SendmailSettings,
    ServerSettings,
    TlsSettings,
    TracingSettings,
    declared_keys,
    show_url,
    show_value,
    type_name,
)

__all__ = [
    "ConfigError",
    "load_config",
    "ENV_PREFIX",
    "CONFIG_ENV",
    # from settings.py
    "Config",
    "ServerSettings",
    "AdminSettings",
    "LogSettings",
    "SendmailSettings",
    "TracingSettings",
    "EndpointSettings",
    "TlsSettings",
    "HTTP_TOKEN",
    "RESERVED_HEADERS",
    "REDACTED",
]

ENV_PREFIX = "MILTERBRIDGE_"
CONFIG_ENV = "MILTERBRIDGE_CONFIG"
_SECTIONS: Mapping[str, type] = {
    "server": ServerSettings,
    "admin": AdminSettings,
    "log": LogSettings,
    "sendmail": SendmailSettings,
    "tracing": TracingSettings,
}
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")


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


# -- secrets, and values that name environment variables or files --------------------------


def _check_secret(secret: str, where: str) -> str:
    # Standard Webhooks: the key is the base64 text after the "whsec_" prefix.
    try:
        ok = secret.startswith("whsec_") and bool(base64.b64decode(secret[6:], validate=True))
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise InvalidValue(f"{where} {REDACTED} is not a Standard Webhooks secret ('whsec_' followed by base64)")
    return secret


def _secrets_inline(secrets: tuple[str, ...], key: str, ctx: _Context) -> tuple[str, ...]:
    return tuple(_check_secret(secret, "the secret") for secret in secrets)


def _secrets_from_env(names: tuple[str, ...], key: str, ctx: _Context) -> tuple[str, ...]:
    out = []
    for name in names:
        if name not in ctx.environ:
            raise InvalidValue(f"environment variable {show_value(name)} is not set")
        out.append(_check_secret(ctx.environ[name].strip(), f"the value of {name}"))
    return tuple(out)


def _secrets_from_files(paths: tuple[str, ...], key: str, ctx: _Context) -> tuple[str, ...]:
    out = []
    for item in paths:
        path = ctx.path(item)
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InvalidValue(f"cannot read secret file {show_value(path)}: {reason}") from None
        ctx.secret_files.append(path)
        out.append(_check_secret(text, f"the content of {path}"))
    return tuple(out)


def _expand_headers(headers: tuple[tuple[str, str], ...], key: str, ctx: _Context) -> tuple[tuple[str, str], ...]:
    out = []
    for name, raw in headers:
        hkey = f"{key}.{name}"
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


def _existing_file(text: str, key: str, ctx: _Context) -> str:
    path = ctx.path(text)
    if not os.path.isfile(path):
        raise InvalidValue(f"file {show_value(path)} does not exist")
    return path


def _tls(table: dict[str, Any], key: str, ctx: _Context) -> TlsSettings:
    kwargs = _section(table, TlsSettings, key, ctx)
    if ("cert_file" in kwargs) != ("key_file" in kwargs):
        missing = "key_file" if "cert_file" in kwargs else "cert_file"
        raise ctx.error(f"{key}.{missing}", "cert_file and key_file must be given together (client certificate)")
    return TlsSettings(**kwargs)


#: Keys the loader finishes after their declared check: they name environment variables or
#: files, hold ${VAR} references, or are tables of their own.
_FINISH: Mapping[tuple[type, str], Callable[[Any, str, _Context], Any]] = {
    (EndpointSettings, "secret"): _secrets_inline,
    (EndpointSettings, "secret_env"): _secrets_from_env,
    (EndpointSettings, "secret_file"): _secrets_from_files,
    (EndpointSettings, "headers"): _expand_headers,
    (EndpointSettings, "tls"): _tls,
    (TlsSettings, "ca_file"): _existing_file,
    (TlsSettings, "cert_file"): _existing_file,
    (TlsSettings, "key_file"): _existing_file,
}


# -- tables -------------------------------------------------------------------------------


def _convert(cls: type, key: Key, value: Any, dotted: str, ctx: _Context) -> Any:
    """One key's value: its declared check, then what the loader adds (see ``_FINISH``)."""
    try:
        converted = key.check.convert(value)
        finish = _FINISH.get((cls, key.name))
        return converted if finish is None else finish(converted, dotted, ctx)
    except InvalidValue as exc:
        raise ctx.error(f"{dotted}.{exc.part}" if exc.part else dotted, str(exc)) from None


def _section(table: Any, cls: type, prefix: str, ctx: _Context) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from one table; unknown keys are errors so that typos never pass."""
    if not isinstance(table, dict):
        raise ctx.error(prefix, f"expected a table, got {type_name(table)}")
    keys = declared_keys(cls)
    for name in table:
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(keys)})"
            raise ctx.error(f"{prefix}.{name}", f"unknown key{hint}")
    values = {name: _convert(cls, keys[name], value, f"{prefix}.{name}", ctx) for name, value in table.items()}
    kwargs: dict[str, Any] = {}
    for key in keys.values():  # in declaration order, which is the order joined keys (secrets) join in
        if key.name not in values:
            continue
        if key.joined:
            kwargs[key.field] = kwargs.get(key.field, ()) + values[key.name]
        else:
            kwargs[key.field] = values[key.name]
    return kwargs


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
        raise ctx.error(f"endpoints[{index}]", f"expected a table, got {type_name(table)}")
    keys = declared_keys(EndpointSettings)
    for key in keys.values():
        if key.required and key.name not in table:
            raise ctx.error(f"endpoints[{index}].{key.name}", "is required")
    name = _convert(EndpointSettings, keys["name"], table["name"], f"endpoints[{index}].name", ctx)
    prefix = f"endpoints.{name}"
    settings = EndpointSettings(**_section(table, EndpointSettings, prefix, ctx))
    ctx.inline_secrets.extend(_inline_secrets(table, prefix, ctx))
    parts = urlsplit(settings.url)
    if parts.scheme == "http" and not settings.allow_insecure_http and not is_loopback_host(parts.hostname or ""):
        why = "is plain http to a host that is not loopback; use https or set allow_insecure_http = true"
        raise ctx.error(f"{prefix}.url", f"{show_url(settings.url)} {why}")
    if (parts.username or parts.password) and any(name.lower() == "authorization" for name, _ in settings.headers):
        # The HTTP client cannot send both, and refusing here beats failing every request.
        raise ctx.error(f"{prefix}.headers.Authorization", "cannot be combined with credentials in the url")
    _check_timeouts_events(settings, prefix, ctx)
    _check_when(settings, prefix, ctx)
    _check_protocol(settings, prefix, ctx)
    return settings


def _check_protocol(settings: EndpointSettings, prefix: str, ctx: _Context) -> None:
    """An MTA Hooks or Stalwart endpoint is called only at events that have a stage; ``properties`` is theirs."""
    if settings.protocol is EndpointProtocol.MILTERBRIDGE:
        if settings.properties is not None:
            raise ctx.error(f"{prefix}.properties", 'is only for protocol = "mta-hooks"')
        return
    if settings.properties is not None and settings.protocol is not EndpointProtocol.MTA_HOOKS:
        raise ctx.error(f"{prefix}.properties", 'is only for protocol = "mta-hooks"')
    staged = sorted(e.value for e in settings.events if e not in STAGES)
    if staged:
        raise ctx.error(
            f"{prefix}.events",
            f"{', '.join(staged)}: {settings.protocol.value} has no stage for "
            f"{'it' if len(staged) == 1 else 'them'} (it has connect, helo, mail, rcpt and eom)",
        )


def _check_when(settings: EndpointSettings, prefix: str, ctx: _Context) -> None:
    """Every ``when`` key is known at the endpoint's earliest event (notifications aside)."""
    if settings.when is None:
        return
    unknown = unknown_at(settings.when, settings.events)
    if unknown is not None:
        key, earliest = unknown
        raise ctx.error(
            f"{prefix}.when.{key.value}",
            f"is known only from {KNOWN_AT[key].value} on, but the endpoint is called from {earliest.value} "
            f"(events: {', '.join(sorted(e.value for e in settings.events))}); drop the key or the earlier events",
        )


def reply_limits(sendmail: SendmailSettings) -> dict[Mta, ReplyLimits]:
    """How long each MTA waits for the bridge, from ``[sendmail]`` and Postfix's defaults."""
    return {Mta.POSTFIX: POSTFIX_LIMITS, Mta.SENDMAIL: sendmail_limits(sendmail.timeouts)}


def enforced_mtas(server: ServerSettings) -> tuple[Mta, ...]:
    """The MTAs whose limits a config must keep: the one named, or Postfix under ``auto``.

    Under ``auto`` a budget over Sendmail's limits only warns (``serving.config_warnings``):
    at a Sendmail connection it is cut to fit (``ReplyLimits.budget_caps``).
    """
    return (Mta.POSTFIX,) if server.mta == MTA_AUTO else (Mta(server.mta),)


def budget_problems(settings: EndpointSettings, prefix: str, limits: ReplyLimits) -> list[tuple[str, str]]:
    """(key, message) for each budget of the endpoint (a ``timeouts`` entry, else ``timeout``)
    that is too long for what ``limits``' MTA waits."""
    problems: list[tuple[str, str]] = []
    overridden = dict(settings.timeouts)
    early = sorted(e.value for e in settings.events & ANSWERED_BEFORE_EOM if e not in overridden)
    budgets: list[tuple[str, float, list[str]]] = [(f"{prefix}.timeout", settings.timeout, early)] if early else []
    budgets += [
        (f"{prefix}.timeouts.{event.value}", seconds, [event.value])
        for event, seconds in overridden.items()
        if event in ANSWERED_BEFORE_EOM
    ]
    for key, seconds, events in budgets:
        if not limits.fits(seconds, limits.before_eom):
            problems.append((key, _too_long_before_eom(seconds, events, limits)))
    eom = overridden.get(Event.EOM, settings.timeout) if Event.EOM in settings.events else None
    if eom is not None and limits.eom_total is not None and not limits.fits(eom, limits.eom_total):
        key = f"{prefix}.timeouts.eom" if Event.EOM in overridden else f"{prefix}.timeout"
        problems.append(
            (
                key,
                f"{eom:g} seconds is too long for eom: Sendmail waits at most E ({limits.eom_total:g}s, "
                f"[sendmail] timeouts) for the whole end-of-message, keep-alives or not, and counts it in "
                f"whole seconds; use at most {limits.longest(limits.eom_total):g}",
            )
        )
    return problems


def _too_long_before_eom(seconds: float, events: list[str], limits: ReplyLimits) -> str:
    what = f"{seconds:g} seconds is too long for events before end-of-message ({', '.join(events)})"
    assert limits.before_eom is not None
    if limits.mta is Mta.POSTFIX:
        return (
            f"{what}: Postfix waits at most milter_command_timeout (30s by default) for those replies and "
            f"keep-alives exist only at end-of-message; use less than {limits.before_eom:g}"
        )
    return (
        f"{what}: Sendmail waits at most R ({limits.before_eom:g}s, [sendmail] timeouts) for each reply and "
        f"counts it in whole seconds, and keep-alives exist only at end-of-message; "
        f"use at most {limits.longest(limits.before_eom):g}"
    )


def progress_problem(server: ServerSettings, limits: ReplyLimits) -> str | None:
    """Why ``progress_interval`` is too long for ``limits``' MTA to keep waiting at end-of-message, or None."""
    if limits.keepalive is None or limits.fits(server.progress_interval, limits.keepalive):
        return None
    if limits.mta is Mta.POSTFIX:
        wait, advice = "milter_content_timeout", f"use less than {limits.keepalive:g}"
    else:
        longest = limits.longest(limits.keepalive)
        wait, advice = "R, [sendmail] timeouts", f"counted in whole seconds; use at most {longest:g}"
    return (
        f"{server.progress_interval:g} seconds is too long: {limits.mta.value.capitalize()} waits at most "
        f"{limits.keepalive:g}s ({wait}) between keep-alives at end-of-message, {advice}"
    )


def wait_problems(config: Config, limits: ReplyLimits) -> list[tuple[str, str]]:
    """(key, message) for every endpoint budget, then ``progress_interval``, too long for ``limits``' MTA."""
    problems = [p for ep in config.endpoints for p in budget_problems(ep, f"endpoints.{ep.name}", limits)]
    progress = progress_problem(config.server, limits)
    if progress is not None:
        problems.append(("server.progress_interval", progress))
    return problems


def check_waits(config: Config, error: Callable[[str, str], ConfigError] = ConfigError) -> None:
    """Every budget and ``progress_interval`` fit what the MTAs of ``config.server.mta`` wait
    (``enforced_mtas``). The loader checks this once it has read the file (its ``error`` names
    the environment variable that set a key); a reload checks its merged config.

    Raises:
        ConfigError: naming the first key that does not fit.
    """
    limits = reply_limits(config.sendmail)
    for mta in enforced_mtas(config.server):
        for key, message in wait_problems(config, limits[mta]):
            raise error(key, message)


def _check_timeouts_events(settings: EndpointSettings, prefix: str, ctx: _Context) -> None:
    """Each ``timeouts`` entry names an event the endpoint is called at."""
    for event in dict(settings.timeouts):
        if event not in settings.events:
            subscribed = ", ".join(sorted(e.value for e in settings.events))
            raise ctx.error(
                f"{prefix}.timeouts.{event.value}",
                f"the endpoint is not called at {event.value} (events: {subscribed})",
            )


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
                raise ConfigError(f"endpoints.{name.lower()}", f"{var} {why} {show_value(name)}")
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
                raise ctx.error(section, f"expected a table, got {type_name(table)}")
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
            raise ctx.error(name, f"unknown section (known: {', '.join(_SECTIONS)}, endpoints)")
    sections = {name: cls(**_section(data.get(name, {}), cls, name, ctx)) for name, cls in _SECTIONS.items()}
    raw_endpoints = data.get("endpoints", [])
    if not isinstance(raw_endpoints, list):
        raise ctx.error("endpoints", f"expected an array of tables ([[endpoints]]), got {type_name(raw_endpoints)}")
    endpoints = tuple(_endpoint(table, i, ctx) for i, table in enumerate(raw_endpoints))
    seen: dict[str, str] = {}
    for i, ep in enumerate(endpoints):
        if ep.name.lower() in seen:
            other = seen[ep.name.lower()]
            raise ctx.error(f"endpoints[{i}].name", f"{ep.name!r} is already used by endpoint {other!r}")
        seen[ep.name.lower()] = ep.name
    config = Config(
        server=sections["server"],
        admin=sections["admin"],
        log=sections["log"],
        sendmail=sections["sendmail"],
        tracing=sections["tracing"],
        endpoints=endpoints,
        source=source,
        inline_secrets=tuple(ctx.inline_secrets),
        secret_files=tuple(ctx.secret_files),
    )
    check_waits(config, ctx.error)
    return config
