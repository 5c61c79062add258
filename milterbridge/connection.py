"""One milter connection: an asyncio Protocol driving a sans-IO session.

The connection feeds bytes to :class:`~milterbridge.milter.session.MilterSession`,
hands each command to a :class:`Handler` (the webhook dispatcher, or the fixed
:class:`StaticHandler`), and writes the replies. A handler answers at once
(no task, no await: the common fast path for no-reply and unsubscribed
events) or with an awaitable; only then does the connection start one task,
and while it runs at end-of-message it sends SMFIR_PROGRESS keep-alives.

A malformed frame or an illegal command closes this connection only, logged
with the reason. A connection that does not negotiate within
``negotiate_timeout`` is closed, and so is one idle for ``idle_timeout``.

Admission (:meth:`ServerState.admit`, once per accepted socket): a peer outside
``allowed_clients`` is closed at once; over ``max_connections`` a connection is
still served, by :class:`OverflowHandler` (a tempfail, no webhook), up to a
second, small cap; only past that one is it closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from inspect import isawaitable
from typing import Protocol as TypingProtocol
from typing import cast

from milterbridge.milter.constants import Action, Event, Protocol
from milterbridge.milter.context import MemoryBudget
from milterbridge.milter.errors import LocalProtocolError, MilterError, NegotiationError, RemoteProtocolError
from milterbridge.milter.messages import (
    Accept,
    Command,
    Continue,
    EndOfMessage,
    Modification,
    Negotiate,
    NegotiateReply,
    Progress,
    Quit,
    Reply,
    ReplyCode,
    TempFail,
)
from milterbridge.milter.negotiation import Requirements, negotiate
from milterbridge.milter.session import NEED_DATA, MilterSession, SessionLimits, State

log = logging.getLogger("milterbridge.connection")

Replies = Sequence[Reply | Modification]
HandlerResult = Replies | Awaitable[Replies] | None

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _BorrowedSocket(socket.socket):
    """A socket object on a descriptor someone else owns: it never closes it, not even when
    collected (a plain socket object would close the descriptor, by then maybe reused)."""

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


class Handler(TypingProtocol):
    """What a connection asks its application for (one instance per connection)."""

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        """Answer the MTA's option offer; raise NegotiationError to refuse."""
        ...

    def handle(self, command: Command) -> HandlerResult:
        """Replies for a command, now or as an awaitable.

        Called for every command but MACRO and those the session takes in by itself
        (``MilterSession.set_quiet``). When the session needs no reply (ABORT, QUIT,
        no-reply events) the result must be immediate and empty.
        """
        ...

    def connection_lost(self) -> None:
        """The connection ended (QUIT, EOF, error or shutdown)."""
        ...


HandlerFactory = Callable[[MilterSession], Handler]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class StaticHandler:
    """A fixed policy: continue at every event, accept at end-of-message.

    Asks the MTA for no events but end-of-message, so every answer is a
    single round trip. Used by tests and the benchmark as the floor.
    """

    def __init__(self, session: MilterSession, requirements: Requirements | None = None) -> None:
        self.session = session
        self.requirements = requirements or Requirements(events=frozenset(), reply_events=frozenset())

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        return negotiate(offer, self.requirements).reply()

    def handle(self, command: Command) -> HandlerResult:
        if not self.session.needs_reply:
            return None
        if type(command) is EndOfMessage:
            return (Accept(),)
        return (Continue(),)

    def connection_lost(self) -> None:
        return None


#: The answer to every session over ``max_connections`` (see OverflowHandler).
OVERFLOW_REPLY = ReplyCode.build(451, [b"too many connections to the filter, try again later"], b"4.3.2")


class OverflowHandler:
    """A connection accepted over ``max_connections``: 451 4.3.2, no webhook.

    Hanging up instead would hand the SMTP session to Postfix's milter_default_action,
    which may be ``accept``. A milter connection belongs to one SMTP session and this one
    stays over the limit for its whole life, so every message of the session is to be
    tempfailed anyway. Asking only for CONNECT and tempfailing it does that in one round
    trip: Postfix then closes the milter connection at once (freeing the slot), still
    answers HELO/EHLO, and gives MAIL, VRFY and ETRN this reply (milter-protocol.md §5.4).
    Tempfailing each MAIL instead would hold the connection for the whole session. Any
    other command the MTA waits on (end-of-message from an MTA that skips CONNECT) gets the
    same answer.
    """

    REQUIREMENTS = Requirements(
        events=frozenset({Event.CONNECT}),
        reply_events=frozenset({Event.CONNECT}),
        actions=Action.NONE,
        header_leading_space=False,
        skip=False,
    )

    def __init__(self, session: MilterSession) -> None:
        self.session = session

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        return negotiate(offer, self.REQUIREMENTS).reply()

    def handle(self, command: Command) -> HandlerResult:
        if not self.session.needs_reply:
            return None
        return (OVERFLOW_REPLY,)

    def connection_lost(self) -> None:
        return None


