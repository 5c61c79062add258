"""PolicyState: targets, accept scope, skip, deferred modifications and verdicts, end-of-message."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event, Family, Protocol
from milterbridge.milter.negotiation import Requirements, negotiate
from milterbridge.milter.session import NEED_DATA, MilterSession
from milterbridge.policy.apply import DropReason
from milterbridge.policy.model import (
    CONTINUE,
    ActionName,
    AddHeaderOp,
    AddRcptOp,
    AnyOp,
    ChangeHeaderOp,
    Decision,
    DeleteHeaderOp,
    EndpointPolicy,
    Failure,
    InsertHeaderOp,
    Mode,
    OnError,
    PolicyUsageError,
    ReplaceBodyOp,
    SmtpReply,
)
from milterbridge.policy.transaction import PolicyState

from .test_apply import PostfixHeaders, intended

A = ActionName
E = Event
HEADERS = [(b"From", b" a@example.org"), (b"Subject", b" hi"), (b"X-Spam", b" 1"), (b"X-Spam", b" 2")]
ADD = AddHeaderOp(name="X-Checked", value="yes")


def ep(name: str, index: int, *events: Event, **kw: object) -> EndpointPolicy:
    return EndpointPolicy(name=name, index=index, events=frozenset(events), **kw)  # type: ignore[arg-type]


def state(*endpoints: EndpointPolicy, actions: Action = ALL_ACTIONS, skip: bool = True) -> PolicyState:
    return PolicyState(endpoints, actions=actions, skip_negotiated=skip)


def d(action: ActionName, *mods: AnyOp, **kw: object) -> Decision:
    return Decision(action=action, modifications=mods, **kw)  # type: ignore[arg-type]


def names(endpoints: list[EndpointPolicy]) -> list[str]:
    return [e.name for e in endpoints]


# ----------------------------------------------------------------- targets and API checks


def test_targets_and_observers():
    """Targets are the enforcing subscribers in config order; observers are listed apart."""
    s = state(
        ep("b", 1, E.RCPT, E.EOM),
        ep("a", 0, E.EOM),
        ep("watch", 2, E.RCPT, mode=Mode.OBSERVE),
    )
    assert names(s.targets(E.EOM)) == ["a", "b"]
    assert names(s.targets(E.RCPT)) == ["b"]
    assert names(s.observers(E.RCPT)) == ["watch"]
    assert s.targets(E.CONNECT) == []


@pytest.mark.parametrize(
    ("event", "outcomes", "match"),
    [
        pytest.param(E.EOM, {}, "finish_eom", id="eom"),
        pytest.param(E.ABORT, {}, "notification", id="abort"),
        pytest.param(E.RCPT, {}, r"no outcome for \['a'\]", id="missing"),
        pytest.param(E.RCPT, {"a": CONTINUE, "zz": CONTINUE}, "unknown endpoint 'zz'", id="unknown-name"),
        pytest.param(E.MAIL, {"a": CONTINUE}, "not a target of mail", id="not-subscribed"),
        pytest.param(E.CONNECT, {"a": CONTINUE}, "not a target", id="not-subscribed-connect"),
        pytest.param(E.RCPT, {"a": d(A.SKIP)}, "skip is not legal at rcpt", id="illegal-action"),
        pytest.param(E.UNKNOWN, {"u": d(A.CONTINUE, ADD)}, "not allowed at unknown", id="mods-at-unknown"),
    ],
)
def test_usage_errors(event, outcomes, match):
    """Caller mistakes raise PolicyUsageError instead of being guessed at."""
    s = state(ep("a", 0, E.RCPT, E.EOM), ep("u", 1, E.UNKNOWN))
    with pytest.raises(PolicyUsageError, match=match):
        s.decide(event, outcomes)


def test_ungranted_actions_are_usage_errors():
    """A decision needing an action the MTA did not grant must have been refused by the parser."""
    s = state(ep("a", 0, E.RCPT), actions=Action.ADD_HEADERS)
    with pytest.raises(PolicyUsageError, match="not granted"):
        s.decide(E.RCPT, {"a": d(A.CONTINUE, ChangeHeaderOp(name="X", index=1, value="v"))})
    with pytest.raises(PolicyUsageError, match="not granted"):
        s.decide(E.RCPT, {"a": d(A.QUARANTINE)})


def test_duplicate_endpoint_names_refused():
    """Endpoint names identify outcomes, so they must be unique."""
    with pytest.raises(PolicyUsageError):
        state(ep("a", 0), ep("a", 1))


def test_observe_outcomes_are_ignored():
    """An observe endpoint's reject is reported as ignored and never applied."""
    s = state(ep("a", 0, E.RCPT), ep("watch", 1, E.RCPT, mode=Mode.OBSERVE))
    got = s.decide(E.RCPT, {"a": CONTINUE, "watch": d(A.REJECT)})
    assert got.reply == m.Continue()
    assert got.ignored == ("watch",)
    assert [v.endpoint.name for v in got.verdicts] == ["a"]


