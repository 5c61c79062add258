"""What the session knows: connection scope apart from message scope.

ABORT and end-of-message reset only the :class:`MessageContext`; the
:class:`ConnectionContext` lives until QUIT (or a new CONNECT after QUIT_NC).
Macros are folded in here instead of being surfaced as events: each packet waits in
:class:`PendingMacros` until its command arrives.

Each context also records which limits (:class:`Limit`) it went over, with the count of
items not kept; :mod:`.limits` decides what is kept, :func:`over_limit` and
:func:`truncated_parts` report it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from .constants import Family
from .errors import RemoteProtocolError

#: Macro stages (the ``cmd`` byte of a ``'D'`` packet) whose values are connection scoped.
CONNECTION_MACRO_STAGES = frozenset({b"C", b"H"})
#: Macro names one connection (or one message) may hold: ``[server] max_macros``'s default.
DEFAULT_MAX_MACROS: Final = 1_000


class MacroStore:
    """Macro values folded in lazily: raw ``'D'`` payloads are parsed only when read.

    Postfix sends a macro packet before every event, but most events need no
    payload; keeping the raw bytes and parsing them on first access saves a
    split and a dict update per packet on the hot path. ``max_macros`` bounds
    the number of names (counted without parsing, from the NUL bytes).
    """

    __slots__ = ("_count", "_parsed", "_raw", "max_macros", "version")

    def __init__(self, max_macros: int = DEFAULT_MAX_MACROS) -> None:
        self._parsed: dict[bytes, bytes] = {}
        self._raw: list[bytes] = []
        self._count = 0
        self.max_macros = max_macros
        #: Goes up whenever the values may have changed (for callers that cache what they built).
        self.version = 0

    def add_raw(self, payload: bytes) -> bool:
        """Fold one ``'D'`` payload (stage byte, then name/value strings) in later.

        Returns False, keeping nothing of the packet, when it would take the store over
        ``max_macros`` names: the caller marks its context as cut (fail closed, not a hang-up).
        """
        raw = self._raw
        if len(payload) <= 1 or (raw and raw[-1] == payload):
            # No values, or the packet just added again (Postfix repeats the eoh macros
            # before every header): folding it in would change nothing.
            return True
        pairs = (payload.count(b"\0") + 1) // 2
        if self._count + pairs > self.max_macros:
            self.values()  # parse so the count is exact (names may repeat)
            self._count = len(self._parsed)
            if self._count + pairs > self.max_macros:
                return False
        self._count += pairs
        raw.append(payload)
        self.version += 1
        return True

    def values(self) -> dict[bytes, bytes]:
        """Every macro seen so far (later packets override earlier ones)."""
        if self._raw:
            parsed = self._parsed
            for payload in self._raw:
                body = payload[1:]
                if not body:
                    continue
                if body[-1] != 0:
                    raise RemoteProtocolError("missing string NUL terminator in macro packet")
                parts = body[:-1].split(b"\0")
                if len(parts) % 2:
                    parts.append(b"")
                parsed.update(zip(parts[0::2], parts[1::2], strict=True))
            self._raw.clear()
        return self._parsed

    def update(self, values: dict[bytes, bytes]) -> None:
        self.values().update(values)
        self.version += 1


class Limit(enum.StrEnum):
    """A limit on what the bridge holds for a message or connection; the value is its ``[server]`` key.

    The values also appear in logs, metric labels and the replies to a message over a limit.
    """

    MAX_RECIPIENTS = "max_recipients"
    MAX_HEADERS = "max_headers"
    MAX_HEADER_BYTES = "max_header_bytes"
    MAX_MACROS = "max_macros"
    #: Body bytes of one message.
    MAX_MESSAGE_BYTES = "max_message_bytes"
    #: What all connections together hold (see :class:`MemoryBudget`): a message over it is
    #: always tempfailed, whatever ``on_oversize`` says, since it says nothing about the message.
    MAX_BUFFERED_BYTES = "max_buffered_bytes"

    # Hash like the plain string, in C (as Event does): limits key the over_limits dicts.
    __hash__ = str.__hash__


#: Limit -> what the payload's ``message.truncated`` list calls the part that was cut when
#: the limit was reached. The shared budget cuts headers and recipients; it is reported as
#: ``headers``.
TRUNCATED_PART: Final[Mapping[Limit, str]] = {
    Limit.MAX_RECIPIENTS: "recipients",
    Limit.MAX_HEADERS: "headers",
    Limit.MAX_HEADER_BYTES: "headers",
    Limit.MAX_MACROS: "macros",
    Limit.MAX_MESSAGE_BYTES: "body",
    Limit.MAX_BUFFERED_BYTES: "headers",
}

#: Limits after which a message keeps no more headers, so that the kept ones are a prefix of
#: the message's and their indexes stay right.
HEADER_LIMITS: Final = frozenset({Limit.MAX_HEADERS, Limit.MAX_HEADER_BYTES, Limit.MAX_BUFFERED_BYTES})


def count_over(over_limits: dict[Limit, int], limit: Limit) -> None:
    """Count one item not kept because it went over ``limit``."""
    over_limits[limit] = over_limits.get(limit, 0) + 1


#: A budget is low while less than ``1 / LOW_BUDGET_DIVISOR`` of it is free.
LOW_BUDGET_DIVISOR: Final = 16


class MemoryBudget:
    """Bytes that all connections of a process may hold together (``[server] max_buffered_bytes``).

    Headers and recipients (their bytes plus a fixed estimate of what keeping one costs) and
    in-memory body bytes are taken from it while a message is received and given back when it
    ends, so a flood spread over many connections cannot grow memory past it. Macros are not
    counted (``max_macros`` and the frame size bound them per connection). A header or
    recipient that does not fit marks its message over :attr:`Limit.MAX_BUFFERED_BYTES`; a
    body piece that does not fit goes to the spool file instead of memory; a new message is
    marked while less than a sixteenth of the budget is free (``low``), so that the messages
    already in progress can finish.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (nothing reserved) when they do not fit."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Return bytes taken earlier."""
        self.used -= nbytes

    @property
    def low(self) -> bool:
        """Less than a sixteenth of the budget is free: new messages are refused."""
        return self.limit - self.used < self.limit // LOW_BUDGET_DIVISOR


