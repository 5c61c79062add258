"""Who may connect, and what the listener's connections share (:class:`ServerState`).

Admission (:meth:`ServerState.admit`, once per accepted socket): a peer outside
``allowed_clients`` is closed at once; over ``max_connections`` a connection is
still served, by :class:`OverflowHandler` (a tempfail, no webhook), up to a
second, small cap (``max_overflow``); only past that one is it closed.

Refusals, over-limit connections and negotiation timeouts are counted through a
:class:`ConnectionObserver` and logged at most once per :class:`LogThrottle`
interval, so a flood of connections cannot flood the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from milterbridge.milter.constants import Action, Event
from milterbridge.milter.context import MessageContext
from milterbridge.milter.messages import Command, Negotiate, NegotiateReply, ReplyCode
from milterbridge.milter.negotiation import Requirements, negotiate
from milterbridge.milter.session import MilterSession

if TYPE_CHECKING:
    from milterbridge.connection import ConnectionSettings, HandlerResult, MilterConnection

#: The listener's lines (refusals, over-limit connections, negotiation timeouts) share the
#: connection logger, the name operators filter on.
log = logging.getLogger("milterbridge.connection")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``ServerState.admit`` answers: serve normally, serve with OverflowHandler, or one of the
#: refusal reasons (the ``reason`` label of ``connections_refused_total``).
SERVE = "serve"
OVERFLOW = "overflow"
NOT_ALLOWED = "not_allowed"
MAX_CONNECTIONS = "max_connections"
REFUSAL_REASONS = (NOT_ALLOWED, MAX_CONNECTIONS)
#: ``connection_timeouts_total{stage}``: no OPTNEG in time, or idle between commands.
TIMEOUT_STAGES = ("negotiate", "idle")

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

    def message_ended(self, message: MessageContext, *, mta_gave_up: bool = False) -> None:
        return None

    def connection_lost(self) -> None:
        return None


def default_max_overflow(max_connections: int) -> int:
    """How many connections may be served over ``max_connections`` (with OverflowHandler).

    An over-limit connection normally lives for one round trip (OPTNEG, CONNECT answered,
    Postfix hangs up); its frames are capped at 64 KiB and its life at
    ``overflow_lifetime``, so a tenth of the limit (at least 10) absorbs a burst without
    letting a flood grow memory. Past this cap connections are closed at accept.
    """
    return max(10, max_connections // 10)


def overflow_settings(settings: ConnectionSettings) -> ConnectionSettings:
    """Settings of an over-limit connection: it asks for no content, so it needs no large frame
    and takes nothing from the shared memory budget."""
    limits = replace(settings.limits, max_frame_bytes=min(settings.limits.max_frame_bytes, 65535))
    return replace(settings, limits=limits, budget=None)


def overflow_lifetime(settings: ConnectionSettings) -> float:
    """Seconds an over-limit connection may stay open, busy or not.

    Postfix sends CONNECT right after OPTNEG and hangs up after our tempfail, so anything
    longer is a peer holding a slot (ABORTs every few seconds would defeat an idle timer).
    """
    return 2 * settings.negotiate_timeout


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
        #: Commands read per event by the sessions of connections already closed.
        self._closed_event_counts: dict[Event, int] = {}

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
        """An admitted connection joins the state (counted, logged if over the limit)."""
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
        """A connection has ended; its session's event counts join those of the closed ones."""
        if conn in self.connections:
            self.observer.connection_closed()
            if conn.overflow:
                self.overflow -= 1
            else:
                closed = self._closed_event_counts
                for event, count in conn.session.event_counts.items():
                    closed[event] = closed.get(event, 0) + count
        self.connections.discard(conn)
        if not self.connections:
            self.idle.set()

    def event_counts(self) -> dict[Event, int]:
        """Commands read per event by every session served so far, live and closed.

        Sessions over ``max_connections`` (each refused with a tempfail) are not counted: they
        show in ``connections_overflow_total``. A new dict, summed when called (at scrape
        time); call it from the event loop's thread.
        """
        counts = dict(self._closed_event_counts)
        for conn in self.connections:
            if conn.overflow:
                continue
            for event, count in conn.session.event_counts.items():
                counts[event] = counts.get(event, 0) + count
        return counts

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
