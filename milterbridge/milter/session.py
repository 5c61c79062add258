"""The milter-side session: a sans-IO state machine written as tables.

Use it like h11: ``receive_data(chunk)``, then ``next_event()`` until it
returns :data:`NEED_DATA`; when :attr:`MilterSession.needs_reply` is true,
``send(reply)`` (or ``send_all``) returns the bytes to write.

Rules kept here, all from milter-protocol.md:

* Which command may follow which (:data:`TRANSITIONS`). We are at least as
  lenient as libmilter (§5.11): ABORT is legal any time after CONNECT and is
  idempotent (Postfix sends it after every message, sometimes twice); a new
  HELO or MAIL while a transaction is open ends that transaction.
* Which replies are legal in answer to which command (:data:`ALLOWED_REPLIES`);
  modifications, QUARANTINE and PROGRESS only at end-of-message, SKIP only
  at a body chunk and only when negotiated.
* No reply to MACRO, ABORT, QUIT, QUIT_NC, nor to an event negotiated as
  no-reply (:data:`NO_REPLY_FLAG`).
* Macros are folded into the context, never surfaced as events.

Hot path: Postfix sends every event before end-of-message even when the milter
only wants the end (the payload needs the envelope and headers), as no-reply
events, each after a macro packet. A caller that does not need to see some of
them says so with :meth:`MilterSession.set_quiet`; ``next_event`` then folds
those (of :data:`ABSORBABLE`) into the context itself and reads on, instead of
building a message object and returning it.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .codec import _HEADER_BYTES, FrameDecoder, _unpack_u32, command_decoder
from .constants import DEFAULT_MAX_FRAME_BYTES, LEN_BYTES, Action, Event, Protocol
from .context import (
    BUDGET_LIMIT,
    CONNECTION_MACRO_STAGES,
    TRUNCATED_PART,
    ConnectionContext,
    MacroStore,
    MemoryBudget,
    MessageContext,
    over_limit,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macro,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    Progress,
    Quit,
    QuitNewConnection,
    RcptTo,
    Reject,
    ReplaceBody,
    Reply,
    ReplyCode,
    Shutdown,
    Skip,
    TempFail,
    Unknown,
    envelope_fields,
    header_fields,
)


class NeedData:
    """Returned by :meth:`MilterSession.next_event` when more bytes are needed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class State(enum.Enum):
    """Where the session is in the protocol."""

    INIT = "init"  # waiting for OPTNEG
    NEGOTIATED = "negotiated"  # waiting for CONNECT
    CONNECTED = "connected"  # connection open, no transaction
    ENVELOPE = "envelope"  # after MAIL / RCPT
    DATA = "data"  # after DATA
    HEADERS = "headers"  # after a HEADER
    EOH = "eoh"  # after end-of-headers
    BODY = "body"  # after a body chunk
    CLOSED = "closed"  # after QUIT or EOF

    # Members are singletons: identity hashing is right and skips Enum's Python-level
    # __hash__, which ran twice per command in the transition lookup.
    __hash__ = object.__hash__


_S = State
_MESSAGE_STATES = frozenset({_S.ENVELOPE, _S.DATA, _S.HEADERS, _S.EOH, _S.BODY})
_OPEN_STATES = frozenset({_S.CONNECTED, *_MESSAGE_STATES})

#: Command class -> {state it may arrive in: state it leads to}. Content
#: commands may skip states the milter switched off (NOHDRS, NOEOH, NOBODY).
#: MACRO is not listed: it is legal in every state but INIT and CLOSED.
TRANSITIONS: Final[dict[type[Command], dict[State, State]]] = {
    Negotiate: {_S.INIT: _S.NEGOTIATED},
    Connect: {_S.NEGOTIATED: _S.CONNECTED},
    Helo: dict.fromkeys(_OPEN_STATES, _S.CONNECTED),
    MailFrom: {_S.CONNECTED: _S.ENVELOPE, _S.ENVELOPE: _S.ENVELOPE},
    RcptTo: {_S.ENVELOPE: _S.ENVELOPE},
    Data: {_S.ENVELOPE: _S.DATA},
    Header: dict.fromkeys((_S.ENVELOPE, _S.DATA, _S.HEADERS), _S.HEADERS),
    EndOfHeaders: dict.fromkeys((_S.ENVELOPE, _S.DATA, _S.HEADERS), _S.EOH),
    BodyChunk: dict.fromkeys(_MESSAGE_STATES, _S.BODY),
    EndOfMessage: dict.fromkeys(_MESSAGE_STATES, _S.BODY),
    Unknown: {s: s for s in (_S.NEGOTIATED, *_OPEN_STATES)},
    Abort: {**{s: s for s in (_S.NEGOTIATED,)}, **dict.fromkeys(_OPEN_STATES, _S.CONNECTED)},
    Quit: dict.fromkeys((_S.INIT, _S.NEGOTIATED, *_OPEN_STATES), _S.CLOSED),
    QuitNewConnection: dict.fromkeys(_OPEN_STATES, _S.NEGOTIATED),
}

