"""End-of-message modifications: order, values, and header indexes in each MTA's numbering.

``PostfixHeaders`` is a tiny model of how Postfix's cleanup edits the queued
header list (milter-protocol.md §6.1): CHGHEADER counts visible headers of a
name and unlinks on delete, INSHEADER counts every header including Postfix's
own hidden Received, ADDHEADER appends. ``SendmailHeaders`` models Sendmail's
list (sendmail-e2e.md, measured with Sendmail 8.17): one entry per ``H`` line of
the cf first (only Received shows), a deleted header keeps its entry, and
INSHEADER inserts after the entry at the index. ``intended`` is what the
endpoints' ops mean on the list they received. Applying the plan through either
model must give the intended list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, CHUNK_SIZE, Action
from milterbridge.policy.apply import (
    POSTFIX_NUMBERING,
    AdjustedModification,
    AdjustReason,
    DropReason,
    HeaderNumbering,
    crlf_body,
    plan_modifications,
    sendmail_numbering,
    wire_value,
)
from milterbridge.policy.model import (
    AddHeaderOp,
    AddRcptOp,
    AnyOp,
    ChangeFromOp,
    ChangeHeaderOp,
    DeleteHeaderOp,
    DeleteRcptOp,
    InsertHeaderOp,
    ReplaceBodyOp,
)

HIDDEN = (b"Received", b" from client.example by mx.example (Postfix)")
Header = tuple[bytes, bytes]


class PostfixHeaders:
    """Postfix's queued header list under milter edits (hidden headers first)."""

    def __init__(self, headers: Sequence[Header], received_offset: int = 1) -> None:
        self.items: list[tuple[bytes, bytes, bool]] = [(*HIDDEN, True)] * received_offset
        self.items += [(name, value, False) for name, value in headers]

    def apply(self, mod: m.Modification) -> None:
        match mod:
            case m.ChangeHeader(index=index, name=name, value=value):
                index = max(index, 1)  # idx 0 is treated as 1
                same = [i for i, (n, _v, hidden) in enumerate(self.items) if not hidden and n.lower() == name.lower()]
                if index <= len(same):
                    if value:
                        self.items[same[index - 1]] = (name, value, False)
                    else:
                        del self.items[same[index - 1]]
                elif value:
                    self.items.append((name, value, False))
            case m.InsertHeader(index=index, name=name, value=value):
                self.items.insert(min(index, len(self.items)), (name, value, False))
            case m.AddHeader(name=name, value=value):
                self.items.append((name, value, False))
            case _:
                pass

    def result(self) -> list[Header]:
        return [(n, v) for n, v, _hidden in self.items]


def intended(headers: Sequence[Header], ops: Sequence[tuple[str, Sequence[AnyOp]]], received_offset: int = 1):
    """What the ops mean on the received list: first edit of a header wins; see apply.py."""
    count = len(headers)
    edits: dict[int, AnyOp] = {}
    inserts: dict[int, list[Header]] = defaultdict(list)
    adds: list[Header] = []
    for _endpoint, endpoint_ops in ops:
        for op in endpoint_ops:
            match op:
                case ChangeHeaderOp() | DeleteHeaderOp():
                    same = [i for i, (n, _v) in enumerate(headers) if n.lower() == op.name.encode().lower()]
                    if op.index <= len(same):
                        edits.setdefault(same[op.index - 1], op)
                    elif isinstance(op, ChangeHeaderOp):
                        adds.append((op.name.encode(), wire_value(op.value)))
                case InsertHeaderOp():
                    inserts[min(op.index, count)].append((op.name.encode(), wire_value(op.value)))
                case AddHeaderOp():
                    adds.append((op.name.encode(), wire_value(op.value)))
    out = [*inserts[0], *[HIDDEN] * received_offset]
    for pos, header in enumerate(headers):
        edit = edits.get(pos)
        if edit is None:
            out.append(header)
        elif isinstance(edit, ChangeHeaderOp):
            out.append((edit.name.encode(), wire_value(edit.value)))
        out.extend(inserts[pos + 1])
    return out + adds


