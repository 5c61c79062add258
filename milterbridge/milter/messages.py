"""Typed, immutable milter messages in three vocabularies.

* :class:`Command` — MTA to milter (``SMFIC_*``).
* :class:`Reply` — milter to MTA decisions and interim answers (``SMFIR_*``),
  plus :class:`NegotiateReply`, the answer to OPTNEG with its macro lists.
* :class:`Modification` — milter to MTA message changes, legal only in reply
  to end-of-message.

Every class declares its one-byte wire code as a class keyword; the code is
registered per direction and a duplicate fails at import time. Each class can
encode its payload and decode it back, so both sides of the protocol (the
bridge and the MTA-side client) share one definition.

All text fields are ``bytes``: the wire has no character set (8-bit headers,
SMTPUTF8 addresses), and decoding is left to the shell.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

from .constants import CHUNK_SIZE, Action, Family, MacroStage, Protocol
from .errors import LocalProtocolError, RemoteProtocolError

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_OPTNEG = struct.Struct(">III")

_FROZEN = {"frozen": True, "slots": True, "kw_only": True}


# --------------------------------------------------------------------------
# payload helpers


def _cstrings(payload: bytes) -> list[bytes]:
    """Split a payload made of NUL-terminated strings (possibly none)."""
    if not payload:
        return []
    if payload[-1] != 0:
        raise RemoteProtocolError("missing string NUL terminator")
    return payload[:-1].split(b"\0")


def _exact_cstrings(payload: bytes, count: int, what: str) -> list[bytes]:
    parts = _cstrings(payload)
    if len(parts) != count:
        raise RemoteProtocolError(f"{what}: expected {count} strings, got {len(parts)}")
    return parts


def _cstr(value: bytes, what: str) -> bytes:
    """Encode one string field, refusing an embedded NUL (it would split it)."""
    if b"\0" in value:
        raise LocalProtocolError(f"{what} contains a NUL byte")
    return value + b"\0"


def envelope_fields(payload: bytes, what: str) -> tuple[bytes, tuple[bytes, ...]]:
    """(address, ESMTP args) of a MAIL or RCPT payload, without building the message."""
    parts = _cstrings(payload)
    if not parts:
        raise RemoteProtocolError(f"{what}: missing address")
    return parts[0], tuple(parts[1:])


def header_fields(payload: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a HEADER payload, without building the message."""
    name, value = _exact_cstrings(payload, 2, "HEADER")
    return name, value


def _empty(payload: bytes, what: str) -> None:
    if payload:
        # Postfix: "reply ... was followed by N data bytes" is a protocol error.
        raise RemoteProtocolError(f"{what} must have an empty payload, got {len(payload)} bytes")


# --------------------------------------------------------------------------
# bases and registries

#: Wire code -> class, for each direction.
COMMANDS: dict[bytes, type[Command]] = {}
RESPONSES: dict[bytes, type[Reply | Modification]] = {}


