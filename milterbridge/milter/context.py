"""What the session knows: connection scope apart from message scope.

ABORT and end-of-message reset only the :class:`MessageContext`; the
:class:`ConnectionContext` lives until QUIT (or a new CONNECT after QUIT_NC).
Macros are folded in here instead of being surfaced as events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import Family
from .errors import RemoteProtocolError

#: Macro stages (the ``cmd`` byte of a ``'D'`` packet) whose values are connection scoped.
CONNECTION_MACRO_STAGES = frozenset({b"C", b"H"})


class MacroStore:
    """Macro values folded in lazily: raw ``'D'`` payloads are parsed only when read.

    Postfix sends a macro packet before every event, but most events need no
    payload; keeping the raw bytes and parsing them on first access saves a
    split and a dict update per packet on the hot path. ``max_macros`` bounds
    the number of names (counted without parsing, from the NUL bytes).
    """

    __slots__ = ("_count", "_parsed", "_raw", "max_macros", "version")

    def __init__(self, max_macros: int = 1_000) -> None:
        self._parsed: dict[bytes, bytes] = {}
        self._raw: list[bytes] = []
        self._count = 0
        self.max_macros = max_macros
        #: Goes up whenever the values may have changed (for callers that cache what they built).
        self.version = 0

    def add_raw(self, payload: bytes) -> None:
        """Fold one ``'D'`` payload (stage byte, then name/value strings) in later."""
        raw = self._raw
        if len(payload) <= 1 or (raw and raw[-1] == payload):
            # No values, or the packet just added again (Postfix repeats the eoh macros
            # before every header): folding it in would change nothing.
            return
        pairs = (payload.count(b"\0") + 1) // 2
        self._count += pairs
        if self._count > self.max_macros:
            self.values()  # parse so the count is exact (names may repeat)
            self._count = len(self._parsed) + pairs
            if self._count > self.max_macros:
                raise RemoteProtocolError(f"more than {self.max_macros} macros")
        raw.append(payload)
        self.version += 1

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
    store: MacroStore = field(default_factory=MacroStore, repr=False)

    @property
    def macros(self) -> dict[bytes, bytes]:
        """Message-scoped macros (M, R, T, L, N, B, E stages)."""
        return self.store.values()

    @property
    def queue_id(self) -> bytes | None:
        """Postfix's queue id (macro ``i``) once the MTA has sent it."""
        return self.store.values().get(b"i") or None