# ----------------------------------------------------------------- merge at events


def test_reject_with_reply_from_first_listed():
    """Two rejects: the reply of the endpoint listed first is sent, as a 'y'."""
    s = state(ep("b", 1, E.MAIL), ep("a", 0, E.MAIL))
    got = s.decide(
        E.MAIL,
        {
            "b": d(A.REJECT, reply=SmtpReply(code=554, lines=("from b",))),
            "a": d(A.REJECT, reply=SmtpReply(code=550, enhanced="5.7.1", lines=("from a",))),
        },
    )
    assert got.reply == m.ReplyCode(text=b"550 5.7.1 from a")
    assert got.winner is not None
    assert got.winner.endpoint.name == "a"
    assert got.action is A.REJECT
    assert got.ends_message
    assert not got.ends_session


@pytest.mark.parametrize(
    ("event", "outcome", "reply", "ends_message", "ends_session"),
    [
        pytest.param(E.CONNECT, d(A.REJECT), m.Reject(), True, True, id="connect-reject"),
        pytest.param(E.HELO, d(A.TEMPFAIL), m.TempFail(), True, True, id="helo-tempfail"),
        pytest.param(E.MAIL, d(A.TEMPFAIL), m.TempFail(), True, False, id="mail-tempfail"),
        pytest.param(E.RCPT, d(A.REJECT), m.Reject(), False, False, id="rcpt-recipient-only"),
        pytest.param(
            E.RCPT,
            d(A.TEMPFAIL, reply=SmtpReply(code=421, lines=("bye",))),
            m.ReplyCode(text=b"421 bye"),
            True,
            True,
            id="rcpt-421",
        ),
        pytest.param(E.RCPT, Failure(reason="timeout"), m.TempFail(), False, False, id="rcpt-failure-451"),
        pytest.param(E.DATA, d(A.DISCARD), m.Discard(), True, False, id="data-discard"),
        pytest.param(E.HEADER, d(A.REJECT), m.Reject(), True, False, id="header-reject"),
        pytest.param(E.UNKNOWN, d(A.TEMPFAIL), m.TempFail(), False, False, id="unknown-tempfail"),
        pytest.param(E.UNKNOWN, Failure(reason="x"), m.TempFail(), False, False, id="unknown-failure"),
        pytest.param(E.MAIL, d(A.QUARANTINE), m.Continue(), False, False, id="quarantine-is-remembered"),
    ],
)
def test_single_decision_replies(event, outcome, reply, ends_message, ends_session):
    """One endpoint's decision turns into the right milter reply and scope at each event."""
    s = state(ep("a", 0, event, E.EOM))
    got = s.decide(event, {"a": outcome})
    assert got.reply == reply
    assert (got.ends_message, got.ends_session) == (ends_message, ends_session)