def through_postfix(headers, ops, received_offset=1, actions=ALL_ACTIONS):
    numbering = HeaderNumbering(above=received_offset, counts_deleted=False)
    plan = plan_modifications(ops, headers, actions=actions, numbering=numbering)
    model = PostfixHeaders(headers, received_offset)
    for mod in plan.messages:
        model.apply(mod)
    return plan, model.result()


class SendmailHeaders:
    """Sendmail's header list under milter edits: ``cf_lines`` entries from the cf's H lines first.

    Of those only Received (the second, after Return-Path) is ever shown here; the others stay
    invisible, as Return-Path, Resent-* and Full-Name do for a message that does not trigger
    them. A deleted header keeps its entry (its value is gone). INSHEADER index i inserts after
    entry i (0-based).
    """

    def __init__(self, headers: Sequence[Header], cf_lines: int) -> None:
        #: (name, value, visible, user): user headers are the message's and the milter's
        self.items: list[tuple[bytes, bytes, bool, bool]] = [
            (b"Return-Path", b"", False, False),
            (*HIDDEN, True, False),
        ]
        self.items += [(b"X-Default", b"", False, False)] * (cf_lines - 2)
        self.items += [(name, value, True, True) for name, value in headers]

    def apply(self, mod: m.Modification) -> None:
        match mod:
            case m.ChangeHeader(index=index, name=name, value=value):
                index = max(index, 1)
                same = [i for i, (n, _v, _vis, user) in enumerate(self.items) if user and n.lower() == name.lower()]
                if index <= len(same):
                    pos = same[index - 1]
                    self.items[pos] = (name, value, bool(value), True)
                elif value:
                    self.items.append((name, value, True, True))
            case m.InsertHeader(index=index, name=name, value=value):
                self.items.insert(min(index + 1, len(self.items)), (name, value, True, True))
            case m.AddHeader(name=name, value=value):
                self.items.append((name, value, True, True))
            case _:
                pass

    def result(self) -> list[Header]:
        return [(n, v) for n, v, visible, _user in self.items if visible]


def through_sendmail(headers, ops, cf_lines=9):
    plan = plan_modifications(ops, headers, actions=ALL_ACTIONS, numbering=sendmail_numbering(cf_lines))
    model = SendmailHeaders(headers, cf_lines)
    for mod in plan.messages:
        model.apply(mod)
    return plan, model.result()


HEADERS: list[Header] = [
    (b"From", b" a@example.org"),
    (b"X-Spam", b" old"),
    (b"Subject", b" hi"),
    (b"X-Spam", b" older"),
    (b"To", b" b@example.org"),
]


# ----------------------------------------------------------------- values and order


@pytest.mark.parametrize(
    ("value", "wire"),
    [("v", b" v"), (" v", b" v"), ("\tv", b"\tv"), ("", b" "), ("a\n\tb", b" a\n\tb"), ("é", b" \xc3\xa9")],
)
def test_wire_value(value, wire):
    """One space is prepended unless the value starts with a space or tab; folds stay LF."""
    assert wire_value(value) == wire


@pytest.mark.parametrize(
    ("body", "wire"),
    [(b"a\nb\n", b"a\r\nb\r\n"), (b"a\r\nb", b"a\r\nb"), (b"a\rb\n", b"a\rb\r\n"), (b"\n\n", b"\r\n\r\n"), (b"", b"")],
)
def test_crlf_body(body, wire):
    """Bare LF becomes CRLF; existing CRLF and lone CR are kept."""
    assert crlf_body(body) == wire


