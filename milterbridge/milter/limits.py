"""What a message may keep: the per-connection limits and the shared memory budget.

Limits (design.md §3.7): what is over a limit is not kept, and the context records which
limit it went over (:attr:`MessageContext.over_limits`), so that the caller can answer the
MTA (``server.on_oversize``) instead of hanging up, which would hand the message to
``milter_default_action``. Nothing is kept past the first header over a limit, so the kept
headers are a prefix of the message's and their indexes stay right.

:class:`SessionLimits` holds the bounds; :class:`Limiter` applies them, and the shared
:class:`~.context.MemoryBudget`, to each recipient, header and body piece the session reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import DEFAULT_MAX_FRAME_BYTES
from .context import DEFAULT_MAX_MACROS, HEADER_LIMITS, Limit, MemoryBudget, MessageContext, count_over


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLimits:
    """Bounds on what one connection may make us hold in memory."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_recipients: int = 10_000
    max_headers: int = 10_000
    max_header_bytes: int = 16 * 1024 * 1024
    max_macros: int = DEFAULT_MAX_MACROS
    #: Body bytes of one message; counted only (the body is the caller's to keep).
    max_message_bytes: int = 50 * 1024 * 1024


#: What keeping one header or recipient costs beyond its bytes, as counted against the shared
#: budget: the tuple and bytes objects here and the JSON objects the payload builder caches
#: for it (measured: about 250 bytes for a short header on CPython 3.11).
ITEM_OVERHEAD_BYTES = 256


class Limiter:
    """Applies :class:`SessionLimits` and the shared budget to what one session's messages keep.

    Each method keeps an item in the message, or counts it in ``over_limits`` under the limit
    it went over. Bytes taken from the budget are recorded in ``MessageContext.budget_bytes``
    and given back by :meth:`release` when the message ends.
    """

    __slots__ = ("budget", "limits")

    def __init__(self, limits: SessionLimits, budget: MemoryBudget | None) -> None:
        self.limits = limits
        #: Shared by every connection of the process (``[server] max_buffered_bytes``), or None.
        self.budget = budget

    def opened(self, msg: MessageContext) -> None:
        """A new message: marked over the budget while it is low, so messages in progress can finish."""
        if self.budget is not None and self.budget.low:
            count_over(msg.over_limits, Limit.MAX_BUFFERED_BYTES)

    def release(self, msg: MessageContext) -> None:
        """The message ended: give back what it took from the budget."""
        if self.budget is not None:
            self.budget.give(msg.budget_bytes)

    def add_recipient(self, msg: MessageContext, address: bytes, args: tuple[bytes, ...]) -> Limit | None:
        """Keep a recipient; returns the limit it went over (it was not kept) or None."""
        if len(msg.recipients) >= self.limits.max_recipients:
            limit = Limit.MAX_RECIPIENTS
        elif not self._take(msg, len(address) + sum(map(len, args))):
            limit = Limit.MAX_BUFFERED_BYTES
        else:
            msg.recipients.append((address, args))
            return None
        count_over(msg.over_limits, limit)
        return limit

    def refuse_recipient(self, msg: MessageContext, dropped_by: Limit | None) -> None:
        """The MTA was told to refuse the last recipient: it is not part of the message (design §3.2).

        ``dropped_by`` is what :meth:`add_recipient` returned for it: a recipient that was
        not kept is not missing from the message either, so it leaves the count again.
        """
        if dropped_by is None:
            msg.recipients.pop()
            return
        over = msg.over_limits
        left = over.get(dropped_by, 0) - 1
        if left > 0:
            over[dropped_by] = left
        else:
            over.pop(dropped_by, None)

    def add_header(self, msg: MessageContext, name: bytes, value: bytes) -> None:
        """Keep a header, unless it or one before it went over a header limit."""
        over = msg.over_limits
        if over and not HEADER_LIMITS.isdisjoint(over):
            # Keep a prefix: a header kept after a cut one would shift the header indexes.
            count_over(over, next(limit for limit in over if limit in HEADER_LIMITS))
            return
        if len(msg.headers) >= self.limits.max_headers:
            count_over(over, Limit.MAX_HEADERS)
            return
        nbytes = len(name) + len(value)
        size = msg.header_bytes + nbytes
        if size > self.limits.max_header_bytes:
            count_over(over, Limit.MAX_HEADER_BYTES)
            return
        if not self._take(msg, nbytes):
            count_over(over, Limit.MAX_BUFFERED_BYTES)
            return
        msg.header_bytes = size
        msg.headers.append((name, value))

    def add_body(self, msg: MessageContext, nbytes: int) -> None:
        """Count body bytes (the body itself is the caller's to keep); marks the message once when over."""
        msg.body_bytes += nbytes
        if msg.body_bytes > self.limits.max_message_bytes and Limit.MAX_MESSAGE_BYTES not in msg.over_limits:
            count_over(msg.over_limits, Limit.MAX_MESSAGE_BYTES)

    def _take(self, msg: MessageContext, nbytes: int) -> bool:
        """Take an item of ``nbytes`` (plus what keeping it costs) from the shared budget for ``msg``."""
        if self.budget is None:
            return True
        cost = nbytes + ITEM_OVERHEAD_BYTES
        if not self.budget.take(cost):
            return False
        msg.budget_bytes += cost
        return True
