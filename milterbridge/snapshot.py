"""Everything derived from one config, built once: a reload builds a new snapshot.

A connection keeps the snapshot it started with until it ends, so a reload never changes
the rules in the middle of a message. The endpoints (settings, policy view, prepared HTTP
request head, circuit breaker) are built here and nowhere else; an unchanged endpoint keeps
its breaker across a reload (``endpoint.build_endpoints``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from milterbridge.config import Config, reply_limits
from milterbridge.endpoint import Endpoint, build_endpoints
from milterbridge.milter.constants import Action, Event
from milterbridge.milter.context import ConnectionContext
from milterbridge.milter.messages import Command, Negotiate, NegotiateReply
from milterbridge.milter.mta import Mta, ReplyLimits, identify
from milterbridge.milter.negotiation import Negotiated, Requirements, negotiate, requirements
from milterbridge.milter.session import EVENT_OF
from milterbridge.policy.apply import POSTFIX_NUMBERING, HeaderNumbering, sendmail_numbering
from milterbridge.policy.conditions import Condition
from milterbridge.policy.model import Mode, OnOversize
from milterbridge.policy.transaction import PolicyEndpoints, PolicyState
from milterbridge.settings import MTA_AUTO

log = logging.getLogger("milterbridge.dispatch")

#: Distinct MTA offers whose answer is kept (Postfix always sends the same one).
_MAX_CACHED_OFFERS = 64


@dataclass(frozen=True, slots=True)
class MtaProfile:
    """What the bridge follows at a connection from one MTA: its header numbering and waits."""

    numbering: HeaderNumbering
    limits: ReplyLimits
    #: ``limits.budget_caps()``, computed once.
    caps: Mapping[Event, float] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "caps", self.limits.budget_caps())


class Snapshot:
    """One config's endpoints, negotiation and rules; see the module docstring.

    Raises ValueError/OSError when an endpoint cannot be prepared (a TLS file, a secret).
    """

    def __init__(self, config: Config, previous: Snapshot | None = None) -> None:
        self.config = config
        self.endpoints: tuple[Endpoint, ...] = build_endpoints(
            config.endpoints, previous.endpoints if previous is not None else ()
        )
        self.policies = PolicyEndpoints([ep.policy for ep in self.endpoints])
        subscribed = {e for ep in self.endpoints for e in ep.settings.events}
        #: Whether any endpoint wants the message body (it is kept only then).
        self.keep_body = any(ep.settings.include_body for ep in self.endpoints)
        self.requirements: Requirements = requirements(
            subscribed,
            {e for ep in self.endpoints if ep.settings.mode is Mode.ENFORCE for e in ep.settings.events},
            macros=(m.encode() for ep in self.endpoints for m in ep.settings.macros),
            body=self.keep_body,
        )
        #: Endpoint name -> its ``when``, for the endpoints that have one. Empty: no condition
        #: anywhere, and connections take the handler without condition checks.
        self.conditions: dict[str, Condition] = {
            ep.name: ep.settings.when for ep in self.endpoints if ep.settings.when is not None
        }
        self.conditional = bool(self.conditions)
        if self.conditional:
            self.requirements = with_condition_macros(self.requirements, self.conditions.values())
        self._subscribers: dict[Event, tuple[Endpoint, ...]] = {
            event: tuple(ep for ep in self.endpoints if event in ep.settings.events) for event in Event
        }
        #: Commands whose event no endpoint subscribes to: no request is built for them.
        self.unsubscribed: frozenset[type[Command]] = frozenset(
            kind for kind, event in EVENT_OF.items() if event not in subscribed
        )
        #: Whether a message over a limit is refused (on_oversize tempfail or reject) rather than
        #: passed on to the endpoints with what was kept (continue).
        self.refuse_over_limit = config.server.on_oversize is not OnOversize.CONTINUE
        #: A placeholder policy until a connection has negotiated (it is never asked to decide).
        self.idle_policy = PolicyState(self.policies, actions=Action.NONE, skip_negotiated=False)
        self._negotiations: dict[tuple[int, int, int], tuple[Negotiated, NegotiateReply]] = {}
        limits = reply_limits(config.sendmail)
        self.profiles: Mapping[Mta, MtaProfile] = {
            Mta.POSTFIX: MtaProfile(POSTFIX_NUMBERING, limits[Mta.POSTFIX]),
            Mta.SENDMAIL: MtaProfile(sendmail_numbering(config.sendmail.header_lines), limits[Mta.SENDMAIL]),
        }
        #: The MTA ``[server] mta`` names; None for ``auto`` (told per connection).
        self.mta: Mta | None = None if config.server.mta == MTA_AUTO else Mta(config.server.mta)
        #: One warning per config about an MTA that the v macro does not name as expected.
        self._mta_logged = False

    def subscribers(self, event: Event) -> Sequence[Endpoint]:
        """Every endpoint subscribed to ``event`` (both modes; used for the notifications)."""
        return self._subscribers[event]

    def negotiate(self, offer: Negotiate) -> tuple[Negotiated, NegotiateReply, bool]:
        """Our answer to an offer, computed once per distinct offer.

        Returns the outcome, the reply and whether this offer was new (so its warnings are
        logged once, not per connection).
        """
        key = (offer.version, int(offer.actions), int(offer.protocol))
        cached = self._negotiations.get(key)
        if cached is not None:
            return cached[0], cached[1], False
        got = negotiate(offer, self.requirements)
        reply = got.reply()
        if len(self._negotiations) < _MAX_CACHED_OFFERS:
            self._negotiations[key] = (got, reply)
        return got, reply, True

    def mta_profile(self, connection: ConnectionContext) -> MtaProfile:
        """The profile for a connection: the configured MTA's, else the one its ``v`` macro names.

        An MTA that cannot be told is taken for Postfix, and a configured MTA that the ``v`` macro
        contradicts is kept; either is said once per config, at warning.
        """
        version = connection.macros.get(b"v")
        told = identify(version)
        mta = self.mta or told
        if not self._mta_logged and (mta is None or (told is not None and told is not mta)):
            self._mta_logged = True
            _warn_about_mta(mta, told, version)
        return self.profiles[mta or Mta.POSTFIX]

    def breaker_states(self) -> dict[str, str]:
        """Breaker state per endpoint name (``closed``, ``open``, ``half_open``), for metrics."""
        return {ep.name: str(ep.breaker.state) for ep in self.endpoints}

    def budgets(self) -> dict[tuple[str, str], float]:
        """The budget in seconds per (endpoint name, event name) for the events each endpoint is called at."""
        return {(ep.name, str(event)): ep.timeouts[event] for ep in self.endpoints for event in ep.settings.events}


def _warn_about_mta(mta: Mta | None, told: Mta | None, version: bytes | None) -> None:
    shown = repr(version.decode("utf-8", "replace")) if version is not None else "not sent"
    if mta is None:
        log.warning(
            "cannot tell the MTA from its v macro (%s); following Postfix's header numbering and timeouts; "
            "set [server] mta to say which MTA connects",
            shown,
        )
    elif told is not None:
        log.warning(
            "[server] mta is %s, but the v macro (%s) names %s: header inserts and timeouts follow %s",
            mta.value,
            shown,
            told.value,
            mta.value,
        )


def with_condition_macros(needed: Requirements, conditions: Iterable[Condition]) -> Requirements:
    """``needed`` with the macros the conditions look at, each at its stage (Postfix's defaults
    hold them today; this keeps the conditions working whatever those lists become)."""
    macros = {stage: list(names) for stage, names in needed.macros.items()}
    for condition in conditions:
        for stage, name in condition.macros:
            names = macros.setdefault(stage, [])
            if name not in names:
                names.append(name)
    return dataclasses.replace(needed, macros={stage: tuple(names) for stage, names in macros.items()})