def test_failure_on_error_accept_at_unknown_is_continue():
    """on_error accept cannot send 'a' at unknown: it continues."""
    s = state(ep("a", 0, E.UNKNOWN, on_error=OnError.ACCEPT))
    got = s.decide(E.UNKNOWN, {"a": Failure(reason="HTTP 503")})
    assert got.reply == m.Continue()
    assert got.verdicts[0].failure == "HTTP 503"
    assert got.verdicts[0].action is A.CONTINUE


# ----------------------------------------------------------------- accept scope


def test_accept_at_connect_is_for_the_connection():
    """Accept at connect: 'a' when it is the only endpoint, and it stays done across messages."""
    s = state(ep("a", 0, E.CONNECT, E.EOM))
    got = s.decide(E.CONNECT, {"a": d(A.ACCEPT)})
    assert got.reply == m.Accept()
    assert got.action is A.ACCEPT
    s.reset_message()
    assert s.targets(E.EOM) == []
    assert s.targets(E.CLOSE) == []


def test_accept_waits_for_every_enforcing_endpoint():
    """'a' only when every enforcing endpoint is done; observers do not count."""
    s = state(ep("a", 0, E.MAIL, E.EOM), ep("b", 1, E.RCPT, E.EOM), ep("w", 2, E.MAIL, mode=Mode.OBSERVE))
    assert s.decide(E.MAIL, {"a": d(A.ACCEPT)}).reply == m.Continue()
    assert names(s.targets(E.EOM)) == ["b"]
    assert s.decide(E.RCPT, {"b": d(A.ACCEPT)}).reply == m.Accept()


def test_message_accept_ends_with_the_message():
    """Accept at mail is for this message only."""
    s = state(ep("a", 0, E.MAIL, E.EOM), ep("b", 1, E.EOM))
    s.decide(E.MAIL, {"a": d(A.ACCEPT)})
    assert names(s.targets(E.EOM)) == ["b"]
    s.reset_message()
    assert names(s.targets(E.EOM)) == ["a", "b"]


def test_accept_with_pending_modifications_continues_and_keeps_them():
    """An accept does not send 'a' while its modifications wait for eom, and they survive."""
    s = state(ep("a", 0, E.RCPT, E.EOM))
    got = s.decide(E.RCPT, {"a": d(A.ACCEPT, ADD)})
    assert got.reply == m.Continue()
    assert s.targets(E.EOM) == []
    eom = s.finish_eom({}, HEADERS)
    assert eom.messages == (m.AddHeader(name=b"X-Checked", value=b" yes"), m.Continue())


def test_no_accept_at_unknown_even_when_all_done():
    """At unknown 'a' is never sent, even when every endpoint is done."""
    s = state(ep("a", 0, E.MAIL, E.UNKNOWN))
    assert s.decide(E.MAIL, {"a": d(A.ACCEPT)}).reply == m.Accept()
    assert s.decide(E.UNKNOWN, {}).reply == m.Continue()


def test_connect_quarantine_blocks_accept():
    """A quarantine remembered at connect keeps 'c' so that eom still comes."""
    s = state(ep("a", 0, E.CONNECT), ep("b", 1, E.HELO))
    assert s.decide(E.CONNECT, {"a": d(A.QUARANTINE, reason="bad client")}).reply == m.Continue()
    got = s.decide(E.HELO, {"b": d(A.ACCEPT)})
    assert got.reply == m.Continue()
    assert s.has_pending


def test_eom_accept_when_all_done():
    """At eom 'a' is sent when everyone accepted and nothing is to apply; else 'c'."""
    s = state(ep("a", 0, E.EOM), ep("b", 1, E.EOM))
    assert s.finish_eom({"a": d(A.ACCEPT), "b": d(A.ACCEPT)}, HEADERS).messages == (m.Accept(),)
    assert s.finish_eom({"a": d(A.ACCEPT), "b": CONTINUE}, HEADERS).messages == (m.Continue(),)
    got = s.finish_eom({"a": d(A.ACCEPT), "b": d(A.ACCEPT, ADD)}, HEADERS)
    assert got.reply == m.Continue()


# ----------------------------------------------------------------- skip


