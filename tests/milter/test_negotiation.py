"""Negotiation tests: our OPTNEG answer from requirements and the MTA's offer."""

from __future__ import annotations

import pytest

from milterbridge.milter import messages as m
from milterbridge.milter.constants import Action, Event, MacroStage, Protocol
from milterbridge.milter.errors import NegotiationError
from milterbridge.milter.negotiation import Requirements, negotiate

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