def test_fixed_order_and_encoding():
    """Every op kind comes out in design §3.3's order, encoded for the wire."""
    ops: list[tuple[str, list[AnyOp]]] = [
        (
            "a",
            [
                ReplaceBodyOp(body=b"new\n"),
                AddHeaderOp(name="X-Add", value="1"),
                InsertHeaderOp(index=0, name="X-Top", value="t"),
                DeleteHeaderOp(name="X-Spam", index=1),
                AddRcptOp(address="archive@example.org", args=("NOTIFY=NEVER", "ORCPT=rfc822;x@y")),
                AddRcptOp(address="copy@example.org"),
                DeleteRcptOp(address="bob@example.net"),
                ChangeFromOp(address="bounce@example.org", args=("RET=HDRS",)),
                ChangeHeaderOp(name="Subject", index=1, value="[SPAM] hi"),
            ],
        )
    ]
    plan = plan_modifications(ops, HEADERS, actions=ALL_ACTIONS)
    assert plan.messages == (
        m.ChangeSender(address=b"<bounce@example.org>", args=b"RET=HDRS"),
        m.RemoveRecipient(address=b"<bob@example.net>"),
        m.AddRecipientWithArgs(address=b"<archive@example.org>", args=b"NOTIFY=NEVER ORCPT=rfc822;x@y"),
        m.AddRecipient(address=b"<copy@example.org>"),
        m.ChangeHeader(index=1, name=b"Subject", value=b" [SPAM] hi"),
        m.ChangeHeader(index=1, name=b"X-Spam", value=b""),
        m.InsertHeader(index=0, name=b"X-Top", value=b" t"),
        m.AddHeader(name=b"X-Add", value=b" 1"),
        m.ReplaceBody(data=b"new\r\n"),
    )
    assert not plan.dropped
    assert len(plan.applied) == 9


def test_change_from_without_args_sends_one_string():
    """change_from with no args sends the address only (no empty args string)."""
    plan = plan_modifications([("a", [ChangeFromOp(address="x@y")])], [], actions=ALL_ACTIONS)
    assert plan.messages == (m.ChangeSender(address=b"<x@y>", args=None),)


def test_large_body_is_chunked_in_one_run():
    """A replacement body larger than a packet is split into consecutive REPLBODY pieces."""
    body = b"x" * (CHUNK_SIZE + 10)
    plan = plan_modifications(
        [("a", [ReplaceBodyOp(body=body), AddHeaderOp(name="X", value="1")])], [], actions=ALL_ACTIONS
    )
    kinds = [type(msg) for msg in plan.messages]
    assert kinds == [m.AddHeader, m.ReplaceBody, m.ReplaceBody]
    assert b"".join(msg.data for msg in plan.messages[1:]) == body  # type: ignore[attr-defined]


def test_only_one_body_and_sender_first_listed_wins():
    """Two endpoints replacing the body or sender: the first listed wins, the other is a conflict."""
    ops: list[tuple[str, list[AnyOp]]] = [
        ("a", [ReplaceBodyOp(body=b"A"), ChangeFromOp(address="a@x")]),
        ("b", [ReplaceBodyOp(body=b"B"), ChangeFromOp(address="b@x")]),
    ]
    plan = plan_modifications(ops, [], actions=ALL_ACTIONS)
    assert plan.messages == (m.ChangeSender(address=b"<a@x>"), m.ReplaceBody(data=b"A"))
    assert [(d.endpoint, d.op.op, d.reason) for d in plan.dropped] == [
        ("b", "replace_body", DropReason.CONFLICT),
        ("b", "change_from", DropReason.CONFLICT),
    ]


def test_duplicate_recipient_removals_sent_once():
    """Two endpoints deleting the same recipient send one DELRCPT."""
    ops: list[tuple[str, list[AnyOp]]] = [("a", [DeleteRcptOp(address="x@y")]), ("b", [DeleteRcptOp(address="x@y")])]
    plan = plan_modifications(ops, [], actions=ALL_ACTIONS)
    assert plan.messages == (m.RemoveRecipient(address=b"<x@y>"),)
    assert plan.dropped[0].reason is DropReason.DUPLICATE


def test_change_of_missing_header_needs_addhdrs():
    """A change that would become an add is dropped when only CHGHDRS was granted."""
    ops: list[tuple[str, list[AnyOp]]] = [("a", [ChangeHeaderOp(name="X-Nope", index=1, value="v")])]
    plan = plan_modifications(ops, HEADERS, actions=Action.CHANGE_HEADERS)
    assert plan.messages == ()
    assert plan.dropped[0].reason is DropReason.NOT_GRANTED