@pytest.mark.parametrize(
    ("endpoints", "skip_negotiated", "answers", "reply"),
    [
        pytest.param([ep("a", 0, E.BODY)], True, {"a": A.SKIP}, m.Skip(), id="only-subscriber"),
        pytest.param([ep("a", 0, E.BODY)], False, {"a": A.SKIP}, m.Continue(), id="not-negotiated"),
        pytest.param(
            [ep("a", 0, E.BODY), ep("b", 1, E.BODY)],
            True,
            {"a": A.SKIP, "b": A.CONTINUE},
            m.Continue(),
            id="one-of-two",
        ),
        pytest.param([ep("a", 0, E.BODY), ep("b", 1, E.BODY)], True, {"a": A.SKIP, "b": A.SKIP}, m.Skip(), id="both"),
        pytest.param(
            [ep("a", 0, E.BODY), ep("b", 1, E.EOM, include_body=True)],
            True,
            {"a": A.SKIP},
            m.Continue(),
            id="include-body",
        ),
        pytest.param(
            [ep("a", 0, E.BODY), ep("w", 1, E.BODY, mode=Mode.OBSERVE)],
            True,
            {"a": A.SKIP},
            m.Continue(),
            id="observe-subscriber",
        ),
        pytest.param(
            [ep("a", 0, E.BODY), ep("b", 1, E.BODY, E.EOM)],
            True,
            {"a": A.SKIP, "b": A.ACCEPT},
            m.Skip(),
            id="done-counts-as-skipped",
        ),
    ],
)
def test_skip_rules(endpoints, skip_negotiated, answers, reply):
    """'s' only at body, when negotiated, without include_body, once every body subscriber skipped."""
    s = state(*endpoints, skip=skip_negotiated)
    got = s.decide(E.BODY, {name: d(action) for name, action in answers.items()})
    assert got.reply == reply


def test_skip_stops_the_event_kind_for_this_message():
    """After skip at header the endpoint gets no more headers this message, still 'c' to the MTA."""
    s = state(ep("a", 0, E.HEADER, E.EOM))
    got = s.decide(E.HEADER, {"a": d(A.SKIP)})
    assert got.reply == m.Continue()
    assert got.action is A.CONTINUE
    assert s.targets(E.HEADER) == []
    assert names(s.targets(E.EOM)) == ["a"]
    s.reset_message()
    assert names(s.targets(E.HEADER)) == ["a"]


def test_skip_across_chunks():
    """A first skip stops body events for one endpoint; 's' comes when the last one skips."""
    s = state(ep("a", 0, E.BODY), ep("b", 1, E.BODY))
    assert s.decide(E.BODY, {"a": d(A.SKIP), "b": CONTINUE}).reply == m.Continue()
    assert names(s.targets(E.BODY)) == ["b"]
    assert s.decide(E.BODY, {"b": d(A.SKIP)}).reply == m.Skip()


# ----------------------------------------------------------------- deferred modifications


def test_modifications_are_deferred_to_eom():
    """Modifications from rcpt are applied at eom, before those returned at eom, per endpoint order."""
    s = state(ep("a", 0, E.RCPT, E.EOM), ep("b", 1, E.EOM))
    got = s.decide(E.RCPT, {"a": d(A.CONTINUE, AddHeaderOp(name="X-A", value="rcpt"))})
    assert got.reply == m.Continue()
    assert s.pending_modifications() == [("a", [AddHeaderOp(name="X-A", value="rcpt")])]
    eom = s.finish_eom(
        {
            "a": d(A.CONTINUE, AddHeaderOp(name="X-A", value="eom")),
            "b": d(A.CONTINUE, AddHeaderOp(name="X-B", value="b")),
        },
        HEADERS,
    )
    assert eom.messages == (
        m.AddHeader(name=b"X-A", value=b" rcpt"),
        m.AddHeader(name=b"X-A", value=b" eom"),
        m.AddHeader(name=b"X-B", value=b" b"),
        m.Continue(),
    )
    assert [a.endpoint for a in eom.applied] == ["a", "a", "b"]


