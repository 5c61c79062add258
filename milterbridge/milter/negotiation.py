"""Option negotiation: our OPTNEG answer from what we need and what the MTA offers.

The rule (milter-protocol.md §4.4): answer version ``min(6, offered)``, ask
for actions that are a subset of the offer, switch off events nobody needs
(``SMFIP_NO*``) and negotiate as no-reply the events we never decide on
(``SMFIP_NR_*``), each bit ANDed with the offer. Fewer round trips is the main
performance lever, so the caller states exactly which events it needs.

:func:`requirements` derives what we need from the endpoints' subscriptions
(design.md §3.6); :func:`negotiate` meets it with the MTA's offer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .constants import (
    ALL_ACTIONS,
    EVENT_FLAGS,
    INTERNAL_PROTOCOL,
    MILTER_VERSION,
    MIN_MILTER_VERSION,
    V1_ACTIONS,
    V1_PROTOCOL,
    Action,
    Event,
    MacroStage,
    Protocol,
)
from .errors import NegotiationError
from .messages import Negotiate, NegotiateReply

#: Events that can appear in a requirement's ``events`` (``eom`` is always sent).
NEGOTIABLE_EVENTS = frozenset(EVENT_FLAGS)

#: Events always requested from the MTA: they build the payload context.
CONTEXT_EVENTS: Final = frozenset({Event.CONNECT, Event.HELO, Event.MAIL, Event.RCPT, Event.HEADER})
#: Events requested only when an endpoint subscribes.
OPTIONAL_EVENTS: Final = frozenset({Event.DATA, Event.EOH, Event.UNKNOWN, Event.BODY})

#: Postfix's default macro lists per stage (milter-protocol.md §8.1), always
#: requested so that the payload carries them whatever main.cf says.
DEFAULT_MACROS: Final[Mapping[MacroStage, tuple[bytes, ...]]] = {
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirements:
    """What the milter needs from the MTA.

    ``events`` are delivered; of those, only ``reply_events`` are answered,
    the rest are negotiated as no-reply where the MTA allows it. ``eom`` is
    always delivered and answered (no flag exists for it). :func:`requirements`
    builds the bridge's from its endpoints.
    """

    events: frozenset[Event] = NEGOTIABLE_EVENTS
    reply_events: frozenset[Event] = NEGOTIABLE_EVENTS
    #: Actions wanted; what the MTA lacks is reported in ``Negotiated.missing_actions``.
    actions: Action = ALL_ACTIONS & ~Action.SETSYMLIST
    #: Actions without which we refuse the connection.
    required_actions: Action = Action.NONE
    #: Macro names to request per stage (names as the MTA spells them).
    macros: Mapping[MacroStage, tuple[bytes, ...]] = field(default_factory=dict)
    header_leading_space: bool = True
    skip: bool = True
    rcpt_rejected: bool = False

    def __post_init__(self) -> None:
        extra = (self.events | self.reply_events) - NEGOTIABLE_EVENTS
        if extra:
            raise ValueError(f"not negotiable events: {sorted(extra)}")
        if not self.reply_events <= self.events:
            raise ValueError("reply_events must be a subset of events")
        if self.required_actions & ~self.actions:
            raise ValueError("required_actions must be a subset of actions")


@dataclass(frozen=True, slots=True, kw_only=True)
class Negotiated:
    """The outcome of one negotiation, with what could not be had."""

    version: int
    actions: Action
    protocol: Protocol
    macros: tuple[tuple[MacroStage, bytes], ...]
    #: Wanted actions the MTA did not offer (log them; we carry on without).
    missing_actions: Action
    #: Events wanted no-reply that the MTA offers no ``SMFIP_NR_*`` bit for: reply "continue".
    forced_replies: frozenset[Event]
    #: Wanted events the MTA will not send at this version or offer.
    unavailable_events: frozenset[Event]

    @property
    def skip(self) -> bool:
        """SMFIP_SKIP was agreed: 's' may answer a body chunk."""
        return bool(self.protocol & Protocol.SKIP)

    def reply(self) -> NegotiateReply:
        """The OPTNEG answer to send."""
        return NegotiateReply(version=self.version, actions=self.actions, protocol=self.protocol, macros=self.macros)


def requirements(
    subscribed: Iterable[Event],
    enforced: Iterable[Event],
    *,
    macros: Iterable[bytes] = (),
    body: bool = False,
) -> Requirements:
    """What the bridge needs from the MTA, from what its endpoints ask for (design.md §3.6).

    ``subscribed``: the events some endpoint subscribes to; ``enforced``: those some
    enforce-mode endpoint subscribes to (only these are answered, the rest are no-reply);
    ``macros``: extra macro names endpoints ask for, requested at every stage after
    :data:`DEFAULT_MACROS`; ``body``: some endpoint wants the message body, so body chunks
    are delivered even when nobody subscribes to ``body``. :data:`CONTEXT_EVENTS` are
    always delivered, :data:`OPTIONAL_EVENTS` when subscribed.
    """
    events = set(CONTEXT_EVENTS) | (set(subscribed) & OPTIONAL_EVENTS)
    if body:
        events.add(Event.BODY)  # no-reply unless an enforcing endpoint subscribes
    extra = tuple(dict.fromkeys(macros))
    return Requirements(
        events=frozenset(events),
        reply_events=frozenset(enforced) & events,
        actions=ALL_ACTIONS & ~Action.SETSYMLIST,
        macros={stage: tuple(dict.fromkeys(names + extra)) for stage, names in DEFAULT_MACROS.items()},
    )


def negotiate(offer: Negotiate, requirements: Requirements) -> Negotiated:
    """Compute our answer to ``offer``; raises NegotiationError if it is unusable."""
    if offer.version < MIN_MILTER_VERSION:
        raise NegotiationError(f"MTA protocol version {offer.version} is too old (need >= 2)")
    version = min(MILTER_VERSION, offer.version)
    # An MTA offering nothing means the version-1 sets (libmilter does the same).
    offered_actions = offer.actions or V1_ACTIONS
    offered_protocol = (offer.protocol or V1_PROTOCOL) & ~INTERNAL_PROTOCOL

    missing_required = requirements.required_actions & ~offered_actions
    if missing_required:
        raise NegotiationError(f"MTA does not offer required actions: {missing_required!r}")

    actions = requirements.actions & offered_actions & ALL_ACTIONS
    protocol = Protocol.NONE
    forced: set[Event] = set()
    unavailable: set[Event] = set()
    for event, (skip_bit, noreply_bit, since) in EVENT_FLAGS.items():
        if event not in requirements.events:
            protocol |= skip_bit & offered_protocol
            continue
        if version < since:
            unavailable.add(event)
            continue
        if event not in requirements.reply_events:
            if noreply_bit & offered_protocol:
                protocol |= noreply_bit
            else:
                forced.add(event)
    wanted_caps = Protocol.NONE
    if requirements.header_leading_space:
        wanted_caps |= Protocol.HDR_LEADSPC
    if requirements.skip:
        wanted_caps |= Protocol.SKIP
    if requirements.rcpt_rejected:
        wanted_caps |= Protocol.RCPT_REJ
    protocol |= wanted_caps & offered_protocol

    macros: tuple[tuple[MacroStage, bytes], ...] = ()
    if requirements.macros and Action.SETSYMLIST & offered_actions:
        actions |= Action.SETSYMLIST
        macros = tuple((stage, b" ".join(names)) for stage, names in sorted(requirements.macros.items()) if names)
    return Negotiated(
        version=version,
        actions=actions,
        protocol=protocol,
        macros=macros,
        missing_actions=requirements.actions & ~offered_actions,
        forced_replies=frozenset(forced),
        unavailable_events=frozenset(unavailable),
    )