def test_change_past_the_last_header_is_reported_as_added_instead():
    """A change past the last header of its name goes out as an add and is reported, with the header's name."""
    change = ChangeHeaderOp(name="Subject", index=2, value="[SPAM] hi")
    ops: list[tuple[str, list[AnyOp]]] = [("a", [ChangeHeaderOp(name="Subject", index=1, value="x")]), ("b", [change])]
    plan = plan_modifications(ops, HEADERS, actions=ALL_ACTIONS)
    assert plan.messages[-1] == m.AddHeader(name=b"Subject", value=b" [SPAM] hi")
    assert plan.adjusted == (
        AdjustedModification(
            endpoint="b",
            op=change,
            reason=AdjustReason.ADDED_INSTEAD,
            note="change_header past the last Subject: added instead",
        ),
    )
    assert plan.dropped == ()
    assert [a.converted for a in plan.applied] == [False, True]


@pytest.mark.parametrize(
    "ops",
    [
        pytest.param([ChangeHeaderOp(name="X-Spam", index=2, value="v")], id="change-in-range"),
        pytest.param([AddHeaderOp(name="Subject", value="v")], id="add"),
        pytest.param([DeleteHeaderOp(name="Subject", index=2)], id="delete-missing"),
    ],
)
def test_only_changes_past_the_end_are_adjusted(ops: list[AnyOp]) -> None:
    """Changes in range, adds and deletes are never reported as adjusted."""
    plan = plan_modifications([("a", ops)], HEADERS, actions=ALL_ACTIONS)
    assert plan.adjusted == ()


def test_change_past_the_end_not_granted_is_dropped_not_adjusted():
    """Without ADDHDRS the would-be add is dropped, so nothing is reported as adjusted."""
    ops: list[tuple[str, list[AnyOp]]] = [("a", [ChangeHeaderOp(name="Subject", index=2, value="v")])]
    plan = plan_modifications(ops, HEADERS, actions=Action.CHANGE_HEADERS)
    assert plan.adjusted == ()
    assert plan.dropped[0].reason is DropReason.NOT_GRANTED


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        pytest.param(AddHeaderOp(name="X", value=b"\xe9t\xe9"), m.AddHeader(name=b"X", value=b" \xe9t\xe9"), id="add"),
        pytest.param(
            InsertHeaderOp(index=0, name="X", value=b"\t\xff"),
            m.InsertHeader(index=0, name=b"X", value=b"\t\xff"),
            id="insert",
        ),
        pytest.param(
            ChangeHeaderOp(name="Subject", index=1, value=b" \x80"),
            m.ChangeHeader(index=1, name=b"Subject", value=b" \x80"),
            id="change",
        ),
    ],
)
def test_byte_values_are_sent_as_they_are(op: AnyOp, expected: m.Modification) -> None:
    """A value given as bytes (value_b64) reaches the wire unchanged, with the leading-space rule of text."""
    plan = plan_modifications([("a", [op])], HEADERS, actions=ALL_ACTIONS)
    assert plan.messages == (expected,)


def test_ops_not_granted_are_dropped():
    """An op whose action bit the MTA did not grant is never sent."""
    ops: list[tuple[str, list[AnyOp]]] = [
        ("a", [AddHeaderOp(name="X", value="1"), AddRcptOp(address="r@x", args=("NOTIFY=NEVER",))]),
    ]
    plan = plan_modifications(ops, [], actions=Action.ADD_RCPT)
    assert plan.messages == ()
    assert {d.reason for d in plan.dropped} == {DropReason.NOT_GRANTED}