def test_modifications_dropped_when_endpoint_fails_later():
    """A later failure of the endpoint drops what it asked for earlier, and says so."""
    s = state(ep("a", 0, E.RCPT, E.DATA, E.EOM, on_error=OnError.CONTINUE))
    s.decide(E.RCPT, {"a": d(A.CONTINUE, ADD)})
    got = s.decide(E.DATA, {"a": Failure(reason="timeout")})
    assert got.reply == m.Continue()
    assert [(x.endpoint, x.op, x.reason) for x in got.dropped] == [("a", ADD, DropReason.ENDPOINT_FAILED)]
    assert s.finish_eom({"a": CONTINUE}, HEADERS).messages == (m.Continue(),)


def test_modifications_dropped_when_endpoint_fails_at_eom():
    """A failure at eom drops the endpoint's earlier modifications from the answer."""
    s = state(ep("a", 0, E.RCPT, E.EOM, on_error=OnError.CONTINUE), ep("b", 1, E.RCPT))
    s.decide(E.RCPT, {"a": d(A.CONTINUE, ADD), "b": d(A.CONTINUE, AddHeaderOp(name="X-B", value="1"))})
    eom = s.finish_eom({"a": Failure(reason="HTTP 500")}, HEADERS)
    assert eom.messages == (m.AddHeader(name=b"X-B", value=b" 1"), m.Continue())
    assert [(x.endpoint, x.reason) for x in eom.dropped] == [("a", DropReason.ENDPOINT_FAILED)]


def test_modifications_dropped_when_message_refused_early():
    """A reject at data ends the message: pending modifications are reported dropped, never sent."""
    s = state(ep("a", 0, E.RCPT, E.EOM), ep("b", 1, E.DATA))
    s.decide(E.RCPT, {"a": d(A.CONTINUE, ADD)})
    got = s.decide(E.DATA, {"b": d(A.REJECT, AddHeaderOp(name="X-B", value="1"))})
    assert got.reply == m.Reject()
    assert {(x.endpoint, x.reason) for x in got.dropped} == {
        ("a", DropReason.MESSAGE_REFUSED),
        ("b", DropReason.MESSAGE_REFUSED),
    }
    s.reset_message()
    assert not s.has_pending


def test_recipient_refusal_keeps_modifications():
    """Refusing one recipient does not end the message: modifications stay pending."""
    s = state(ep("a", 0, E.RCPT, E.EOM))
    got = s.decide(E.RCPT, {"a": d(A.REJECT, ADD)})
    assert got.reply == m.Reject()
    assert not got.dropped
    assert s.finish_eom({"a": CONTINUE}, HEADERS).messages[0] == m.AddHeader(name=b"X-Checked", value=b" yes")


def test_eom_refusal_sends_no_modifications():
    """Reject or discard at eom: only the final reply, everything else reported dropped."""
    s = state(ep("a", 0, E.RCPT, E.EOM), ep("b", 1, E.EOM))
    s.decide(E.RCPT, {"a": d(A.CONTINUE, ADD)})
    eom = s.finish_eom(
        {"a": d(A.CONTINUE, ReplaceBodyOp(body=b"x")), "b": d(A.REJECT, reply=SmtpReply(code=550, lines=("no",)))},
        HEADERS,
    )
    assert eom.messages == (m.ReplyCode(text=b"550 no"),)
    assert eom.action is A.REJECT
    assert len(eom.dropped) == 2
    s2 = state(ep("a", 0, E.EOM))
    eom = s2.finish_eom({"a": d(A.DISCARD, ADD)}, HEADERS)
    assert eom.messages == (m.Discard(),)
    assert eom.dropped[0].reason is DropReason.MESSAGE_DISCARDED


def test_connection_modifications_apply_to_every_message():
    """Modifications returned at connect apply to each message of the session."""
    s = state(ep("a", 0, E.CONNECT), ep("b", 1, E.EOM))
    s.decide(E.CONNECT, {"a": d(A.CONTINUE, ADD)})
    for _ in range(2):
        eom = s.finish_eom({"b": CONTINUE}, HEADERS)
        assert eom.messages == (m.AddHeader(name=b"X-Checked", value=b" yes"), m.Continue())


