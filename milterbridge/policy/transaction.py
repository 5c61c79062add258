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

from collections.abc import Mapping, Sequence
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

from .apply import AppliedModification, DroppedModification, DropReason, plan_modifications
from .merge import SEVERITY, Verdict, failure_decision, merge, merge_rcpt, refusal_reply
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
#: Actions of merge rank 0 (merge.SEVERITY): they never win a merge.
_NEVER_WINS: Final = frozenset(action for action, rank in SEVERITY.items() if rank == 0)
#: The action an EventResult reports for a reply no verdict won.
_REPLY_ACTIONS: Final[Mapping[type[Reply], ActionName]] = {Accept: ActionName.ACCEPT, Skip: ActionName.SKIP}
#: Events whose refusal ends the message (at rcpt it refuses one recipient only).
_MESSAGE_REFUSAL_EVENTS: Final = frozenset({Event.MAIL, Event.DATA, Event.HEADER, Event.EOH, Event.BODY, Event.EOM})


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


def _is_421(reply: Reply) -> bool:
    # Postfix ends the SMTP session after any reply starting with 421.
    return isinstance(reply, ReplyCode) and reply.smtp_code == 421


class PolicyState:
    """Policy state of one milter connection.

    ``endpoints`` are all configured endpoints (observe ones are never asked
    for decisions and their outcomes are ignored, but they count for SKIP);
    ``actions`` the action bits the MTA granted; ``skip_negotiated`` whether
    SMFIP_SKIP was agreed; ``received_offset`` the hidden headers Postfix
    counts for INSHEADER (its own Received: 1).
    """

    def __init__(
        self,
        endpoints: Sequence[EndpointPolicy],
        *,
        actions: Action,
        skip_negotiated: bool,
        received_offset: int = 1,
    ) -> None:
        self.endpoints: tuple[EndpointPolicy, ...] = tuple(sorted(endpoints, key=lambda e: (e.index, e.name)))
        self._by_name = {ep.name: ep for ep in self.endpoints}
        if len(self._by_name) != len(self.endpoints):
            raise PolicyUsageError("endpoint names must be unique")
        if received_offset < 0:
            raise PolicyUsageError("received_offset must not be negative")
        self.actions = actions
        self.skip_negotiated = skip_negotiated
        self.received_offset = received_offset
        self._enforcing = tuple(ep for ep in self.endpoints if ep.enforcing)
        # connection scope
        self._done_connection: set[str] = set()
        self._connection_mods: dict[str, list[AnyOp]] = {}
        self._connection_quarantine: Verdict | None = None
        # message scope
        self._done_message: set[str] = set()
        self._skipping: dict[str, set[Event]] = {}
        self._message_mods: dict[str, list[AnyOp]] = {}
        self._message_quarantine: Verdict | None = None
        self._pending_discard: Verdict | None = None

    # ---------------------------------------------------------------- queries

    def targets(self, event: Event) -> list[EndpointPolicy]:
        """Enforcing endpoints to call for ``event``: subscribed, not done, not skipping it.

        Also for the notifications: ``abort`` goes to endpoints not done with
        the message (ask before :meth:`reset_message`), ``close`` to endpoints
        not done with the connection.
        """
        if event not in LEGAL_ACTIONS and event not in NOTIFICATION_EVENTS:
            raise PolicyUsageError(f"unknown event {event!r}")
        done = self._done_connection if event is Event.CLOSE else self._done_connection | self._done_message
        return [
            ep
            for ep in self._enforcing
            if event in ep.events and ep.name not in done and event not in self._skipping.get(ep.name, ())
        ]

    def observers(self, event: Event) -> list[EndpointPolicy]:
        """Observe endpoints subscribed to ``event`` (called without waiting; never applied)."""
        return [ep for ep in self.endpoints if not ep.enforcing and event in ep.events]

    @property
    def has_pending(self) -> bool:
        """True while modifications, a quarantine or a discard wait for a later event."""
        return bool(
            any(self._connection_mods.values())
            or any(self._message_mods.values())
            or self._connection_quarantine
            or self._message_quarantine
            or self._pending_discard
        )

    def pending_modifications(self) -> list[tuple[str, list[AnyOp]]]:
        """``(endpoint, ops)`` kept for end-of-message, in config order (connection scope first)."""
        out = []
        for ep in self.endpoints:
            ops = [*self._connection_mods.get(ep.name, ()), *self._message_mods.get(ep.name, ())]
            if ops:
                out.append((ep.name, ops))
        return out

    # ---------------------------------------------------------------- updates

    def reset_message(self) -> None:
        """Forget message-scoped state (after end-of-message or abort); idempotent."""
        self._done_message.clear()
        self._skipping.clear()
        self._message_mods.clear()
        self._message_quarantine = None
        self._pending_discard = None

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
        if self._pending_discard is None and all(v.decision.action in _NEVER_WINS for v in verdicts):
            # The common case, merged without the merge: nobody asked for more than
            # continue, and no discard is remembered, so nothing wins and nothing is deferred.
            winner = deferred = None
        else:
            winner, deferred = self._merge(event, verdicts)
            self._remember_quarantines(event, verdicts)
        ends_message = ends_session = False
        if winner is not None and winner.action in _REFUSALS:
            reply = refusal_reply(winner.decision)
            ends_session = event in CONNECTION_EVENTS or _is_421(reply)
            ends_message = ends_session or event in _MESSAGE_REFUSAL_EVENTS
        elif winner is not None and winner.action is ActionName.DISCARD:
            reply = Discard()
            ends_message = True
        else:
            reply = Continue()
        if ends_message:
            why = DropReason.SESSION_REFUSED if ends_session else _drop_reason(winner)
            dropped.extend(self._drop_message_mods(why, verdicts, include_connection=ends_session))
        else:
            self._record(event, verdicts)
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
        self, outcomes: Mapping[str, Decision | Failure], headers: Sequence[tuple[bytes, bytes]]
    ) -> EomResult:
        """The end-of-message answer: modifications, quarantine and final reply, in order.

        ``headers`` are the message's headers exactly as the endpoints received
        them (``message.headers``). Resets the message state afterwards.
        """
        verdicts, ignored, dropped = self._resolve(Event.EOM, outcomes)
        remembered = [self._pending_discard, self._message_quarantine, self._connection_quarantine]
        winner = merge([*verdicts, *(v for v in remembered if v is not None)])
        quarantine = None
        applied: tuple[AppliedModification, ...] = ()
        if winner is not None and winner.action in _ENDS_MESSAGE:
            reply: Reply = refusal_reply(winner.decision) if winner.action in _REFUSALS else Discard()
            dropped.extend(self._drop_message_mods(_drop_reason(winner), verdicts, include_connection=False))
            messages: tuple[Reply | Modification, ...] = (reply,)
        else:
            eom_ops = {v.endpoint.name: v.decision.modifications for v in verdicts}
            pending = dict(self.pending_modifications())
            ops = []
            for ep in self.endpoints:
                endpoint_ops = [*pending.get(ep.name, ()), *eom_ops.get(ep.name, ())]
                if endpoint_ops:
                    ops.append((ep.name, endpoint_ops))
            plan = plan_modifications(ops, headers, actions=self.actions, received_offset=self.received_offset)
            applied = plan.applied
            mods: list[Reply | Modification] = list(plan.messages)
            dropped.extend(plan.dropped)
            if winner is not None and winner.action is ActionName.QUARANTINE:
                quarantine = winner.decision.reason or f"quarantined by milterbridge endpoint {winner.endpoint.name}"
                mods.append(Quarantine(reason=quarantine.encode()))
            done = self._done_connection | self._done_message
            done.update(v.endpoint.name for v in verdicts if v.action is ActionName.ACCEPT)
            all_done = bool(self._enforcing) and all(ep.name in done for ep in self._enforcing)
            reply = Accept() if all_done and not mods else Continue()
            messages = (*mods, reply)
        if winner is not None:
            action = winner.action
        else:
            action = ActionName.ACCEPT if isinstance(reply, Accept) else ActionName.CONTINUE
        self.reset_message()
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
                dropped.extend(self._drop_endpoint_mods(name))
                decision = failure_decision(ep, event, outcome)
                verdicts.append(Verdict(endpoint=ep, decision=decision, failure=outcome.reason))
                continue
            self._check_decision(name, event, outcome, legal)
            verdicts.append(Verdict(endpoint=ep, decision=outcome))
        missing = expected - {v.endpoint.name for v in verdicts}
        if missing:
            raise PolicyUsageError(f"no outcome for {sorted(missing)} at {event}")
        if len(verdicts) > 1:
            verdicts.sort(key=lambda v: (v.endpoint.index, v.endpoint.name))
        return verdicts, ignored, dropped

    def _check_decision(self, name: str, event: Event, decision: Decision, legal: frozenset[ActionName]) -> None:
        if decision.action not in legal:
            raise PolicyUsageError(f"{name}: {decision.action} is not legal at {event}")
        if event is Event.UNKNOWN and decision.modifications:
            raise PolicyUsageError(f"{name}: modifications are not allowed at unknown")
        missing = [required_action(op) for op in decision.modifications if not required_action(op) & self.actions]
        if decision.action is ActionName.QUARANTINE and not self.actions & Action.QUARANTINE:
            missing.append(Action.QUARANTINE)
        if missing:
            raise PolicyUsageError(f"{name}: needs {missing[0]!r}, not granted; parse with allowed_actions")

    def _merge(self, event: Event, verdicts: list[Verdict]) -> tuple[Verdict | None, Verdict | None]:
        """(winner, deferred message verdict) at a non-eom event."""
        pending = self._pending_discard
        if event is Event.RCPT:
            recipient, message = merge_rcpt(verdicts)
            message = merge(v for v in (message, pending) if v is not None)
            if recipient is not None:
                if message is not None and message.action is ActionName.DISCARD:
                    self._pending_discard = message
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

    def _remember_quarantines(self, event: Event, verdicts: list[Verdict]) -> None:
        new = [v for v in verdicts if v.action is ActionName.QUARANTINE]
        if not new:
            return
        if event in CONNECTION_EVENTS:
            old = self._connection_quarantine
            self._connection_quarantine = merge([*([old] if old else []), *new])
        else:
            old = self._message_quarantine
            self._message_quarantine = merge([*([old] if old else []), *new])

    def _record(self, event: Event, verdicts: list[Verdict]) -> None:
        """Remember accepts, skips and modifications of a message that goes on."""
        connection = event in CONNECTION_EVENTS
        for v in verdicts:
            name = v.endpoint.name
            if v.action is ActionName.ACCEPT:
                (self._done_connection if connection else self._done_message).add(name)
            elif v.action is ActionName.SKIP:
                self._skipping.setdefault(name, set()).add(event)
            if v.decision.modifications:
                store = self._connection_mods if connection else self._message_mods
                store.setdefault(name, []).extend(v.decision.modifications)

    def _continue_reply(self, event: Event) -> Reply:
        connection = event in CONNECTION_EVENTS
        done = self._done_connection if connection else self._done_connection | self._done_message
        all_done = bool(self._enforcing) and all(ep.name in done for ep in self._enforcing)
        if all_done and event is not Event.UNKNOWN and not self.has_pending:
            return Accept()
        if event is Event.BODY and self._may_skip_body():
            return Skip()
        return Continue()

    def _may_skip_body(self) -> bool:
        if not self.skip_negotiated or any(ep.include_body for ep in self.endpoints):
            return False
        done = self._done_connection | self._done_message
        for ep in self.endpoints:
            if Event.BODY not in ep.events:
                continue
            if not ep.enforcing:
                return False
            if ep.name not in done and Event.BODY not in self._skipping.get(ep.name, ()):
                return False
        return True

    def _drop_endpoint_mods(self, name: str) -> list[DroppedModification]:
        ops = [*self._connection_mods.pop(name, ()), *self._message_mods.pop(name, ())]
        return [DroppedModification(endpoint=name, op=op, reason=DropReason.ENDPOINT_FAILED) for op in ops]

    def _drop_message_mods(
        self, reason: DropReason, verdicts: list[Verdict], *, include_connection: bool
    ) -> list[DroppedModification]:
        """Report and forget the ops of a message that ends without end-of-message changes."""
        out: list[DroppedModification] = []
        for name, ops in self._message_mods.items():
            out.extend(DroppedModification(endpoint=name, op=op, reason=reason) for op in ops)
        self._message_mods.clear()
        if include_connection:
            for name, ops in self._connection_mods.items():
                out.extend(DroppedModification(endpoint=name, op=op, reason=reason) for op in ops)
            self._connection_mods.clear()
        for v in verdicts:
            name = v.endpoint.name
            out.extend(DroppedModification(endpoint=name, op=op, reason=reason) for op in v.decision.modifications)
        self._pending_discard = None
        return out


def _drop_reason(winner: Verdict | None) -> DropReason:
    if winner is not None and winner.action is ActionName.DISCARD:
        return DropReason.MESSAGE_DISCARDED
    return DropReason.MESSAGE_REFUSED
