"""Connection and message state of the policy: who is still asked, what is pending.

One :class:`PolicyState` per milter connection. The dispatcher asks
:meth:`PolicyState.targets` which enforcing endpoints to call for an event,
hands the outcomes (a :class:`Decision` or a :class:`Failure` per endpoint) to
:meth:`PolicyState.decide` (every event but end-of-message) or
:meth:`PolicyState.finish_eom`, writes the milter reply they return, and
calls :meth:`PolicyState.reset_message` when a message ends (abort; finish_eom
resets by itself).

Rules kept here (design.md §3.3-3.5, milter-protocol.md §5.8):

* ``accept`` marks its endpoint done: for the connection at connect/helo, for
  the message elsewhere. ``'a'`` goes to the MTA only when every enforcing
  endpoint is done and no modification, quarantine or discard is pending
  (an early ``'a'`` makes Postfix skip end-of-message); otherwise ``'c'``.
  Never at ``unknown``.
* An endpoint whose ``when`` excludes the connection or the message is done
  with it without being called, its part counting as ``continue``
  (:meth:`PolicyState.skip`); one excluded from the current recipient only is
  left out of that rcpt (:meth:`PolicyState.pass_recipient`). Observe
  endpoints are left out the same way.
* ``skip`` stops that event kind (header, body) for the endpoint for this
  message. ``'s'`` goes to the MTA only at body, when SKIP was negotiated, no
  endpoint uses ``include_body`` and every body subscriber has skipped or is
  done; an ``observe`` body subscriber never skips (its answers are not
  applied), so it keeps the body coming.
* Modifications are kept per endpoint until end-of-message, at connection
  scope when returned at connect/helo (then they apply to every message of the
  session, like a quarantine there). They survive a later accept, are dropped
  when their endpoint later fails, and are not applied when the message is
  refused or discarded.
* A quarantine before end-of-message is remembered (for every message when at
  connect/helo); a reject, tempfail or discard wins over it.
* At ``rcpt`` a recipient refusal and a message verdict are merged apart; a
  discard behind a recipient refusal is remembered and sent at the next event
  where Postfix honours a discard (at the latest end-of-message).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from milterbridge.milter.constants import Action, Event
from milterbridge.milter.messages import (
    Accept,
    Continue,
    Discard,
    Modification,
    Quarantine,
    Reply,
    ReplyCode,
    Skip,
)

from .apply import (
    POSTFIX_NUMBERING,
    AdjustedModification,
    AppliedModification,
    DroppedModification,
    DropReason,
    HeaderNumbering,
    plan_modifications,
)
from .ledger import Ledger
from .merge import SEVERITY, Severity, Verdict, failure_decision, merge, merge_rcpt, refusal_reply
from .model import (
    CONNECTION_EVENTS,
    LEGAL_ACTIONS,
    NOTIFICATION_EVENTS,
    ActionName,
    AnyOp,
    Decision,
    EndpointPolicy,
    Failure,
    PolicyUsageError,
    required_action,
)

_REFUSALS: Final = frozenset({ActionName.REJECT, ActionName.TEMPFAIL})
_ENDS_MESSAGE: Final = frozenset({ActionName.REJECT, ActionName.TEMPFAIL, ActionName.DISCARD})
#: Actions that never win a merge.
_NEVER_WINS: Final = frozenset(action for action, rank in SEVERITY.items() if rank is Severity.NONE)
#: The action an EventResult reports for a reply no verdict won.
_REPLY_ACTIONS: Final[Mapping[type[Reply], ActionName]] = {Accept: ActionName.ACCEPT, Skip: ActionName.SKIP}
#: Events whose refusal ends the message (at rcpt it refuses one recipient only).
_MESSAGE_REFUSAL_EVENTS: Final = frozenset({Event.MAIL, Event.DATA, Event.HEADER, Event.EOH, Event.BODY, Event.EOM})
#: Postfix ends the SMTP session after any reply with this code ("service not available").
SESSION_ENDING_CODE: Final = 421


@dataclass(slots=True, kw_only=True)
class EventResult:
    """What :meth:`PolicyState.decide` did at one event, and the reply to send (read-only by
    convention: not frozen, because a frozen dataclass costs a fifth of ``decide`` to build).

    ``action`` is the merged action (``reject``, ``tempfail``, ``discard``,
    ``quarantine`` (remembered; the reply is ``'c'``), ``accept`` when ``'a'``
    is sent, ``skip`` when ``'s'`` is sent, else ``continue``). ``winner`` is
    the verdict that decided it (``None`` when no endpoint asked for more than
    continue). ``deferred`` is a message verdict remembered at this event for
    later (a quarantine, or a discard behind a recipient refusal at rcpt).
    ``verdicts`` are the enforcing endpoints' effective decisions, in config
    order, failures already mapped; ``ignored`` names observe endpoints whose
    outcomes were passed and not applied. ``dropped`` lists modifications
    given up at this event (a failing endpoint's earlier ones, or all of a
    message that ends here). ``ends_message``: the reply ends the transaction
    (refusal at mail/data/header/eoh/body, any discard, any session end);
    ``ends_session``: the reply refuses the SMTP session (refusal at
    connect/helo, or a 421 reply).
    """

    event: Event
    reply: Reply
    action: ActionName
    winner: Verdict | None
    deferred: Verdict | None
    verdicts: tuple[Verdict, ...]
    ignored: tuple[str, ...]
    dropped: tuple[DroppedModification, ...]
    ends_message: bool
    ends_session: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class EomResult:
    """The whole end-of-message answer and why.

    ``messages`` is written in one go: modifications in the fixed order, the
    quarantine, then ``reply`` (the final decision). ``quarantine`` is the
    reason sent with ``'q'``, if any.
    """

    messages: tuple[Reply | Modification, ...]
    reply: Reply
    action: ActionName
    winner: Verdict | None
    quarantine: str | None
    verdicts: tuple[Verdict, ...]
    ignored: tuple[str, ...]
    applied: tuple[AppliedModification, ...]
    dropped: tuple[DroppedModification, ...]
    #: Ops sent other than asked (e.g. a change_header past the last header, added instead).
    adjusted: tuple[AdjustedModification, ...] = ()


class PolicyEndpoints:
    """The configured endpoints as the policy looks at them: built once per config, shared by
    every connection's :class:`PolicyState`.

    ``endpoints`` in config order (``index``, then name); ``enforcing`` those that decide.
    Raises PolicyUsageError when two endpoints have one name.
    """

    def __init__(self, endpoints: Sequence[EndpointPolicy]) -> None:
        self.endpoints: tuple[EndpointPolicy, ...] = tuple(sorted(endpoints, key=lambda e: (e.index, e.name)))
        self.by_name: dict[str, EndpointPolicy] = {ep.name: ep for ep in self.endpoints}
        if len(self.by_name) != len(self.endpoints):
            raise PolicyUsageError("endpoint names must be unique")
        self.enforcing: tuple[EndpointPolicy, ...] = tuple(ep for ep in self.endpoints if ep.enforcing)


class PolicyState:
    """Policy state of one milter connection.

    ``endpoints`` are all configured endpoints (observe ones are never asked
    for decisions and their outcomes are ignored, but they count for SKIP),
    best given as the config's shared :class:`PolicyEndpoints`; ``actions`` the
    action bits the MTA granted; ``skip_negotiated`` whether SMFIP_SKIP was agreed.
    What it remembers between events is kept in a :class:`~.ledger.Ledger`.
    """

    def __init__(
        self,
        endpoints: PolicyEndpoints | Sequence[EndpointPolicy],
        *,
        actions: Action,
        skip_negotiated: bool,
        conditional: bool = False,
    ) -> None:
        shared = endpoints if isinstance(endpoints, PolicyEndpoints) else PolicyEndpoints(endpoints)
        self.endpoints = shared.endpoints
        self._by_name = shared.by_name
        self._enforcing = shared.enforcing
        self.actions = actions
        self.skip_negotiated = skip_negotiated
        self._ledger = Ledger()
        #: Some endpoint has a ``when``: only then are skipped ones looked for among observers and at rcpt.
        self._conditional = conditional

    # ---------------------------------------------------------------- queries

    def targets(self, event: Event) -> list[EndpointPolicy]:
        """Enforcing endpoints to call for ``event``: subscribed, not done, not skipping it.

        Also for the notifications: ``abort`` goes to endpoints not done with
        the message (ask before :meth:`reset_message`), ``close`` to endpoints
        not done with the connection.
        """
        if event not in LEGAL_ACTIONS and event not in NOTIFICATION_EVENTS:
            raise PolicyUsageError(f"unknown event {event!r}")
        ledger = self._ledger
        done = ledger.connection.done if event is Event.CLOSE else ledger.connection.done | ledger.message.done
        if self._conditional and event is Event.RCPT:
            done = done | ledger.passing
        skipping = ledger.skipping
        return [
            ep
            for ep in self._enforcing
            if event in ep.events and ep.name not in done and event not in skipping.get(ep.name, ())
        ]

    def observers(self, event: Event) -> list[EndpointPolicy]:
        """Observe endpoints subscribed to ``event`` (called without waiting; never applied).

        Those their ``when`` excludes (:meth:`skip`, :meth:`pass_recipient`) are left out.
        """
        if not self._conditional:
            return [ep for ep in self.endpoints if not ep.enforcing and event in ep.events]
        ledger = self._ledger
        excluded = ledger.connection.done
        if event not in CONNECTION_EVENTS:
            excluded = excluded | ledger.message.done
        if event is Event.RCPT:
            excluded = excluded | ledger.passing
        return [ep for ep in self.endpoints if not ep.enforcing and event in ep.events and ep.name not in excluded]

    @property
    def has_pending(self) -> bool:
        """True while modifications, a quarantine or a discard wait for a later event."""
        return self._ledger.has_pending

    def pending_modifications(self) -> list[tuple[str, list[AnyOp]]]:
        """``(endpoint, ops)`` kept for end-of-message, in config order (connection scope first)."""
        return self._ledger.modifications(self.endpoints, [])

    # ---------------------------------------------------------------- updates

    def reset_message(self) -> None:
        """Forget message-scoped state (after end-of-message or abort); idempotent."""
        self._ledger.reset_message()

    def done(self) -> set[str]:
        """Endpoints done with the current message (or with the whole connection)."""
        ledger = self._ledger
        return ledger.connection.done | ledger.message.done

    def skip(self, event: Event, names: Iterable[str]) -> None:
        """Endpoints whose ``when`` excludes them from the connection (``event`` connect or helo)
        or the current message (any later event): done with it, their part counting as ``continue``."""
        self._ledger.scope(event).done.update(names)

    def pass_recipient(self, names: Iterable[str]) -> None:
        """Endpoints not called for the current recipient (``when`` excludes it); the next call replaces them."""
        self._ledger.passing = frozenset(names)

    def decide(self, event: Event, outcomes: Mapping[str, Decision | Failure]) -> EventResult:
        """Merge the outcomes of ``targets(event)`` into the reply for ``event`` (not eom).

        Call it for every event the MTA waits a reply for, also with no
        outcomes: a remembered discard may be due. ``outcomes`` must hold
        exactly the names of ``targets(event)`` (plus, optionally, observe
        endpoints, which are ignored).
        """
        if event is Event.EOM:
            raise PolicyUsageError("use finish_eom() at end-of-message")
        if event in NOTIFICATION_EVENTS:
            raise PolicyUsageError(f"{event} is a notification; nothing to decide")
        verdicts, ignored, dropped = self._resolve(event, outcomes)
        ledger = self._ledger
        if ledger.discard is None and all(v.decision.action in _NEVER_WINS for v in verdicts):
            # The common case, merged without the merge: nobody asked for more than
            # continue, and no discard is remembered, so nothing wins and nothing is deferred.
            winner = deferred = None
        else:
            winner, deferred = _merge_event(event, verdicts, ledger)
            ledger.remember_quarantines(event, verdicts)
        ends_message = ends_session = False
        if winner is not None and winner.action in _REFUSALS:
            reply = refusal_reply(winner.decision)
            ends_session = event in CONNECTION_EVENTS or _ends_session(reply)
            ends_message = ends_session or event in _MESSAGE_REFUSAL_EVENTS
        elif winner is not None and winner.action is ActionName.DISCARD:
            reply = Discard()
            ends_message = True
        else:
            reply = Continue()
        if ends_message:
            why = DropReason.SESSION_REFUSED if ends_session else _drop_reason(winner)
            dropped.extend(ledger.drop_message(why, verdicts, include_connection=ends_session))
        else:
            ledger.record(event, verdicts)
            if isinstance(reply, Continue):
                reply = self._continue_reply(event)
        if winner is not None:
            action = winner.action
        else:
            action = _REPLY_ACTIONS.get(type(reply), ActionName.CONTINUE)
        return EventResult(
            event=event,
            reply=reply,
            action=action,
            winner=winner,
            deferred=deferred,
            verdicts=tuple(verdicts),
            ignored=tuple(ignored),
            dropped=tuple(dropped),
            ends_message=ends_message,
            ends_session=ends_session,
        )

    def finish_eom(
        self,
        outcomes: Mapping[str, Decision | Failure],
        headers: Sequence[tuple[bytes, bytes]],
        numbering: HeaderNumbering = POSTFIX_NUMBERING,
    ) -> EomResult:
        """The end-of-message answer: modifications, quarantine and final reply, in order.

        ``headers`` are the message's headers exactly as the endpoints received
        them (``message.headers``); ``numbering`` how the connected MTA counts
        header positions. Resets the message state afterwards.
        """
        verdicts, ignored, dropped = self._resolve(Event.EOM, outcomes)
        ledger = self._ledger
        winner = merge([*verdicts, *ledger.remembered()])
        quarantine = None
        applied: tuple[AppliedModification, ...] = ()
        adjusted: tuple[AdjustedModification, ...] = ()
        if winner is not None and winner.action in _ENDS_MESSAGE:
            reply: Reply = refusal_reply(winner.decision) if winner.action in _REFUSALS else Discard()
            dropped.extend(ledger.drop_message(_drop_reason(winner), verdicts, include_connection=False))
            messages: tuple[Reply | Modification, ...] = (reply,)
        else:
            ops = ledger.modifications(self.endpoints, verdicts)
            plan = plan_modifications(ops, headers, actions=self.actions, numbering=numbering)
            applied = plan.applied
            adjusted = plan.adjusted
            mods: list[Reply | Modification] = list(plan.messages)
            dropped.extend(plan.dropped)
            if winner is not None and winner.action is ActionName.QUARANTINE:
                quarantine = winner.decision.reason or f"quarantined by milterbridge endpoint {winner.endpoint.name}"
                mods.append(Quarantine(reason=quarantine.encode()))
            done = ledger.connection.done | ledger.message.done
            done.update(v.endpoint.name for v in verdicts if v.action is ActionName.ACCEPT)
            reply = Accept() if self._all_done(done) and not mods else Continue()
            messages = (*mods, reply)
        if winner is not None:
            action = winner.action
        else:
            action = ActionName.ACCEPT if isinstance(reply, Accept) else ActionName.CONTINUE
        ledger.reset_message()
        return EomResult(
            messages=messages,
            reply=reply,
            action=action,
            winner=winner,
            quarantine=quarantine,
            verdicts=tuple(verdicts),
            ignored=tuple(ignored),
            applied=applied,
            dropped=tuple(dropped),
            adjusted=adjusted,
        )

    # ---------------------------------------------------------------- helpers

    def _resolve(
        self, event: Event, outcomes: Mapping[str, Decision | Failure]
    ) -> tuple[list[Verdict], list[str], list[DroppedModification]]:
        """Outcomes -> verdicts (failures mapped through on_error), checking the caller's input."""
        expected = {ep.name for ep in self.targets(event)}
        legal = LEGAL_ACTIONS[event]
        verdicts: list[Verdict] = []
        ignored: list[str] = []
        dropped: list[DroppedModification] = []
        for name, outcome in outcomes.items():
            ep = self._by_name.get(name)
            if ep is None:
                raise PolicyUsageError(f"unknown endpoint {name!r}")
            if not ep.enforcing:
                ignored.append(name)
                continue
            if name not in expected:
                raise PolicyUsageError(f"endpoint {name!r} is not a target of {event}")
            if isinstance(outcome, Failure):
                # A failure takes back what the endpoint asked for earlier.
                dropped.extend(self._ledger.drop_endpoint(name))
                decision = failure_decision(ep, event, outcome)
                verdicts.append(Verdict(endpoint=ep, decision=decision, failure=outcome.reason))
                continue
            _check_decision(name, event, outcome, legal, self.actions)
            verdicts.append(Verdict(endpoint=ep, decision=outcome))
        missing = expected - {v.endpoint.name for v in verdicts}
        if missing:
            raise PolicyUsageError(f"no outcome for {sorted(missing)} at {event}")
        if len(verdicts) > 1:
            verdicts.sort(key=lambda v: (v.endpoint.index, v.endpoint.name))
        return verdicts, ignored, dropped

    def _continue_reply(self, event: Event) -> Reply:
        ledger = self._ledger
        done = ledger.connection.done if event in CONNECTION_EVENTS else ledger.connection.done | ledger.message.done
        if self._all_done(done) and event is not Event.UNKNOWN and not ledger.has_pending:
            return Accept()
        if event is Event.BODY and self._may_skip_body():
            return Skip()
        return Continue()

    def _all_done(self, done: set[str]) -> bool:
        """True when every enforcing endpoint (at least one) is in ``done``."""
        return bool(self._enforcing) and all(ep.name in done for ep in self._enforcing)

    def _may_skip_body(self) -> bool:
        if not self.skip_negotiated or any(ep.include_body for ep in self.endpoints):
            return False
        ledger = self._ledger
        done = ledger.connection.done | ledger.message.done
        skipping = ledger.skipping
        for ep in self.endpoints:
            if Event.BODY not in ep.events or ep.name in done:
                continue
            if not ep.enforcing:
                return False
            if Event.BODY not in skipping.get(ep.name, ()):
                return False
        return True