def test_connection_modifications_come_before_the_message_ones():
    """An endpoint's ops go out in the order it asked: connect, then later events, then eom."""
    s = state(ep("a", 0, E.CONNECT, E.MAIL, E.EOM))
    s.decide(E.CONNECT, {"a": d(A.CONTINUE, AddHeaderOp(name="X-1", value="connect"))})
    s.decide(E.MAIL, {"a": d(A.CONTINUE, AddHeaderOp(name="X-2", value="mail"))})
    eom = s.finish_eom({"a": d(A.CONTINUE, AddHeaderOp(name="X-3", value="eom"))}, HEADERS)
    assert [x.name for x in eom.messages if isinstance(x, m.AddHeader)] == [b"X-1", b"X-2", b"X-3"]


def test_failure_drops_the_endpoints_connection_modifications_too():
    """A failing endpoint takes back what it asked for at connect as well, for the rest of the session."""
    s = state(ep("a", 0, E.CONNECT, E.EOM, on_error=OnError.CONTINUE), ep("b", 1, E.EOM))
    s.decide(E.CONNECT, {"a": d(A.CONTINUE, ADD)})
    eom = s.finish_eom({"a": Failure(reason="timeout"), "b": CONTINUE}, HEADERS)
    assert [(x.endpoint, x.op, x.reason) for x in eom.dropped] == [("a", ADD, DropReason.ENDPOINT_FAILED)]
    assert eom.messages == (m.Continue(),)
    assert s.finish_eom({"a": CONTINUE, "b": CONTINUE}, HEADERS).messages == (m.Continue(),)


def test_message_refusal_forgets_the_deferred_discard():
    """A message refused after a deferred discard takes the discard with it."""
    s = state(ep("a", 0, E.RCPT, E.DATA), ep("b", 1, E.RCPT))
    s.decide(E.RCPT, {"a": d(A.REJECT), "b": d(A.DISCARD)})
    assert s.decide(E.DATA, {"a": d(A.TEMPFAIL)}).reply == m.TempFail()
    assert not s.has_pending


def test_session_refusal_drops_connection_modifications():
    """A reject at helo refuses the session and drops the connection's modifications."""
    s = state(ep("a", 0, E.CONNECT, E.HELO))
    s.decide(E.CONNECT, {"a": d(A.CONTINUE, ADD)})
    got = s.decide(E.HELO, {"a": d(A.REJECT)})
    assert got.ends_session
    assert [x.reason for x in got.dropped] == [DropReason.SESSION_REFUSED]


# ----------------------------------------------------------------- message verdicts


def test_discard_behind_recipient_refusal_applies_at_next_event():
    """At rcpt a reject and a discard: the recipient is refused now, the discard comes next."""
    s = state(ep("a", 0, E.RCPT), ep("b", 1, E.RCPT, E.UNKNOWN))
    got = s.decide(E.RCPT, {"a": d(A.REJECT), "b": d(A.DISCARD)})
    assert got.reply == m.Reject()
    assert got.deferred is not None
    assert got.deferred.endpoint.name == "b"
    assert not got.ends_message
    # Not at unknown (no discard allowed there) ...
    assert s.decide(E.UNKNOWN, {"b": CONTINUE}).reply == m.Continue()
    # ... but at the next rcpt.
    got = s.decide(E.RCPT, {"a": CONTINUE, "b": CONTINUE})
    assert got.reply == m.Discard()
    assert got.ends_message


