"""What the session knows: connection scope apart from message scope.

ABORT and end-of-message reset only the :class:`MessageContext`; the
:class:`ConnectionContext` lives until QUIT (or a new CONNECT after QUIT_NC).
Macros are folded in here instead of being surfaced as events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import Family

#: Macro stages (the ``cmd`` byte of a ``'D'`` packet) whose values are connection scoped.
CONNECTION_MACRO_STAGES = frozenset({b"C", b"H"})


@dataclass(slots=True, kw_only=True)
class ConnectionContext:
    """Connection-scoped facts: the client, its HELO and connection macros."""

    hostname: bytes = b""
    family: Family = Family.UNKNOWN
    port: int = 0
    address: bytes = b""
    helo: bytes | None = None
    macros: dict[bytes, bytes] = field(default_factory=dict)
    #: Messages that started on this connection (a MAIL was seen).
    message_count: int = 0


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
    macros: dict[bytes, bytes] = field(default_factory=dict)
    #: Postfix queue id (macro ``i``) once the MTA has sent it.
    queue_id: bytes | None = None
