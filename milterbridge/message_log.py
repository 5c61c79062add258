"""What the bridge notes about each message, and the log lines of the message path.

Every message ends in exactly one ``message <outcome>`` line (and one count in
``milterbridge_messages_total``): the endpoints called for it with their answers and times,
the reply, the reason, the modifications applied, recipients refused over ``max_recipients``,
the endpoints not called because of their ``when`` (``skipped``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from milterbridge.milter.context import ConnectionContext, Limit, MessageContext, over_limit
from milterbridge.milter.messages import Reply
from milterbridge.milter.negotiation import Negotiated
from milterbridge.payload import client_address
from milterbridge.policy.apply import AdjustedModification, DroppedModification
from milterbridge.policy.model import Failure
from milterbridge.replies import outcome_of, reply_text
from milterbridge.spans import MessageTrace, Tracer

log = logging.getLogger("milterbridge.dispatch")


class MessageMetrics(Protocol):
    """The counters a message's end feeds (milterbridge.metrics.Metrics satisfies it)."""

    def message(self, outcome: str) -> None: ...
    def oversize(self, limit: str) -> None: ...


class MessageLog:
    """The bookkeeping of one connection's messages, one at a time.

    ``start`` at MAIL; ``call`` for each enforcing endpoint call; ``refused_recipient`` for
    a recipient refused over ``max_recipients``; ``end`` writes the log line once per message
    (a later ``end`` for the same message, e.g. its abort after a refusal, writes nothing).
    """

    __slots__ = (
        "_accepted",
        "_calls",
        "_logged",
        "_metrics",
        "_refused_recipients",
        "_started",
        "_tracer",
        "session_id",
        "skipped",
        "skipped_recipients",
        "trace",
    )

    def __init__(self, session_id: str, metrics: MessageMetrics, tracer: Tracer | None = None) -> None:
        self.session_id = session_id
        self._metrics = metrics
        self._tracer = tracer
        #: The trace of the message under way (only with tracing on): its calls' spans join it.
        self.trace: MessageTrace | None = None
        self._started = 0.0
        self._calls: list[dict[str, Any]] = []
        self._refused_recipients = 0
        #: Number of the last message logged, and of the last one accepted before end-of-message.
        self._logged: int | None = None
        self._accepted: int | None = None
        #: Endpoints not called for this message because of their ``when``: name -> the key that
        #: did not match. The handler sets it at MAIL (a fresh dict) and adds to it; ``end`` logs it.
        self.skipped: dict[str, str] = {}
        #: Endpoints subscribed to ``rcpt`` not called for some recipients because of their
        #: ``recipient_domains``: name -> how many recipients.
        self.skipped_recipients: dict[str, int] = {}

    def start(self) -> None:
        """A new message (MAIL)."""
        self._started = time.monotonic()
        self._calls = []
        self._refused_recipients = 0
        if self._tracer is not None:
            self._end_trace("aborted", None, None)  # a message nobody ended (none should be left)
            self.trace = self._tracer.message(self.session_id)

    def _end_trace(self, outcome: str, reason: str | None, queue_id: bytes | None) -> None:
        trace, self.trace = self.trace, None
        if trace is not None:
            trace.end(outcome, reason, queue_id.decode("ascii", "replace") if queue_id else None)

    def call(
        self,
        endpoint: str,
        event: str,
        action: str,
        elapsed: float,
        error: str | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        """An enforcing endpoint answered ``action`` (or ``failure``, with ``error``) for this message.

        ``reason`` is the decision's own reason, logged with every endpoint's entry whether or
        not that decision settled the message.
        """
        entry: dict[str, Any] = {"endpoint": endpoint, "event": event, "action": action, "ms": round(elapsed * 1000, 1)}
        if error is not None:
            entry["error"] = error
        if reason is not None:
            entry["reason"] = reason
        self._calls.append(entry)

    def refused_recipient(self) -> None:
        """A recipient was refused at RCPT for being over max_recipients; the message goes on."""
        self._refused_recipients += 1

    def accepted(self, msg: MessageContext) -> None:
        """An accept before end-of-message: the MTA delivers without asking again (no abort follows)."""
        self._accepted = msg.number

    def was_accepted(self, msg: MessageContext) -> bool:
        return self._accepted == msg.number

    def end(
        self,
        msg: MessageContext,
        connection: ConnectionContext,
        reply: Reply | None,
        *,
        reason: str | None,
        quarantined: bool = False,
        modifications: int = 0,
        message_id: str | None = None,
    ) -> None:
        """Log and count how ``msg`` ended; ``reply`` None means the client ended it (aborted)."""
        if self._logged == msg.number:
            return
        self._logged = msg.number
        outcome = outcome_of(reply, quarantined=quarantined)
        self._metrics.message(outcome)
        limit = over_limit(msg, connection)
        if limit is None and self._refused_recipients:
            limit = Limit.MAX_RECIPIENTS  # refused at RCPT: the message went on without them
        if limit is not None:
            self._metrics.oversize(limit)
        if self.trace is not None:
            self._end_trace(outcome, reason, msg.queue_id)
        if log.isEnabledFor(logging.INFO):  # the line's fields are built only for a log that shows them
            log.info(
                "message %s",
                outcome,
                extra={"fields": self._fields(msg, outcome, reply, reason, modifications, message_id)},
            )
        self._calls = []
        self._refused_recipients = 0
        self.skipped = {}
        self.skipped_recipients = {}

    def _fields(
        self,
        msg: MessageContext,
        outcome: str,
        reply: Reply | None,
        reason: str | None,
        modifications: int,
        message_id: str | None,
    ) -> dict[str, Any]:
        """The fields of a message's log line."""
        fields: dict[str, Any] = {
            "session": self.session_id,
            "message": message_id,
            "queue_id": msg.queue_id.decode("ascii", "replace") if msg.queue_id else None,
            "outcome": outcome,
            "reason": reason,
            "endpoints": self._calls,
            "ms": round((time.monotonic() - self._started) * 1000, 1) if self._started else None,
        }
        text = reply_text(reply) if reply is not None else None
        if text:
            fields["reply"] = text
        if modifications:
            fields["modifications"] = modifications
        if self._refused_recipients:
            fields["recipients_over_limit"] = self._refused_recipients
        if self.skipped:
            fields["skipped"] = self.skipped
        if self.skipped_recipients:
            fields["skipped_recipients"] = self.skipped_recipients
        return fields


def log_call_failure(session_id: str, endpoint: str, event: str, failure: Failure, on_error: str) -> None:
    """The warning for one failed endpoint call (the message line names it too)."""
    log.warning(
        "endpoint %s failed at %s: %s",
        endpoint,
        event,
        failure.reason,
        extra={"fields": {"session": session_id, "endpoint": endpoint, "event": event, "on_error": on_error}},
    )


def log_connection_refused(session_id: str, event: str, reply: Reply, reason: str | None) -> None:
    """A refusal at CONNECT or HELO (or a shutdown reply) ends the SMTP session, not a message."""
    log.info(
        "connection refused at %s",
        event,
        extra={
            "fields": {
                "session": session_id,
                "event": event,
                "reply": reply_text(reply) or type(reply).__name__.lower(),
                "reason": reason,
            }
        },
    )


def log_negotiation_warnings(session_id: str, got: Negotiated) -> None:
    """What the MTA's offer lacks (logged once per distinct offer)."""
    fields = {"fields": {"session": session_id}}
    if got.missing_actions:
        log.warning(
            "MTA does not offer actions %s; responses that need them will be refused", got.missing_actions, extra=fields
        )
    if got.unavailable_events:
        log.warning(
            "MTA protocol version %d does not send events %s", got.version, sorted(got.unavailable_events), extra=fields
        )


class ModificationMetrics(Protocol):
    """The counter adjusted modifications feed (milterbridge.metrics.Metrics satisfies it)."""

    def modification_adjusted(self, endpoint: str, op: str, reason: str) -> None: ...


def log_dropped_modifications(
    session_id: str,
    dropped: Iterable[DroppedModification],
    adjusted: Iterable[AdjustedModification] = (),
    metrics: ModificationMetrics | None = None,
) -> None:
    """Modifications an endpoint asked for and the bridge did not apply, or applied otherwise, and why.

    An adjusted one is also counted in ``metrics`` when given.
    """
    for mod in dropped:
        fields = {"session": session_id, "endpoint": mod.endpoint, "op": str(mod.op.op), "why": str(mod.reason)}
        log.info("modification dropped", extra={"fields": fields})
    for adj in adjusted:
        op = str(adj.op.op)
        fields = {"session": session_id, "endpoint": adj.endpoint, "op": op, "why": str(adj.reason), "note": adj.note}
        log.info("modification adjusted", extra={"fields": fields})
        if metrics is not None:
            metrics.modification_adjusted(adj.endpoint, op, adj.reason)


def log_connection_closed(session_id: str, connection: ConnectionContext, started: float) -> None:
    """The end of a milter connection (or of a session on it, at QUIT_NC)."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "session": session_id,
        "client": client_address(connection.address).decode("utf-8", "replace") or None,
        "messages": connection.message_count,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
    log.info("connection closed", extra={"fields": fields})