#: Command class -> the public event name.
EVENT_OF: Final[dict[type[Command], Event]] = {
    Connect: Event.CONNECT,
    Helo: Event.HELO,
    MailFrom: Event.MAIL,
    RcptTo: Event.RCPT,
    Data: Event.DATA,
    Header: Event.HEADER,
    EndOfHeaders: Event.EOH,
    BodyChunk: Event.BODY,
    EndOfMessage: Event.EOM,
    Unknown: Event.UNKNOWN,
    Abort: Event.ABORT,
    Quit: Event.CLOSE,
}

#: Event -> the no-reply bit that lets us stay silent.
NO_REPLY_FLAG: Final[dict[type[Command], Protocol]] = {
    Connect: Protocol.NR_CONNECT,
    Helo: Protocol.NR_HELO,
    MailFrom: Protocol.NR_MAIL,
    RcptTo: Protocol.NR_RCPT,
    Data: Protocol.NR_DATA,
    Header: Protocol.NR_HEADER,
    EndOfHeaders: Protocol.NR_EOH,
    BodyChunk: Protocol.NR_BODY,
    Unknown: Protocol.NR_UNKNOWN,
}

_MACRO_CODE: Final = Macro.code[0]

#: Forward commands a milter can switch off; when one is off, the states it
#: would lead to are also reachable without it (libmilter skips them too).
SKIP_FLAG: Final[dict[type[Command], Protocol]] = {
    Connect: Protocol.NO_CONNECT,
    MailFrom: Protocol.NO_MAIL,
    RcptTo: Protocol.NO_RCPT,
    Data: Protocol.NO_DATA,
    Header: Protocol.NO_HEADERS,
    EndOfHeaders: Protocol.NO_EOH,
    BodyChunk: Protocol.NO_BODY,
}


@functools.lru_cache(maxsize=64)
def effective_transitions(protocol: Protocol, version: int) -> dict[type[Command], dict[State, State]]:
    """:data:`TRANSITIONS` widened by the commands negotiated away.

    With NOCONNECT, HELO may follow OPTNEG; with NOMAIL and NORCPT, header
    events may come straight after HELO, and so on.
    """
    disabled = [cmd for cmd, bit in SKIP_FLAG.items() if protocol & bit]
    if version < 4:
        disabled.append(Data)  # DATA exists from protocol version 4
    if not disabled:
        return TRANSITIONS

    def reachable(state: State) -> list[State]:
        seen = [state]
        for current in seen:
            for cmd in disabled:
                nxt = TRANSITIONS[cmd].get(current)
                if nxt is not None and nxt not in seen:
                    seen.append(nxt)
        return seen

    table: dict[type[Command], dict[State, State]] = {}
    for cmd, trans in TRANSITIONS.items():
        widened = dict(trans)
        for state in State:
            if state in widened or state in (State.INIT, State.CLOSED):
                continue
            for via in reachable(state)[1:]:
                if via in trans:
                    widened[state] = trans[via]
                    break
        table[cmd] = widened
    return table


@functools.lru_cache(maxsize=64)
def silent_commands(protocol: Protocol) -> frozenset[type[Command]]:
    """Commands never answered under ``protocol``: MACRO, ABORT, QUIT(_NC) and the no-reply events."""
    return NEVER_ANSWERED | {kind for kind, bit in NO_REPLY_FLAG.items() if protocol & bit}


#: Commands ``next_event`` may take in without returning them (see ``set_quiet``): they only
#: add to the message context, and nothing else about the connection depends on them.
ABSORBABLE: Final[frozenset[type[Command]]] = frozenset({RcptTo, Data, Header, EndOfHeaders})

#: Commands that are never answered.
NEVER_ANSWERED: Final[frozenset[type[Command]]] = frozenset({Macro, Abort, Quit, QuitNewConnection})

_DECISIONS: frozenset[type[Reply]] = frozenset({Continue, Accept, Reject, TempFail, ReplyCode, Shutdown})

