"""The decision vocabulary shared by config, the webhook layer and the policy.

The enum values are the fixed public strings of the webhook contract
(design.md §3.3-3.5). Everything here is an immutable value: a parsed
endpoint answer (:class:`Decision` with its :class:`SmtpReply` and
modification ops), a :class:`Failure` of an endpoint call, and the slice of an
endpoint's settings the policy needs (:class:`EndpointPolicy`; policy does
not import ``config``).

Errors of the policy package::

    PolicyError              root of everything raised by milterbridge.policy
    ├── DecisionError        remote fault: an endpoint's response breaks the contract
    │                        (also a ValueError); the call counts as a failure
    └── PolicyUsageError     local fault: the caller broke the API (a bug; also a ValueError)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from milterbridge.milter.constants import Action, Event
from milterbridge.milter.messages import ReplyCode

_FROZEN: Final = {"frozen": True, "slots": True, "kw_only": True}


# --------------------------------------------------------------------------
# errors


class PolicyError(Exception):
    """Root of all policy errors."""


class DecisionError(PolicyError, ValueError):
    """An endpoint's response is not a valid decision; the message says which rule it broke."""


class PolicyUsageError(PolicyError, ValueError):
    """The caller used the policy API wrongly (unknown endpoint, missing outcome, wrong event)."""


# --------------------------------------------------------------------------
# enums (fixed public strings)


class ActionName(enum.StrEnum):
    """What an endpoint decided (the ``action`` key of a response)."""

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    SKIP = "skip"
    QUARANTINE = "quarantine"


class OnError(enum.StrEnum):
    """An endpoint's failure policy (config key ``on_error``)."""

    TEMPFAIL = "tempfail"
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"


class Mode(enum.StrEnum):
    """Whether an endpoint's decisions are applied (``enforce``) or only logged (``observe``)."""

    ENFORCE = "enforce"
    OBSERVE = "observe"


class OnOversize(enum.StrEnum):
    """What happens to a message over ``max_message_bytes``."""

    TEMPFAIL = "tempfail"
    REJECT = "reject"
    CONTINUE = "continue"


class ModOp(enum.StrEnum):
    """Modification operations (the ``op`` key)."""

    ADD_HEADER = "add_header"
    INSERT_HEADER = "insert_header"
    CHANGE_HEADER = "change_header"
    DELETE_HEADER = "delete_header"
    REPLACE_BODY = "replace_body"
    ADD_RCPT = "add_rcpt"
    DELETE_RCPT = "delete_rcpt"
    CHANGE_FROM = "change_from"


#: Every op: the default of an endpoint's ``allowed_ops``.
ALL_OPS: Final = frozenset(ModOp)


# --------------------------------------------------------------------------
# the contract's tables

_A = ActionName
_COMMON: Final = frozenset({_A.CONTINUE, _A.ACCEPT, _A.REJECT, _A.TEMPFAIL, _A.QUARANTINE})
_MESSAGE: Final = _COMMON | {_A.DISCARD}

#: Actions an endpoint may answer per decision event (design.md §3.3). Discard
#: is missing at connect/helo (Postfix ignores it there); accept, discard and
#: quarantine at unknown (they can crash Postfix's smtpd, milter-protocol.md
#: §9 items 22-23), and reject too: Postfix ignores a 5xx answer to an unknown
#: command, so a refusal there must be a 4xx tempfail.
LEGAL_ACTIONS: Final[Mapping[Event, frozenset[ActionName]]] = {
    Event.CONNECT: _COMMON,
    Event.HELO: _COMMON,
    Event.MAIL: _MESSAGE,
    Event.RCPT: _MESSAGE,
    Event.DATA: _MESSAGE,
    Event.HEADER: _MESSAGE | {_A.SKIP},
    Event.EOH: _MESSAGE,
    Event.BODY: _MESSAGE | {_A.SKIP},
    Event.EOM: _MESSAGE,
    Event.UNKNOWN: frozenset({_A.CONTINUE, _A.TEMPFAIL}),
}