# ----------------------------------------------------------------- header indexes


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        pytest.param(
            [DeleteHeaderOp(name="X-Spam", index=1), DeleteHeaderOp(name="X-Spam", index=2)],
            [m.ChangeHeader(index=2, name=b"X-Spam", value=b""), m.ChangeHeader(index=1, name=b"X-Spam", value=b"")],
            id="deletes-highest-first",
        ),
        pytest.param(
            [DeleteHeaderOp(name="x-spam", index=2)],
            [m.ChangeHeader(index=2, name=b"x-spam", value=b"")],
            id="case-insensitive",
        ),
        pytest.param(
            [InsertHeaderOp(index=0, name="A", value="0"), InsertHeaderOp(index=1, name="B", value="1")],
            [m.InsertHeader(index=0, name=b"A", value=b" 0"), m.InsertHeader(index=3, name=b"B", value=b" 1")],
            id="top-goes-above-received",
        ),
        pytest.param(
            [InsertHeaderOp(index=0, name="A", value="0"), InsertHeaderOp(index=0, name="B", value="0")],
            [m.InsertHeader(index=0, name=b"A", value=b" 0"), m.InsertHeader(index=1, name=b"B", value=b" 0")],
            id="same-gap-keeps-order",
        ),
        pytest.param(
            [InsertHeaderOp(index=5, name="A", value="e"), InsertHeaderOp(index=99, name="B", value="e")],
            [m.InsertHeader(index=6, name=b"A", value=b" e"), m.InsertHeader(index=7, name=b"B", value=b" e")],
            id="end-and-past-end",
        ),
        pytest.param(
            [DeleteHeaderOp(name="X-Spam", index=1), InsertHeaderOp(index=2, name="A", value="v")],
            [m.ChangeHeader(index=1, name=b"X-Spam", value=b""), m.InsertHeader(index=2, name=b"A", value=b" v")],
            id="insert-after-deleted",
        ),
        pytest.param(
            [InsertHeaderOp(index=3, name="A", value="v"), DeleteHeaderOp(name="From", index=1)],
            [m.ChangeHeader(index=1, name=b"From", value=b""), m.InsertHeader(index=3, name=b"A", value=b" v")],
            id="insert-after-earlier-delete",
        ),
        pytest.param(
            [ChangeHeaderOp(name="X-Spam", index=2, value="new"), DeleteHeaderOp(name="X-Spam", index=1)],
            [
                m.ChangeHeader(index=2, name=b"X-Spam", value=b" new"),
                m.ChangeHeader(index=1, name=b"X-Spam", value=b""),
            ],
            id="change-before-lower-delete",
        ),
        pytest.param(
            [ChangeHeaderOp(name="X-Spam", index=3, value="v")],
            [m.AddHeader(name=b"X-Spam", value=b" v")],
            id="change-missing-becomes-add",
        ),
        pytest.param([DeleteHeaderOp(name="X-Nope", index=1)], [], id="delete-missing-is-dropped"),
    ],
)
def test_header_indexes(ops, expected):
    """Header ops convert to the exact Postfix indexes, and the result is what was meant."""
    plan, result = through_postfix(HEADERS, [("a", ops)])
    assert list(plan.messages) == expected
    assert result == intended(HEADERS, [("a", ops)])


def test_without_hidden_received():
    """With received_offset 0 an insert after header N is sent as N."""
    ops: list[AnyOp] = [InsertHeaderOp(index=1, name="A", value="v")]
    plan, result = through_postfix(HEADERS, [("a", ops)], received_offset=0)
    assert plan.messages == (m.InsertHeader(index=1, name=b"A", value=b" v"),)
    assert result == intended(HEADERS, [("a", ops)], received_offset=0)


def test_conflicting_header_edits_first_listed_wins():
    """Edits of one header by two endpoints: duplicates sent once, conflicts dropped."""
    ops: list[tuple[str, list[AnyOp]]] = [
        ("a", [DeleteHeaderOp(name="X-Spam", index=1), ChangeHeaderOp(name="Subject", index=1, value="A")]),
        ("b", [DeleteHeaderOp(name="x-spam", index=1), DeleteHeaderOp(name="Subject", index=1)]),
        ("c", [ChangeHeaderOp(name="Subject", index=1, value="A")]),
    ]
    plan, result = through_postfix(HEADERS, ops)
    assert plan.messages == (
        m.ChangeHeader(index=1, name=b"Subject", value=b" A"),
        m.ChangeHeader(index=1, name=b"X-Spam", value=b""),
    )
    assert [(d.endpoint, d.reason) for d in plan.dropped] == [
        ("b", DropReason.DUPLICATE),
        ("b", DropReason.CONFLICT),
        ("c", DropReason.DUPLICATE),
    ]
    assert result == intended(HEADERS, ops)


