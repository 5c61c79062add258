"""What the policy of one milter connection remembers between events.

:class:`~milterbridge.policy.transaction.PolicyState` decides; the
:class:`Ledger` it keeps records and forgets. Two scopes, one :class:`Scope`
each:

* the connection: answers given at connect or helo, which hold for every
  message of the SMTP session;
* the current message: answers given at every later event, forgotten when the
  message ends (end-of-message or abort).

Each scope holds the endpoints done with it (they answered ``accept``, or
their ``when`` excluded them: done with ``continue``), the modifications
waiting for end-of-message and a remembered quarantine. The message alone also
holds the event kinds each endpoint skips, a discard deferred behind a
recipient refusal at rcpt and the endpoints whose ``when`` excludes the
current recipient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milterbridge.milter.constants import Event

from .apply import DroppedModification, DropReason
from .merge import Verdict, merge
from .model import CONNECTION_EVENTS, ActionName, AnyOp, EndpointPolicy


@dataclass(slots=True)
class Scope:
    """What one scope remembers: who is done with it, the modifications kept, a quarantine."""

    done: set[str] = field(default_factory=set)
    mods: dict[str, list[AnyOp]] = field(default_factory=dict)
    quarantine: Verdict | None = None

    def clear(self) -> None:
        """Forget everything."""
        self.done.clear()
        self.mods.clear()
        self.quarantine = None

    def drop_mods(self, reason: DropReason) -> list[DroppedModification]:
        """Forget the kept modifications, reporting each as dropped for ``reason``."""
        out = [
            DroppedModification(endpoint=name, op=op, reason=reason) for name, ops in self.mods.items() for op in ops
        ]
        self.mods.clear()
        return out


class Ledger:
    """The policy's memory of one milter connection: a connection scope and a message scope."""

    def __init__(self) -> None:
        self.connection = Scope()
        self.message = Scope()
        #: endpoint name -> the event kinds it skips for the rest of the message
        self.skipping: dict[str, set[Event]] = {}
        #: a message discard waiting for an event where Postfix honours it (set at rcpt)
        self.discard: Verdict | None = None
        #: endpoints not called for the current recipient (their ``recipient_domains`` do not match it)
        self.passing: frozenset[str] = frozenset()

    def scope(self, event: Event) -> Scope:
        """The scope an answer at ``event`` belongs to."""
        return self.connection if event in CONNECTION_EVENTS else self.message

    @property
    def has_pending(self) -> bool:
        """True while modifications, a quarantine or a discard wait for a later event."""
        connection, message = self.connection, self.message
        return bool(
            any(connection.mods.values())
            or any(message.mods.values())
            or connection.quarantine
            or message.quarantine
            or self.discard
        )

    def remembered(self) -> list[Verdict]:
        """The verdicts waiting for end-of-message: the discard, then the quarantines (message first)."""
        return [v for v in (self.discard, self.message.quarantine, self.connection.quarantine) if v is not None]

    def modifications(
        self, endpoints: tuple[EndpointPolicy, ...], verdicts: list[Verdict]
    ) -> list[tuple[str, list[AnyOp]]]:
        """``(endpoint, ops)`` in the order of ``endpoints``, for those with any.

        Each endpoint's ops in the order asked: kept at connection scope, kept
        at message scope, then those of its verdict in ``verdicts`` (the
        current event's).
        """
        latest = {v.endpoint.name: v.decision.modifications for v in verdicts}
        connection, message = self.connection.mods, self.message.mods
        out = []
        for ep in endpoints:
            ops = [*connection.get(ep.name, ()), *message.get(ep.name, ()), *latest.get(ep.name, ())]
            if ops:
                out.append((ep.name, ops))
        return out

    def record(self, event: Event, verdicts: list[Verdict]) -> None:
        """Remember the accepts, skips and modifications of an event whose message goes on."""
        scope = self.connection if event in CONNECTION_EVENTS else self.message
        for v in verdicts:
            name = v.endpoint.name
            if v.action is ActionName.ACCEPT:
                scope.done.add(name)
            elif v.action is ActionName.SKIP:
                self.skipping.setdefault(name, set()).add(event)
            if v.decision.modifications:
                scope.mods.setdefault(name, []).extend(v.decision.modifications)

    def remember_quarantines(self, event: Event, verdicts: list[Verdict]) -> None:
        """Merge the quarantines among ``verdicts`` into the one kept by the event's scope."""
        new = [v for v in verdicts if v.action is ActionName.QUARANTINE]
        if not new:
            return
        scope = self.scope(event)
        old = scope.quarantine
        scope.quarantine = merge([*([old] if old else []), *new])

    def drop_endpoint(self, name: str) -> list[DroppedModification]:
        """Forget what a failing endpoint asked for earlier (both scopes), reporting each op."""
        ops = [*self.connection.mods.pop(name, ()), *self.message.mods.pop(name, ())]
        return [DroppedModification(endpoint=name, op=op, reason=DropReason.ENDPOINT_FAILED) for op in ops]

    def drop_message(
        self, reason: DropReason, verdicts: list[Verdict], *, include_connection: bool
    ) -> list[DroppedModification]:
        """Report and forget the ops of a message that ends without end-of-message changes.

        Those kept for the message, those of the current ``verdicts`` and, when
        the session ends too, those kept for the connection. The deferred
        discard is forgotten as well.
        """
        out = self.message.drop_mods(reason)
        if include_connection:
            out.extend(self.connection.drop_mods(reason))
        for v in verdicts:
            name = v.endpoint.name
            out.extend(DroppedModification(endpoint=name, op=op, reason=reason) for op in v.decision.modifications)
        self.discard = None
        return out

    def reset_message(self) -> None:
        """Forget the message scope; idempotent."""
        self.message.clear()
        self.skipping.clear()
        self.discard = None
        self.passing = frozenset()
