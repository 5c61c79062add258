"""Merging several endpoints' decisions, and the failure rules (design.md §3.4-3.5).

* Severity: reject > tempfail > discard > quarantine > continue. ``skip`` and
  ``accept`` merge like continue (accept only marks its endpoint done).
  Tempfail ranks above discard because a retry loses nothing.
* Ties go to the endpoint listed first (lowest :attr:`EndpointPolicy.index`),
  which also supplies the reply and the reason.
* At ``rcpt`` the recipient verdict (reject/tempfail of this recipient) and the
  message verdict (discard/quarantine) are merged apart: :func:`merge_rcpt`.
* Only enforcing endpoints take part: a verdict from an ``observe`` endpoint is
  skipped here even if a caller passes one.
* A failure merges as if the endpoint had answered its ``on_error`` action at
  that event (:func:`failure_decision`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from milterbridge.milter.constants import Event
from milterbridge.milter.messages import Reject, Reply, TempFail

from .model import (
    CONTINUE,
    LEGAL_ACTIONS,
    NOTIFICATION_EVENTS,
    ActionName,
    Decision,
    EndpointPolicy,
    Failure,
    OnError,
    PolicyUsageError,
)


class Severity(enum.IntEnum):
    """Merge rank of an action: the higher rank wins; ``NONE`` (0, so false) never wins over anything."""

    NONE = 0  # continue, skip and accept
    QUARANTINE = 1
    DISCARD = 2
    TEMPFAIL = 3
    REJECT = 4


#: Merge rank of each action.
SEVERITY: Final[Mapping[ActionName, Severity]] = {
    ActionName.REJECT: Severity.REJECT,
    ActionName.TEMPFAIL: Severity.TEMPFAIL,
    ActionName.DISCARD: Severity.DISCARD,
    ActionName.QUARANTINE: Severity.QUARANTINE,
    ActionName.CONTINUE: Severity.NONE,
    ActionName.SKIP: Severity.NONE,
    ActionName.ACCEPT: Severity.NONE,
}

_RECIPIENT_ACTIONS: Final = frozenset({ActionName.REJECT, ActionName.TEMPFAIL})
_MESSAGE_ACTIONS: Final = frozenset({ActionName.DISCARD, ActionName.QUARANTINE})


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One endpoint's effective decision at one event.

    ``failure`` holds the failure reason when ``decision`` came from the
    endpoint's ``on_error`` rather than from its response.
    """

    endpoint: EndpointPolicy
    decision: Decision
    failure: str | None = None

    @property
    def action(self) -> ActionName:
        """The decided action."""
        return self.decision.action

    @property
    def severity(self) -> Severity:
        """The action's merge rank."""
        return SEVERITY[self.decision.action]


def _key(v: Verdict) -> tuple[int, int, str]:
    # The name breaks ties between equal indexes, so the result never depends
    # on the order the verdicts arrive in.
    return (-v.severity, v.endpoint.index, v.endpoint.name)


def merge(verdicts: Iterable[Verdict]) -> Verdict | None:
    """The winning verdict of enforcing endpoints, or ``None`` when all are continue-like."""
    best: Verdict | None = None
    for v in verdicts:
        if not v.endpoint.enforcing or not v.severity:
            continue
        if best is None or _key(v) < _key(best):
            best = v
    return best


def merge_rcpt(verdicts: Iterable[Verdict]) -> tuple[Verdict | None, Verdict | None]:
    """At ``rcpt``: (recipient verdict, message verdict), merged apart."""
    items = list(verdicts)
    recipient = merge(v for v in items if v.action in _RECIPIENT_ACTIONS)
    message = merge(v for v in items if v.action in _MESSAGE_ACTIONS)
    return recipient, message


_ON_ERROR_ACTION: Final[Mapping[OnError, ActionName]] = {
    OnError.TEMPFAIL: ActionName.TEMPFAIL,
    OnError.CONTINUE: ActionName.CONTINUE,
    OnError.ACCEPT: ActionName.ACCEPT,
    OnError.REJECT: ActionName.REJECT,
}


def failure_decision(endpoint: EndpointPolicy, event: Event, failure: Failure) -> Decision:
    """The decision a failure stands for: the endpoint's ``on_error`` action at ``event``.

    Where that action is not legal, the nearest legal one is used:

    * at ``unknown``, ``accept`` becomes continue (an ``'a'`` there can crash
      Postfix's smtpd) and ``reject`` becomes tempfail (Postfix ignores a 5xx
      answer to an unknown command; a 4xx is the only refusal it honours);
    * at ``abort``/``close`` (notifications) nothing applies: continue.

    At ``rcpt`` a tempfail refuses only that recipient, with the MTA's default
    451 text. The decision carries no reply (the MTA's default text is used)
    and no modifications; its ``reason`` names the failure.
    """
    if event in NOTIFICATION_EVENTS:
        return CONTINUE
    legal = LEGAL_ACTIONS.get(event)
    if legal is None:
        raise PolicyUsageError(f"{event} is not a decision event")
    action = _ON_ERROR_ACTION[endpoint.on_error]
    if action not in legal:
        action = ActionName.TEMPFAIL if action is ActionName.REJECT else ActionName.CONTINUE
    return Decision(action=action, reason=f"endpoint {endpoint.name} failed: {failure.reason}")


def refusal_reply(decision: Decision) -> Reply:
    """The milter reply for a reject or tempfail decision (``'y'`` when it has a reply text)."""
    if decision.reply is not None:
        return decision.reply.to_milter()
    if decision.action is ActionName.REJECT:
        return Reject()
    if decision.action is ActionName.TEMPFAIL:
        return TempFail()
    raise PolicyUsageError(f"{decision.action} is not a refusal")
