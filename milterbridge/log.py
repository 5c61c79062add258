"""JSON logging: one object per line on stdout, built with stdlib logging and orjson.

A line looks like::

    {"ts":"2024-05-01T12:00:00.123Z","level":"info","logger":"milterbridge.dispatch",
     "msg":"message accepted","session":"...","queue_id":"4Vb1xk0Yz3z9","outcome":"accepted"}

``ts``, ``level``, ``logger`` and ``msg`` are always present; callers add their own keys with
``log.info("...", extra={"fields": {...}})`` and those are merged at the top level (a field that
would shadow one of the fixed keys is written with a trailing underscore instead). An exception
adds ``exc`` with its type, message and traceback.

Values orjson cannot encode natively are written as ``str(value)``; bytes are decoded as UTF-8
with replacement characters. Field values whose key names a credential (see ``SENSITIVE_WORDS``)
are replaced by ``"<redacted>"`` at any depth, as a last line of defence: callers are expected
never to log secrets in the first place. For the same reason the user info and the query string
of any URL in the message, in a string field or in an exception are replaced too: both may carry
credentials or tokens (``redact_urls``, which lives in settings.py because config errors use it too).
"""

from __future__ import annotations

import datetime
import logging
import sys
import traceback
from collections.abc import Mapping
from typing import Any, Final, TextIO

import orjson

from milterbridge.settings import REDACTED, redact_urls

__all__ = [
    "LEVELS",
    "REDACTED",
    "SENSITIVE_WORDS",
    "JsonFormatter",
    "RedactingFilter",
    "configure_logging",
    "redact_fields",
    "redact_urls",
]

#: ``log.level`` values (settings.py declares the key) and their stdlib levels.
LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: A field whose lower-cased name contains one of these has its value redacted.
SENSITIVE_WORDS: Final = ("secret", "password", "authorization", "token")
#: Keys every line has; fields with these names get a trailing underscore.
_FIXED_KEYS: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})
#: Dict keys that are not strings are written as strings rather than refused.
_OPTIONS: Final = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z
#: Nesting beyond this is cut when redacting (orjson itself refuses depth > 254).
_MAX_DEPTH: Final = 32


def _is_sensitive(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return any(word in lowered for word in SENSITIVE_WORDS)


def _redact_mapping(fields: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    return {key: REDACTED if _is_sensitive(key) else _redact_value(value, depth) for key, value in fields.items()}


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, Mapping | list | tuple) and depth >= _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, Mapping):
        return _redact_mapping(value, depth + 1)
    if isinstance(value, list | tuple):
        return [_redact_value(item, depth + 1) for item in value]
    if isinstance(value, str):
        return redact_urls(value)
    return value


def redact_fields(fields: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``fields`` with the value of every sensitive key replaced, in nested dicts and lists too."""
    return _redact_mapping(fields, 0)


def _default(value: Any) -> Any:
    """orjson's fallback: bytes as text, sets as lists, everything else as ``str``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return list(value)
    return str(value)


def _timestamp(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exception_type(exc_type: type[BaseException]) -> str:
    module = exc_type.__module__
    return exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object, without the trailing newline."""
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_urls(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                line[f"{name}_" if name in _FIXED_KEYS else name] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc_value, exc_tb = record.exc_info
            line["exc"] = {
                "type": _exception_type(exc_type),
                "message": redact_urls(str(exc_value)),
                "traceback": redact_urls("".join(traceback.format_exception(exc_type, exc_value, exc_tb))),
            }
        if record.stack_info:
            line["stack"] = redact_urls(record.stack_info)
        return self._dumps(line)

    @staticmethod
    def _dumps(line: dict[str, Any]) -> str:
        try:
            return orjson.dumps(line, default=_default, option=_OPTIONS).decode()
        except (orjson.JSONEncodeError, RecursionError) as exc:
            # Integers beyond 64 bits, nesting beyond orjson's limit, a __str__ that raises:
            # keep the fixed keys and say why the fields were dropped, rather than lose the line.
            fallback: dict[str, Any] = {key: line[key] for key in ("ts", "level", "logger", "msg") if key in line}
            fallback["log_error"] = f"fields not encodable: {exc}"
            return orjson.dumps(fallback, default=str).decode()


class RedactingFilter(logging.Filter):
    """Replaces sensitive values in a record's ``fields`` (a copy; the caller's dict is left alone)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact and always let the record through."""
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.fields = redact_fields(fields)
        return True


class _JsonHandler(logging.StreamHandler[TextIO]):
    """Our handler; its class is how ``configure_logging`` finds and replaces it."""


def configure_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send all logging to ``stream`` (default: ``sys.stdout`` at call time) as JSON lines.

    Sets the root logger's level to ``level`` (a ``LEVELS`` name, case-insensitive) and
    installs one JSON handler on it. Calling again replaces that handler, so a reload never
    duplicates lines; handlers installed by others are left in place. Returns the handler.

    Raises:
        ValueError: ``level`` is not one of ``LEVELS``.
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(LEVELS)})") from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _JsonHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    # aiohttp logs one line per request at info on "aiohttp.access"; admin.py turns the access
    # log off, and this keeps any other aiohttp server in the process quiet as well.
    logging.getLogger("aiohttp.access").setLevel(max(numeric, logging.WARNING))
    return handler
