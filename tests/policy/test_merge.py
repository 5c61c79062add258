"""Merging decisions of several endpoints, and the failure rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter import messages as m
from milterbridge.milter.constants import Event
from milterbridge.policy.merge import Verdict, failure_decision, merge, merge_rcpt, refusal_reply
from milterbridge.policy.model import (
    ActionName,
    Decision,
    EndpointPolicy,
    Failure,
    Mode,
    OnError,
    PolicyUsageError,
    SmtpReply,
)

A = ActionName
E = Event
RANK = [A.REJECT, A.TEMPFAIL, A.DISCARD, A.QUARANTINE]  # most severe first (design §3.4)


def ep(name: str, index: int, *, mode: Mode = Mode.ENFORCE, on_error: OnError = OnError.TEMPFAIL) -> EndpointPolicy:
    return EndpointPolicy(name=name, index=index, mode=mode, on_error=on_error)


def verdict(name: str, index: int, action: ActionName, *, mode: Mode = Mode.ENFORCE, **kw: object) -> Verdict:
    return Verdict(endpoint=ep(name, index, mode=mode), decision=Decision(action=action, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        (A.REJECT, A.TEMPFAIL, A.REJECT),
        (A.TEMPFAIL, A.REJECT, A.REJECT),
        (A.TEMPFAIL, A.DISCARD, A.TEMPFAIL),
        (A.DISCARD, A.TEMPFAIL, A.TEMPFAIL),
        (A.DISCARD, A.QUARANTINE, A.DISCARD),
        (A.QUARANTINE, A.DISCARD, A.DISCARD),
        (A.QUARANTINE, A.CONTINUE, A.QUARANTINE),
        (A.CONTINUE, A.QUARANTINE, A.QUARANTINE),
        (A.ACCEPT, A.QUARANTINE, A.QUARANTINE),
        (A.SKIP, A.REJECT, A.REJECT),
        (A.ACCEPT, A.REJECT, A.REJECT),
    ],
)
def test_severity_order(first, second, winner):
    """reject > tempfail > discard > quarantine > continue, whatever the order listed."""
    got = merge([verdict("a", 0, first), verdict("b", 1, second)])
    assert got is not None
    assert got.action is winner


@pytest.mark.parametrize("actions", [[A.CONTINUE], [A.ACCEPT, A.SKIP], [A.CONTINUE, A.ACCEPT], []])
def test_continue_like_merges_to_none(actions):
    """Continue, skip and accept never win: the merge has no winner."""
    assert merge(verdict(f"e{i}", i, a) for i, a in enumerate(actions)) is None


def test_tie_goes_to_first_listed_with_its_reply():
    """Of two rejects the endpoint listed first wins and supplies the reply and reason."""
    first = verdict("first", 0, A.REJECT, reply=SmtpReply(code=550, lines=("first",)), reason="r1")
    second = verdict("second", 1, A.REJECT, reply=SmtpReply(code=554, lines=("second",)), reason="r2")
    for order in ([first, second], [second, first]):
        got = merge(order)
        assert got is first
        assert refusal_reply(got.decision) == m.ReplyCode(text=b"550 first")


def test_observe_verdicts_never_win():
    """A verdict from an observe endpoint takes no part in the merge."""
    watcher = verdict("watch", 0, A.REJECT, mode=Mode.OBSERVE)
    enforcer = verdict("enf", 1, A.QUARANTINE)
    assert merge([watcher, enforcer]) is enforcer
    assert merge([watcher]) is None
    assert merge_rcpt([watcher]) == (None, None)


@pytest.mark.parametrize(
    ("actions", "recipient", "message"),
    [
        ([A.REJECT, A.DISCARD], A.REJECT, A.DISCARD),
        ([A.DISCARD, A.TEMPFAIL], A.TEMPFAIL, A.DISCARD),
        ([A.QUARANTINE, A.TEMPFAIL, A.REJECT], A.REJECT, A.QUARANTINE),
        ([A.QUARANTINE, A.DISCARD], None, A.DISCARD),
        ([A.TEMPFAIL, A.CONTINUE], A.TEMPFAIL, None),
        ([A.ACCEPT, A.CONTINUE], None, None),
    ],
)
def test_rcpt_verdicts_merge_apart(actions, recipient, message):
    """At rcpt, recipient refusals and message verdicts are merged separately."""
    got_r, got_m = merge_rcpt(verdict(f"e{i}", i, a) for i, a in enumerate(actions))
    assert (got_r.action if got_r else None) is recipient
    assert (got_m.action if got_m else None) is message


@pytest.mark.parametrize(
    ("on_error", "event", "expected"),
    [
        (OnError.TEMPFAIL, E.CONNECT, A.TEMPFAIL),
        (OnError.TEMPFAIL, E.RCPT, A.TEMPFAIL),
        (OnError.TEMPFAIL, E.EOM, A.TEMPFAIL),
        (OnError.TEMPFAIL, E.UNKNOWN, A.TEMPFAIL),
        (OnError.CONTINUE, E.MAIL, A.CONTINUE),
        (OnError.CONTINUE, E.EOM, A.CONTINUE),
        (OnError.ACCEPT, E.HELO, A.ACCEPT),
        (OnError.ACCEPT, E.BODY, A.ACCEPT),
        (OnError.ACCEPT, E.UNKNOWN, A.CONTINUE),
        (OnError.REJECT, E.DATA, A.REJECT),
        (OnError.REJECT, E.EOM, A.REJECT),
        (OnError.REJECT, E.UNKNOWN, A.TEMPFAIL),
        (OnError.REJECT, E.ABORT, A.CONTINUE),
        (OnError.TEMPFAIL, E.CLOSE, A.CONTINUE),
    ],
)
def test_failure_mapping(on_error, event, expected):
    """A failure stands for the on_error action, or the nearest legal one at that event."""
    decision = failure_decision(ep("x", 0, on_error=on_error), event, Failure(reason="timeout after 5.0 s"))
    assert decision.action is expected
    assert decision.reply is None
    assert not decision.modifications
    if event not in (E.ABORT, E.CLOSE):
        assert decision.reason is not None
        assert "timeout after 5.0 s" in decision.reason


def test_failure_at_rcpt_is_a_plain_tempfail_for_that_recipient():
    """At rcpt a tempfail failure becomes the MTA's default 451 ('t'), for the recipient only."""
    decision = failure_decision(ep("x", 0), E.RCPT, Failure(reason="HTTP 500"))
    assert refusal_reply(decision) == m.TempFail()