#: Events whose response is ignored (notifications, design.md §3.1).
NOTIFICATION_EVENTS: Final = frozenset({Event.ABORT, Event.CLOSE})

#: Events where an accept or a quarantine covers the whole connection.
CONNECTION_EVENTS: Final = frozenset({Event.CONNECT, Event.HELO})


# --------------------------------------------------------------------------
# values

#: SMTP reply codes a reject may carry (5yz, permanent failure; RFC 5321 §4.2.1).
REJECT_CODES: Final = range(500, 600)
#: SMTP reply codes a tempfail may carry (4yz, transient failure).
TEMPFAIL_CODES: Final = range(400, 500)

#: Texts for a reply given with a code and no text: Postfix's own defaults for
#: a bare 'r' / 't' (milter-protocol.md §5.8).
DEFAULT_REJECT_TEXT: Final = b"Command rejected"
DEFAULT_TEMPFAIL_TEXT: Final = b"Service unavailable - try again later"


@dataclass(**_FROZEN)
class SmtpReply:
    """An SMTP reply an endpoint asked for: code, optional enhanced code, text lines.

    Construction checks that the reply can be put on the wire (4xx/5xx,
    enhanced class, line count and length, no CR/LF/NUL), so
    :meth:`to_milter` never fails.
    """

    code: int
    enhanced: str | None = None
    lines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.to_milter()  # raises ValueError when it would not encode

    def to_milter(self) -> ReplyCode:
        """The ``'y'`` reply in the portable multi-line format, ``%`` doubled.

        A bare code (``"550"``) fails Postfix's check that the 4th character is
        a space or ``-`` (milter-protocol.md §7.3), so: without text (none, or
        only empty lines) Postfix's own default text for the class is used,
        and without an enhanced code an empty line is sent as one space.
        """
        enhanced = (self.enhanced or "").encode("ascii")
        lines = [line.encode() for line in self.lines]
        if not any(lines):
            lines = [DEFAULT_REJECT_TEXT if self.code in REJECT_CODES else DEFAULT_TEMPFAIL_TEXT]
        elif not enhanced:
            lines = [line or b" " for line in lines]
        return ReplyCode.build(self.code, lines, enhanced)


class ModificationOp:
    """Base of the modification ops an endpoint can ask for (applied at end-of-message)."""

    __slots__ = ()

    @property
    def op(self) -> ModOp:
        """Which operation this is (the ``op`` key)."""
        raise NotImplementedError


@dataclass(**_FROZEN)
class AddHeaderOp(ModificationOp):
    """Append a header at the end of the header block.

    In the header ops, ``value`` is text (the response's ``value``, sent as
    UTF-8) or bytes (its ``value_b64``, sent exactly as they are).
    """

    @property
    def op(self) -> ModOp:
        return ModOp.ADD_HEADER

    name: str
    value: str | bytes


@dataclass(**_FROZEN)
class InsertHeaderOp(ModificationOp):
    """Insert a header after the ``index``-th header the endpoint received (0 = very top)."""

    @property
    def op(self) -> ModOp:
        return ModOp.INSERT_HEADER

    index: int
    name: str
    value: str | bytes


@dataclass(**_FROZEN)
class ChangeHeaderOp(ModificationOp):
    """Replace the value of the ``index``-th header named ``name`` (1-based, case-insensitive)."""

    @property
    def op(self) -> ModOp:
        return ModOp.CHANGE_HEADER

    name: str
    index: int
    value: str | bytes


@dataclass(**_FROZEN)
class DeleteHeaderOp(ModificationOp):
    """Delete the ``index``-th header named ``name`` (1-based, case-insensitive)."""

    @property
    def op(self) -> ModOp:
        return ModOp.DELETE_HEADER

    name: str
    index: int


@dataclass(**_FROZEN)
class ReplaceBodyOp(ModificationOp):
    """Replace the whole body with ``body`` (decoded from base64)."""

    @property
    def op(self) -> ModOp:
        return ModOp.REPLACE_BODY

    body: bytes