@dataclass(slots=True, kw_only=True)
class ConnectionContext:
    """Connection-scoped facts: the client, its HELO and connection macros."""

    hostname: bytes = b""
    family: Family = Family.UNKNOWN
    port: int = 0
    address: bytes = b""
    helo: bytes | None = None
    store: MacroStore = field(default_factory=MacroStore, repr=False)
    #: Messages that started on this connection (a MAIL was seen).
    message_count: int = 0
    #: Limits this connection went over -> items not kept. Connection-scoped (macros of the
    #: connect and helo stages): it marks every message.
    over_limits: dict[Limit, int] = field(default_factory=dict)

    @property
    def macros(self) -> dict[bytes, bytes]:
        """Connection-scoped macros (C and H stages)."""
        return self.store.values()


@dataclass(slots=True, kw_only=True)
class MessageContext:
    """Transaction-scoped facts, from MAIL until end-of-message or ABORT."""

    #: 1-based number of this transaction on its connection.
    number: int
    #: Raw MAIL address token and its ESMTP args.
    mail_from: bytes
    mail_args: tuple[bytes, ...] = ()
    #: Accepted recipients (raw token, ESMTP args); refused ones are removed.
    recipients: list[tuple[bytes, tuple[bytes, ...]]] = field(default_factory=list)
    #: Headers in arrival order, byte-exact.
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    header_bytes: int = 0
    body_bytes: int = 0
    #: Bytes this message holds of the shared :class:`MemoryBudget` (given back when it ends).
    budget_bytes: int = 0
    store: MacroStore = field(default_factory=MacroStore, repr=False)
    #: Limits this message went over -> items not kept. Nothing is kept past the first item
    #: over a limit, so what is kept is a prefix (header indexes stay right). A recipient
    #: refused at RCPT for being over the limit is not in the message, so it leaves the count
    #: again.
    over_limits: dict[Limit, int] = field(default_factory=dict)

    @property
    def macros(self) -> dict[bytes, bytes]:
        """Message-scoped macros (M, R, T, L, N, B, E stages)."""
        return self.store.values()

    @property
    def queue_id(self) -> bytes | None:
        """Postfix's queue id (macro ``i``) once the MTA has sent it."""
        return self.store.values().get(b"i") or None


class PendingMacros:
    """Macro packets waiting for their command (the MTA sends each just before it).

    Kept raw, one per stage: a new packet for a stage replaces an unclaimed one (libmilter
    keeps one set per stage), so a peer sending macro packets without commands cannot grow
    this, and ``max_frame_bytes`` bounds each packet. A packet with more names than
    ``max_macros`` is cut when folded in (the context is marked over :attr:`Limit.MAX_MACROS`).
    """

    __slots__ = ("_by_stage",)

    def __init__(self) -> None:
        self._by_stage: dict[bytes, bytes] = {}

    def add(self, payload: bytes) -> None:
        """Keep one ``'D'`` payload (stage byte, then name/value strings) for the next command."""
        if not payload:
            raise RemoteProtocolError("macro packet without a stage byte")
        stage = payload[:1]
        if len(payload) == 1:
            # No values: all it does is replace an unclaimed packet of its stage.
            self._by_stage.pop(stage, None)
            return
        self._by_stage[stage] = payload

    def fold_into(self, connection: ConnectionContext, message: MessageContext | None) -> None:
        """The command arrived: fold the waiting packets into its contexts, by stage."""
        if not self._by_stage:
            return
        for stage, payload in self._by_stage.items():
            if stage in CONNECTION_MACRO_STAGES or message is None:
                if not connection.store.add_raw(payload):
                    count_over(connection.over_limits, Limit.MAX_MACROS)
            elif not message.store.add_raw(payload):
                count_over(message.over_limits, Limit.MAX_MACROS)
        self._by_stage.clear()


def over_limit(message: MessageContext | None, connection: ConnectionContext) -> Limit | None:
    """The first limit ``message`` (or, for any message, its connection) went over, or None.

    :attr:`Limit.MAX_BUFFERED_BYTES` comes first: a message over it is refused however the
    others apply.
    """
    if message is not None and message.over_limits:
        if Limit.MAX_BUFFERED_BYTES in message.over_limits:
            return Limit.MAX_BUFFERED_BYTES
        return next(iter(message.over_limits))
    if connection.over_limits:
        return next(iter(connection.over_limits))
    return None


def truncated_parts(message: MessageContext, connection: ConnectionContext) -> list[str]:
    """What was cut from ``message`` and its connection, for the payload: e.g. ``["headers"]``."""
    limits = [*message.over_limits, *connection.over_limits]
    return sorted({TRUNCATED_PART[limit] for limit in limits})
