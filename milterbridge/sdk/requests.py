"""Typed webhook requests: the JSON the bridge POSTs, as frozen dataclasses.

:func:`parse_request` turns a request body into one :class:`Request` subclass per event
(``ConnectRequest`` ... ``CloseRequest``, as in ``openapi/milterbridge.yaml``), each with its
typed ``data``. Field names are the contract's, with one rule for bytes that are not UTF-8:
where the contract has a text field ``x`` and a ``x_b64`` sibling holding the exact bytes,
the SDK has ``x`` (the text, for display) and ``x_bytes`` (always the exact bytes: the
sibling decoded when it is present, else the text encoded as UTF-8). Macro maps come with a
``macros_bytes`` map of every value's exact bytes. Bodies and body chunks keep their base64
text and decode it on ``.bytes``.

Keys the SDK does not know are ignored (the contract may add optional request keys); a
missing key, a value of the wrong type or invalid base64 raises :class:`RequestError`
naming the place (``message.rcpt_to[1].args: expected an array``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeVar

__all__ = [
    "RequestError",
    "Client",
    "Session",
    "Address",
    "Header",
    "Body",
    "Message",
    "HeloData",
    "BodyChunk",
    "UnknownData",
    "EmptyData",
    "Request",
    "ConnectRequest",
    "HeloRequest",
    "MailRequest",
    "RcptRequest",
    "DataRequest",
    "HeaderRequest",
    "EohRequest",
    "BodyRequest",
    "EomRequest",
    "UnknownRequest",
    "AbortRequest",
    "CloseRequest",
    "REQUEST_TYPES",
    "parse_request",
]

_FROZEN: Final = {"frozen": True, "slots": True, "kw_only": True}

_T = TypeVar("_T")


class RequestError(ValueError):
    """A request body is not a webhook request of the contract; the message names the place."""


# --------------------------------------------------------------------------
# the parts


@dataclass(**_FROZEN)
class Client:
    """The SMTP client (``session.client``, and the ``data`` of ``connect``)."""

    name: str
    name_bytes: bytes
    #: ``None`` when the family is ``unknown``.
    address: str | None
    address_bytes: bytes | None
    #: ``None`` for ``unix`` and ``unknown``.
    port: int | None
    #: ``inet``, ``inet6``, ``unix`` or ``unknown``.
    family: str


@dataclass(**_FROZEN)
class Session:
    """Connection-scoped facts, the same for every message of the SMTP session."""

    id: str
    client: Client
    #: The last HELO/EHLO argument, ``None`` before the first one.
    helo: str | None
    helo_bytes: bytes | None
    macros: Mapping[str, str]
    macros_bytes: Mapping[str, bytes]


@dataclass(**_FROZEN)
class Address:
    """An envelope address with its ESMTP arguments (the null sender is ``address == ""``)."""

    address: str
    address_bytes: bytes
    raw: str
    raw_bytes: bytes
    args: tuple[str, ...]
    args_bytes: tuple[bytes, ...]


@dataclass(**_FROZEN)
class Header:
    """One header as the MTA sent it: the value keeps its leading space and LF folds."""

    name: str
    name_bytes: bytes
    value: str
    value_bytes: bytes


@dataclass(**_FROZEN)
class Body:
    """``message.body`` at ``eom`` (endpoints with ``include_body``)."""

    #: The body's full size in bytes.
    size: int
    base64: str
    #: True when ``base64`` holds only the first bytes of the body (or none).
    truncated: bool

    @property
    def bytes(self) -> bytes:
        """The body bytes that were sent (decoded from ``base64`` on each access)."""
        return base64.b64decode(self.base64)


@dataclass(**_FROZEN)
class Message:
    """Transaction-scoped facts, from MAIL on."""

    id: str
    #: The MTA's queue id once it was sent, else ``None``.
    queue_id: str | None
    mail_from: Address
    rcpt_to: tuple[Address, ...]
    headers: tuple[Header, ...]
    macros: Mapping[str, str]
    macros_bytes: Mapping[str, bytes]
    #: Only at ``eom`` and only for endpoints with ``include_body``.
    body: Body | None
    #: What a per-message limit cut (``body``, ``headers``, ``macros``, ``recipients``), else empty.
    truncated: tuple[str, ...]

    def header(self, name: str) -> Header | None:
        """The first header called ``name`` (compared case-insensitively), if any."""
        folded = name.lower()
        return next((h for h in self.headers if h.name.lower() == folded), None)


@dataclass(**_FROZEN)
class HeloData:
    """The ``data`` of ``helo``."""

    hostname: str
    hostname_bytes: bytes


@dataclass(**_FROZEN)
class BodyChunk:
    """The ``data`` of ``body``: one chunk, cut at any byte."""

    offset: int
    base64: str

    @property
    def bytes(self) -> bytes:
        """The chunk's bytes (decoded from ``base64`` on each access)."""
        return base64.b64decode(self.base64)


@dataclass(**_FROZEN)
class UnknownData:
    """The ``data`` of ``unknown``: the whole command line without CRLF."""

    command: str
    command_bytes: bytes


