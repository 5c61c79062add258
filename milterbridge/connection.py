"""One milter connection: an asyncio Protocol driving a sans-IO session.

The connection feeds bytes to :class:`~milterbridge.milter.session.MilterSession`,
hands each command to a :class:`Handler` (the webhook dispatcher), and writes the
replies. A handler answers at once (no task, no await: the common fast path for
no-reply and unsubscribed events) or with an awaitable; only then does the
connection start one task, and while it runs at end-of-message it sends
SMFIR_PROGRESS keep-alives. A message that ends without end-of-message (ABORT,
a new MAIL or HELO, QUIT, the connection lost) is reported by the session before
the command that ended it, and passed on to :meth:`Handler.message_ended`.

A malformed frame or an illegal command closes this connection only, logged
with the reason. A connection that does not negotiate within
``negotiate_timeout`` is closed, and so is one idle for ``idle_timeout``
(:class:`_Deadlines`).

Who is served at all is decided once per accepted socket, in
:mod:`milterbridge.admission`; a refused connection never gets a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from inspect import isawaitable
from typing import Protocol as TypingProtocol
from typing import cast

from milterbridge.admission import OVERFLOW, SERVE, OverflowHandler, ServerState, overflow_lifetime, overflow_settings
from milterbridge.milter.constants import Protocol
from milterbridge.milter.context import MemoryBudget, MessageContext
from milterbridge.milter.errors import LocalProtocolError, MilterError, NegotiationError, RemoteProtocolError
from milterbridge.milter.messages import (
    Command,
    Continue,
    EndOfMessage,
    Modification,
    Negotiate,
    NegotiateReply,
    Progress,
    Quit,
    Reply,
    TempFail,
)
from milterbridge.milter.session import NEED_DATA, MessageEnded, MilterSession, SessionLimits, State
from milterbridge.tcp import TCP_QUICKACK, quickack_socket

log = logging.getLogger("milterbridge.connection")

Replies = Sequence[Reply | Modification]
HandlerResult = Replies | Awaitable[Replies] | None


class Handler(TypingProtocol):
    """What a connection asks its application for (one instance per connection)."""

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        """Answer the MTA's option offer; raise NegotiationError to refuse."""
        ...

    def handle(self, command: Command) -> HandlerResult:
        """Replies for a command, now or as an awaitable.

        Called for every command but MACRO and the unsubscribed no-reply commands the
        session folds in by itself (``MilterSession.set_unsubscribed``). When the session
        needs no reply (ABORT, QUIT, no-reply events) the result must be immediate and empty.
        """
        ...

    def message_ended(self, message: MessageContext, *, mta_gave_up: bool = False) -> None:
        """``message`` ended without end-of-message (ABORT, a new MAIL or HELO, QUIT, QUIT_NC, EOF).

        Called before the command that ended it is handled; never answered on the wire.
        ``mta_gave_up``: the MTA closed the connection while it waited for our reply (its timeout).
        """
        ...

    def connection_lost(self) -> None:
        """The connection ended (QUIT, EOF, error or shutdown)."""
        ...


HandlerFactory = Callable[[MilterSession], Handler]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionSettings:
    """Per-connection knobs, taken from ServerSettings."""

    limits: SessionLimits = SessionLimits()
    #: Seconds between commands before a connection is closed. A Postfix milter connection
    #: lives as long as its SMTP session and can be quiet for several smtpd_timeout periods
    #: (docs/postfix.md, "Timeouts"); closing a live one hands the rest of that session to
    #: milter_default_action, so this is generous.
    idle_timeout: float = 3600.0
    #: Seconds from accept to the MTA's OPTNEG (Postfix sends it at once).
    negotiate_timeout: float = 10.0
    progress_interval: float = 1.0
    #: Pause reading when a busy connection has buffered this much.
    pause_reading_bytes: int = 4 * 1024 * 1024
    #: Shared by all connections of the process (``[server] max_buffered_bytes``); None: no budget.
    budget: MemoryBudget | None = None