def test_deferred_discard_at_eom_and_reject_still_wins():
    """A remembered discard is sent at eom at the latest; a reject there wins over it."""
    s = state(ep("a", 0, E.RCPT, E.EOM), ep("b", 1, E.RCPT))
    s.decide(E.RCPT, {"a": d(A.TEMPFAIL), "b": d(A.DISCARD)})
    assert s.decide(E.DATA, {}).reply == m.Discard()
    s.reset_message()
    s.decide(E.RCPT, {"a": d(A.TEMPFAIL), "b": d(A.DISCARD)})
    assert s.finish_eom({"a": CONTINUE}, HEADERS).messages == (m.Discard(),)
    s.decide(E.RCPT, {"a": d(A.TEMPFAIL), "b": d(A.DISCARD)})
    assert s.finish_eom({"a": d(A.REJECT)}, HEADERS).messages == (m.Reject(),)


def test_discard_alone_at_rcpt_is_immediate():
    """Without a recipient verdict a discard at rcpt is sent at once."""
    s = state(ep("a", 0, E.RCPT))
    got = s.decide(E.RCPT, {"a": d(A.DISCARD)})
    assert got.reply == m.Discard()
    assert got.ends_message


def test_quarantine_remembered_until_eom():
    """A quarantine at rcpt goes out at eom with its reason, after the modifications."""
    s = state(ep("a", 0, E.RCPT, E.EOM))
    got = s.decide(E.RCPT, {"a": d(A.QUARANTINE, ADD, reason="virus found")})
    assert got.reply == m.Continue()
    assert got.action is A.QUARANTINE
    eom = s.finish_eom({"a": CONTINUE}, HEADERS)
    assert eom.messages == (
        m.AddHeader(name=b"X-Checked", value=b" yes"),
        m.Quarantine(reason=b"virus found"),
        m.Continue(),
    )
    assert eom.quarantine == "virus found"


def test_quarantine_default_reason_and_first_listed_reason():
    """Without a reason a default names the endpoint; with several, the first listed supplies it."""
    s = state(ep("a", 0, E.EOM), ep("b", 1, E.RCPT))
    s.decide(E.RCPT, {"b": d(A.QUARANTINE)})
    eom = s.finish_eom({"a": CONTINUE}, HEADERS)
    assert eom.quarantine is not None
    assert "b" in eom.quarantine
    s.decide(E.RCPT, {"b": d(A.QUARANTINE, reason="from b")})
    eom = s.finish_eom({"a": d(A.QUARANTINE, reason="from a")}, HEADERS)
    assert eom.quarantine == "from a"


def test_message_quarantine_reason_wins_a_tie_with_the_connection_one():
    """The same endpoint quarantining at connect and in the message: the message's reason is sent."""
    s = state(ep("a", 0, E.CONNECT, E.MAIL), ep("b", 1, E.EOM))
    s.decide(E.CONNECT, {"a": d(A.QUARANTINE, reason="client")})
    s.decide(E.MAIL, {"a": d(A.QUARANTINE, reason="sender")})
    assert s.finish_eom({"b": CONTINUE}, HEADERS).quarantine == "sender"
    assert s.finish_eom({"b": CONTINUE}, HEADERS).quarantine == "client"


def test_later_refusal_beats_quarantine():
    """A quarantine remembered before eom loses to a later reject."""
    s = state(ep("a", 0, E.MAIL, E.EOM))
    s.decide(E.MAIL, {"a": d(A.QUARANTINE)})
    assert s.finish_eom({"a": d(A.TEMPFAIL)}, HEADERS).messages == (m.TempFail(),)


def test_connect_quarantine_applies_to_every_message():
    """A quarantine at connect holds each message of the session."""
    s = state(ep("a", 0, E.CONNECT), ep("b", 1, E.EOM))
    s.decide(E.CONNECT, {"a": d(A.QUARANTINE, reason="suspicious client")})
    for _ in range(2):
        eom = s.finish_eom({"b": CONTINUE}, HEADERS)
        assert eom.messages == (m.Quarantine(reason=b"suspicious client"), m.Continue())


