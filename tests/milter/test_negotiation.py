"""Negotiation tests: requirements from the endpoints, our OPTNEG answer from them and the MTA's offer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event, MacroStage, Protocol
from milterbridge.milter.errors import NegotiationError
from milterbridge.milter.negotiation import (
    CONTEXT_EVENTS,
    DEFAULT_MACROS,
    OPTIONAL_EVENTS,
    Requirements,
    negotiate,
    requirements,
)

# What Postfix offers for each milter_protocol setting (milter-protocol.md §4.5).
POSTFIX_OFFERS = {
    2: m.Negotiate(version=2, actions=Action(0x1FF), protocol=Protocol(0x7F)),
    3: m.Negotiate(version=3, actions=Action(0x1FF), protocol=Protocol(0x17F)),
    4: m.Negotiate(version=4, actions=Action(0x1FF), protocol=Protocol(0x37F)),
    6: m.Negotiate(version=6, actions=Action(0x1FF), protocol=Protocol(0x1FFFFF)),
}

EOM_ONLY = Requirements(events=frozenset({Event.RCPT}), reply_events=frozenset())


@pytest.mark.parametrize("version", [2, 3, 4, 6])
def test_version_never_above_offer(version: int) -> None:
    """We answer min(6, offered) and only offered bits."""
    offer = POSTFIX_OFFERS[version]
    got = negotiate(offer, Requirements())
    assert got.version == version
    assert not got.protocol & ~offer.protocol
    assert not got.actions & ~offer.actions


def test_v6_no_reply_and_skips() -> None:
    """Unwanted events are switched off; context-only events are no-reply."""
    got = negotiate(POSTFIX_OFFERS[6], EOM_ONLY)
    assert got.protocol & Protocol.NR_RCPT
    assert got.protocol & Protocol.NO_CONNECT
    assert got.protocol & Protocol.NO_HEADERS
    assert got.protocol & Protocol.NO_BODY
    assert not got.protocol & Protocol.NO_RCPT
    assert got.protocol & Protocol.HDR_LEADSPC
    assert got.protocol & Protocol.SKIP
    assert got.forced_replies == frozenset()


def test_v2_cannot_do_no_reply() -> None:
    """At version 2 the NR bits are not offered: those events need a 'continue' from us."""
    got = negotiate(POSTFIX_OFFERS[2], EOM_ONLY)
    assert not got.protocol & Protocol.NR_RCPT
    assert got.forced_replies == {Event.RCPT}
    assert not got.protocol & Protocol.HDR_LEADSPC


@pytest.mark.parametrize(("version", "unavailable"), [(2, {Event.DATA, Event.UNKNOWN}), (3, {Event.DATA}), (4, set())])
def test_old_versions_lack_events(version: int, unavailable: set[Event]) -> None:
    """DATA needs version 4 and UNKNOWN version 3: reported as unavailable."""
    got = negotiate(POSTFIX_OFFERS[version], Requirements())
    assert got.unavailable_events == unavailable


def test_missing_required_action_refused() -> None:
    """An offer without a required action is refused with a clear error."""
    offer = m.Negotiate(version=6, actions=Action.ADD_HEADERS, protocol=Protocol(0x1FFFFF))
    req = Requirements(actions=Action.ADD_HEADERS | Action.CHANGE_FROM, required_actions=Action.CHANGE_FROM)
    with pytest.raises(NegotiationError, match="CHANGE_FROM"):
        negotiate(offer, req)


def test_missing_wanted_action_reported() -> None:
    """A wanted but not offered action is reported, not fatal."""
    offer = m.Negotiate(version=6, actions=Action.ADD_HEADERS, protocol=Protocol(0x1FFFFF))
    got = negotiate(offer, Requirements(actions=Action.ADD_HEADERS | Action.QUARANTINE))
    assert got.actions == Action.ADD_HEADERS
    assert got.missing_actions == Action.QUARANTINE


def test_too_old_mta_refused() -> None:
    """Protocol version 1 is refused, as libmilter does."""
    with pytest.raises(NegotiationError):
        negotiate(m.Negotiate(version=1, actions=Action(0xF), protocol=Protocol(0x3F)), Requirements())


def test_zero_offer_means_v1_sets() -> None:
    """An MTA offering no actions/protocol bits is taken to offer the version-1 sets."""
    got = negotiate(m.Negotiate(version=2, actions=Action.NONE, protocol=Protocol.NONE), EOM_ONLY)
    assert got.actions == Action(0x0F) & Requirements().actions
    assert got.protocol & Protocol.NO_HEADERS


def test_macro_lists_requested() -> None:
    """Macro lists go into the answer with SETSYMLIST, in stage order."""
    req = Requirements(macros={MacroStage.ENVFROM: (b"i", b"{auth_authen}"), MacroStage.CONNECT: (b"j",)})
    got = negotiate(POSTFIX_OFFERS[6], req)
    assert got.actions & Action.SETSYMLIST
    assert got.macros == ((MacroStage.CONNECT, b"j"), (MacroStage.ENVFROM, b"i {auth_authen}"))
    wire = got.reply().to_frame()
    assert b"i {auth_authen}\0" in wire


def test_requirements_validated() -> None:
    """reply_events outside events is a programming error caught early."""
    with pytest.raises(ValueError):
        Requirements(events=frozenset(), reply_events=frozenset({Event.RCPT}))


# ------------------------------------------------------------------ requirements()

CONTEXT = {Event.CONNECT, Event.HELO, Event.MAIL, Event.RCPT, Event.HEADER}


@pytest.mark.parametrize(
    ("subscribed", "enforced", "body", "events", "reply_events"),
    [
        pytest.param(set(), set(), False, CONTEXT, set(), id="nobody"),
        pytest.param({Event.EOM}, {Event.EOM}, False, CONTEXT, set(), id="eom-only"),
        pytest.param(
            {Event.RCPT, Event.EOM}, {Event.RCPT, Event.EOM}, False, CONTEXT, {Event.RCPT}, id="enforced-rcpt"
        ),
        pytest.param({Event.RCPT, Event.EOM}, set(), False, CONTEXT, set(), id="observed-rcpt-is-no-reply"),
        pytest.param(
            {Event.DATA, Event.EOH, Event.UNKNOWN, Event.ABORT, Event.CLOSE},
            {Event.EOH},
            False,
            CONTEXT | {Event.DATA, Event.EOH, Event.UNKNOWN},
            {Event.EOH},
            id="optional-events-when-subscribed",
        ),
        pytest.param(set(), set(), True, CONTEXT | {Event.BODY}, set(), id="include-body-without-subscriber"),
        pytest.param({Event.BODY}, {Event.BODY}, False, CONTEXT | {Event.BODY}, {Event.BODY}, id="enforced-body"),
        pytest.param({Event.BODY}, {Event.BODY}, True, CONTEXT | {Event.BODY}, {Event.BODY}, id="body-both-ways"),
    ],
)
def test_requirements_events(
    subscribed: set[Event], enforced: set[Event], body: bool, events: set[Event], reply_events: set[Event]
) -> None:
    """Context events always, optional ones when subscribed (body also for include_body); enforced ones answered."""
    got = requirements(subscribed, enforced, body=body)
    assert got.events == events
    assert got.reply_events == reply_events
    assert got.actions == ALL_ACTIONS & ~Action.SETSYMLIST
    assert got.required_actions == Action.NONE


def test_requirements_macros_add_to_every_stage_once() -> None:
    """Extra macro names follow each stage's defaults, deduplicated, in the order first asked for."""
    got = requirements(set(), set(), macros=[b"{x}", b"i", b"{y}", b"{x}"])
    assert set(got.macros) == set(DEFAULT_MACROS)
    assert got.macros[MacroStage.DATA] == (b"i", b"{x}", b"{y}")
    assert got.macros[MacroStage.CONNECT] == (*DEFAULT_MACROS[MacroStage.CONNECT], b"{x}", b"i", b"{y}")
    assert requirements(set(), set()).macros == DEFAULT_MACROS