@dataclass(**_FROZEN)
class EmptyData:
    """The ``data`` of events that add nothing (``data``, ``eoh``, ``eom``, ``abort``, ``close``)."""


# --------------------------------------------------------------------------
# the requests


@dataclass(**_FROZEN)
class Request:
    """The envelope every request shares; each event has its subclass with a typed ``data``."""

    event: str
    #: The call id, equal to the ``webhook-id`` header and unchanged on a retry.
    id: str
    #: RFC 3339 in UTC, as sent (``2025-11-24T16:48:03.120544Z``).
    timestamp: str
    session: Session
    #: ``None`` before MAIL (and at ``unknown`` outside a transaction).
    message: Message | None


@dataclass(**_FROZEN)
class ConnectRequest(Request):
    message: None
    data: Client


@dataclass(**_FROZEN)
class HeloRequest(Request):
    message: None
    data: HeloData


@dataclass(**_FROZEN)
class MailRequest(Request):
    message: Message
    data: Address


@dataclass(**_FROZEN)
class RcptRequest(Request):
    message: Message
    data: Address


@dataclass(**_FROZEN)
class DataRequest(Request):
    message: Message
    data: EmptyData


@dataclass(**_FROZEN)
class HeaderRequest(Request):
    message: Message
    data: Header


@dataclass(**_FROZEN)
class EohRequest(Request):
    message: Message
    data: EmptyData


@dataclass(**_FROZEN)
class BodyRequest(Request):
    message: Message
    data: BodyChunk


@dataclass(**_FROZEN)
class EomRequest(Request):
    message: Message
    data: EmptyData


@dataclass(**_FROZEN)
class UnknownRequest(Request):
    message: Message | None
    data: UnknownData


@dataclass(**_FROZEN)
class AbortRequest(Request):
    message: Message
    data: EmptyData


@dataclass(**_FROZEN)
class CloseRequest(Request):
    message: None
    data: EmptyData


# --------------------------------------------------------------------------
# parsing

_Obj = Mapping[str, object]


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__)


def _object(value: object, where: str) -> _Obj:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected an object, got {_kind(value)}")
    return value


def _get(obj: _Obj, key: str, where: str) -> object:
    if key not in obj:
        raise RequestError(f"{where}: {key!r} is missing")
    return obj[key]