def test_finish_eom_resets_message_state():
    """After eom, message-scoped accept, skip and pending changes are gone."""
    s = state(ep("a", 0, E.HEADER, E.EOM), ep("b", 1, E.MAIL, E.EOM))
    s.decide(E.MAIL, {"b": d(A.ACCEPT, ADD)})
    s.decide(E.HEADER, {"a": d(A.SKIP)})
    s.finish_eom({"a": CONTINUE}, HEADERS)
    assert not s.has_pending
    assert names(s.targets(E.HEADER)) == ["a"]
    assert names(s.targets(E.EOM)) == ["a", "b"]


# ----------------------------------------------------------------- against the real session


def test_eom_answer_is_legal_for_the_milter_session():
    """A full eom answer passes the sans-IO session's checks (order, body run, action bits)."""
    offer = m.Negotiate(version=6, actions=Action(0x1FF), protocol=Protocol(0x1FFFFF))
    session = MilterSession()
    session.receive_data(offer.to_frame())
    session.next_event()
    reply = negotiate(offer, Requirements()).reply()
    session.send(reply)
    commands = [
        m.Connect(hostname=b"c", family=Family.INET, port=25, address=b"192.0.2.1"),
        m.MailFrom(address=b"<a@b>"),
        m.RcptTo(address=b"<c@d>"),
        *(m.Header(name=n, value=v) for n, v in HEADERS),
        m.EndOfHeaders(),
        m.EndOfMessage(),
    ]
    s = state(ep("a", 0, E.RCPT, E.EOM), ep("b", 1, E.EOM), actions=reply.actions)
    s.decide(E.RCPT, {"a": d(A.QUARANTINE, AddRcptOp(address="x@y", args=("NOTIFY=NEVER",)))})
    for cmd in commands:
        session.receive_data(cmd.to_frame())
        assert session.next_event() is not NEED_DATA
        if session.needs_reply and not isinstance(cmd, m.EndOfMessage):
            session.send(m.Continue())
    eom = s.finish_eom(
        {
            "a": d(A.CONTINUE, ReplaceBodyOp(body=b"x" * 70000 + b"\n"), DeleteHeaderOp(name="x-spam", index=2)),
            "b": d(A.CONTINUE, InsertHeaderOp(index=0, name="X-Top", value="1"), ADD),
        },
        HEADERS,
    )
    data = session.send_all(eom.messages)
    assert data.endswith(m.Continue().to_frame())
    assert not session.needs_reply


# ----------------------------------------------------------------- property through PolicyState

NAMES = st.sampled_from(["From", "Subject", "X-Spam", "x-spam", "X-New"])
VALUES = st.sampled_from(["v", " lead", "f\n\tx", ""])
HEADER_OPS = st.one_of(
    st.builds(AddHeaderOp, name=NAMES, value=VALUES),
    st.builds(InsertHeaderOp, index=st.integers(0, 6), name=NAMES, value=VALUES),
    st.builds(ChangeHeaderOp, name=NAMES, index=st.integers(1, 3), value=VALUES),
    st.builds(DeleteHeaderOp, name=NAMES, index=st.integers(1, 3)),
)


@settings(max_examples=150, deadline=None)
@given(
    early=st.lists(st.lists(HEADER_OPS, max_size=4), min_size=3, max_size=3),
    late=st.lists(st.lists(HEADER_OPS, max_size=4), min_size=3, max_size=3),
)
def test_finish_eom_through_postfix_equals_intended(early, late):
    """Ops kept from rcpt and given at eom by three endpoints land where the endpoints meant."""
    endpoints = [ep(f"e{i}", i, E.RCPT, E.EOM) for i in range(3)]
    s = state(*endpoints)
    s.decide(E.RCPT, {f"e{i}": d(A.CONTINUE, *ops) for i, ops in enumerate(early)})
    eom = s.finish_eom({f"e{i}": d(A.CONTINUE, *ops) for i, ops in enumerate(late)}, HEADERS)
    model = PostfixHeaders(HEADERS)
    for msg in eom.messages[:-1]:
        assert isinstance(msg, m.Modification)
        model.apply(msg)
    ops = [(f"e{i}", [*early[i], *late[i]]) for i in range(3)]
    assert model.result() == intended(HEADERS, ops)