# ----------------------------------------------------------------- property

NAMES = st.sampled_from(["From", "To", "X-Spam", "x-spam", "Subject", "Received", "X-New"])
VALUES = st.sampled_from(["v", " lead", "\ttab", "fold\n\tx", "", "é"])
HEADER_LISTS = st.lists(
    st.tuples(NAMES.map(str.encode), VALUES.map(wire_value)),
    max_size=8,
)
INDEX = st.integers(1, 5)
OPS = st.one_of(
    st.builds(AddHeaderOp, name=NAMES, value=VALUES),
    st.builds(InsertHeaderOp, index=st.integers(0, 10), name=NAMES, value=VALUES),
    st.builds(ChangeHeaderOp, name=NAMES, index=INDEX, value=VALUES),
    st.builds(DeleteHeaderOp, name=NAMES, index=INDEX),
)
ENDPOINT_OPS = st.lists(st.lists(OPS, max_size=6), min_size=1, max_size=3).map(
    lambda lists: [(f"e{i}", ops) for i, ops in enumerate(lists)]
)


@settings(max_examples=400, deadline=None)
@given(headers=HEADER_LISTS, ops=ENDPOINT_OPS, received_offset=st.sampled_from([0, 1]))
def test_plan_through_postfix_equals_intended(headers, ops, received_offset):
    """Applying the plan through the Postfix model gives the endpoints' intended header list."""
    plan, result = through_postfix(headers, ops, received_offset)
    assert result == intended(headers, ops, received_offset)
    kinds = [type(msg) for msg in plan.messages]
    # Changes first, then inserts, then adds (design §3.3).
    assert kinds == sorted(kinds, key=[m.ChangeHeader, m.InsertHeader, m.AddHeader].index)


@settings(max_examples=400, deadline=None)
@given(headers=HEADER_LISTS, ops=ENDPOINT_OPS, cf_lines=st.sampled_from([2, 9, 11]))
def test_plan_through_sendmail_equals_intended(headers, ops, cf_lines):
    """Applying the plan in Sendmail's numbering through the Sendmail model gives the same intended list."""
    _plan, result = through_sendmail(headers, ops, cf_lines)
    assert result == intended(headers, ops)


def test_sendmail_numbering_counts_cf_lines_and_deleted_headers():
    """With a stock cf an insert after the message's 2nd header goes to entry 10; a deleted 1st header still counts."""
    ops: list[AnyOp] = [DeleteHeaderOp(name="From", index=1), InsertHeaderOp(index=2, name="A", value="v")]
    postfix_plan, _ = through_postfix(HEADERS, [("a", ops)])
    sendmail_plan, result = through_sendmail(HEADERS, [("a", ops)])
    assert postfix_plan.messages[-1] == m.InsertHeader(index=2, name=b"A", value=b" v")  # Received + X-Spam
    assert sendmail_plan.messages[-1] == m.InsertHeader(index=10, name=b"A", value=b" v")  # 8 + From + X-Spam
    assert result == intended(HEADERS, [("a", ops)])


def test_numbering_refuses_impossible_values():
    with pytest.raises(ValueError, match="negative"):
        HeaderNumbering(above=-1, counts_deleted=False)
    with pytest.raises(ValueError, match="at least one H line"):
        sendmail_numbering(0)
    assert sendmail_numbering(9) == HeaderNumbering(above=8, counts_deleted=True)
    assert HeaderNumbering(above=1, counts_deleted=False) == POSTFIX_NUMBERING
