"""The dispatcher: which endpoints to call for each milter event, and when.

The path of a command, top to bottom: the connection (``connection.py``) reads bytes and
the pure session (``milter/session.py``) turns them into commands; :class:`ConnectionHandler`
(one per connection) decides which endpoints a command concerns, builds the request
(``payload.py``), calls them all at once (``endpoint.call_endpoint``: post, decode, validate
into an outcome), hands the outcomes to the pure policy (``policy/``: merge, apply) and
returns its replies. Observe endpoints and the ``abort``/``close`` notifications run in the
background (``background.py``) and never hold a reply. Each message's bookkeeping and log
line is a :class:`~milterbridge.message_log.MessageLog`; its body a
:class:`~milterbridge.body.BodyBuffer`.

Commands no endpoint subscribes to and the MTA does not wait for (no-reply) never reach the
handler: the session folds them into its context itself.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from milterbridge import payload as pl
from milterbridge.background import SHUTDOWN_GRACE, BackgroundCalls, DropCounter
from milterbridge.body import BodyBuffer, MessageBody, SpoolError, SpoolObserver
from milterbridge.calls import CallMetrics, ConnectionCalls
from milterbridge.config import Config
from milterbridge.connection import HandlerResult
from milterbridge.endpoint import Endpoint, WebhookPoster
from milterbridge.hooks import HookBook
from milterbridge.message_log import (
    MessageLog,
    MessageMetrics,
    ModificationMetrics,
    log_connection_closed,
    log_connection_refused,
    log_dropped_modifications,
    log_negotiation_warnings,
)
from milterbridge.milter.constants import Event
from milterbridge.milter.context import Limit, MessageContext
from milterbridge.milter.messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Discard,
    EndOfMessage,
    Helo,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    Quit,
    QuitNewConnection,
    RcptTo,
    Reply,
    TempFail,
)
from milterbridge.milter.session import EVENT_OF, MilterSession
from milterbridge.policy.merge import Verdict
from milterbridge.policy.model import EndpointPolicy, Outcome
from milterbridge.policy.transaction import EventResult, PolicyState
from milterbridge.replies import REFUSED_OVER_LIMIT, TOO_MANY_RECIPIENTS, over_limit_reply
from milterbridge.snapshot import MtaProfile, Snapshot
from milterbridge.spans import Tracer

log = logging.getLogger("milterbridge.dispatch")


class Observer(CallMetrics, DropCounter, SpoolObserver, MessageMetrics, ModificationMetrics, Protocol):
    """Every metric hook the dispatcher's parts feed (milterbridge.metrics.Metrics satisfies it)."""

    def endpoint_skipped(self, endpoint: str, reason: str) -> None: ...


class _NoMetrics:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Dispatcher:
    """The process-wide handler factory for milter connections.

    ``reload`` swaps the snapshot whole (raising ValueError/OSError, and keeping the running
    one, when an endpoint cannot be prepared); live connections keep the one they started with.
    """

    def __init__(
        self,
        config: Config,
        client: WebhookPoster,
        *,
        metrics: Observer | None = None,
        tracer: Tracer | None = None,
        hooks: HookBook | None = None,
    ) -> None:
        self.client = client
        #: The registrations of the config's MTA Hooks endpoints (``hooks.Registrar`` keeps them).
        self.hooks = hooks
        #: With ``[tracing] enabled``: the spans of every message and call (milterbridge.tracing).
        self.tracer = tracer
        self.metrics: Observer = metrics or _NoMetrics()
        self.snapshot = Snapshot(config)
        self.background = BackgroundCalls(self.metrics)

    def reload(self, config: Config) -> None:
        self.snapshot = Snapshot(config, self.snapshot)

    def breaker_states(self) -> dict[str, str]:
        return self.snapshot.breaker_states()

    def budgets(self) -> dict[tuple[str, str], float]:
        return self.snapshot.budgets()

    def __call__(self, session: MilterSession) -> ConnectionHandler:
        if self.snapshot.conditional:
            from milterbridge.conditional import ConditionalHandler  # it subclasses ConnectionHandler

            return ConditionalHandler(self, session)
        return ConnectionHandler(self, session)

    async def aclose(self, timeout: float = SHUTDOWN_GRACE) -> None:
        """Let background calls finish up to ``timeout``, then cancel the rest."""
        await self.background.aclose(timeout)


