"""The tracing hooks of the message path, as protocols (no OpenTelemetry import here).

``milterbridge.tracing`` implements them with OpenTelemetry when ``[tracing] enabled`` is set;
otherwise the dispatcher holds None and the message path makes no tracing call at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from milterbridge.endpoint import CallResult, Endpoint
    from milterbridge.milter.constants import Event

__all__ = ["CallTrace", "MessageTrace", "Tracer"]


class MessageTrace(Protocol):
    """The trace of one message, from MAIL to its end."""

    def end(self, outcome: str, reason: str | None, queue_id: str | None) -> None:
        """The message ended with ``outcome`` (``MESSAGE_OUTCOMES``)."""
        ...


class CallTrace(Protocol):
    """The span of one webhook call."""

    #: Header lines (CRLF-terminated) that carry the call's trace context to the endpoint.
    header: bytes

    def finish(self, result: CallResult | None, error: BaseException | None = None) -> None:
        """The call ended with ``result``; or, without one, with ``error`` (cancelled, a bridge fault)."""
        ...


class Tracer(Protocol):
    """Starts the traces of a worker's messages and the spans of their webhook calls."""

    def message(self, session_id: str) -> MessageTrace:
        """A message starts (MAIL) on the connection ``session_id``."""
        ...

    def call(self, parent: MessageTrace | None, endpoint: Endpoint, event: Event) -> CallTrace:
        """A call to ``endpoint`` at ``event`` starts, within ``parent`` (None: outside a message)."""
        ...