def _check_decision(name: str, event: Event, decision: Decision, legal: frozenset[ActionName], actions: Action) -> None:
    """Refuse a decision the parser should have refused: illegal action, ungranted action bits."""
    if decision.action not in legal:
        raise PolicyUsageError(f"{name}: {decision.action} is not legal at {event}")
    if event is Event.UNKNOWN and decision.modifications:
        raise PolicyUsageError(f"{name}: modifications are not allowed at unknown")
    missing = [required_action(op) for op in decision.modifications if not actions.grants(required_action(op))]
    if decision.action is ActionName.QUARANTINE and not actions.grants(Action.QUARANTINE):
        missing.append(Action.QUARANTINE)
    if missing:
        raise PolicyUsageError(f"{name}: needs {missing[0]!r}, not granted; parse with allowed_actions")


def _merge_event(event: Event, verdicts: list[Verdict], ledger: Ledger) -> tuple[Verdict | None, Verdict | None]:
    """(winner, deferred message verdict) at a non-eom event, the remembered discard included.

    At rcpt a discard behind a recipient refusal is remembered in ``ledger``
    for a later event; elsewhere the remembered discard joins the merge where
    Postfix honours a discard.
    """
    pending = ledger.discard
    if event is Event.RCPT:
        recipient, message = merge_rcpt(verdicts)
        message = merge(v for v in (message, pending) if v is not None)
        if recipient is not None:
            if message is not None and message.action is ActionName.DISCARD:
                ledger.discard = message
            return recipient, message
        if message is not None and message.action is ActionName.DISCARD:
            return message, None
        return message, message
    candidates = list(verdicts)
    if pending is not None and ActionName.DISCARD in LEGAL_ACTIONS[event]:
        candidates.append(pending)
    winner = merge(candidates)
    deferred = winner if winner is not None and winner.action is ActionName.QUARANTINE else None
    return winner, deferred


def _ends_session(reply: Reply) -> bool:
    return isinstance(reply, ReplyCode) and reply.smtp_code == SESSION_ENDING_CODE


def _drop_reason(winner: Verdict | None) -> DropReason:
    if winner is not None and winner.action is ActionName.DISCARD:
        return DropReason.MESSAGE_DISCARDED
    return DropReason.MESSAGE_REFUSED