class Message:
    """Base of every wire message.

    The bases are plain classes (not dataclasses) so that ``__init_subclass__``
    can use ``super()``: a slotted dataclass is a new class object, which would
    break the zero-argument form.
    """

    __slots__ = ()
    code: ClassVar[bytes]
    #: The per-direction table a subclass registers its code in.
    _registry: ClassVar[dict[bytes, type[Message]]]

    def __init_subclass__(cls, code: bytes | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is None:
            # dataclass(slots=True) rebuilds the class without the keyword;
            # the code is then in the copied class namespace.
            code = cls.__dict__.get("code")
        if code is None:
            return
        if len(code) != 1:
            raise TypeError(f"{cls.__name__}: wire code must be one byte, got {code!r}")
        table = cls._registry
        if code in table and table[code].__qualname__ != cls.__qualname__:
            raise TypeError(f"{cls.__name__}: code {code!r} already used by {table[code].__name__}")
        # The slotted dataclass built from this class registers itself again
        # under the same name; the last one (the real class) wins.
        table[code] = cls
        cls.code = code

    def encode_payload(self) -> bytes:
        """The payload bytes (everything after the code byte)."""
        return b""

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        """Build the message from its payload; raises RemoteProtocolError."""
        _empty(payload, cls.__name__)
        return cls()

    def to_frame(self) -> bytes:
        """The whole frame: length prefix, code and payload."""
        payload = self.encode_payload()
        return _U32.pack(len(payload) + 1) + self.code + payload


class Command(Message):
    """A message from the MTA to the milter (``SMFIC_*``)."""

    __slots__ = ()
    _registry: ClassVar[dict[bytes, type[Message]]] = COMMANDS  # type: ignore[assignment]


class Reply(Message):
    """A decision or interim answer from the milter (``SMFIR_*``)."""

    __slots__ = ()
    _registry: ClassVar[dict[bytes, type[Message]]] = RESPONSES  # type: ignore[assignment]


class Modification(Message):
    """A message change, legal only in reply to end-of-message."""

    __slots__ = ()
    _registry: ClassVar[dict[bytes, type[Message]]] = RESPONSES  # type: ignore[assignment]
    #: The action bit the MTA must have granted for this change.
    action: ClassVar[Action]


# --------------------------------------------------------------------------
# commands, MTA -> milter


@dataclass(**_FROZEN)
class Negotiate(Command, code=b"O"):  # SMFIC_OPTNEG
    """The MTA's option offer: protocol version, actions and protocol bits."""

    version: int
    actions: Action
    protocol: Protocol

    def encode_payload(self) -> bytes:
        return _OPTNEG.pack(self.version, int(self.actions), int(self.protocol))

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        if len(payload) != _OPTNEG.size:
            raise RemoteProtocolError(f"OPTNEG payload must be 12 bytes, got {len(payload)}")
        version, actions, protocol = _OPTNEG.unpack(payload)
        return cls(version=version, actions=Action(actions), protocol=Protocol(protocol))


@dataclass(**_FROZEN)
class Macro(Command, code=b"D"):  # SMFIC_MACRO
    """Macro values for the command that follows; always no-reply.

    ``stage`` is the code of the command these macros belong to (Postfix also
    uses ``L`` and ``B``). An odd string count leaves the last name without a
    value; it is kept with an empty value.
    """

    stage: bytes
    macros: tuple[tuple[bytes, bytes], ...] = ()

    def encode_payload(self) -> bytes:
        if len(self.stage) != 1:
            raise LocalProtocolError("macro stage must be one byte")
        out = [self.stage]
        for name, value in self.macros:
            out.append(_cstr(name, "macro name"))
            out.append(_cstr(value, "macro value"))
        return b"".join(out)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        if len(payload) == 1:
            # Postfix sends a macro packet before every event, often empty.
            empty = _EMPTY_MACROS.get(payload)
            if empty is None:
                empty = _EMPTY_MACROS[payload] = cls(stage=payload)
            return empty  # type: ignore[return-value]
        if not payload:
            raise RemoteProtocolError("macro packet without a stage byte")
        parts = _cstrings(payload[1:])
        if len(parts) % 2:
            parts.append(b"")
        pairs = tuple(zip(parts[0::2], parts[1::2], strict=True))
        return cls(stage=payload[:1], macros=pairs)


_EMPTY_MACROS: dict[bytes, Macro] = {}


@dataclass(**_FROZEN)
class Connect(Command, code=b"C"):  # SMFIC_CONNECT
    """A new SMTP client: its name, address family, port and address."""

    hostname: bytes
    family: Family = Family.UNKNOWN
    port: int = 0
    address: bytes = b""

    def encode_payload(self) -> bytes:
        head = _cstr(self.hostname, "hostname") + self.family.value
        if self.family is Family.UNKNOWN:
            return head
        return head + _U16.pack(self.port) + _cstr(self.address, "address")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        end = payload.find(b"\0")
        if end < 0 or end + 1 >= len(payload):
            raise RemoteProtocolError("CONNECT: missing hostname or family")
        hostname = payload[:end]
        try:
            family = Family(payload[end + 1 : end + 2])
        except ValueError:
            raise RemoteProtocolError(f"CONNECT: unknown family {payload[end + 1 : end + 2]!r}") from None
        rest = payload[end + 2 :]
        if family is Family.UNKNOWN:
            # Nothing follows 'U' (milter-protocol.md §2.2, pitfall 11).
            _empty(rest, "CONNECT with family U")
            return cls(hostname=hostname, family=family)
        if len(rest) < 3:
            raise RemoteProtocolError("CONNECT: truncated port or address")
        (port,) = _U16.unpack_from(rest)
        (address,) = _exact_cstrings(rest[2:], 1, "CONNECT address")
        return cls(hostname=hostname, family=family, port=port, address=address)


@dataclass(**_FROZEN)
class Helo(Command, code=b"H"):  # SMFIC_HELO
    """The HELO/EHLO argument."""

    hostname: bytes

    def encode_payload(self) -> bytes:
        return _cstr(self.hostname, "helo")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        (hostname,) = _exact_cstrings(payload, 1, "HELO")
        return cls(hostname=hostname)


@dataclass(**_FROZEN)
class _Envelope(Command):
    address: bytes
    args: tuple[bytes, ...] = ()

    def encode_payload(self) -> bytes:
        return b"".join([_cstr(self.address, "address"), *(_cstr(a, "ESMTP argument") for a in self.args)])

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        address, args = envelope_fields(payload, cls.__name__)
        return cls(address=address, args=args)


@dataclass(**_FROZEN)
class MailFrom(_Envelope, code=b"M"):  # SMFIC_MAIL
    """MAIL FROM: the raw address token (``<a@b>``, ``<>``, ``a@b`` or ``""``) and ESMTP args."""


@dataclass(**_FROZEN)
class RcptTo(_Envelope, code=b"R"):  # SMFIC_RCPT
    """RCPT TO: the raw address token and ESMTP args."""


@dataclass(**_FROZEN)
class Data(Command, code=b"T"):  # SMFIC_DATA
    """DATA (or the first BDAT) was received."""


@dataclass(**_FROZEN)
class Header(Command, code=b"L"):  # SMFIC_HEADER
    """One header; the value is byte-exact (folds joined with LF)."""

    name: bytes
    value: bytes

    def encode_payload(self) -> bytes:
        return _cstr(self.name, "header name") + _cstr(self.value, "header value")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        name, value = header_fields(payload)
        return cls(name=name, value=value)


@dataclass(**_FROZEN)
class EndOfHeaders(Command, code=b"N"):  # SMFIC_EOH
    """All headers have been sent."""


@dataclass(**_FROZEN)
class BodyChunk(Command, code=b"B"):  # SMFIC_BODY
    """A piece of the body: raw CRLF text cut at any byte."""

    data: bytes

    def encode_payload(self) -> bytes:
        return self.data

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        return cls(data=payload)


@dataclass(**_FROZEN)
class EndOfMessage(Command, code=b"E"):  # SMFIC_BODYEOB
    """End of message. libmilter treats a payload as a last body chunk; so do we."""

    data: bytes = b""

    def encode_payload(self) -> bytes:
        return self.data

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        return cls(data=payload)


@dataclass(**_FROZEN)
class Abort(Command, code=b"A"):  # SMFIC_ABORT
    """The transaction ended without (another) end-of-message; always no-reply."""


@dataclass(**_FROZEN)
class Quit(Command, code=b"Q"):  # SMFIC_QUIT
    """The session ends and the MTA closes the socket; always no-reply."""


@dataclass(**_FROZEN)
class QuitNewConnection(Command, code=b"K"):  # SMFIC_QUIT_NC
    """The session ends but the socket stays open for a new CONNECT (v6); always no-reply."""


@dataclass(**_FROZEN)
class Unknown(Command, code=b"U"):  # SMFIC_UNKNOWN
    """An SMTP command the MTA did not recognise (the whole line)."""

    line: bytes

    def encode_payload(self) -> bytes:
        return _cstr(self.line, "command line")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        (line,) = _exact_cstrings(payload, 1, "UNKNOWN")
        return cls(line=line)


# --------------------------------------------------------------------------
# replies, milter -> MTA


@dataclass(**_FROZEN)
class NegotiateReply(Reply, code=b"O"):  # SMFIC_OPTNEG (answer)
    """Our answer to OPTNEG, with the per-stage macro lists (the "symlist")."""

    version: int
    actions: Action
    protocol: Protocol
    macros: tuple[tuple[MacroStage, bytes], ...] = ()
    #: The frame, encoded on first use: one reply answers every connection that makes the same offer.
    _frame: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def to_frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            frame = Reply.to_frame(self)  # no zero-argument super() in a slotted dataclass
            object.__setattr__(self, "_frame", frame)  # frozen: a cache, not a change of value
        return frame

    def encode_payload(self) -> bytes:
        out = [_OPTNEG.pack(self.version, int(self.actions), int(self.protocol))]
        for stage, names in self.macros:
            out.append(_U32.pack(int(stage)))
            out.append(_cstr(names, "macro list"))
        return b"".join(out)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        if len(payload) < _OPTNEG.size:
            raise RemoteProtocolError(f"OPTNEG reply shorter than 12 bytes ({len(payload)})")
        version, actions, protocol = _OPTNEG.unpack_from(payload)
        macros: list[tuple[MacroStage, bytes]] = []
        pos = _OPTNEG.size
        while pos < len(payload):
            if pos + 4 >= len(payload):
                raise RemoteProtocolError("OPTNEG reply: truncated macro list")
            (stage,) = _U32.unpack_from(payload, pos)
            end = payload.find(b"\0", pos + 4)
            if end < 0:
                raise RemoteProtocolError("OPTNEG reply: macro list without NUL")
            try:
                macros.append((MacroStage(stage), payload[pos + 4 : end]))
            except ValueError:
                raise RemoteProtocolError(f"OPTNEG reply: unknown macro stage {stage}") from None
            pos = end + 1
        return cls(version=version, actions=Action(actions), protocol=Protocol(protocol), macros=tuple(macros))


@dataclass(**_FROZEN)
class Continue(Reply, code=b"c"):  # SMFIR_CONTINUE
    """Go on with the next step."""


@dataclass(**_FROZEN)
class Accept(Reply, code=b"a"):  # SMFIR_ACCEPT
    """Accept; the milter wants no more events for this message (or connection)."""


@dataclass(**_FROZEN)
class Reject(Reply, code=b"r"):  # SMFIR_REJECT
    """Reject with the MTA's default 5xx text."""


@dataclass(**_FROZEN)
class TempFail(Reply, code=b"t"):  # SMFIR_TEMPFAIL
    """Temporary failure with the MTA's default 4xx text."""


@dataclass(**_FROZEN)
class Discard(Reply, code=b"d"):  # SMFIR_DISCARD
    """Accept and silently drop the message (not at connect or helo)."""


@dataclass(**_FROZEN)
class Skip(Reply, code=b"s"):  # SMFIR_SKIP
    """No more events of this kind (body chunks); needs SMFIP_SKIP."""


@dataclass(**_FROZEN)
class Progress(Reply, code=b"p"):  # SMFIR_PROGRESS
    """Keep-alive: the MTA restarts its timer and keeps waiting."""


@dataclass(**_FROZEN)
class ConnFail(Reply, code=b"f"):  # SMFIR_CONN_FAIL
    """Defined by libmilter but implemented by no MTA; decoded, never sent by us."""


@dataclass(**_FROZEN)
class Shutdown(Reply, code=b"4"):  # SMFIR_SHUTDOWN
    """Postfix only: 421 and disconnect. ``ReplyCode`` with 421 is the portable form."""


@dataclass(**_FROZEN)
class ReplyCode(Reply, code=b"y"):  # SMFIR_REPLYCODE
    """A full SMTP reply (4xx tempfail or 5xx reject), possibly multi-line.

    Build it with :meth:`build`, which validates the code, the enhanced code
    and the lines, doubles ``%`` and joins lines in the portable format.
    """

    text: bytes

    #: libmilter's ``MAXREPLIES``.
    MAX_LINES: ClassVar[int] = 32
    #: RFC 5321 reply-line limit, the portable bound (milter-protocol.md §7.3).
    MAX_LINE_BYTES: ClassVar[int] = 512

    def encode_payload(self) -> bytes:
        return _cstr(self.text, "reply text")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        (text,) = _exact_cstrings(payload, 1, "REPLYCODE")
        return cls(text=text)

    @property
    def smtp_code(self) -> int:
        """The three-digit SMTP code (0 if the text does not start with one)."""
        head = self.text[:3]
        return int(head) if head.isdigit() and len(head) == 3 else 0

    @classmethod
    def build(cls, code: int, lines: tuple[bytes, ...] | list[bytes], enhanced: bytes = b"") -> ReplyCode:
        """Build a portable reply: the same code on each line, ``-`` on all but the last.

        Raises ValueError for a code outside 4xx/5xx, an enhanced code of the
        wrong class, or lines that are too many, too long or contain CR/LF/NUL.
        """
        if not 400 <= code <= 599:
            raise ValueError(f"reply code must be 4xx or 5xx, got {code}")
        if not lines:
            lines = [b""]
        if len(lines) > cls.MAX_LINES:
            raise ValueError(f"at most {cls.MAX_LINES} reply lines, got {len(lines)}")
        digits = str(code).encode()
        if enhanced and (not _valid_enhanced(enhanced) or enhanced[:1] != digits[:1]):
            raise ValueError(f"enhanced code {enhanced!r} does not fit reply code {code}")
        out = []
        for n, line in enumerate(lines):
            if any(c in line for c in (b"\r", b"\n", b"\0")):
                raise ValueError("reply lines must not contain CR, LF or NUL")
            body = line.replace(b"%", b"%%")
            sep = b" " if n == len(lines) - 1 else b"-"
            head = digits + sep
            if body:
                text = head + (enhanced + b" " if enhanced else b"") + body
            else:
                # Postfix needs the space or '-' after the code, so a bare code keeps it.
                text = head + enhanced if enhanced else head
            if len(text) > cls.MAX_LINE_BYTES:
                raise ValueError(f"reply line longer than {cls.MAX_LINE_BYTES} bytes")
            out.append(text)
        return cls(text=b"\r\n".join(out))


def _valid_enhanced(enhanced: bytes) -> bool:
    parts = enhanced.split(b".")
    return (
        len(parts) == 3 and parts[0] in (b"2", b"4", b"5") and all(p.isdigit() and 1 <= len(p) <= 3 for p in parts[1:])
    )


# --------------------------------------------------------------------------
# modifications, milter -> MTA, only in reply to end-of-message


@dataclass(**_FROZEN)
class AddHeader(Modification, code=b"h"):  # SMFIR_ADDHEADER
    """Append a header at the end of the header block."""

    action: ClassVar[Action] = Action.ADD_HEADERS
    name: bytes
    value: bytes

    def encode_payload(self) -> bytes:
        return _cstr(self.name, "header name") + _cstr(self.value, "header value")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        name, value = _exact_cstrings(payload, 2, "ADDHEADER")
        return cls(name=name, value=value)


@dataclass(**_FROZEN)
class _IndexedHeader(Modification):
    index: int
    name: bytes
    value: bytes

    def encode_payload(self) -> bytes:
        if not 0 <= self.index <= 0xFFFFFFFF:
            raise LocalProtocolError(f"header index out of range: {self.index}")
        return _U32.pack(self.index) + _cstr(self.name, "header name") + _cstr(self.value, "header value")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        if len(payload) < 4:
            raise RemoteProtocolError(f"{cls.__name__}: truncated index")
        (index,) = _U32.unpack_from(payload)
        name, value = _exact_cstrings(payload[4:], 2, cls.__name__)
        return cls(index=index, name=name, value=value)


@dataclass(**_FROZEN)
class InsertHeader(_IndexedHeader, code=b"i"):  # SMFIR_INSHEADER
    """Insert a header after the ``index``-th one (0 = top; MTA numbering)."""

    action: ClassVar[Action] = Action.ADD_HEADERS


@dataclass(**_FROZEN)
class ChangeHeader(_IndexedHeader, code=b"m"):  # SMFIR_CHGHEADER
    """Change the ``index``-th header of this name (1-based); an empty value deletes it."""

    action: ClassVar[Action] = Action.CHANGE_HEADERS


@dataclass(**_FROZEN)
class _Recipient(Modification):
    address: bytes

    def encode_payload(self) -> bytes:
        return _cstr(self.address, "recipient")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        (address,) = _exact_cstrings(payload, 1, cls.__name__)
        return cls(address=address)


@dataclass(**_FROZEN)
class AddRecipient(_Recipient, code=b"+"):  # SMFIR_ADDRCPT
    """Add a recipient."""

    action: ClassVar[Action] = Action.ADD_RCPT


@dataclass(**_FROZEN)
class _AddressWithArgs(Modification):
    address: bytes
    #: ESMTP parameters as one space-separated string (milter-protocol.md §3.1).
    args: bytes | None = None

    def encode_payload(self) -> bytes:
        out = _cstr(self.address, "address")
        return out if self.args is None else out + _cstr(self.args, "ESMTP arguments")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        parts = _cstrings(payload)
        if len(parts) == 1:
            return cls(address=parts[0])
        if len(parts) == 2:
            return cls(address=parts[0], args=parts[1])
        raise RemoteProtocolError(f"{cls.__name__}: expected 1 or 2 strings, got {len(parts)}")


@dataclass(**_FROZEN)
class AddRecipientWithArgs(_AddressWithArgs, code=b"2"):  # SMFIR_ADDRCPT_PAR
    """Add a recipient with ESMTP parameters (Postfix uses NOTIFY and ORCPT)."""

    action: ClassVar[Action] = Action.ADD_RCPT_PAR


@dataclass(**_FROZEN)
class RemoveRecipient(_Recipient, code=b"-"):  # SMFIR_DELRCPT
    """Remove a recipient (exact match on the address as received)."""

    action: ClassVar[Action] = Action.DELETE_RCPT


@dataclass(**_FROZEN)
class ChangeSender(_AddressWithArgs, code=b"e"):  # SMFIR_CHGFROM
    """Replace the envelope sender (Postfix uses RET and ENVID)."""

    action: ClassVar[Action] = Action.CHANGE_FROM


@dataclass(**_FROZEN)
class ReplaceBody(Modification, code=b"b"):  # SMFIR_REPLBODY
    """One piece of the new body; see :func:`replace_body` to chunk a whole body."""

    action: ClassVar[Action] = Action.CHANGE_BODY
    data: bytes

    def encode_payload(self) -> bytes:
        return self.data

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        return cls(data=payload)


@dataclass(**_FROZEN)
class Quarantine(Modification, code=b"q"):  # SMFIR_QUARANTINE
    """Put the message on hold with a reason (must not be empty on the wire)."""

    action: ClassVar[Action] = Action.QUARANTINE
    reason: bytes

    def encode_payload(self) -> bytes:
        if not self.reason:
            raise LocalProtocolError("quarantine reason must not be empty")
        return _cstr(self.reason, "quarantine reason")

    @classmethod
    def decode_payload(cls, payload: bytes) -> Self:
        (reason,) = _exact_cstrings(payload, 1, "QUARANTINE")
        return cls(reason=reason)


def replace_body(body: bytes, chunk_size: int = CHUNK_SIZE) -> list[ReplaceBody]:
    """Split a new body into REPLBODY pieces of at most ``chunk_size`` bytes.

    An empty body becomes one empty piece, which empties the message body.
    """
    if chunk_size < 1:
        raise LocalProtocolError("chunk size must be positive")
    if not body:
        return [ReplaceBody(data=b"")]
    return [ReplaceBody(data=body[i : i + chunk_size]) for i in range(0, len(body), chunk_size)]


#: Replies that end the MTA's wait for an event.
FINAL_REPLIES: tuple[type[Reply], ...] = (
    Continue,
    Accept,
    Reject,
    TempFail,
    Discard,
    Skip,
    ReplyCode,
    Shutdown,
    ConnFail,
)

__all__ = [
    "COMMANDS",
    "FINAL_REPLIES",
    "RESPONSES",
    "Abort",
    "Accept",
    "AddHeader",
    "AddRecipient",
    "AddRecipientWithArgs",
    "BodyChunk",
    "ChangeHeader",
    "ChangeSender",
    "Command",
    "ConnFail",
    "Connect",
    "Continue",
    "Data",
    "Discard",
    "EndOfHeaders",
    "EndOfMessage",
    "Header",
    "Helo",
    "InsertHeader",
    "Macro",
    "MailFrom",
    "Message",
    "Modification",
    "Negotiate",
    "NegotiateReply",
    "Progress",
    "Quarantine",
    "Quit",
    "QuitNewConnection",
    "RcptTo",
    "Reject",
    "RemoveRecipient",
    "ReplaceBody",
    "Reply",
    "ReplyCode",
    "Shutdown",
    "Skip",
    "TempFail",
    "Unknown",
    "envelope_fields",
    "field",
    "header_fields",
    "replace_body",
]