@dataclass(**_FROZEN)
class AddRcptOp(ModificationOp):
    """Add an envelope recipient, with optional ESMTP arguments (one per item)."""

    @property
    def op(self) -> ModOp:
        return ModOp.ADD_RCPT

    address: str
    args: tuple[str, ...] = ()


@dataclass(**_FROZEN)
class DeleteRcptOp(ModificationOp):
    """Remove an envelope recipient (Postfix: exact match on the address as received)."""

    @property
    def op(self) -> ModOp:
        return ModOp.DELETE_RCPT

    address: str


@dataclass(**_FROZEN)
class ChangeFromOp(ModificationOp):
    """Replace the envelope sender, with optional ESMTP arguments."""

    @property
    def op(self) -> ModOp:
        return ModOp.CHANGE_FROM

    address: str
    args: tuple[str, ...] = ()


#: Any modification op.
AnyOp = (
    AddHeaderOp
    | InsertHeaderOp
    | ChangeHeaderOp
    | DeleteHeaderOp
    | ReplaceBodyOp
    | AddRcptOp
    | DeleteRcptOp
    | ChangeFromOp
)

_OP_ACTION: Final[Mapping[ModOp, Action]] = {
    ModOp.ADD_HEADER: Action.ADD_HEADERS,
    ModOp.INSERT_HEADER: Action.ADD_HEADERS,
    ModOp.CHANGE_HEADER: Action.CHANGE_HEADERS,
    ModOp.DELETE_HEADER: Action.CHANGE_HEADERS,
    ModOp.REPLACE_BODY: Action.CHANGE_BODY,
    ModOp.ADD_RCPT: Action.ADD_RCPT,
    ModOp.DELETE_RCPT: Action.DELETE_RCPT,
    ModOp.CHANGE_FROM: Action.CHANGE_FROM,
}


def required_action(op: ModificationOp) -> Action:
    """The action bit the MTA must have granted for ``op`` (add_rcpt with args needs ADDRCPT_PAR)."""
    if isinstance(op, AddRcptOp) and op.args:
        return Action.ADD_RCPT_PAR
    return _OP_ACTION[op.op]


@dataclass(**_FROZEN)
class Decision:
    """One endpoint's answer to one event, validated.

    ``reply`` only with reject (5xx) or tempfail (4xx); construction refuses
    anything else so an invalid decision cannot exist.
    """

    action: ActionName
    reply: SmtpReply | None = None
    reason: str | None = None
    modifications: tuple[AnyOp, ...] = ()

    def __post_init__(self) -> None:
        reply = self.reply
        if reply is None:
            return
        if self.action is ActionName.REJECT and reply.code not in REJECT_CODES:
            raise ValueError(f"reject needs a 5xx reply, got {reply.code}")
        if self.action is ActionName.TEMPFAIL and reply.code not in TEMPFAIL_CODES:
            raise ValueError(f"tempfail needs a 4xx reply, got {reply.code}")
        if self.action not in (ActionName.REJECT, ActionName.TEMPFAIL):
            raise ValueError(f"a reply is allowed only with reject or tempfail, not {self.action}")


#: The answer of a 204, an empty body, or an endpoint with nothing to say.
CONTINUE: Final = Decision(action=ActionName.CONTINUE)


@dataclass(**_FROZEN)
class Failure:
    """An endpoint call that produced no valid decision (timeout, error status, invalid body...)."""

    reason: str


#: What the dispatcher hands the policy for one endpoint and one event.
Outcome = Decision | Failure


@dataclass(**_FROZEN)
class EndpointPolicy:
    """The part of an endpoint's settings the policy needs.

    ``index`` is the endpoint's position in the config: ties in the merge go
    to the lowest index.
    """

    name: str
    index: int
    events: frozenset[Event] = frozenset({Event.EOM})
    mode: Mode = Mode.ENFORCE
    on_error: OnError = OnError.TEMPFAIL
    include_body: bool = False

    @property
    def enforcing(self) -> bool:
        """True when the endpoint's decisions are applied."""
        return self.mode is Mode.ENFORCE
