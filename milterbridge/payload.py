"""Webhook request bodies built from the session context (design.md §3.2).

Text on the milter wire is bytes in no declared charset. Every text field is
sent as UTF-8 text; when the bytes are not valid UTF-8 the field holds the
text decoded with U+FFFD replacement and a sibling ``<field>_b64`` holds the
exact bytes (for macro maps: a sibling ``macros_b64`` map). Bodies are
always base64. The spec (openapi/milterbridge.yaml) documents the rule.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson

from milterbridge.body import BodyBuffer
from milterbridge.milter.constants import Family
from milterbridge.milter.context import MessageContext, truncated_parts
from milterbridge.milter.messages import BodyChunk, Command, Connect, Header, Helo, MailFrom, RcptTo, Unknown
from milterbridge.milter.session import MilterSession

JSON = dict[str, Any]

FAMILY_NAMES = {Family.INET: "inet", Family.INET6: "inet6", Family.UNIX: "unix", Family.UNKNOWN: "unknown"}


#: Random bytes for ids, drawn from the OS in batches: one getrandom call per 256 ids.
_ID_BYTES = 12
_id_pool = memoryview(b"")


def new_id(prefix: str) -> str:
    """A short random id (96 bits from the OS's CSPRNG), e.g. ``ses_2f1c...``."""
    global _id_pool
    if len(_id_pool) < _ID_BYTES:
        _id_pool = memoryview(os.urandom(_ID_BYTES * 256))
    piece, _id_pool = _id_pool[:_ID_BYTES], _id_pool[_ID_BYTES:]
    return f"{prefix}_{piece.hex()}"


def _forget_id_pool() -> None:
    global _id_pool
    _id_pool = memoryview(b"")


# A forked worker must not hand out the ids its parent still holds.
os.register_at_fork(after_in_child=_forget_id_pool)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def put_text(obj: JSON, key: str, raw: bytes) -> None:
    """Set ``obj[key]`` to the text of ``raw``, adding ``key_b64`` when it is not UTF-8."""
    try:
        obj[key] = raw.decode("utf-8")
    except UnicodeDecodeError:
        obj[key] = raw.decode("utf-8", "replace")
        obj[key + "_b64"] = b64(raw)


def text_obj(key: str, raw: bytes) -> JSON:
    out: JSON = {}
    put_text(out, key, raw)
    return out


def put_macros(obj: JSON, macros: dict[bytes, bytes]) -> None:
    """``macros`` (and ``macros_b64`` for values that are not UTF-8) from a macro map."""
    out: dict[str, str] = {}
    exact: dict[str, str] = {}
    for name, value in macros.items():
        key = name.decode("utf-8", "replace")
        try:
            out[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[key] = value.decode("utf-8", "replace")
            exact[key] = b64(value)
    obj["macros"] = out
    if exact:
        obj["macros_b64"] = exact


def strip_address(raw: bytes) -> bytes:
    """Remove one pair of surrounding angle brackets; ``<>`` and ``""`` are the null sender."""
    if raw.startswith(b"<") and raw.endswith(b">"):
        return raw[1:-1]
    return raw


def address_obj(raw: bytes, args: tuple[bytes, ...]) -> JSON:
    out: JSON = {}
    put_text(out, "address", strip_address(raw))
    put_text(out, "raw", raw)
    texts = []
    exact = []
    for arg in args:
        try:
            texts.append(arg.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(arg.decode("utf-8", "replace"))
        exact.append(b64(arg))
    out["args"] = texts
    if any(a.decode("utf-8", "replace").encode() != a for a in args):
        out["args_b64"] = exact
    return out


def header_obj(name: bytes, value: bytes) -> JSON:
    try:  # the common case in one step: both are UTF-8 (ten or more headers per message)
        return {"name": name.decode("utf-8"), "value": value.decode("utf-8")}
    except UnicodeDecodeError:
        out: JSON = {}
        put_text(out, "name", name)
        put_text(out, "value", value)
        return out


def client_address(raw: bytes) -> bytes:
    """The client address as Postfix sends it: without Sendmail's ``IPv6:`` prefix
    (milter-protocol.md §9 item 10), and compressed (Sendmail sends ``IPv6:0:0:0:0:0:0:0:1``
    for ``::1``)."""
    if raw[:5].lower() != b"ipv6:":
        return raw
    bare = raw[5:]
    try:
        return ipaddress.IPv6Address(bare.decode("ascii")).compressed.encode()
    except ValueError:  # not an address after all: keep what was sent
        return bare


#: (whole second, its "YYYY-MM-DDTHH:MM:SS" text): the formatting is done once per second.
_second_text: tuple[int, str] = (-1, "")


def rfc3339_now() -> str:
    """The current UTC time with milliseconds, e.g. ``2026-11-25T18:47:25.123Z``."""
    global _second_text
    now = time.time()
    second = int(now)
    if _second_text[0] != second:
        _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second_text[1]}.{int((now - second) * 1000):03d}Z"


class PayloadBuilder:
    """Builds request dicts for one connection, caching what does not change per event."""

    def __init__(self, session: MilterSession) -> None:
        self.session = session
        self.session_id = new_id("ses")
        self._client: JSON | None = None
        self._session_obj: JSON | None = None
        self._headers: list[JSON] = []
        self._headers_of: MessageContext | None = None
        #: (message number, id) of the current message; ids are made once per message.
        self._message_id: tuple[int, str] = (0, "")
        # Parts of the message object kept between the events of one message (per-stage
        # webhooks build it for every event): MAIL, each recipient, the macros at a version.
        self._parts_of: MessageContext | None = None
        self._mail_from: JSON = {}
        self._rcpts: list[tuple[tuple[bytes, tuple[bytes, ...]], JSON]] = []
        self._macros: tuple[int, JSON] = (-1, {})

    def invalidate_session(self) -> None:
        """Connection facts changed (CONNECT, HELO, new connection macros)."""
        self._session_obj = None
        self._client = None

    def client(self) -> JSON:
        if self._client is None:
            conn = self.session.connection
            client: JSON = {}
            put_text(client, "name", conn.hostname)
            if conn.address:
                put_text(client, "address", client_address(conn.address))
            else:
                client["address"] = None
            client["port"] = conn.port if conn.family in (Family.INET, Family.INET6) else None
            client["family"] = FAMILY_NAMES[conn.family]
            self._client = client
        return self._client

    def session_obj(self) -> JSON:
        if self._session_obj is None:
            conn = self.session.connection
            obj: JSON = {"id": self.session_id, "client": self.client()}
            if conn.helo is None:
                obj["helo"] = None
            else:
                put_text(obj, "helo", conn.helo)
            put_macros(obj, conn.macros)
            self._session_obj = obj
        return self._session_obj

    def message_id(self, msg: MessageContext) -> str:
        number, mid = self._message_id
        if number != msg.number:
            mid = new_id("msg")
            self._message_id = (msg.number, mid)
        return mid

    def headers(self, msg: MessageContext) -> list[JSON]:
        if self._headers_of is not msg:
            self._headers_of = msg
            self._headers = []
        cached = self._headers
        for name, value in msg.headers[len(cached) :]:
            cached.append(header_obj(name, value))
        return cached

    def recipients(self, msg: MessageContext) -> list[JSON]:
        """``rcpt_to``, reusing the objects of recipients already seen (a refused one drops out)."""
        cached = self._rcpts
        out = []
        for n, rcpt in enumerate(msg.recipients):
            if n < len(cached) and cached[n][0] is rcpt:
                out.append(cached[n][1])
                continue
            del cached[n:]
            obj = address_obj(*rcpt)
            cached.append((rcpt, obj))
            out.append(obj)
        del cached[len(msg.recipients) :]
        return out

    def message_obj(self, msg: MessageContext | None) -> JSON | None:
        if msg is None:
            return None
        if self._parts_of is not msg:
            self._parts_of = msg
            self._mail_from = address_obj(msg.mail_from, msg.mail_args)
            self._rcpts = []
            self._macros = (-1, {})
        macros = msg.macros
        version, macro_part = self._macros
        if version != msg.store.version:
            macro_part = {}
            put_macros(macro_part, macros)
            self._macros = (msg.store.version, macro_part)
        queue_id = macros.get(b"i")
        obj: JSON = {
            "id": self.message_id(msg),
            "queue_id": queue_id.decode("ascii", "replace") if queue_id else None,
            "mail_from": self._mail_from,
            "rcpt_to": self.recipients(msg),
            "headers": self.headers(msg),
            **macro_part,
        }
        if msg.over_limits or self.session.connection.over_limits:
            # What was cut at a limit (design.md §3.7); decision calls see it only with on_oversize = continue.
            obj["truncated"] = truncated_parts(msg, self.session.connection)
        return obj

    def event_data(self, command: Command, body_size: int = 0) -> JSON:
        """The ``data`` member of a request: what this event adds (``body_size``: body bytes so far)."""
        match command:
            case Connect():
                return self.client()
            case Helo(hostname=hostname):
                return text_obj("hostname", hostname)
            case MailFrom(address=address, args=args) | RcptTo(address=address, args=args):
                return address_obj(address, args)
            case Header(name=name, value=value):
                return header_obj(name, value)
            case BodyChunk(data=data):
                return {"offset": body_size - len(data), "base64": b64(data)}
            case Unknown(line=line):
                return text_obj("command", line)
        return {}

    def request(self, event: str, data: JSON, msg: MessageContext | None) -> JSON:
        """The request without its ``id`` (set per endpoint call)."""
        return {
            "event": event,
            "id": "",
            "timestamp": rfc3339_now(),
            "session": self.session_obj(),
            "message": self.message_obj(msg),
            "data": data,
        }


def encode(obj: JSON) -> bytes:
    """Serialize a request with orjson (bytes, sent as is)."""
    # Typed here: where orjson is not installed (mypyc's build) its functions are Any.
    encoded: bytes = orjson.dumps(obj)
    return encoded


class DecodeError(ValueError):
    """A response body that is not JSON."""


def decode(body: bytes) -> object:
    """Parse a response body; empty means continue (None). Raises DecodeError when it is not JSON."""
    if not body.strip():
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from None


class BodyPart:
    """The ``message.body`` member of an eom request for an endpoint with ``include_body``.

    Up to ``max_bytes`` of the body, base64-encoded; ``truncated`` when the body is longer, or
    was not kept at all (over ``max_message_bytes``). With ``stream`` the bytes are read from
    the buffer while the request is sent (:class:`StreamedRequest`), so a large message never
    sits in memory as one base64 string; without it they are encoded now (a call that outlives
    the buffer: observe endpoints).
    """

    __slots__ = ("kept", "source", "stream", "truncated")

    def __init__(self, source: BodyBuffer, max_bytes: int, *, stream: bool) -> None:
        self.source = source
        self.kept = 0 if source.oversize else min(max_bytes, source.size)
        self.truncated = self.kept < source.size
        self.stream = stream and self.kept > 0

    def json(self) -> JSON:
        """The member with its base64 last (``encode_request`` cuts the request there)."""
        encoded = "" if self.stream or not self.kept else b64(self.source.read(self.kept))
        return {"size": self.source.size, "truncated": self.truncated, "base64": encoded}


#: How an encoded request ends when its body is streamed: the (empty) base64 string of
#: ``message.body``, the body object, the message object and the request itself.
_STREAMED_END = b'"base64":""}}}'


def encode_request(request: JSON, webhook_id: str, body: BodyPart | None = None) -> bytes | StreamedRequest:
    """The request for one endpoint call, with its id and, for include_body at eom, the body."""
    if body is None:
        return encode({**request, "id": webhook_id})
    # The message (and in it the body, and in that the base64) goes last, so that the bytes
    # of a streamed body go just before the last four bytes of the encoded request.
    obj = {key: value for key, value in request.items() if key != "message"}
    obj["id"] = webhook_id
    obj["message"] = {**request["message"], "body": body.json()}
    encoded = encode(obj)
    if not body.stream:
        return encoded
    if not encoded.endswith(_STREAMED_END):  # the layout above changed: a bug, never a short body
        raise ValueError("the encoded request does not end with the message body")
    split = len(encoded) - len(_STREAMED_END) + len(b'"base64":"')
    return StreamedRequest(encoded[:split], body.source, body.kept, encoded[split:])


class StreamedRequest:
    """A JSON request whose body bytes are base64-encoded from a BodyBuffer while it is sent.

    The request is ``head``, the first ``limit`` bytes of the body in 48 KiB pieces, and
    ``tail``. ``len()`` is exact (for Content-Length and signing).
    """

    __slots__ = ("_size", "head", "limit", "source", "tail")

    def __init__(self, head: bytes, source: BodyBuffer, limit: int, tail: bytes) -> None:
        self.head = head
        self.tail = tail
        self.source = source
        self.limit = limit
        raw = min(limit, source.size)
        self._size = len(head) + 4 * ((raw + 2) // 3) + len(tail)

    def __len__(self) -> int:
        return self._size

    def chunks(self) -> Iterator[bytes]:
        yield self.head
        for piece in self.source.chunks(self.limit):
            yield base64.b64encode(piece)
        yield self.tail