class ConnectionObserver(TypingProtocol):
    """Metric hooks of the listener (milterbridge.metrics.Metrics satisfies it)."""

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def connection_refused(self, reason: str) -> None: ...
    def connection_overflow(self) -> None: ...
    def connection_timeout(self, stage: str) -> None: ...
    def progress(self) -> None: ...
    def protocol_error(self) -> None: ...


class _NoObserver:
    def connection_opened(self) -> None:
        return None

    def connection_closed(self) -> None:
        return None

    def connection_refused(self, reason: str) -> None:
        return None

    def connection_overflow(self) -> None:
        return None

    def connection_timeout(self, stage: str) -> None:
        return None

    def progress(self) -> None:
        return None

    def protocol_error(self) -> None:
        return None


#: ``ServerState.admit`` answers: serve normally, serve with OverflowHandler, or one of the
#: refusal reasons (the ``reason`` label of ``connections_refused_total``).
SERVE = "serve"
OVERFLOW = "overflow"
NOT_ALLOWED = "not_allowed"
MAX_CONNECTIONS = "max_connections"
REFUSAL_REASONS = (NOT_ALLOWED, MAX_CONNECTIONS)
#: ``connection_timeouts_total{stage}``: no OPTNEG in time, or idle between commands.
TIMEOUT_STAGES = ("negotiate", "idle")