def test_failure_mapping_refuses_non_events():
    """A name that is no event is a usage error."""
    with pytest.raises(PolicyUsageError):
        failure_decision(ep("x", 0), "negotiate", Failure(reason="x"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("decision", "reply"),
    [
        (Decision(action=A.REJECT), m.Reject()),
        (Decision(action=A.TEMPFAIL), m.TempFail()),
        (
            Decision(action=A.TEMPFAIL, reply=SmtpReply(code=451, enhanced="4.7.1", lines=("100% busy",))),
            m.ReplyCode(text=b"451 4.7.1 100%% busy"),
        ),
        (Decision(action=A.REJECT, reply=SmtpReply(code=550, lines=("a", "b"))), m.ReplyCode(text=b"550-a\r\n550 b")),
    ],
)
def test_refusal_reply(decision, reply):
    """A refusal with text is a 'y' reply (portable format, % doubled); without, 'r' or 't'."""
    assert refusal_reply(decision) == reply


def test_refusal_reply_of_non_refusal_is_a_usage_error():
    """Only reject and tempfail have a refusal reply."""
    with pytest.raises(PolicyUsageError):
        refusal_reply(Decision(action=A.DISCARD))


@pytest.mark.parametrize(
    ("action", "code"),
    [(A.REJECT, 451), (A.TEMPFAIL, 550), (A.CONTINUE, 550), (A.DISCARD, 451)],
)
def test_decision_refuses_mismatched_reply(action, code):
    """A Decision cannot carry a reply of the wrong class or with the wrong action."""
    with pytest.raises(ValueError):
        Decision(action=action, reply=SmtpReply(code=code))


# ----------------------------------------------------------------- properties

VERDICTS = st.lists(
    st.tuples(st.sampled_from(list(ActionName)), st.sampled_from(list(Mode))), min_size=0, max_size=8
).map(lambda items: [verdict(f"e{i}", i, a, mode=mode) for i, (a, mode) in enumerate(items)])


@settings(max_examples=200, deadline=None)
@given(verdicts=VERDICTS, seed=st.randoms(use_true_random=False))
def test_merge_is_deterministic_and_picks_max_severity(verdicts, seed):
    """The merge ignores input order, picks the most severe enforcing verdict, ties to the lowest index."""
    shuffled = list(verdicts)
    seed.shuffle(shuffled)
    got = merge(verdicts)
    assert merge(shuffled) is got
    enforcing = [v for v in verdicts if v.endpoint.mode is Mode.ENFORCE and v.action in RANK]
    if not enforcing:
        assert got is None
        return
    assert got is not None
    best = min(RANK.index(v.action) for v in enforcing)
    assert got.action is RANK[best]
    assert got.endpoint.index == min(v.endpoint.index for v in enforcing if v.action is RANK[best])