def _describe_peer(peer: object) -> tuple[str, str | None]:
    """The peer for the log, and its host when it is an inet peer (else None).

    An inet peer is (host, port[, flow, scope]). A unix socket's is a path, often empty, or
    bytes for a Linux abstract address (a client may bind one before it connects), named as
    ss(8) does: ``@name``.
    """
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}", str(peer[0])
    if isinstance(peer, bytes):
        name = peer.decode("utf-8", "backslashreplace")
        return ("@" + name[1:] if name.startswith("\0") else name) or "unix", None
    return str(peer) if peer else "unix", None


def _never_passed(stage: str, idle_for: float) -> bool:
    return False


class _Deadlines:
    """A connection's deadlines.

    Negotiation: OPTNEG, and CONNECT when it was asked for, within ``negotiate_timeout`` of
    accept. Idleness: ``idle_timeout`` since :attr:`last_activity`, the last pass that read
    a whole command, so a peer trickling bytes that never finish a frame is still closed
    (slowloris). One timer checks both. An over-limit connection also has a ``lifetime``
    from accept, busy or not. ``passed(stage, idle_for)`` is called when one has passed
    (stage ``"negotiate"``, ``"idle"`` or ``"lifetime"``) and returns False to wait on.
    """

    __slots__ = (
        "_handle",
        "_idle_timeout",
        "_lifetime_handle",
        "_loop",
        "_negotiate_timeout",
        "_passed",
        "_session",
        "last_activity",
    )

    def __init__(
        self, settings: ConnectionSettings, session: MilterSession, passed: Callable[[str, float], bool]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._negotiate_timeout = settings.negotiate_timeout
        self._idle_timeout = settings.idle_timeout
        self._session = session
        self._passed = passed
        self._handle: asyncio.TimerHandle | None = None
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self.last_activity = 0.0

    def start(self, lifetime: float | None = None) -> None:
        """Count from now (accept): the negotiation's deadline comes first."""
        self.last_activity = time.monotonic()
        self._arm(min(self._negotiate_timeout, self._idle_timeout))
        if lifetime is not None:
            self._lifetime_handle = self._loop.call_later(lifetime, self._passed, "lifetime", lifetime)

    def cancel(self) -> None:
        """Stop for good (the connection is gone): no timer runs, and the connection is let go.

        ``passed`` is the connection's bound method; dropping it breaks the reference cycle
        connection -> deadlines -> connection, so the connection's objects are freed when it
        closes instead of waiting for the cyclic garbage collector.
        """
        if self._handle is not None:
            self._handle.cancel()
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        self._passed = _never_passed

    def _arm(self, delay: float) -> None:
        self._handle = self._loop.call_later(delay, self._check)

    def _awaiting_session_start(self) -> bool:
        """No OPTNEG yet, or no CONNECT after it although one was asked for.

        Postfix sends CONNECT right after OPTNEG; a peer that negotiates and then says nothing
        is not an MTA session, and must not hold a connection slot for idle_timeout.
        """
        state = self._session.state
        return state is State.INIT or (state is State.NEGOTIATED and not self._session.protocol & Protocol.NO_CONNECT)

    def _check(self) -> None:
        # Until OPTNEG no command has completed, so idle_for counts from accept.
        idle_for = time.monotonic() - self.last_activity
        starting = self._awaiting_session_start()
        if starting and idle_for >= self._negotiate_timeout:
            if self._passed("negotiate", idle_for):
                return
        elif idle_for >= self._idle_timeout and self._passed("idle", idle_for):
            return
        delay = self._idle_timeout - idle_for
        if starting:
            delay = min(delay, self._negotiate_timeout - idle_for)
        self._arm(max(delay, 0.01))


class MilterConnection(asyncio.Protocol):
    """Drives one milter session over one transport."""

    transport: asyncio.Transport
    #: Set at accept, for an admitted connection only (a refused one gets none of these).
    session: MilterSession
    handler: Handler
    _deadlines: _Deadlines

    def __init__(self, state: ServerState, factory: HandlerFactory, settings: ConnectionSettings) -> None:
        self._state = state
        self._factory = factory
        self._settings = settings
        self.peer = "?"
        self._sock: socket.socket | None = None
        #: Set by each of our writes: the next read sets TCP_QUICKACK again (see milterbridge.tcp).
        self._quickack_due = True
        self._busy: asyncio.Task[None] | None = None
        self._paused = False
        self._closed = False
        #: False until admitted at accept (a refused connection never joins the state).
        self._admitted = False
        #: Served by OverflowHandler (accepted over max_connections).
        self.overflow = False
        self._progress_handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def busy(self) -> asyncio.Task[None] | None:
        """The task awaiting the handler's replies to the current command, while one runs."""
        return self._busy

    # -------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.peer, host = _describe_peer(transport.get_extra_info("peername"))
        admission = self._state.admit(host)
        if admission is not SERVE and admission is not OVERFLOW:
            self._closed = True
            self._state.refuse(admission, self.peer)
            transport.abort()  # type: ignore[attr-defined]
            return
        self._admitted = True
        factory: HandlerFactory = self._factory
        if admission is OVERFLOW:
            self.overflow = True
            self._settings = overflow_settings(self._settings)
            factory = OverflowHandler
        if host is not None:  # an inet peer
            self._sock = quickack_socket(transport.get_extra_info("socket"))
        self.session = MilterSession(self._settings.limits, budget=self._settings.budget)
        # The deadlines first: should the handler factory fail, they still close the connection.
        self._deadlines = _Deadlines(self._settings, self.session, self._deadline_passed)
        self._deadlines.start(overflow_lifetime(self._settings) if self.overflow else None)
        self._state.add(self)
        self.handler = factory(self.session)

    def data_received(self, data: bytes) -> None:
        if self._quickack_due and self._sock is not None:
            # The first read after each of our writes (see _quickack_due): a plain try
            # (suppress() would build an object each time).
            self._quickack_due = False
            try:  # noqa: SIM105
                self._sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)  # type: ignore[arg-type]
            except OSError:
                pass
        try:
            self.session.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(f"protocol error: {exc}")
            return
        if self._busy is None:
            self._drive()
        elif self.session.buffered > self._settings.pause_reading_bytes and not self._paused:
            self.transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        if self._sock is not None:
            self._sock.detach()
            self._sock = None
        # The MTA hung up while a reply was due: it stopped waiting (we never close mid-reply
        # but at the drain deadline).
        mta_gave_up = not self._closed and self.session.pending is not None
        self._closed = True
        self._deadlines.cancel()
        if self._busy is not None:
            self._busy.cancel()
            self._busy = None
        if self.session.state is not State.CLOSED:
            self._end_session(mta_gave_up)
        try:
            self.handler.connection_lost()
        except Exception:
            log.exception("handler failed on connection close")
        self._state.remove(self)

    # ---------------------------------------------------------------- drive

    def _drive(self) -> None:
        """Process every buffered command that can be answered without waiting."""
        session = self.session
        handler = self.handler
        read = session.commands_read
        try:
            while not self._closed:
                try:
                    event = session.next_event()
                except RemoteProtocolError as exc:
                    self._fail(f"protocol error: {exc}")
                    return
                if event is NEED_DATA:
                    break
                if type(event) is MessageEnded:
                    self._message_ended(event)
                    continue
                if type(event) is Negotiate:
                    if not self._negotiate(handler, event):
                        return
                    continue
                try:
                    result = handler.handle(event)  # type: ignore[arg-type]
                except Exception:
                    log.exception("handler failed on %s", type(event).__name__)
                    result = (TempFail(),) if session.needs_reply else None
                if not session.needs_reply:
                    if type(event) is Quit:
                        self._close()
                        return
                    continue
                if type(result) is tuple or type(result) is list or result is None or not isawaitable(result):
                    if not self._write(result or (Continue(),)):
                        return
                    continue
                self._busy = self._loop.create_task(self._finish(event, result))  # type: ignore[arg-type]
                return
        finally:
            # Activity is any whole command read, returned or folded in by the session (see _Deadlines).
            if session.commands_read != read:
                self._deadlines.last_activity = time.monotonic()
        if self._paused:
            self._paused = False
            self.transport.resume_reading()

    def _message_ended(self, event: MessageEnded, mta_gave_up: bool = False) -> None:
        try:
            self.handler.message_ended(event.message, mta_gave_up=mta_gave_up)
        except Exception:
            log.exception("handler failed on a message that ended without end-of-message")

    def _end_session(self, mta_gave_up: bool) -> None:
        """The peer is gone: a message still open ends, and the handler hears of it."""
        try:
            self.session.receive_eof()
        except RemoteProtocolError as err:
            log.info("connection %s closed: %s", self.peer, err)
        # After EOF the session has nothing left to return but the end of an open message.
        with contextlib.suppress(MilterError):
            while type(event := self.session.next_event()) is MessageEnded:
                self._message_ended(event, mta_gave_up)

    def _negotiate(self, handler: Handler, offer: Negotiate) -> bool:
        try:
            reply = handler.negotiate(offer)
            data = self.session.send(reply)
        except (NegotiationError, LocalProtocolError) as exc:
            self._fail(f"negotiation refused: {exc}")
            return False
        self.transport.write(data)
        self._quickack_due = True
        return True

    async def _finish(self, command: Command, pending: Awaitable[Replies]) -> None:
        if type(command) is EndOfMessage:
            self._progress_handle = self._loop.call_later(self._settings.progress_interval, self._progress)
        try:
            replies = await pending
        except Exception:  # not CancelledError: the connection was lost, nothing to answer
            log.exception("handler failed on %s", type(command).__name__)
            replies = (TempFail(),)
        finally:
            if self._progress_handle is not None:
                self._progress_handle.cancel()
                self._progress_handle = None
        self._busy = None
        if self._closed:
            return
        if self._write(replies):
            self._drive()

    def _progress(self) -> None:
        """Keep the MTA waiting while a slow end-of-message decision runs."""
        if self._closed:
            return
        try:
            self.transport.write(self.session.send(Progress()))
            self._quickack_due = True
        except MilterError:
            return
        self._progress_handle = self._loop.call_later(self._settings.progress_interval, self._progress)
        self._state.observer.progress()

    def _write(self, replies: Replies) -> bool:
        try:
            data = self.session.send_all(replies)
        except LocalProtocolError as exc:
            log.exception("bug: illegal reply from handler on %s", self.peer)
            self._fail(f"internal error: {exc}")
            return False
        self.transport.write(data)
        self._quickack_due = True
        return True

    # ------------------------------------------------------------- closing

    def _deadline_passed(self, stage: str, idle_for: float) -> bool:
        """Close for a passed deadline (see _Deadlines); False while a message is being decided."""
        if self._closed:
            return True
        if stage == "idle":
            if self._busy is not None:
                return False
            log.info("closing idle milter connection %s after %.0f s", self.peer, idle_for)
            self._state.observer.connection_timeout("idle")
        elif stage == "negotiate":
            self._state.negotiation_overdue(self.peer, self._settings.negotiate_timeout)
        self._close()
        return True

    def _fail(self, reason: str) -> None:
        log.warning("closing milter connection %s: %s", self.peer, reason)
        self._state.observer.protocol_error()
        self.abort()

    def _close(self) -> None:
        self._closed = True
        self.transport.close()

    def shutdown(self) -> None:
        """Draining: close a connection that has not negotiated yet; leave live sessions alone.

        Postfix holds one milter connection per SMTP session. Closing one between two
        messages, or before its first, would make Postfix apply milter_default_action to
        that session's next command, so live sessions run until they end (QUIT/EOF) or the
        drain deadline passes.
        """
        if self.session.state is State.INIT and self._busy is None:
            self._close()

    def abort(self) -> None:
        """Close at once (the drain deadline passed)."""
        self._closed = True
        self.transport.abort()