def test_requirements_take_iterators() -> None:
    """Each argument is read once, so generators work."""
    got = requirements(iter([Event.DATA]), iter([Event.DATA, Event.RCPT]), macros=(n for n in [b"{z}"]))
    assert Event.DATA in got.events
    assert got.reply_events == {Event.DATA, Event.RCPT}
    assert got.macros[MacroStage.EOM] == (b"i", b"{z}")


@given(
    subscribed=st.sets(st.sampled_from(list(Event))),
    enforced=st.sets(st.sampled_from(list(Event))),
    body=st.booleans(),
)
def test_requirements_properties(subscribed: set[Event], enforced: set[Event], body: bool) -> None:
    """Whatever the endpoints ask, the result is a valid Requirements that Postfix's offer can meet."""
    enforced &= subscribed
    got = requirements(subscribed, enforced, body=body)
    assert CONTEXT_EVENTS <= got.events <= CONTEXT_EVENTS | OPTIONAL_EVENTS
    assert got.events - CONTEXT_EVENTS == (subscribed & OPTIONAL_EVENTS) | ({Event.BODY} if body else set())
    assert got.reply_events == enforced & got.events
    negotiated = negotiate(POSTFIX_OFFERS[6], got)
    for event in got.events - got.reply_events:
        assert negotiated.protocol & EVENT_NR_BIT[event]


EVENT_NR_BIT = {
    Event.CONNECT: Protocol.NR_CONNECT,
    Event.HELO: Protocol.NR_HELO,
    Event.MAIL: Protocol.NR_MAIL,
    Event.RCPT: Protocol.NR_RCPT,
    Event.DATA: Protocol.NR_DATA,
    Event.HEADER: Protocol.NR_HEADER,
    Event.EOH: Protocol.NR_EOH,
    Event.BODY: Protocol.NR_BODY,
    Event.UNKNOWN: Protocol.NR_UNKNOWN,
}


@given(st.integers(0, int(ALL_ACTIONS)), st.integers(0, int(ALL_ACTIONS)))
def test_actions_grant_exactly_the_bits_they_hold(held: int, needed: int) -> None:
    """``Action.grants`` agrees with the flags' own arithmetic: every needed bit is held."""
    assert Action(held).grants(Action(needed)) is ((Action(needed) & ~Action(held)) == Action.NONE)
    assert Action(held).grants(Action.NONE)
