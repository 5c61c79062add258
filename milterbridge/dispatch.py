"""The dispatcher: milter events in, webhook calls out, milter replies back.

One :class:`Dispatcher` per process holds the endpoint snapshot and the
webhook client; it is the connection's handler factory. Each connection gets
a :class:`ConnectionHandler`, which builds payloads, calls the enforcing
endpoints subscribed to the event concurrently, hands their outcomes to the
pure :class:`~milterbridge.policy.transaction.PolicyState`, and returns the
replies. Observe endpoints and the ``abort``/``close`` notifications run in
the background, bounded by their timeouts, and never hold a reply.

Events nobody enforces are answered at once, without a task (the fast path).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from milterbridge import payload as pl
from milterbridge.body import BodyBuffer, SpoolError
from milterbridge.config import Config, EndpointSettings
from milterbridge.connection import HandlerResult
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event, MacroStage
from milterbridge.milter.context import BUDGET_LIMIT, MessageContext, over_limit
from milterbridge.milter.messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    Quit,
    QuitNewConnection,
    RcptTo,
    Reject,
    Reply,
    ReplyCode,
    TempFail,
    Unknown,
)
from milterbridge.milter.negotiation import Negotiated, Requirements, negotiate
from milterbridge.milter.session import EVENT_OF, MilterSession
from milterbridge.policy.model import DecisionError, EndpointPolicy, Failure, Mode, OnOversize, Outcome
from milterbridge.policy.parse import parse_decision
from milterbridge.policy.transaction import EomResult, EventResult, PolicyState

log = logging.getLogger("milterbridge.dispatch")

#: Events always requested from the MTA: they build the payload context.
CONTEXT_EVENTS = frozenset({Event.CONNECT, Event.HELO, Event.MAIL, Event.RCPT, Event.HEADER})
#: Events requested only when an endpoint subscribes.
OPTIONAL_EVENTS = frozenset({Event.DATA, Event.EOH, Event.UNKNOWN, Event.BODY})

#: Postfix's default macro lists per stage (milter-protocol.md §8.1), always
#: requested so that the payload carries them whatever main.cf says.
DEFAULT_MACROS: Mapping[MacroStage, tuple[bytes, ...]] = {
    MacroStage.CONNECT: (b"j", b"{daemon_name}", b"{daemon_addr}", b"v", b"_", b"{client_addr}", b"{client_name}"),
    MacroStage.HELO: (b"{tls_version}", b"{cipher}", b"{cipher_bits}", b"{cert_subject}", b"{cert_issuer}"),
    MacroStage.ENVFROM: (
        b"i",
        b"{auth_type}",
        b"{auth_authen}",
        b"{auth_author}",
        b"{mail_addr}",
        b"{mail_host}",
        b"{mail_mailer}",
    ),
    MacroStage.ENVRCPT: (b"i", b"{rcpt_addr}", b"{rcpt_host}", b"{rcpt_mailer}"),
    MacroStage.DATA: (b"i",),
    MacroStage.EOH: (b"i",),
    MacroStage.EOM: (b"i",),
}

#: What the reply to a message over a limit says went wrong, per limit (its [server] key).
_OVER_LIMIT_TEXT: Mapping[str, str] = {
    "max_message_bytes": "Message size exceeds the mail filter's limit",
    "max_headers": "Too many header lines for the mail filter",
    "max_header_bytes": "Header section too large for the mail filter",
    "max_recipients": "Too many recipients for the mail filter",
    "max_macros": "Too many MTA macros for the mail filter",
}
_OVER_LIMIT_CODE: Mapping[OnOversize, tuple[int, bytes]] = {
    OnOversize.TEMPFAIL: (451, b"4.3.4"),
    OnOversize.REJECT: (552, b"5.3.4"),
}
#: on_oversize (tempfail or reject) -> limit -> the reply, e.g. "451 4.3.4 Too many header
#: lines for the mail filter (max_headers)".
OVER_LIMIT_REPLIES: Mapping[OnOversize, Mapping[str, Reply]] = {
    mode: {
        limit: ReplyCode.build(code, [f"{text} ({limit})".encode()], enhanced)
        for limit, text in _OVER_LIMIT_TEXT.items()
    }
    for mode, (code, enhanced) in _OVER_LIMIT_CODE.items()
}
#: The answer to a message refused because all connections together hold max_buffered_bytes:
#: a tempfail whatever on_oversize says (the message itself may be fine).
BUSY_REPLY: Reply = ReplyCode.build(451, [f"Mail filter busy, try again later ({BUDGET_LIMIT})".encode()], b"4.3.2")
#: A recipient over max_recipients at a RCPT the MTA waits for: RFC 5321 §4.5.3.1.10's answer,
#: so the client sends it again later in another transaction (a 5xx would bounce it).
TOO_MANY_RECIPIENTS: Reply = ReplyCode.build(
    452, [b"Too many recipients for the mail filter (max_recipients)"], b"4.5.3"
)
#: Commands answered with on_oversize when their message (or connection) is over a limit.
#: UNKNOWN is not: Postfix honours only 4xx there, and the message's next command is refused.
#: A refusal at CONNECT or HELO refuses the SMTP session; at RCPT, that recipient.
_REFUSED_OVER_LIMIT = frozenset({Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk, EndOfMessage})


class WebhookPoster(Protocol):
    """The webhook client as the dispatcher sees it (milterbridge.webhook.client.WebhookClient)."""

    async def post(self, endpoint: EndpointSettings, body: bytes | pl.StreamedRequest, *, webhook_id: str) -> Any:
        """POST ``body``; returns an object with ``status``, ``body``, ``attempts``; raises on failure."""
        ...


class Observer(Protocol):
    """Metric hooks the dispatcher calls (milterbridge.metrics.Metrics satisfies it)."""

    def event(self, name: str) -> None: ...
    def event_counts(self) -> dict[str, int]: ...
    def message(self, outcome: str) -> None: ...
    def webhook(self, endpoint: str, event: str, outcome: str, seconds: float) -> None: ...
    def decision(self, endpoint: str, event: str, action: str, mode: str) -> None: ...
    def oversize(self, limit: str) -> None: ...
    def bridge_fault(self, kind: str) -> None: ...
    def background_dropped(self, endpoint: str) -> None: ...
    def spooled(self, nbytes: int, *, new_file: bool = True) -> None: ...
    def unspooled(self, nbytes: int) -> None: ...


class _NoMetrics:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint as the dispatcher uses it: settings plus the policy's view."""

    settings: EndpointSettings
    policy: EndpointPolicy