#: Command class -> replies that may answer it. Modifications, PROGRESS and
#: QUARANTINE are legal only at end-of-message (Postfix treats them as a
#: protocol error elsewhere; the sendmail MTA refuses PROGRESS elsewhere).
#: DISCARD is not allowed at CONNECT/HELO; at UNKNOWN neither ACCEPT nor
#: DISCARD (they can crash Postfix's smtpd, §9 item 22).
ALLOWED_REPLIES: Final[dict[type[Command], frozenset[type[Reply]]]] = {
    Negotiate: frozenset({NegotiateReply}),
    Connect: _DECISIONS,
    Helo: _DECISIONS,
    MailFrom: _DECISIONS | {Discard},
    RcptTo: _DECISIONS | {Discard},
    Data: _DECISIONS | {Discard},
    Header: _DECISIONS | {Discard},
    EndOfHeaders: _DECISIONS | {Discard},
    BodyChunk: _DECISIONS | {Discard, Skip},
    EndOfMessage: _DECISIONS | {Discard, Progress},
    Unknown: frozenset({Continue, Reject, TempFail, ReplyCode, Shutdown}),
}

#: Replies that answer a command without ending the MTA's wait.
INTERIM_REPLIES: Final = frozenset({Progress})


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLimits:
    """Bounds on what one connection may make us hold in memory."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_recipients: int = 10_000
    max_headers: int = 10_000
    max_header_bytes: int = 16 * 1024 * 1024
    max_macros: int = 1_000
    #: Body bytes of one message; counted only (the body is the caller's to keep).
    max_message_bytes: int = 50 * 1024 * 1024


#: What keeping one header or recipient costs beyond its bytes, as counted against the shared
#: budget: the tuple and bytes objects here and the JSON objects the payload builder caches
#: for it (measured: about 250 bytes for a short header on CPython 3.11).
ITEM_OVERHEAD_BYTES = 256


def _over(over_limits: dict[str, int], limit: str) -> None:
    """Count one item not kept because it went over ``limit``."""
    over_limits[limit] = over_limits.get(limit, 0) + 1


def _refused_over(over_limits: dict[str, int], limit: str) -> None:
    """An item over ``limit`` was refused at the MTA after all: it is not missing from the context."""
    left = over_limits.get(limit, 0) - 1
    if left > 0:
        over_limits[limit] = left
    else:
        over_limits.pop(limit, None)


class MilterSession:
    """One milter connection as seen from the milter (our) side."""

    def __init__(self, limits: SessionLimits | None = None, *, budget: MemoryBudget | None = None) -> None:
        self.limits = limits or SessionLimits()
        #: Shared by every connection of the process (``[server] max_buffered_bytes``), or None.
        self.budget = budget
        self._decoder: FrameDecoder[Command] = command_decoder(self.limits.max_frame_bytes)
        self.state = State.INIT
        self.connection = ConnectionContext(store=MacroStore(self.limits.max_macros))
        self.message: MessageContext | None = None
        #: The message the last command ended without end-of-message (ABORT, a
        #: new HELO or MAIL, QUIT, EOF); ``None`` if it ended none.
        self.aborted: MessageContext | None = None
        #: The message the last end-of-message reply completed.
        self.completed: MessageContext | None = None
        #: The command waiting for our final reply, if any.
        self.pending: Command | None = None
        self.version = 0
        self.actions = Action.NONE
        self.protocol = Protocol.NONE
        self._pending_macros: dict[bytes, bytes] = {}
        self._transitions = TRANSITIONS
        #: Commands answered by nobody: NEVER_ANSWERED plus the negotiated no-reply events.
        self._silent: frozenset[type[Command]] = NEVER_ANSWERED
        self._body_replaced = 0  # 0 none yet, 1 in a REPLBODY run, 2 run ended
        #: The limit the last recipient went over (it was not kept), or None.
        self._rcpt_dropped_by: str | None = None
        self._quiet: frozenset[type[Command]] = frozenset()
        #: Wire code -> command class, for the commands next_event takes in itself.
        self._absorb: dict[int, type[Command]] = {}
        #: Commands taken in without being returned, per event name (see ``set_quiet``).
        self.quiet_counts: dict[str, int] = {}
        #: How many commands were taken in without being returned, in all.
        self.absorbed = 0

    def set_quiet(self, kinds: Iterable[type[Command]], counts: dict[str, int] | None = None) -> None:
        """Commands the caller does not need to see when they need no reply.

        Those of :data:`ABSORBABLE` that were negotiated no-reply are then folded into the
        context by ``next_event``, which reads on instead of returning them; each is counted
        in ``counts`` (default :attr:`quiet_counts`) under its event name, and in
        :attr:`absorbed`. Legality is checked exactly as for a returned command.
        """
        self._quiet = frozenset(kinds) & ABSORBABLE
        if counts is not None:
            self.quiet_counts = counts
        self._absorb = {kind.code[0]: kind for kind in self._quiet if kind in self._silent}

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the MTA; raises RemoteProtocolError on a bad frame header."""
        if self.state is State.CLOSED:
            if data:
                raise RemoteProtocolError("data after QUIT")
            return
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        """The MTA closed the connection; ends any open message."""
        partial = not self._decoder.at_boundary
        self.aborted = self._end_message()
        self.state = State.CLOSED
        self.pending = None
        if partial:
            raise RemoteProtocolError("connection closed in the middle of a frame")

    @property
    def needs_reply(self) -> bool:
        """True while a command waits for our final reply."""
        return self.pending is not None

    def next_event(self) -> Command | NeedData:
        """The next command from the MTA, or :data:`NEED_DATA`."""
        if self.pending is not None:
            raise LocalProtocolError(f"reply to {type(self.pending).__name__} before reading on")
        decoder = self._decoder
        absorb = self._absorb
        # FrameDecoder.next_frame, inlined: this loop runs for every frame (about 30 per small
        # message, most of them macro packets and quiet commands taken in right here).
        buf = decoder._buf
        size = len(buf)
        max_payload = decoder.max_frame_bytes
        while True:
            pos = decoder._pos
            if pos == size:  # FrameDecoder._compact's common case: the read was all whole frames
                if pos:
                    decoder._buf = b""
                    decoder._pos = 0
                return NEED_DATA
            if size - pos < _HEADER_BYTES:
                decoder._compact()
                return NEED_DATA
            (length,) = _unpack_u32(buf, pos)
            if length < 1 or length - 1 > max_payload:
                decoder.next_frame()  # raises with the precise reason
            end = pos + LEN_BYTES + length
            if end > size:
                decoder._compact()
                return NEED_DATA
            code = buf[pos + LEN_BYTES]
            payload = buf[pos + _HEADER_BYTES : end]
            if type(payload) is not bytes:
                payload = bytes(payload)
            decoder._pos = end
            if code == _MACRO_CODE:
                self._receive_macro(payload)
                continue
            kind = absorb.get(code)
            if kind is not None:
                self._absorb_command(kind, payload)
                continue
            msg = decoder.decode(code, payload)
            self._receive_command(msg)
            return msg

    def _receive_macro(self, payload: bytes) -> None:
        """Keep a macro packet's raw payload until its command arrives (parsed only when read)."""
        if self.state is State.INIT or self.state is State.CLOSED:
            raise RemoteProtocolError(f"macros in state {self.state.value}")
        if not payload:
            raise RemoteProtocolError("macro packet without a stage byte")
        # A packet with more names than max_macros is cut when folded in (see _fold_macros);
        # max_frame_bytes bounds it meanwhile. A new packet for a stage replaces an unclaimed
        # one (libmilter keeps one set per stage), so a peer sending macro packets without
        # commands cannot grow this.
        stage = payload[:1]
        if len(payload) == 1:
            # No values: all it does is replace an unclaimed packet of its stage.
            self._pending_macros.pop(stage, None)
            return
        self._pending_macros[stage] = payload

    def _absorb_command(self, kind: type[Command], payload: bytes) -> None:
        """``_receive_command`` for a quiet no-reply command, from its payload (see ``set_quiet``)."""
        if kind is Header:
            # header_fields, inlined (ten or more per message): exactly two NUL-ended strings.
            fields = payload[:-1].split(b"\0") if payload[-1:] == b"\0" else ()
            if len(fields) != 2:
                name, value = header_fields(payload)  # raises with the precise reason
            else:
                name, value = fields
        elif kind is RcptTo:
            address, args = envelope_fields(payload, "RcptTo")
        else:
            kind.decode_payload(payload)  # DATA and EOH: the payload must be empty
        state = self.state
        new_state = self._transitions[kind].get(state)
        if new_state is None:
            raise RemoteProtocolError(f"{kind.__name__} not allowed in state {state.value}")
        self.aborted = None
        self.completed = None
        self.state = new_state
        if self.message is None:
            self._open_message(b"", ())  # MAIL was negotiated away
        if kind is Header:
            self._add_header(name, value)
        elif kind is RcptTo:
            self._add_recipient(address, args)
        if self._pending_macros:
            self._fold_macros()
        event = EVENT_OF[kind]
        counts = self.quiet_counts
        counts[event] = counts.get(event, 0) + 1
        self.absorbed += 1

    def _receive_command(self, cmd: Command) -> None:
        kind = type(cmd)
        table = self._transitions[kind]
        state = self.state
        try:
            new_state = table[state]
        except KeyError:
            raise RemoteProtocolError(f"{kind.__name__} not allowed in state {state.value}") from None
        self.aborted = None
        self.completed = None
        if kind is MailFrom or kind is Helo or kind is Abort or kind is Quit or kind is QuitNewConnection:
            self.aborted = self._end_message()
        self.state = new_state
        if new_state in _MESSAGE_STATES and self.message is None and kind is not MailFrom:
            self._open_message(b"", ())  # MAIL was negotiated away
        if kind is Connect:
            self._on_connect(cmd)  # type: ignore[arg-type]
        elif kind is Helo:
            self.connection.helo = cmd.hostname  # type: ignore[attr-defined]
        elif kind is MailFrom:
            self._open_message(cmd.address, cmd.args)  # type: ignore[attr-defined]
        elif kind is RcptTo:
            self._add_recipient(cmd.address, cmd.args)  # type: ignore[attr-defined]
        elif kind is Header:
            self._add_header(cmd.name, cmd.value)  # type: ignore[attr-defined]
        elif kind is BodyChunk or kind is EndOfMessage:
            msg = self.message
            assert msg is not None
            msg.body_bytes += len(cmd.data)  # type: ignore[attr-defined]
            if msg.body_bytes > self.limits.max_message_bytes and "max_message_bytes" not in msg.over_limits:
                _over(msg.over_limits, "max_message_bytes")
            if kind is EndOfMessage:
                self._body_replaced = 0
        elif kind is QuitNewConnection:
            self.connection = ConnectionContext(store=MacroStore(self.limits.max_macros))
        if self._pending_macros:
            self._fold_macros()
        if kind not in self._silent:
            self.pending = cmd

    def _open_message(self, mail_from: bytes, args: tuple[bytes, ...]) -> None:
        conn = self.connection
        conn.message_count += 1
        self.message = MessageContext(
            number=conn.message_count,
            mail_from=mail_from,
            mail_args=args,
            store=MacroStore(self.limits.max_macros),
        )
        if self.budget is not None and self.budget.low:
            _over(self.message.over_limits, BUDGET_LIMIT)

    def _on_connect(self, cmd: Connect) -> None:
        conn = self.connection
        conn.hostname = cmd.hostname
        conn.family = cmd.family
        conn.port = cmd.port
        conn.address = cmd.address

    # Limits (design.md §3.7): what is over a limit is not kept, and the context records
    # which limit it went over, so that the caller can answer the MTA (server.on_oversize)
    # instead of hanging up, which would hand the message to milter_default_action.

    def _add_recipient(self, address: bytes, args: tuple[bytes, ...]) -> None:
        msg = self.message
        assert msg is not None
        if len(msg.recipients) >= self.limits.max_recipients:
            self._rcpt_dropped_by = "max_recipients"
        elif not self._take(msg, len(address) + sum(map(len, args))):
            self._rcpt_dropped_by = BUDGET_LIMIT
        else:
            self._rcpt_dropped_by = None
            msg.recipients.append((address, args))
            return
        _over(msg.over_limits, self._rcpt_dropped_by)

    def _take(self, msg: MessageContext, nbytes: int) -> bool:
        """Take an item of ``nbytes`` (plus what keeping it costs) from the shared budget for ``msg``."""
        if self.budget is None:
            return True
        cost = nbytes + ITEM_OVERHEAD_BYTES
        if not self.budget.take(cost):
            return False
        msg.budget_bytes += cost
        return True

    def _add_header(self, name: bytes, value: bytes) -> None:
        msg = self.message
        assert msg is not None
        over = msg.over_limits
        if over and ("max_headers" in over or "max_header_bytes" in over or BUDGET_LIMIT in over):
            # Keep a prefix: a header kept after a cut one would shift the header indexes.
            _over(over, next(limit for limit in over if TRUNCATED_PART[limit] == "headers"))
            return
        if len(msg.headers) >= self.limits.max_headers:
            _over(over, "max_headers")
            return
        nbytes = len(name) + len(value)
        size = msg.header_bytes + nbytes
        if size > self.limits.max_header_bytes:
            _over(over, "max_header_bytes")
            return
        if not self._take(msg, nbytes):
            _over(over, BUDGET_LIMIT)
            return
        msg.header_bytes = size
        msg.headers.append((name, value))

    def _fold_macros(self) -> None:
        message = self.message
        for stage, payload in self._pending_macros.items():
            if stage in CONNECTION_MACRO_STAGES or message is None:
                if not self.connection.store.add_raw(payload):
                    _over(self.connection.over_limits, "max_macros")
            elif not message.store.add_raw(payload):
                _over(message.over_limits, "max_macros")
        self._pending_macros.clear()

    def over_limit(self) -> str | None:
        """The first limit the current message (or its connection) went over, or None.

        A key of :data:`~milterbridge.milter.context.TRUNCATED_PART`, e.g. ``"max_headers"``.
        """
        return over_limit(self.message, self.connection)

    def _end_message(self) -> MessageContext | None:
        msg = self.message
        self.message = None
        if msg is not None and self.budget is not None:
            self.budget.give(msg.budget_bytes)
        return msg

    # ----------------------------------------------------------------- output

    def send(self, reply: Reply | Modification) -> bytes:
        """Validate one reply against the pending command; return its frame."""
        pending = self.pending
        if pending is None:
            raise LocalProtocolError(f"{type(reply).__name__} sent but no command is waiting for a reply")
        kind = type(reply)
        pending_kind = type(pending)
        if isinstance(reply, Modification):
            if pending_kind is not EndOfMessage:
                raise LocalProtocolError(f"{kind.__name__} is legal only at end-of-message")
            if not reply.action & self.actions:
                raise LocalProtocolError(f"{kind.__name__} needs action {reply.action!r}, not negotiated")
            self._check_body_run(kind is ReplaceBody)
            return reply.to_frame()
        if kind not in ALLOWED_REPLIES[pending_kind]:
            raise LocalProtocolError(f"{kind.__name__} is not a legal answer to {pending_kind.__name__}")
        if kind is Skip and not self.protocol & Protocol.SKIP:
            raise LocalProtocolError("SKIP was not negotiated")
        if kind is ReplyCode:
            code = reply.smtp_code  # type: ignore[attr-defined]
            if not 400 <= code <= 599:
                raise LocalProtocolError(f"reply code must be 4xx or 5xx: {reply.text[:20]!r}")  # type: ignore[attr-defined]
        if kind is NegotiateReply:
            self._on_negotiated(reply)  # type: ignore[arg-type]
        if kind in INTERIM_REPLIES:
            return reply.to_frame()
        self._check_body_run(False)
        self.pending = None
        if pending_kind is RcptTo and kind in (Reject, TempFail, ReplyCode) and self.message is not None:
            # A refused recipient is not part of the message (design §3.2).
            if self._rcpt_dropped_by is None:
                self.message.recipients.pop()
            else:
                _refused_over(self.message.over_limits, self._rcpt_dropped_by)
        if pending_kind is EndOfMessage:
            self.completed = self._end_message()
            self.state = State.CONNECTED
        return reply.to_frame()

    def send_all(self, replies: Iterable[Reply | Modification]) -> bytes:
        """Frames for several replies (modifications, then the final one) for one write."""
        return b"".join([self.send(r) for r in replies])

    def _on_negotiated(self, reply: NegotiateReply) -> None:
        offer = self.pending
        assert isinstance(offer, Negotiate)
        if reply.version > offer.version:
            raise LocalProtocolError(f"version {reply.version} is above the MTA's {offer.version}")
        if reply.actions & ~(offer.actions or Action(0x0F)):
            raise LocalProtocolError("actions outside the MTA's offer")
        self.version = reply.version
        self.actions = reply.actions
        self.protocol = reply.protocol
        self._transitions = effective_transitions(reply.protocol, reply.version)
        self._silent = silent_commands(reply.protocol)
        self.set_quiet(self._quiet)

    def _check_body_run(self, is_body: bool) -> None:
        # Postfix refuses REPLBODY pieces interleaved with other requests (§8.7).
        if is_body:
            if self._body_replaced == 2:
                raise LocalProtocolError("REPLBODY pieces must be sent in one unbroken run")
            self._body_replaced = 1
        elif self._body_replaced == 1:
            self._body_replaced = 2