def _str(obj: _Obj, key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise RequestError(f"{where}.{key}: expected a string, got {_kind(value)}")
    return value


def _opt_str(obj: _Obj, key: str, where: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, where)


def _int(obj: _Obj, key: str, where: str) -> int:
    value = _get(obj, key, where)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def _b64(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"{where}: expected base64 text, got {_kind(text)}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise RequestError(f"{where}: not valid base64") from None


def _text(obj: _Obj, key: str, where: str) -> tuple[str, bytes]:
    """A text field and its exact bytes (the ``_b64`` sibling, else the text as UTF-8)."""
    text = _str(obj, key, where)
    sibling = obj.get(f"{key}_b64")
    return text, text.encode("utf-8", "surrogatepass") if sibling is None else _b64(sibling, f"{where}.{key}_b64")


def _opt_text(obj: _Obj, key: str, where: str) -> tuple[str | None, bytes | None]:
    if obj.get(key) is None:
        return None, None
    return _text(obj, key, where)


def _list(obj: _Obj, key: str, where: str, item: Callable[[object, str], _T]) -> tuple[_T, ...]:
    value = _get(obj, key, where)
    if not isinstance(value, list):
        raise RequestError(f"{where}.{key}: expected an array, got {_kind(value)}")
    return tuple(item(v, f"{where}.{key}[{n}]") for n, v in enumerate(value))


def _string_item(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a string, got {_kind(value)}")
    return value


def _macros(obj: _Obj, where: str) -> tuple[Mapping[str, str], Mapping[str, bytes]]:
    raw = _object(_get(obj, "macros", where), f"{where}.macros")
    texts = {name: _string_item(value, f"{where}.macros[{name!r}]") for name, value in raw.items()}
    exact = {name: text.encode("utf-8", "surrogatepass") for name, text in texts.items()}
    siblings = obj.get("macros_b64")
    if siblings is not None:
        for name, value in _object(siblings, f"{where}.macros_b64").items():
            exact[name] = _b64(value, f"{where}.macros_b64[{name!r}]")
    return MappingProxyType(texts), MappingProxyType(exact)


def _client(value: object, where: str) -> Client:
    obj = _object(value, where)
    name, name_bytes = _text(obj, "name", where)
    address, address_bytes = _opt_text(obj, "address", where)
    port = None if obj.get("port") is None else _int(obj, "port", where)
    return Client(
        name=name,
        name_bytes=name_bytes,
        address=address,
        address_bytes=address_bytes,
        port=port,
        family=_str(obj, "family", where),
    )


def _session(value: object, where: str) -> Session:
    obj = _object(value, where)
    helo, helo_bytes = _opt_text(obj, "helo", where)
    macros, macros_bytes = _macros(obj, where)
    return Session(
        id=_str(obj, "id", where),
        client=_client(_get(obj, "client", where), f"{where}.client"),
        helo=helo,
        helo_bytes=helo_bytes,
        macros=macros,
        macros_bytes=macros_bytes,
    )


def _address(value: object, where: str) -> Address:
    obj = _object(value, where)
    address, address_bytes = _text(obj, "address", where)
    raw, raw_bytes = _text(obj, "raw", where)
    args = _list(obj, "args", where, _string_item)
    if obj.get("args_b64") is None:
        args_bytes = tuple(a.encode("utf-8", "surrogatepass") for a in args)
    else:
        args_bytes = _list(obj, "args_b64", where, _b64)
        if len(args_bytes) != len(args):
            raise RequestError(f"{where}.args_b64: {len(args_bytes)} items for {len(args)} args")
    return Address(
        address=address, address_bytes=address_bytes, raw=raw, raw_bytes=raw_bytes, args=args, args_bytes=args_bytes
    )


def _header(value: object, where: str) -> Header:
    obj = _object(value, where)
    name, name_bytes = _text(obj, "name", where)
    text, value_bytes = _text(obj, "value", where)
    return Header(name=name, name_bytes=name_bytes, value=text, value_bytes=value_bytes)


def _body(value: object, where: str) -> Body:
    obj = _object(value, where)
    text = _str(obj, "base64", where)
    _b64(text, f"{where}.base64")
    truncated = obj.get("truncated") is True
    return Body(size=_int(obj, "size", where), base64=text, truncated=truncated)


def _message(value: object, where: str) -> Message:
    obj = _object(value, where)
    macros, macros_bytes = _macros(obj, where)
    body = None if obj.get("body") is None else _body(obj["body"], f"{where}.body")
    truncated = () if obj.get("truncated") is None else _list(obj, "truncated", where, _string_item)
    return Message(
        id=_str(obj, "id", where),
        queue_id=_opt_str(obj, "queue_id", where),
        mail_from=_address(_get(obj, "mail_from", where), f"{where}.mail_from"),
        rcpt_to=_list(obj, "rcpt_to", where, _address),
        headers=_list(obj, "headers", where, _header),
        macros=macros,
        macros_bytes=macros_bytes,
        body=body,
        truncated=truncated,
    )


def _helo_data(value: object, where: str) -> HeloData:
    hostname, hostname_bytes = _text(_object(value, where), "hostname", where)
    return HeloData(hostname=hostname, hostname_bytes=hostname_bytes)


def _body_chunk(value: object, where: str) -> BodyChunk:
    obj = _object(value, where)
    text = _str(obj, "base64", where)
    _b64(text, f"{where}.base64")
    return BodyChunk(offset=_int(obj, "offset", where), base64=text)


def _unknown_data(value: object, where: str) -> UnknownData:
    command, command_bytes = _text(_object(value, where), "command", where)
    return UnknownData(command=command, command_bytes=command_bytes)


def _empty(value: object, where: str) -> EmptyData:
    _object(value, where)
    return EmptyData()


#: event -> (request class, whether ``message`` is "none", "required" or "optional", data parser).
_EVENTS: Final[Mapping[str, tuple[type[Request], str, Callable[[object, str], object]]]] = {
    "connect": (ConnectRequest, "none", _client),
    "helo": (HeloRequest, "none", _helo_data),
    "mail": (MailRequest, "required", _address),
    "rcpt": (RcptRequest, "required", _address),
    "data": (DataRequest, "required", _empty),
    "header": (HeaderRequest, "required", _header),
    "eoh": (EohRequest, "required", _empty),
    "body": (BodyRequest, "required", _body_chunk),
    "eom": (EomRequest, "required", _empty),
    "unknown": (UnknownRequest, "optional", _unknown_data),
    "abort": (AbortRequest, "required", _empty),
    "close": (CloseRequest, "none", _empty),
}

#: Event name -> its request class.
REQUEST_TYPES: Final[Mapping[str, type[Request]]] = {event: spec[0] for event, spec in _EVENTS.items()}


def parse_request(body: bytes | str) -> Request:
    """Parse a request body into the :class:`Request` subclass of its event.

    Raises :class:`RequestError` when the body is not JSON, names no known event, or breaks
    the contract's shape (a missing key, a wrong type, invalid base64).
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request: not JSON ({exc})") from None
    obj = _object(document, "request")
    event = _str(obj, "event", "request")
    spec = _EVENTS.get(event)
    if spec is None:
        raise RequestError(f"request.event: unknown event {event!r}")
    cls, message_rule, parse_data = spec
    raw_message = _get(obj, "message", "request")
    message = None
    if raw_message is not None:
        if message_rule == "none":
            raise RequestError(f"request.message: must be null at {event}")
        message = _message(raw_message, "request.message")
    elif message_rule == "required":
        raise RequestError(f"request.message: required at {event}")
    return cls(
        event=event,
        id=_str(obj, "id", "request"),
        timestamp=_str(obj, "timestamp", "request"),
        session=_session(_get(obj, "session", "request"), "request.session"),
        message=message,
        data=parse_data(_get(obj, "data", "request"), "request.data"),  # type: ignore[call-arg]
    )
