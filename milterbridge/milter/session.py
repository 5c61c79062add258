"""The milter-side session: a sans-IO state machine over the tables of :mod:`.rules`.

Use it like h11: ``receive_data(chunk)``, then ``next_event()`` until it
returns :data:`NEED_DATA`; when :attr:`MilterSession.needs_reply` is true,
``send(reply)`` (or ``send_all``) returns the bytes to write.

``next_event`` returns a :class:`~.messages.Command`, or a :class:`MessageEnded` when a
message ended without its end-of-message reply (ABORT, a new HELO or MAIL, QUIT, QUIT_NC,
EOF), just before the command that ended it. Macros are folded into the context, never
returned. What the session reads is counted (:attr:`MilterSession.event_counts`,
:attr:`MilterSession.commands_read`) for the shell to export.

Hot path: Postfix sends every event before end-of-message even when the milter
only wants the end (the payload needs the envelope and headers), as no-reply
events, each after a macro packet. The caller names the commands no endpoint
subscribes to with :meth:`MilterSession.set_unsubscribed`; ``next_event`` then folds
those that are no-reply and :data:`~.rules.FOLDABLE` into the context itself and reads
on, instead of building a message object and returning it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .codec import NO_FRAME, FrameDecoder, command_decoder
from .constants import V1_ACTIONS, Action, Event, Protocol
from .context import ConnectionContext, Limit, MacroStore, MemoryBudget, MessageContext, PendingMacros, over_limit
from .errors import LocalProtocolError, RemoteProtocolError
from .limits import Limiter, SessionLimits
from .messages import (
    BodyChunk,
    Command,
    Connect,
    EndOfMessage,
    Header,
    Helo,
    Macro,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    QuitNewConnection,
    RcptTo,
    ReplaceBody,
    Reply,
    envelope_fields,
    header_fields,
)
from .rules import (
    ALWAYS_NO_REPLY,
    ENDS_MESSAGE,
    EVENT_OF,
    FOLDABLE,
    INTERIM_REPLIES,
    MESSAGE_STATES,
    REFUSALS,
    TRANSITIONS,
    BodyRun,
    State,
    body_run_after,
    check_modification,
    check_reply,
    effective_transitions,
    no_reply_commands,
)

__all__ = [
    "EVENT_OF",
    "NEED_DATA",
    "MessageEnded",
    "MilterSession",
    "NeedData",
    "SessionLimits",
    "State",
]


class NeedData:
    """Returned by :meth:`MilterSession.next_event` when more bytes are needed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class MessageEnded:
    """A message ended without its end-of-message reply: reported once, before what ended it.

    ABORT, a new HELO or MAIL, QUIT or QUIT_NC while the message was open, or EOF. A
    message completed by the reply to end-of-message is not reported. The session has
    already applied the command that ended it (after a MAIL, ``MilterSession.message`` is
    the new message); no reply is due until ``next_event`` has returned that command.
    """

    message: MessageContext


_MACRO_CODE: Final = Macro.code[0]


def _header_fields(payload: bytes) -> tuple[bytes, bytes]:
    """:func:`~.messages.header_fields` with its common case compiled in (ten or more per message)."""
    fields = payload[:-1].split(b"\0") if payload[-1:] == b"\0" else ()
    if len(fields) != 2:
        return header_fields(payload)  # raises with the precise reason
    return fields[0], fields[1]