class Snapshot:
    """Everything derived from one config; a reload makes a new one, live connections keep theirs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.endpoints = tuple(
            Endpoint(
                ep,
                EndpointPolicy(
                    name=ep.name,
                    index=n,
                    events=ep.events,
                    mode=ep.mode,
                    on_error=ep.on_error,
                    include_body=ep.include_body,
                ),
            )
            for n, ep in enumerate(config.endpoints)
        )
        self.by_name = {ep.settings.name: ep for ep in self.endpoints}
        self.policies = [ep.policy for ep in self.endpoints]
        self.keep_body = any(ep.settings.include_body for ep in self.endpoints)
        self.requirements = self._requirements()
        self._negotiations: dict[tuple[int, int, int], tuple[Negotiated, NegotiateReply]] = {}
        #: A placeholder policy until a connection has negotiated (it is never asked to decide).
        self.idle_policy = PolicyState(self.policies, actions=Action.NONE, skip_negotiated=False)
        subscribed = {e for ep in self.endpoints for e in ep.settings.events}
        #: Commands whose event no endpoint subscribes to: no payload is built for them.
        self.quiet = frozenset(kind for kind, event in EVENT_OF.items() if event not in subscribed)
        #: Whether a message over a limit is refused (on_oversize tempfail or reject) rather than
        #: passed on to the endpoints with what was kept (continue).
        self.refuse_over_limit = config.server.on_oversize is not OnOversize.CONTINUE

    def negotiate(self, offer: Negotiate) -> tuple[Negotiated, NegotiateReply, bool]:
        """Our answer to an offer, computed once per distinct offer (Postfix always sends the same).

        Returns the outcome, the reply and whether this offer was new (so its
        warnings are logged once, not per connection).
        """
        key = (offer.version, int(offer.actions), int(offer.protocol))
        cached = self._negotiations.get(key)
        if cached is not None:
            return cached[0], cached[1], False
        got = negotiate(offer, self.requirements)
        if len(self._negotiations) < 64:
            self._negotiations[key] = (got, got.reply())
        return got, got.reply(), True

    def subscribers(self, event: Event) -> list[Endpoint]:
        """Every endpoint subscribed to ``event`` (both modes; used for the notifications)."""
        return [ep for ep in self.endpoints if event in ep.settings.events]

    def _requirements(self) -> Requirements:
        """Negotiation derived from the config (design.md §3.6)."""
        subscribed = {e for ep in self.endpoints for e in ep.settings.events}
        enforced = {e for ep in self.endpoints if ep.settings.mode is Mode.ENFORCE for e in ep.settings.events}
        events = set(CONTEXT_EVENTS) | (subscribed & OPTIONAL_EVENTS)
        if self.keep_body:
            events.add(Event.BODY)  # no-reply unless an enforcing endpoint subscribes
        reply_events = enforced & events
        macros: dict[MacroStage, tuple[bytes, ...]] = {}
        extra = tuple(dict.fromkeys(m.encode() for ep in self.endpoints for m in ep.settings.macros))
        for stage, names in DEFAULT_MACROS.items():
            macros[stage] = tuple(dict.fromkeys(names + extra))
        return Requirements(
            events=frozenset(events),
            reply_events=frozenset(reply_events),
            actions=ALL_ACTIONS & ~Action.SETSYMLIST,
            macros=macros,
        )


class Dispatcher:
    """The process-wide handler factory for milter connections."""

    def __init__(self, config: Config, client: WebhookPoster, *, metrics: Observer | None = None) -> None:
        self.client = client
        self.metrics: Observer = metrics or _NoMetrics()
        #: Where events the session takes in by itself are counted (``MilterSession.set_quiet``).
        self.event_counts: dict[str, int] = metrics.event_counts() if metrics is not None else {}
        self.snapshot = Snapshot(config)
        self._background: set[asyncio.Task[None]] = set()
        #: Background calls running, per endpoint name (see ``spawn``).
        self._background_by_endpoint: dict[str, int] = {}

    def reload(self, config: Config) -> None:
        """New connections use ``config``; live ones keep the snapshot they started with."""
        self.snapshot = Snapshot(config)

    def __call__(self, session: MilterSession) -> ConnectionHandler:
        return ConnectionHandler(self, self.snapshot, session)

    def has_room(self, endpoint: EndpointSettings) -> bool:
        """Whether a background call to ``endpoint`` may start now; False counts it as dropped.

        At most ``endpoint.max_background`` of an endpoint's calls run at once: a slow observe
        endpoint must not grow the bridge's memory with the mail flow. A call over the cap is
        dropped before its request is built (it never holds a reply, so nothing waits for it).
        """
        if self._background_by_endpoint.get(endpoint.name, 0) < endpoint.max_background:
            return True
        self.metrics.background_dropped(endpoint.name)
        return False

    def spawn(self, coro: Coroutine[Any, Any, None], endpoint: EndpointSettings) -> None:
        """Run a notification or observe call in the background (after ``has_room``), tracked for shutdown."""
        name = endpoint.name
        self._background_by_endpoint[name] = self._background_by_endpoint.get(name, 0) + 1
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(functools.partial(self._background_done, name))

    def _background_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        self._background_by_endpoint[name] -= 1

    async def aclose(self, timeout: float = 5.0) -> None:
        """Let background calls finish up to ``timeout``, then cancel the rest."""
        if not self._background:
            return
        _, pending = await asyncio.wait(set(self._background), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _outcome_of(reply: Reply, quarantined: bool) -> str:
    if isinstance(reply, Discard):
        return "discarded"
    if isinstance(reply, Reject):
        return "rejected"
    if isinstance(reply, TempFail):
        return "tempfailed"
    if isinstance(reply, ReplyCode):
        return "tempfailed" if reply.smtp_code < 500 else "rejected"
    return "quarantined" if quarantined else "accepted"


def _reply_text(reply: Reply) -> str | None:
    if isinstance(reply, ReplyCode):
        return reply.text.decode("utf-8", "replace")
    return None


class ConnectionHandler:
    """The dispatcher's handler for one milter connection."""

    def __init__(self, dispatcher: Dispatcher, snapshot: Snapshot, session: MilterSession) -> None:
        self.dispatcher = dispatcher
        self.snapshot = snapshot
        self.session = session
        self.metrics = dispatcher.metrics
        self.builder = pl.PayloadBuilder(session)
        self.negotiated: Negotiated | None = None
        self.policy = snapshot.idle_policy
        self.body: BodyBuffer | None = None
        self._body_offset = 0
        self._message_started = 0.0
        self._message_calls: list[dict[str, Any]] = []
        #: Recipients of this message refused at RCPT for being over max_recipients.
        self._refused_recipients = 0
        self._logged_message: int | None = None
        self._accepted: int | None = None
        self._closed = False
        self._ended: MessageContext | None = None
        self.started = time.monotonic()
        # Quiet no-reply commands (headers, recipients ...) need no handling here: let the
        # session fold them into the context without returning them.
        session.set_quiet(snapshot.quiet, dispatcher.event_counts)

    # -------------------------------------------------------------- handler

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        got, reply, new = self.snapshot.negotiate(offer)
        if new and got.missing_actions:
            log.warning(
                "MTA does not offer actions %s; responses that need them will be refused",
                got.missing_actions,
                extra={"fields": {"session": self.builder.session_id}},
            )
        if new and got.unavailable_events:
            log.warning(
                "MTA protocol version %d does not send events %s",
                got.version,
                sorted(got.unavailable_events),
                extra={"fields": {"session": self.builder.session_id}},
            )
        self.negotiated = got
        self.policy = PolicyState(self.snapshot.policies, actions=got.actions, skip_negotiated=got.skip)
        return reply

    def handle(self, command: Command) -> HandlerResult:
        session = self.session
        kind = type(command)
        if session.aborted is not None:
            self._message_ended(session.aborted)
        event = EVENT_OF.get(kind)
        if event is not None:
            self.metrics.event(event)
        if kind is Connect or kind is Helo:
            self.builder.invalidate_session()
        elif kind is MailFrom:
            self._message_started = time.monotonic()
            self._message_calls = []
            self._refused_recipients = 0
            self._new_body()
        elif kind is Abort:
            return None
        elif kind is Quit or kind is QuitNewConnection:
            self._connection_ended()
            if kind is QuitNewConnection:
                self._restart()
            return None
        if session.needs_reply and kind in _REFUSED_OVER_LIMIT:
            limit = session.over_limit()
            if limit is not None and (self.snapshot.refuse_over_limit or limit == BUDGET_LIMIT):
                return self._refuse_over_limit(kind, limit)
        if kind is BodyChunk:
            return self._body_chunk(command)  # type: ignore[arg-type]
        if kind is EndOfMessage:
            return self._eom(command)  # type: ignore[arg-type]
        if kind in self.snapshot.quiet and not session.needs_reply:
            return None  # the fast path: nobody listens and the MTA does not wait
        assert event is not None
        msg = session.message
        if msg is not None and self.body is None:
            self._new_body()  # MAIL was not seen (negotiated away)
        return self._decide(event, command, msg)

    def _restart(self) -> None:
        """QUIT_NC: a new session on the same socket."""
        self._closed = False
        self.started = time.monotonic()
        # Message numbers start at 1 again: what was noted of the last session's messages goes.
        self._logged_message = None
        self._accepted = None
        self._ended = None
        self.builder = pl.PayloadBuilder(self.session)
        self.policy = PolicyState(
            self.snapshot.policies,
            actions=self.policy.actions,
            skip_negotiated=self.policy.skip_negotiated,
        )

    def _data(self, command: Command) -> pl.JSON:
        """The ``data`` member of a request: what this event adds."""
        match command:
            case Connect():
                return self.builder.client()
            case Helo(hostname=hostname):
                return pl.text_obj("hostname", hostname)
            case MailFrom(address=address, args=args) | RcptTo(address=address, args=args):
                return pl.address_obj(address, args)
            case Header(name=name, value=value):
                return pl.header_obj(name, value)
            case BodyChunk(data=data):
                return {"offset": self._body_offset - len(data), "base64": pl.b64(data)}
            case Unknown(line=line):
                return pl.text_obj("command", line)
        return {}

    def connection_lost(self) -> None:
        if self.session.aborted is not None:
            self._message_ended(self.session.aborted)
        self._connection_ended()

    # ---------------------------------------------------------------- events

    def _decide(self, event: Event, command: Command, msg: MessageContext | None) -> HandlerResult:
        targets = self.policy.targets(event)
        observers = self.policy.observers(event)
        needs_reply = self.session.needs_reply
        if not targets and not observers:
            return self._apply(event, {}) if needs_reply else None
        request = self.builder.request(event.value, self._data(command), msg)
        for ep in observers:
            self._observe(event, ep.name, request)
        if not needs_reply:
            # No-reply events only ever have observe subscribers; enforcing ones get replies.
            for ep in targets:
                self._observe(event, ep.name, request)
            return None
        if not targets:
            return self._apply(event, {})
        return self._decide_async(event, targets, request)

    async def _decide_async(self, event: Event, targets: Sequence[EndpointPolicy], request: pl.JSON) -> Sequence[Reply]:
        try:
            outcomes = await self._call_all(event, targets, [request] * len(targets))
        except Exception as exc:
            return self._bridge_fault(event, exc)
        return self._apply(event, outcomes)

    def _apply(self, event: Event, outcomes: Mapping[str, Outcome]) -> Sequence[Reply]:
        result = self.policy.decide(event, outcomes)
        self._note_decision(event, result)
        return (result.reply,)

    def _note_decision(self, event: Event, result: EventResult) -> None:
        msg = self.session.message
        # At rcpt a refusal ends only that recipient; a discard ends the whole message.
        if result.ends_message and msg is not None and (event is not Event.RCPT or isinstance(result.reply, Discard)):
            self._log_message(msg, result.reply, quarantined=False, reason=self._reason(result.winner))
        elif isinstance(result.reply, Accept) and msg is not None:
            # 'a' before end-of-message: Postfix delivers the message without asking us again.
            self._log_message(msg, result.reply, quarantined=False, reason="accepted by every enforcing endpoint")
            self._accepted = msg.number
        if result.ends_session or (
            event in (Event.CONNECT, Event.HELO) and not isinstance(result.reply, Continue | Accept)
        ):
            self._log_connection_refused(event, result.reply, self._reason(result.winner))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event %s: %s",
                event.value,
                result.action,
                extra={"fields": {"session": self.builder.session_id, "event": event.value, "action": result.action}},
            )

    def _log_connection_refused(self, event: Event, reply: Reply, reason: str | None) -> None:
        log.info(
            "connection refused at %s",
            event.value,
            extra={
                "fields": {
                    "session": self.builder.session_id,
                    "event": event.value,
                    "reply": _reply_text(reply) or type(reply).__name__.lower(),
                    "reason": reason,
                }
            },
        )

    @staticmethod
    def _reason(winner: Any) -> str | None:
        if winner is None:
            return None
        reason = winner.failure or winner.decision.reason
        return f"{winner.endpoint.name}: {reason}" if reason else f"{winner.endpoint.name}: {winner.action}"

    # ------------------------------------------------------------------ body

    def _new_body(self) -> None:
        if self.body is not None:
            self._drop_body()
        server = self.snapshot.config.server
        self.body = BodyBuffer(
            server.body_memory_bytes,
            server.max_message_bytes,
            keep=self.snapshot.keep_body,
            budget=self.session.budget,
        )
        self._body_offset = 0

    def _drop_body(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            if body.spooled:
                self.metrics.unspooled(body.size)
            body.discard()

    def _refuse_over_limit(self, kind: type[Command], limit: str) -> HandlerResult:
        """Answer a command of a message (or connection) over ``limit`` with on_oversize.

        The bridge never hangs up over a limit: that would hand the message to Postfix's
        milter_default_action (design.md §3.7).
        """
        if limit == BUDGET_LIMIT:
            reply = BUSY_REPLY
        else:
            reply = OVER_LIMIT_REPLIES[self.snapshot.config.server.on_oversize][limit]
        msg = self.session.message
        if kind is RcptTo:
            # This recipient only; a message over another limit is refused at its next command.
            if limit != "max_recipients":
                return (reply,)
            self._refused_recipients += 1  # said in the message's log line and counted there
            return (TOO_MANY_RECIPIENTS,)
        if kind is Connect or kind is Helo:
            self.metrics.oversize(limit)  # no message of this session will be logged
            self._log_connection_refused(EVENT_OF[kind], reply, f"over the limit {limit}")
            return (reply,)
        self.policy.reset_message()
        self._drop_body()
        if msg is not None:
            self._log_message(msg, reply, quarantined=False, reason=f"over the limit {limit}")
        return (reply,)

    def _body_chunk(self, command: BodyChunk) -> HandlerResult:
        self._store_chunk(command.data)
        if BodyChunk in self.snapshot.quiet and not self.session.needs_reply:
            return None
        return self._decide(Event.BODY, command, self.session.message)

    def _store_chunk(self, data: bytes) -> BodyBuffer:
        """Count (and, for include_body endpoints, keep) a piece of the body."""
        if self.body is None:
            self._new_body()
        body = self.body
        assert body is not None
        was_spooled, was_oversize = body.spooled, body.oversize
        body.append(data)
        self._body_offset += len(data)
        if body.spooled:
            # The gauge follows the bytes on disk; a new file is counted once.
            self.metrics.spooled(body.size if not was_spooled else len(data), new_file=not was_spooled)
        if body.oversize and not was_oversize and was_spooled:
            self.metrics.unspooled(body.size - len(data))
        return body

    # ------------------------------------------------------------------- eom

    def _eom(self, command: EndOfMessage) -> HandlerResult:
        msg = self.session.message
        assert msg is not None
        if command.data:
            self._store_chunk(command.data)  # a body tail inside EOM (libmilter style): no body event
        if self.body is not None and self.body.failed is not None:
            return self._bridge_fault(Event.EOM, SpoolError(self.body.failed))
        targets = self.policy.targets(Event.EOM)
        observers = self.policy.observers(Event.EOM)
        if not targets and not observers:
            return self._finish(msg, {})
        request = self.builder.request(Event.EOM.value, {}, msg)
        try:
            for ep in observers:
                # Observe calls outlive this message's body buffer: they get the bytes now.
                self._observe(Event.EOM, ep.name, request, with_body=True)
        except SpoolError as exc:
            return self._bridge_fault(Event.EOM, exc)
        if not targets:
            return self._finish(msg, {})
        requests = [self._with_body(ep.name, request, stream=True) for ep in targets]
        return self._eom_async(msg, targets, requests)

    def _with_body(self, name: str, request: pl.JSON, *, stream: bool) -> pl.JSON:
        """The eom request for one endpoint: with ``message.body`` when it has include_body.

        With ``stream`` the base64 is a placeholder filled from the body
        buffer while the request is sent (see ``payload.StreamedRequest``).
        """
        settings = self.snapshot.by_name[name].settings
        body = self.body
        if not settings.include_body or body is None or request["message"] is None:
            return request
        if body.oversize:
            content: pl.JSON = {"size": body.size, "base64": "", "truncated": True}
        else:
            kept = min(settings.max_body_bytes, body.size)
            encoded = pl.BODY_PLACEHOLDER if stream else pl.b64(body.read(kept))
            content = {"size": body.size, "base64": encoded, "truncated": kept < body.size}
        return {**request, "message": {**request["message"], "body": content}}

    async def _eom_async(
        self, msg: MessageContext, targets: Sequence[EndpointPolicy], requests: Sequence[pl.JSON]
    ) -> Sequence[Reply | Modification]:
        try:
            outcomes = await self._call_all(Event.EOM, targets, requests)
        except Exception as exc:
            return self._bridge_fault(Event.EOM, exc)
        return self._finish(msg, outcomes)

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
        msg = self.session.message
        if event not in (Event.CONNECT, Event.HELO, Event.RCPT, Event.UNKNOWN):
            self.policy.reset_message()
            self._drop_body()
            if msg is not None:
                self._log_message(msg, reply, quarantined=False, reason=f"bridge fault: {why}")
        else:
            log.warning("bridge fault at %s, answered tempfail: %s", event.value, why)
        return (reply,)

    def _finish(self, msg: MessageContext, outcomes: Mapping[str, Outcome]) -> Sequence[Reply | Modification]:
        result: EomResult = self.policy.finish_eom(outcomes, msg.headers)
        for dropped in result.dropped:
            log.info(
                "modification dropped",
                extra={
                    "fields": {
                        "session": self.builder.session_id,
                        "endpoint": dropped.endpoint,
                        "op": str(dropped.op.op),
                        "why": str(dropped.reason),
                    }
                },
            )
        reason = self._reason(result.winner)
        self._log_message(
            msg,
            result.reply,
            quarantined=result.quarantine is not None,
            reason=reason,
            modifications=len(result.applied),
        )
        self._drop_body()
        return result.messages

    # -------------------------------------------------------------- webhooks

    async def _call_all(
        self, event: Event, targets: Sequence[EndpointPolicy], requests: Sequence[pl.JSON]
    ) -> dict[str, Outcome]:
        if len(targets) == 1:
            return {targets[0].name: await self._call(event, targets[0].name, requests[0])}
        # return_exceptions: a bridge fault in one call must not leave the others running on.
        results = await asyncio.gather(
            *(self._call(event, ep.name, req) for ep, req in zip(targets, requests, strict=True)),
            return_exceptions=True,
        )
        outcomes: dict[str, Outcome] = {}
        for ep, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            outcomes[ep.name] = result
        return outcomes

    async def _call(
        self,
        event: Event,
        name: str,
        request: pl.JSON | None,
        prepared: tuple[str, bytes] | None = None,
        *,
        record: bool = True,
    ) -> Outcome:
        """One webhook call; ``prepared`` is (id, encoded body) when the request was encoded earlier."""
        endpoint = self.snapshot.by_name[name]
        settings = endpoint.settings
        webhook_id, encoded = prepared if prepared is not None else (pl.new_id("evt"), b"")
        started = time.monotonic()
        outcome: Outcome
        label = "ok"
        if request is not None:
            encoded = pl.encode({**request, "id": webhook_id})
        body: bytes | pl.StreamedRequest = encoded
        message = request.get("message") if request is not None else None
        if message is not None and message.get("body", {}).get("base64") == pl.BODY_PLACEHOLDER:
            assert self.body is not None
            body = pl.StreamedRequest(encoded, self.body, settings.max_body_bytes)
        try:
            response = await self.dispatcher.client.post(settings, body, webhook_id=webhook_id)
        except Exception as exc:
            # The webhook client's errors (WebhookError) name their outcome and carry safe
            # messages. Anything else is the bridge's own fault (a spooled body it cannot read,
            # a bug): never charged to the endpoint, never its on_error (see _bridge_fault).
            failed = getattr(exc, "outcome", None)
            if failed is None:
                raise
            label = str(failed)
            outcome = Failure(reason="breaker_open" if label == "breaker_open" else str(exc))
        else:
            try:
                decoded = pl.decode(response.body)
                actions = self.negotiated.actions if self.negotiated else ALL_ACTIONS
                outcome = parse_decision(
                    decoded,
                    event,
                    max_modifications=settings.max_modifications,
                    allowed_actions=actions,
                    allowed_ops=settings.allowed_ops,
                )
            except DecisionError as exc:
                label = "invalid_decision"
                outcome = Failure(reason=f"invalid decision: {exc}")
            except ValueError as exc:
                label = "invalid_body"
                outcome = Failure(reason=f"invalid response body: {exc}")
        elapsed = time.monotonic() - started
        event_name = event.value  # an enum's .value is a descriptor call: read it once per call
        self.metrics.webhook(name, event_name, str(label), elapsed)
        if isinstance(outcome, Failure):
            action = "failure"
        else:
            action = outcome.action.value
            self.metrics.decision(name, event_name, action, settings.mode.value)
        if record:
            call: dict[str, Any] = {
                "endpoint": name,
                "event": event_name,
                "action": action,
                "ms": round(elapsed * 1000, 1),
            }
            if isinstance(outcome, Failure):
                call["error"] = outcome.reason
            self._message_calls.append(call)
        if isinstance(outcome, Failure):
            log.warning(
                "endpoint %s failed at %s: %s",
                name,
                event_name,
                outcome.reason,
                extra={
                    "fields": {
                        "session": self.builder.session_id,
                        "endpoint": name,
                        "event": event_name,
                        "on_error": settings.on_error.value,
                    }
                },
            )
        return outcome

    def _prepare(self, request: pl.JSON) -> tuple[str, bytes]:
        """Encode a request now: the context it refers to keeps changing after this event."""
        webhook_id = pl.new_id("evt")
        return webhook_id, pl.encode({**request, "id": webhook_id})

    def _observe(self, event: Event, name: str, request: pl.JSON, *, with_body: bool = False) -> None:
        """Call an observe endpoint without waiting for it (its calls are not in the message's log line).

        ``with_body``: the eom request gets the body bytes now (the call outlives the buffer).
        """
        settings = self.snapshot.by_name[name].settings
        if not self.dispatcher.has_room(settings):
            return
        if with_body:
            request = self._with_body(name, request, stream=False)
        self.dispatcher.spawn(self._observe_call(event, name, self._prepare(request)), settings)

    async def _observe_call(self, event: Event, name: str, prepared: tuple[str, bytes]) -> None:
        try:
            outcome = await self._call(event, name, None, prepared, record=False)
        except Exception:
            log.exception("bug: observe call to %s at %s failed", name, event.value)
            return
        if log.isEnabledFor(logging.INFO) and event not in (Event.ABORT, Event.CLOSE):
            action = "failure" if isinstance(outcome, Failure) else outcome.action.value
            log.info(
                "observe endpoint %s at %s: %s",
                name,
                event.value,
                action,
                extra={
                    "fields": {
                        "session": self.builder.session_id,
                        "endpoint": name,
                        "event": event.value,
                        "action": action,
                        "mode": "observe",
                    }
                },
            )

    def _notify(self, event: Event, msg: MessageContext | None) -> None:
        subscribers = self.snapshot.subscribers(event)
        if not subscribers:
            return
        request = self.builder.request(event.value, {}, msg)
        for ep in subscribers:
            if self.dispatcher.has_room(ep.settings):
                self.dispatcher.spawn(self._notify_call(event, ep.settings.name, self._prepare(request)), ep.settings)

    async def _notify_call(self, event: Event, name: str, prepared: tuple[str, bytes]) -> None:
        try:
            await self._call(event, name, None, prepared, record=False)
        except Exception:
            log.exception("bug: %s notification to %s failed", event.value, name)

    # ------------------------------------------------------------ lifecycle

    def _message_ended(self, msg: MessageContext) -> None:
        """A transaction ended without an end-of-message answer (abort, new MAIL, QUIT, EOF)."""
        if self._ended is msg:
            return  # QUIT reported it already; EOF follows
        self._ended = msg
        self.policy.reset_message()
        self._drop_body()
        if self._logged_message != msg.number:
            self._log_message(msg, None, quarantined=False, reason="ended by the client before end-of-message")
        if self._accepted != msg.number:
            self._notify(Event.ABORT, msg)  # an accepted message was delivered: no abort

    def _connection_ended(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_body()
        self._notify(Event.CLOSE, None)
        conn = self.session.connection
        log.info(
            "connection closed",
            extra={
                "fields": {
                    "session": self.builder.session_id,
                    "client": pl.client_address(conn.address).decode("utf-8", "replace") or None,
                    "messages": conn.message_count,
                    "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
                }
            },
        )

    def _log_message(
        self,
        msg: MessageContext,
        reply: Reply | None,
        *,
        quarantined: bool,
        reason: str | None,
        modifications: int = 0,
    ) -> None:
        self._logged_message = msg.number
        outcome = "aborted" if reply is None else _outcome_of(reply, quarantined)
        self.metrics.message(outcome)
        limit = over_limit(msg, self.session.connection)
        if limit is None and self._refused_recipients:
            limit = "max_recipients"  # refused at RCPT: the message went on without them
        if limit is not None:
            self.metrics.oversize(limit)
        fields: dict[str, Any] = {
            "session": self.builder.session_id,
            "message": self.builder.message_id(msg),
            "queue_id": msg.queue_id.decode("ascii", "replace") if msg.queue_id else None,
            "outcome": outcome,
            "reason": reason,
            "endpoints": self._message_calls,
            "ms": round((time.monotonic() - self._message_started) * 1000, 1) if self._message_started else None,
        }
        if reply is not None and _reply_text(reply):
            fields["reply"] = _reply_text(reply)
        if modifications:
            fields["modifications"] = modifications
        if self._refused_recipients:
            fields["recipients_over_limit"] = self._refused_recipients
        log.info("message %s", outcome, extra={"fields": fields})
        self._message_calls = []
        self._refused_recipients = 0


__all__ = ["ConnectionHandler", "Dispatcher", "Snapshot", "WebhookPoster"]