def _reason(winner: Verdict | None) -> str | None:
    """Who decided, and why, for the log."""
    if winner is None:
        return None
    reason = winner.failure or winner.decision.reason
    return f"{winner.endpoint.name}: {reason or winner.action}"


class ConnectionHandler:
    """The dispatcher's handler for one milter connection (the ``connection.Handler`` protocol)."""

    def __init__(self, dispatcher: Dispatcher, session: MilterSession) -> None:
        self.dispatcher = dispatcher
        self.snapshot = dispatcher.snapshot
        self.session = session
        self.metrics = dispatcher.metrics
        self.builder = pl.PayloadBuilder(session)
        self.message_log = MessageLog(self.builder.session_id, self.metrics, dispatcher.tracer)
        self.calls = ConnectionCalls(
            dispatcher.client,
            dispatcher.background,
            self.metrics,
            self.builder.session_id,
            self.message_log,
            self.snapshot.endpoints,
            dispatcher.tracer,
            dispatcher.hooks,
        )
        self.policy = self.snapshot.idle_policy
        server = self.snapshot.config.server
        self.body = MessageBody(
            functools.partial(
                BodyBuffer,
                server.body_memory_bytes,
                server.max_message_bytes,
                keep=self.snapshot.keep_body,
                budget=session.budget,
                observer=self.metrics,
            )
        )
        self.started = time.monotonic()
        self._closed = False
        #: The connected MTA's profile, told from the connect macros when first needed.
        self._profile: MtaProfile | None = None
        #: The event whose answer the MTA waits for while the endpoints decide, and since when.
        self._asked: tuple[Event, float] | None = None
        session.set_unsubscribed(self.snapshot.unsubscribed)

    # ------------------------------------------------------ connection.Handler

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        got, reply, new = self.snapshot.negotiate(offer)
        if new:
            log_negotiation_warnings(self.builder.session_id, got)
        self.calls.actions = got.actions
        self.policy = PolicyState(
            self.snapshot.policies, actions=got.actions, skip_negotiated=got.skip, conditional=self.snapshot.conditional
        )
        return reply

    def handle(self, command: Command) -> HandlerResult:
        session = self.session
        kind = type(command)
        if kind is Connect or kind is Helo:
            self.builder.invalidate_session()
        elif kind is MailFrom:
            self.message_log.start()
            self.body.start()
        elif kind is Abort:
            return None
        elif kind is Quit or kind is QuitNewConnection:
            self._connection_ended()
            if kind is QuitNewConnection:
                self._new_session()
            return None
        if session.needs_reply and kind in REFUSED_OVER_LIMIT:
            limit = session.over_limit()
            if limit is not None and (self.snapshot.refuse_over_limit or limit is Limit.MAX_BUFFERED_BYTES):
                return self._refuse_over_limit(kind, limit)
        if kind is BodyChunk:
            self.body.append(command.data)  # type: ignore[attr-defined]
        elif kind is EndOfMessage:
            return self._eom(command)  # type: ignore[arg-type]
        if kind in self.snapshot.unsubscribed and not session.needs_reply:
            return None  # the fast path: nobody listens and the MTA does not wait
        msg = session.message
        if msg is not None and self.body.buffer is None:
            self.body.start()  # MAIL was not seen (negotiated away)
        return self._decide(EVENT_OF[kind], command, msg)

    def message_ended(self, msg: MessageContext, *, mta_gave_up: bool = False) -> None:
        """``msg`` ended without its end-of-message answer: the client ended it (abort, new MAIL,
        QUIT, EOF), or the MTA stopped waiting for an answer and closed the connection."""
        self.policy.reset_message()
        self.body.drop()
        reason = self._gave_up() if mta_gave_up else "ended by the client before end-of-message"
        if not self.message_log.was_accepted(msg):
            # An accepted message was delivered: no abort. Before _end, so that the
            # notification's span (with tracing on) is in the message's trace.
            self._notify(Event.ABORT, msg)
        self._end(msg, None, reason=reason)

    def connection_lost(self) -> None:
        self._connection_ended()

    # ------------------------------------------------------------------ events

    def _decide(self, event: Event, command: Command, msg: MessageContext | None) -> HandlerResult:
        targets = self.policy.targets(event)
        observers = self.policy.observers(event)
        needs_reply = self.session.needs_reply
        if not targets and not observers:
            return self._apply(event, {}) if needs_reply else None
        body_size = self.body.buffer.size if self.body.buffer is not None else 0
        request = self.builder.request(event.value, self.builder.event_data(command, body_size), msg)
        for policy in observers:
            self.calls.observe(event, policy, request)
        if not needs_reply:
            # No-reply events only ever have observe subscribers; enforcing ones get replies.
            for policy in targets:
                self.calls.observe(event, policy, request)
            return None
        if not targets:
            return self._apply(event, {})
        return self._decide_async(event, targets, request)

    async def _decide_async(self, event: Event, targets: Sequence[EndpointPolicy], request: pl.JSON) -> Sequence[Reply]:
        if self._profile is None:
            self._mta()  # the budgets are cut to the MTA's waits from the first call on
        self._asked = (event, time.monotonic())
        try:
            outcomes = await self.calls.decide(event, targets, request)
        except Exception as exc:
            return self._bridge_fault(event, exc)
        finally:
            self._asked = None
        return self._apply(event, outcomes)

    def _apply(self, event: Event, outcomes: Mapping[str, Outcome]) -> Sequence[Reply]:
        result = self.policy.decide(event, outcomes)
        self._note_decision(event, result)
        return (result.reply,)

    def _note_decision(self, event: Event, result: EventResult) -> None:
        msg = self.session.message
        reply = result.reply
        # At rcpt a refusal ends only that recipient; a discard ends the whole message.
        if result.ends_message and msg is not None and (event is not Event.RCPT or isinstance(reply, Discard)):
            self._end(msg, reply, reason=_reason(result.winner))
        elif isinstance(reply, Accept) and msg is not None:
            # 'a' before end-of-message: Postfix delivers the message without asking us again.
            self._end(msg, reply, reason="accepted by every enforcing endpoint")
            self.message_log.accepted(msg)
        if result.ends_session or (event in (Event.CONNECT, Event.HELO) and not isinstance(reply, Continue | Accept)):
            log_connection_refused(self.builder.session_id, event.value, reply, _reason(result.winner))
        if log.isEnabledFor(logging.DEBUG):
            fields = {"session": self.builder.session_id, "event": event.value, "action": result.action}
            log.debug("event %s: %s", event.value, result.action, extra={"fields": fields})

    def _refuse_over_limit(self, kind: type[Command], limit: Limit) -> HandlerResult:
        """Answer a command of a message (or connection) over ``limit`` with on_oversize.

        The bridge never hangs up over a limit: that would hand the message to Postfix's
        milter_default_action (design.md §3.7).
        """
        reply = over_limit_reply(limit, self.snapshot.config.server.on_oversize)
        if kind is RcptTo:
            # This recipient only; a message over another limit is refused at its next command.
            if limit is not Limit.MAX_RECIPIENTS:
                return (reply,)
            self.message_log.refused_recipient()  # said in the message's log line and counted there
            return (TOO_MANY_RECIPIENTS,)
        if kind is Connect or kind is Helo:
            self.metrics.oversize(limit)  # no message of this session will be logged
            log_connection_refused(self.builder.session_id, EVENT_OF[kind].value, reply, f"over the limit {limit}")
            return (reply,)
        self._end_early(reply, f"over the limit {limit}")
        return (reply,)

    def _bridge_fault(self, event: Event, fault: Exception) -> Sequence[Reply]:
        """A fault of the bridge itself (spool I/O, a bug) tempfails: never the endpoint's
        on_error, which could be continue (design.md §3.7). At RCPT it refuses that recipient."""
        if isinstance(fault, SpoolError):
            kind, why = "spool", str(fault)
        else:
            kind, why = "internal", f"internal error: {type(fault).__name__}: {fault}"
            log.error("bug: %s at %s", why, event.value, exc_info=fault)
        self.metrics.bridge_fault(kind)
        reply = TempFail()
        if event in (Event.CONNECT, Event.HELO, Event.RCPT, Event.UNKNOWN):
            log.warning("bridge fault at %s, answered tempfail: %s", event.value, why)
        else:
            self._end_early(reply, f"bridge fault: {why}")
        return (reply,)

    # --------------------------------------------------------- end-of-message

    def _eom(self, command: EndOfMessage) -> HandlerResult:
        msg = self.session.message
        assert msg is not None
        if command.data:
            self.body.append(command.data)  # a body tail inside EOM (libmilter style): no body event
        body = self.body.buffer
        if body is not None and body.failed is not None:
            return self._bridge_fault(Event.EOM, SpoolError(body.failed))
        targets = self.policy.targets(Event.EOM)
        observers = self.policy.observers(Event.EOM)
        if not targets and not observers:
            return self._finish(msg, {})
        request = self.builder.request(Event.EOM.value, {}, msg)
        try:
            for policy in observers:
                # Observe calls outlive this message's body buffer: they get the bytes now.
                self.calls.observe(Event.EOM, policy, request, body)
        except SpoolError as exc:
            return self._bridge_fault(Event.EOM, exc)
        if not targets:
            return self._finish(msg, {})
        return self._eom_async(msg, targets, request)

    async def _eom_async(
        self, msg: MessageContext, targets: Sequence[EndpointPolicy], request: pl.JSON
    ) -> Sequence[Reply | Modification]:
        if self._profile is None:
            self._mta()
        self._asked = (Event.EOM, time.monotonic())
        try:
            outcomes = await self.calls.decide(Event.EOM, targets, request, self.body.buffer)
        except Exception as exc:
            return self._bridge_fault(Event.EOM, exc)
        finally:
            self._asked = None
        return self._finish(msg, outcomes)

    def _finish(self, msg: MessageContext, outcomes: Mapping[str, Outcome]) -> Sequence[Reply | Modification]:
        result = self.policy.finish_eom(outcomes, msg.headers, (self._profile or self._mta()).numbering)
        log_dropped_modifications(self.builder.session_id, result.dropped, result.adjusted, self.metrics)
        quarantined = result.quarantine is not None
        reason = _reason(result.winner)
        self._end(msg, result.reply, reason=reason, quarantined=quarantined, modifications=len(result.applied))
        self.body.drop()
        return result.messages

    # --------------------------------------------------------------------- MTA

    def _mta(self) -> MtaProfile:
        """The connected MTA's profile (``Snapshot.mta_profile``), told on first use."""
        profile = self._profile
        if profile is None:
            profile = self._profile = self.snapshot.mta_profile(self.session.connection)
            self.calls.budget_caps = profile.caps
        return profile

    def _gave_up(self) -> str:
        """Why a message ended when the MTA closed the connection while it waited for an answer."""
        limits = self._mta().limits
        asked = self._asked
        if asked is None:
            return "the MTA closed the connection while it waited for an answer"
        event, since = asked
        waited = time.monotonic() - since
        return (
            f"{limits.mta.value.capitalize()} stopped waiting for the {event.value} answer after {waited:.1f}s "
            f"and closed the connection ({limits.why_gave_up(event, waited)}); its own failure action applies"
        )

    # ---------------------------------------------------------------- webhooks

    def _notify(self, event: Event, msg: MessageContext | None) -> None:
        """Tell the endpoints subscribed to ``abort`` or ``close``, in the background."""
        subscribers = self._notified(event)
        if subscribers:
            self.calls.notify(event, subscribers, self.builder.request(event.value, {}, msg))

    def _notified(self, event: Event) -> Sequence[Endpoint]:
        """The endpoints told about ``event`` (abort or close): every subscriber."""
        return self.snapshot.subscribers(event)

    # --------------------------------------------------------------- lifecycle

    def _end(self, msg: MessageContext, reply: Reply | None, **how: Any) -> None:
        """Log and count how ``msg`` ended (once; see MessageLog.end)."""
        self.message_log.end(msg, self.session.connection, reply, message_id=self.builder.message_id(msg), **how)

    def _end_early(self, reply: Reply, reason: str) -> None:
        """The bridge ends the current message before end-of-message with ``reply``."""
        self.policy.reset_message()
        self.body.drop()
        msg = self.session.message
        if msg is not None:
            self._end(msg, reply, reason=reason)

    def _new_session(self) -> None:
        """QUIT_NC: a new session on the same socket (message numbers start at 1 again)."""
        self._closed = False
        self.started = time.monotonic()
        self.builder = pl.PayloadBuilder(self.session)
        self.message_log = MessageLog(self.builder.session_id, self.metrics, self.dispatcher.tracer)
        self.calls.session_id, self.calls.message_log = self.builder.session_id, self.message_log
        self.policy = PolicyState(
            self.snapshot.policies,
            actions=self.calls.actions,
            skip_negotiated=self.policy.skip_negotiated,
            conditional=self.snapshot.conditional,
        )

    def _connection_ended(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.body.drop()
        self._notify(Event.CLOSE, None)
        log_connection_closed(self.builder.session_id, self.session.connection, self.started)


__all__ = ["ConnectionHandler", "Dispatcher", "Observer"]