def default_max_overflow(max_connections: int) -> int:
    """How many connections may be served over ``max_connections`` (with OverflowHandler).

    An over-limit connection normally lives for one round trip (OPTNEG, CONNECT answered,
    Postfix hangs up); its frames are capped at 64 KiB and its life at
    ``overflow_lifetime``, so a tenth of the limit (at least 10) absorbs a burst without
    letting a flood grow memory. Past this cap connections are closed at accept.
    """
    return max(10, max_connections // 10)


def overflow_settings(settings: ConnectionSettings) -> ConnectionSettings:
    """Settings of an over-limit connection: it needs no large frame (it asks for no content)."""
    limits = replace(settings.limits, max_frame_bytes=min(settings.limits.max_frame_bytes, 65535))
    return replace(settings, limits=limits)


def overflow_lifetime(settings: ConnectionSettings) -> float:
    """Seconds an over-limit connection may stay open, busy or not.

    Postfix sends CONNECT right after OPTNEG and hangs up after our tempfail, so anything
    longer is a peer holding a slot (ABORTs every few seconds would defeat an idle timer).
    """
    return 2 * settings.negotiate_timeout


class LogThrottle:
    """At most one log line per ``interval`` seconds for one kind of event, so a flood of
    connections cannot flood the log; ``due`` says how many were left out since the last."""

    __slots__ = ("_next", "_skipped", "interval")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._skipped = 0

    def due(self) -> int | None:
        """The number left out since the last line if one may be logged now, else None."""
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return None
        skipped, self._skipped = self._skipped, 0
        self._next = now + self.interval
        return skipped


class ServerState:
    """What the server and its connections share: the live connections, admission and metric hooks."""

    def __init__(
        self,
        observer: ConnectionObserver | None = None,
        *,
        max_connections: int = 1000,
        max_overflow: int | None = None,
        allowed_clients: Sequence[Network] = (),
    ) -> None:
        self.observer: ConnectionObserver = observer or _NoObserver()
        self.connections: set[MilterConnection] = set()
        self.total_connections = 0
        self.max_connections = max_connections
        self.max_overflow = default_max_overflow(max_connections) if max_overflow is None else max_overflow
        #: inet peers must be in one of these networks; empty: every peer may connect.
        self.allowed_clients = tuple(allowed_clients)
        #: Connections in ``connections`` served by OverflowHandler.
        self.overflow = 0
        self.refused = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._throttles = {kind: LogThrottle() for kind in (*REFUSAL_REASONS, OVERFLOW, "negotiate")}

    def admit(self, host: str | None) -> str:
        """How to treat a new connection from ``host`` (None for a unix socket).

        SERVE, OVERFLOW, or a refusal reason (NOT_ALLOWED, MAX_CONNECTIONS).
        """
        if host is not None and self.allowed_clients and not self._allowed(host):
            return NOT_ALLOWED
        if len(self.connections) - self.overflow < self.max_connections:
            return SERVE
        if self.overflow < self.max_overflow:
            return OVERFLOW
        return MAX_CONNECTIONS

    def _allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack listener
        return any(ip in network for network in self.allowed_clients)

    def refuse(self, reason: str, peer: str) -> None:
        """Count and log (throttled) a connection closed at accept."""
        self.refused += 1
        self.observer.connection_refused(reason)
        skipped = self._throttles[reason].due()
        if skipped is None:
            return
        if reason == NOT_ALLOWED:
            why = "the address is not in server.allowed_clients"
        else:
            why = (
                f"{self.max_connections} connections (server.max_connections) and {self.overflow} over the limit "
                "are open; the MTA applies its milter_default_action to this session"
            )
        log.warning("refusing milter connection from %s: %s%s", peer, why, _left_out(skipped))

    def add(self, conn: MilterConnection) -> None:
        self.connections.add(conn)
        self.total_connections += 1
        self.idle.clear()
        self.observer.connection_opened()
        if conn.overflow:
            self.overflow += 1
            self.observer.connection_overflow()
            skipped = self._throttles[OVERFLOW].due()
            if skipped is not None:
                log.warning(
                    "milter connection from %s is over server.max_connections (%d): its session gets %s%s",
                    conn.peer,
                    self.max_connections,
                    OVERFLOW_REPLY.text.decode(),
                    _left_out(skipped),
                )

    def remove(self, conn: MilterConnection) -> None:
        if conn in self.connections:
            self.observer.connection_closed()
            if conn.overflow:
                self.overflow -= 1
        self.connections.discard(conn)
        if not self.connections:
            self.idle.set()

    def negotiation_overdue(self, peer: str, timeout: float) -> None:
        """Count and log (throttled) a connection closed for not negotiating in time."""
        self.observer.connection_timeout("negotiate")
        skipped = self._throttles["negotiate"].due()
        if skipped is not None:
            log.warning(
                "closing milter connection %s: no option negotiation and CONNECT within %g s "
                "(server.negotiate_timeout)%s",
                peer,
                timeout,
                _left_out(skipped),
            )


def _left_out(skipped: int) -> str:
    return f" ({skipped} more like it since the last report)" if skipped else ""


class MilterConnection(asyncio.Protocol):
    """Drives one milter session over one transport."""

    def __init__(self, state: ServerState, factory: HandlerFactory, settings: ConnectionSettings) -> None:
        self._state = state
        self._factory = factory
        self._settings = settings
        self.session = MilterSession(settings.limits, budget=settings.budget)
        self.handler: Handler | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._sock: socket.socket | None = None
        #: Set by each write: the next read sets TCP_QUICKACK again. Linux delays ACKs
        #: ("pingpong" mode) only after we have sent data; TCP_QUICKACK leaves that mode,
        #: and until our next write every read of a small pushed segment ACKs it at once.
        #: So once per write, not once per read, keeps Postfix's Nagle-delayed packets from
        #: waiting for our delayed ACK (postfix-e2e.md pitfall 7).
        self._quickack_due = True
        self._busy: asyncio.Task[None] | None = None
        self._paused = False
        self._closed = False
        #: False until admitted at accept (a refused connection never joins the state).
        self._admitted = False
        #: Served by OverflowHandler (accepted over max_connections).
        self.overflow = False
        self._last_activity = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._lifetime_handle: asyncio.TimerHandle | None = None
        self._progress_handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # -------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "unix")
        sock = transport.get_extra_info("socket")
        inet = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        admission = self._state.admit(peer[0] if inet and isinstance(peer, tuple) else None)
        if admission is not SERVE and admission is not OVERFLOW:
            self._closed = True
            self._state.refuse(admission, self.peer)
            transport.abort()  # type: ignore[attr-defined]
            return
        self._admitted = True
        if admission is OVERFLOW:
            self.overflow = True
            self._settings = overflow_settings(self._settings)
            self.session = MilterSession(self._settings.limits)
            self._factory = OverflowHandler
        if inet:
            # Our back-to-back packets must not wait for an ACK (Nagle), and
            # Postfix's must not wait for our delayed ACK (postfix-e2e.md pitfall 7).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._state.add(self)
        self.handler = self._factory(self.session)
        self._last_activity = time.monotonic()
        # One timer checks both deadlines: the negotiation's first (see _check_idle).
        self._arm_idle_timer(min(self._settings.negotiate_timeout, self._settings.idle_timeout))
        if self.overflow:
            self._lifetime_handle = self._loop.call_later(overflow_lifetime(self._settings), self._close)
        if _TCP_QUICKACK is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # QUICKACK is set again after each of our writes. uvloop's socket stand-in builds a socket
            # object (and calls getsockname) for each setsockopt, so keep one socket object
            # on the descriptor, borrowed: the transport closes the descriptor.
            self._sock = _BorrowedSocket(sock.family, socket.SOCK_STREAM, 0, fileno=sock.fileno())

    def data_received(self, data: bytes) -> None:
        if self._quickack_due and self._sock is not None:
            # The first read after each of our writes (see _quickack_due): a plain try
            # (suppress() would build an object each time).
            self._quickack_due = False
            try:  # noqa: SIM105
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)  # type: ignore[arg-type]
            except OSError:
                pass
        try:
            self.session.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(f"protocol error: {exc}")
            return
        if self._busy is None:
            self._drive()
        elif self.session._decoder.buffered > self._settings.pause_reading_bytes and not self._paused:
            assert self.transport is not None
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
        self._closed = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._lifetime_handle is not None:
            self._lifetime_handle.cancel()
        if self._busy is not None:
            self._busy.cancel()
            self._busy = None
        if self.session.state is not State.CLOSED:
            try:
                self.session.receive_eof()
            except RemoteProtocolError as err:
                log.info("connection %s closed: %s", self.peer, err)
        if self.handler is not None:
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
        assert handler is not None
        absorbed = session.absorbed
        while not self._closed:
            try:
                command = session.next_event()
            except RemoteProtocolError as exc:
                self._fail(f"protocol error: {exc}")
                return
            if command is NEED_DATA:
                if session.absorbed != absorbed:
                    self._last_activity = time.monotonic()  # quiet commands were taken in
                break
            # Idleness counts from the last complete command, so a peer trickling
            # bytes that never finish a frame is still closed (slowloris).
            self._last_activity = time.monotonic()
            if type(command) is Negotiate:
                if not self._negotiate(handler, command):
                    return
                continue
            try:
                result = handler.handle(command)  # type: ignore[arg-type]
            except Exception:
                log.exception("handler failed on %s", type(command).__name__)
                result = (TempFail(),) if session.needs_reply else None
            if not session.needs_reply:
                if type(command) is Quit:
                    self._close()
                    return
                continue
            if result is not None and type(result) is not tuple and type(result) is not list and isawaitable(result):
                self._busy = self._loop.create_task(self._finish(command, result))  # type: ignore[arg-type]
                return
            if not self._write(result or (Continue(),)):
                return
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _negotiate(self, handler: Handler, offer: Negotiate) -> bool:
        try:
            reply = handler.negotiate(offer)
            data = self.session.send(reply)
        except (NegotiationError, LocalProtocolError) as exc:
            self._fail(f"negotiation refused: {exc}")
            return False
        assert self.transport is not None
        self.transport.write(data)
        self._quickack_due = True
        return True

    async def _finish(self, command: Command, pending: Awaitable[Replies]) -> None:
        if type(command) is EndOfMessage:
            self._progress_handle = self._loop.call_later(self._settings.progress_interval, self._progress)
        try:
            replies = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
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
        if self._closed or self.transport is None:
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
        assert self.transport is not None
        self.transport.write(data)
        self._quickack_due = True
        return True

    # ------------------------------------------------------------- closing

    def _fail(self, reason: str) -> None:
        log.warning("closing milter connection %s: %s", self.peer, reason)
        self._state.observer.protocol_error()
        if self.transport is not None:
            self.transport.abort()
        self._closed = True

    def _close(self) -> None:
        self._closed = True
        if self.transport is not None:
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
        if self.transport is not None:
            self.transport.abort()

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_handle = self._loop.call_later(delay, self._check_idle)

    def _awaiting_session_start(self) -> bool:
        """No OPTNEG yet, or no CONNECT after it although one was asked for.

        Postfix sends CONNECT right after OPTNEG; a peer that negotiates and then says nothing
        is not an MTA session, and must not hold a connection slot for idle_timeout.
        """
        state = self.session.state
        return state is State.INIT or (state is State.NEGOTIATED and not self.session.protocol & Protocol.NO_CONNECT)

    def _check_idle(self) -> None:
        if self._closed:
            return
        # Until OPTNEG no command has completed, so idle_for counts from accept.
        idle_for = time.monotonic() - self._last_activity
        starting = self._awaiting_session_start()
        if starting and idle_for >= self._settings.negotiate_timeout:
            self._state.negotiation_overdue(self.peer, self._settings.negotiate_timeout)
            self._close()
            return
        if idle_for >= self._settings.idle_timeout and self._busy is None:
            log.info("closing idle milter connection %s after %.0f s", self.peer, idle_for)
            self._state.observer.connection_timeout("idle")
            self._close()
            return
        delay = self._settings.idle_timeout - idle_for
        if starting:
            delay = min(delay, self._settings.negotiate_timeout - idle_for)
        self._arm_idle_timer(max(delay, 0.01))