class MilterSession:
    """One milter connection as seen from the milter (our) side."""

    def __init__(self, limits: SessionLimits | None = None, *, budget: MemoryBudget | None = None) -> None:
        self.limits = limits or SessionLimits()
        #: Shared by every connection of the process (``[server] max_buffered_bytes``), or None.
        self.budget = budget
        self._limiter = Limiter(self.limits, budget)
        self._decoder: FrameDecoder[Command] = command_decoder(self.limits.max_frame_bytes)
        self.state = State.INIT
        self.connection = ConnectionContext(store=MacroStore(self.limits.max_macros))
        self.message: MessageContext | None = None
        #: The command waiting for our final reply, if any.
        self.pending: Command | None = None
        self.version = 0
        self.actions = Action.NONE
        self.protocol = Protocol.NONE
        #: Commands read, per event (those of :data:`EVENT_OF`), whether returned or folded.
        self.event_counts: dict[Event, int] = {}
        #: Commands read (returned or folded; macro packets not counted).
        self.commands_read = 0
        #: What the next ``next_event`` returns before reading on: the command that ended a
        #: message (after its MessageEnded), or the message EOF ended.
        self._held: Command | MessageEnded | None = None
        self._macros = PendingMacros()
        self._transitions = TRANSITIONS
        self._no_reply: frozenset[type[Command]] = ALWAYS_NO_REPLY
        self._unsubscribed: frozenset[type[Command]] = frozenset()
        #: Wire code -> command class, for the commands next_event folds in itself.
        self._fold: dict[int, type[Command]] = {}
        self._body_run = BodyRun.NONE
        #: The limit the last returned recipient went over (it was not kept), or None.
        self._rcpt_dropped_by: Limit | None = None

    def set_unsubscribed(self, kinds: Iterable[type[Command]]) -> None:
        """Commands whose event no endpoint subscribes to.

        Those that are no-reply (once negotiated) and :data:`~.rules.FOLDABLE` are then
        folded into the context by ``next_event``, which reads on instead of returning
        them. Legality is checked, and the command counted, exactly as for a returned one.
        """
        self._unsubscribed = frozenset(kinds)
        self._fold = {kind.code[0]: kind for kind in self._unsubscribed & FOLDABLE & self._no_reply}

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the MTA; raises RemoteProtocolError on a bad frame header."""
        if self.state is State.CLOSED:
            if data:
                raise RemoteProtocolError("data after QUIT")
            return
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        """The MTA closed the connection: what is buffered is dropped, an open message ends.

        ``next_event`` then returns that message's :class:`MessageEnded` once, then
        :data:`NEED_DATA`. Raises RemoteProtocolError if EOF cut a frame (after that).
        """
        partial = not self._decoder.at_boundary
        self._decoder.clear()
        ended = self._end_message()
        self._held = None if ended is None else MessageEnded(ended)
        self.state = State.CLOSED
        self.pending = None
        if partial:
            raise RemoteProtocolError("connection closed in the middle of a frame")

    @property
    def needs_reply(self) -> bool:
        """True while a command waits for our final reply."""
        return self.pending is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet read as commands."""
        return self._decoder.buffered

    def next_event(self) -> Command | MessageEnded | NeedData:
        """The next command from the MTA, a :class:`MessageEnded`, or :data:`NEED_DATA`."""
        if self.pending is not None:
            raise LocalProtocolError(f"reply to {type(self.pending).__name__} before reading on")
        held = self._held
        if held is not None:
            self._held = None
            if isinstance(held, Command) and type(held) not in self._no_reply:
                self.pending = held
            return held
        decoder = self._decoder
        fold = self._fold
        # Runs for every frame: about 30 per small message, most of them macro packets and
        # no-reply commands folded in right here.
        while True:
            code, payload = decoder.next_raw()
            if code == NO_FRAME:
                return NEED_DATA
            if code == _MACRO_CODE:
                if self.state is State.INIT or self.state is State.CLOSED:
                    raise RemoteProtocolError(f"macros in state {self.state.value}")
                self._macros.add(payload)
                continue
            kind = fold.get(code)
            if kind is not None:
                self._fold_command(kind, payload)
                continue
            return self._receive_command(decoder.decode(code, payload))

    def _fold_command(self, kind: type[Command], payload: bytes) -> None:
        """``_receive_command`` for an unsubscribed no-reply command, from its payload."""
        if kind is Header:
            name, value = _header_fields(payload)
        elif kind is RcptTo:
            address, args = envelope_fields(payload, "RcptTo")
        else:
            kind.decode_payload(payload)  # DATA and EOH: the payload must be empty
        state = self.state
        new_state = self._transitions[kind].get(state)
        if new_state is None:
            raise RemoteProtocolError(f"{kind.__name__} not allowed in state {state.value}")
        self.commands_read += 1
        event = EVENT_OF[kind]
        counts = self.event_counts
        counts[event] = counts.get(event, 0) + 1
        self.state = new_state
        msg = self.message
        if msg is None:
            msg = self._open_message(b"", ())  # MAIL was negotiated away
        if kind is Header:
            self._limiter.add_header(msg, name, value)
        elif kind is RcptTo:
            self._limiter.add_recipient(msg, address, args)
        self._macros.fold_into(self.connection, msg)

    def _receive_command(self, cmd: Command) -> Command | MessageEnded:
        """Check and apply a command read from the MTA; what ``next_event`` returns for it."""
        kind = type(cmd)
        state = self.state
        try:
            new_state = self._transitions[kind][state]
        except KeyError:
            raise RemoteProtocolError(f"{kind.__name__} not allowed in state {state.value}") from None
        self.commands_read += 1
        event = EVENT_OF.get(kind)
        if event is not None:
            counts = self.event_counts
            counts[event] = counts.get(event, 0) + 1
        ended = self._end_message() if self.message is not None and kind in ENDS_MESSAGE else None
        self.state = new_state
        if new_state in MESSAGE_STATES and self.message is None and kind is not MailFrom:
            self._open_message(b"", ())  # MAIL was negotiated away
        if kind is Connect:
            conn = self.connection
            conn.hostname = cmd.hostname  # type: ignore[attr-defined]
            conn.family = cmd.family  # type: ignore[attr-defined]
            conn.port = cmd.port  # type: ignore[attr-defined]
            conn.address = cmd.address  # type: ignore[attr-defined]
        elif kind is Helo:
            self.connection.helo = cmd.hostname  # type: ignore[attr-defined]
        elif kind is MailFrom:
            self._open_message(cmd.address, cmd.args)  # type: ignore[attr-defined]
        elif kind is RcptTo:
            msg = self.message
            assert msg is not None
            self._rcpt_dropped_by = self._limiter.add_recipient(msg, cmd.address, cmd.args)  # type: ignore[attr-defined]
        elif kind is Header:
            msg = self.message
            assert msg is not None
            self._limiter.add_header(msg, cmd.name, cmd.value)  # type: ignore[attr-defined]
        elif kind is BodyChunk or kind is EndOfMessage:
            msg = self.message
            assert msg is not None
            self._limiter.add_body(msg, len(cmd.data))  # type: ignore[attr-defined]
            if kind is EndOfMessage:
                self._body_run = BodyRun.NONE
        elif kind is QuitNewConnection:
            self.connection = ConnectionContext(store=MacroStore(self.limits.max_macros))
        self._macros.fold_into(self.connection, self.message)
        if ended is not None:
            self._held = cmd
            return MessageEnded(ended)
        if kind not in self._no_reply:
            self.pending = cmd
        return cmd

    def _open_message(self, mail_from: bytes, args: tuple[bytes, ...]) -> MessageContext:
        conn = self.connection
        conn.message_count += 1
        msg = self.message = MessageContext(
            number=conn.message_count,
            mail_from=mail_from,
            mail_args=args,
            store=MacroStore(self.limits.max_macros),
        )
        self._limiter.opened(msg)
        return msg

    def _end_message(self) -> MessageContext | None:
        msg = self.message
        self.message = None
        if msg is not None:
            self._limiter.release(msg)
        return msg

    def over_limit(self) -> Limit | None:
        """The first limit the current message (or its connection) went over, or None."""
        return over_limit(self.message, self.connection)

    # ----------------------------------------------------------------- output

    def send(self, reply: Reply | Modification) -> bytes:
        """Validate one reply against the pending command; return its frame."""
        pending = self.pending
        if pending is None:
            raise LocalProtocolError(f"{type(reply).__name__} sent but no command is waiting for a reply")
        pending_kind = type(pending)
        kind = type(reply)
        if isinstance(reply, Modification):
            check_modification(pending_kind, reply, self.actions)
            self._body_run = body_run_after(self._body_run, kind is ReplaceBody)
            return reply.to_frame()
        check_reply(pending_kind, reply, self.protocol)
        if kind is NegotiateReply:
            self._on_negotiated(reply)  # type: ignore[arg-type]
        if kind in INTERIM_REPLIES:
            return reply.to_frame()
        self._body_run = body_run_after(self._body_run, False)
        self.pending = None
        if pending_kind is RcptTo and kind in REFUSALS and self.message is not None:
            self._limiter.refuse_recipient(self.message, self._rcpt_dropped_by)
        if pending_kind is EndOfMessage:
            self._end_message()
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
        if not (offer.actions or V1_ACTIONS).grants(reply.actions):
            raise LocalProtocolError("actions outside the MTA's offer")
        self.version = reply.version
        self.actions = reply.actions
        self.protocol = reply.protocol
        self._transitions = effective_transitions(reply.protocol, reply.version)
        self._no_reply = no_reply_commands(reply.protocol)
        self.set_unsubscribed(self._unsubscribed)
