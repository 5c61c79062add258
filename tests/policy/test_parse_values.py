"""Endpoint answers validated to the byte: header values and names, envelope addresses, allowed_ops."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, Event
from milterbridge.policy.apply import plan_modifications
from milterbridge.policy.mailbox import mailbox_problem
from milterbridge.policy.model import ALL_OPS, AnyOp, ChangeFromOp, DecisionError, ModOp
from milterbridge.policy.parse import parse_decision

VALUE_OPS = [
    pytest.param({"op": "add_header", "name": "X-A"}, id="add_header"),
    pytest.param({"op": "insert_header", "index": 0, "name": "X-A"}, id="insert_header"),
    pytest.param({"op": "change_header", "index": 1, "name": "X-A"}, id="change_header"),
]
ADDRESS_OPS = ["add_rcpt", "delete_rcpt", "change_from"]


def parse_ops(*ops: dict[str, Any], allowed_ops: frozenset[ModOp] | None = None) -> None:
    """Parse a continue answer carrying ``ops``; raises DecisionError when it is invalid."""
    doc = {"action": "continue", "modifications": list(ops)}
    if allowed_ops is None:
        parse_decision(doc, Event.EOM, max_modifications=100)
    else:
        parse_decision(doc, Event.EOM, max_modifications=100, allowed_ops=allowed_ops)


# ----------------------------------------------------------------- header values

C0_REFUSED = [pytest.param(chr(c), id=f"U+{c:04X}") for c in range(0x20) if chr(c) not in "\t\n"]
OTHER_CONTROLS = [
    pytest.param("\x7f", id="DEL"),
    pytest.param("\x80", id="C1-U+0080"),
    pytest.param("\x85", id="C1-NEL"),
    pytest.param("\x9f", id="C1-U+009F"),
]


@pytest.mark.parametrize("op", VALUE_OPS)
@pytest.mark.parametrize("char", C0_REFUSED + OTHER_CONTROLS)
def test_control_characters_in_values_are_refused(op: dict[str, Any], char: str) -> None:
    """Every C0 control but HTAB (LF apart), DEL and C1 controls make the answer invalid, wherever they sit."""
    for value in (char, f"a{char}b", f" a\n\tb{char}"):
        with pytest.raises(DecisionError, match=r"\.value: control character U\+"):
            parse_ops({**op, "value": value})


@pytest.mark.parametrize("op", VALUE_OPS)
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(" ", id="only-a-space"),
        pytest.param("\t7.1", id="htab-first"),
        pytest.param("a\tb", id="htab-inside"),
        pytest.param("a\n b", id="fold-space"),
        pytest.param("a\n\tb", id="fold-htab"),
        pytest.param("a\n \t b\n\tc", id="two-folds"),
        pytest.param("\n\tvalue", id="empty-first-line"),
        pytest.param(" \n value", id="blank-first-line"),
        pytest.param("a\n b ", id="trailing-space-on-fold"),
        pytest.param("caf\u00e9 \u00a0 \u4e2d\u6587 \U0001f600", id="utf8"),
        pytest.param("~!@#$%^&*()", id="printable-ascii"),
    ],
)
def test_values_accepted(op: dict[str, Any], value: str) -> None:
    """Text with HTAB, UTF-8 and proper folds is a valid header value."""
    parse_ops({**op, "value": value})


@pytest.mark.parametrize("op", VALUE_OPS)
@pytest.mark.parametrize(
    ("value", "match"),
    [
        pytest.param("a\nb", "LF is allowed only to fold", id="lf-not-a-fold"),
        pytest.param("a\n", "LF is allowed only to fold", id="trailing-lf"),
        pytest.param("\n", "LF is allowed only to fold", id="only-lf"),
        pytest.param("a\n\n b", "LF is allowed only to fold", id="empty-line"),
        pytest.param("a\n ", "only whitespace", id="fold-line-one-space"),
        pytest.param("a\n\t", "only whitespace", id="fold-line-one-htab"),
        pytest.param("a\n \t \n b", "only whitespace", id="whitespace-line-then-fold"),
        pytest.param("a\n b\n  ", "only whitespace", id="whitespace-last-line"),
        pytest.param("a\r\n b", r"U\+000D", id="crlf-fold"),
    ],
)
def test_values_refused(op: dict[str, Any], value: str, match: str) -> None:
    """LF only folds, a fold line is never only whitespace, CR never."""
    with pytest.raises(DecisionError, match=match):
        parse_ops({**op, "value": value})


# ----------------------------------------------------------------- header values as bytes (value_b64)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def first_op(op: dict[str, Any]) -> AnyOp:
    decision = parse_decision({"action": "continue", "modifications": [op]}, Event.EOM, max_modifications=1)
    return decision.modifications[0]


@pytest.mark.parametrize("op", VALUE_OPS)
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b" Caf\xe9 cr\xe8me", id="latin-1"),
        pytest.param(b"\xc3\x28 \xe2\x82", id="broken-utf-8"),
        pytest.param(b"", id="empty"),
        pytest.param(b"a\n\t\xe9", id="fold"),
        pytest.param(b"\x80\x85\x9f\xff", id="high-bytes-not-c1"),
        pytest.param(b"x" * 65536, id="65536-bytes"),
    ],
)
def test_value_b64_gives_exact_bytes(op: dict[str, Any], value: bytes) -> None:
    """value_b64 is decoded to the op's value as bytes, high bytes included."""
    parsed = first_op({**op, "value_b64": b64(value)})
    assert getattr(parsed, "value") == value  # noqa: B009 (the ops of VALUE_OPS all have a value)


@pytest.mark.parametrize("op", VALUE_OPS)
@pytest.mark.parametrize(
    ("fields", "match"),
    [
        pytest.param({"value": "a", "value_b64": b64(b"a")}, r"'value' or 'value_b64', not both", id="both"),
        pytest.param({}, r"'value' is required \(or 'value_b64'\)", id="neither"),
        pytest.param({"value": None, "value_b64": None}, r"'value' is required", id="both-null"),
        pytest.param({"value_b64": "QR=="}, r"\.value_b64: not canonical base64", id="not-canonical"),
        pytest.param({"value_b64": "QQ"}, r"\.value_b64: not valid base64", id="no-padding"),
        pytest.param({"value_b64": "QU Fh"}, r"\.value_b64: not valid base64", id="whitespace"),
        pytest.param({"value_b64": 7}, r"\.value_b64: expected a string", id="not-a-string"),
        pytest.param({"value_b64": b64(b"x" * 65537)}, r"\.value_b64: longer than 65536 bytes", id="65537-bytes"),
        pytest.param({"value_b64": b64(b"a\r\n b")}, r"\.value_b64: control byte 0x0D", id="cr"),
        pytest.param({"value_b64": b64(b"a\x00")}, r"\.value_b64: control byte 0x00", id="nul"),
        pytest.param({"value_b64": b64(b"a\x7f")}, r"\.value_b64: control byte 0x7F", id="del"),
        pytest.param({"value_b64": b64(b"\x1b$B$3\x1b(B")}, r"control byte 0x1B", id="iso-2022-jp-escape"),
        pytest.param({"value_b64": b64(b"a\nb")}, r"\.value_b64: LF is allowed only to fold", id="lf-not-a-fold"),
        pytest.param({"value_b64": b64(b"a\n \xe9\n ")}, r"\.value_b64: a fold line must not be", id="blank-fold"),
    ],
)
def test_value_b64_refused(op: dict[str, Any], fields: dict[str, Any], match: str) -> None:
    """Exactly one of value and value_b64; the bytes follow the text rules but for 0x80-0xFF."""
    with pytest.raises(DecisionError, match=match):
        parse_ops({**op, **fields})


def test_value_b64_bytes_go_on_the_wire_as_they_are() -> None:
    """The decoded bytes reach the milter modification unchanged, one space added as for text."""
    ops = [
        {"op": "add_header", "name": "X-A", "value_b64": b64(b"Caf\xe9")},
        {"op": "insert_header", "index": 0, "name": "X-I", "value_b64": b64(b"\t\xe8")},
        {"op": "change_header", "index": 1, "name": "Subject", "value_b64": b64(b" \xff\xfe")},
    ]
    decision = parse_decision({"action": "continue", "modifications": ops}, Event.EOM, max_modifications=3)
    plan = plan_modifications([("a", decision.modifications)], [(b"Subject", b" hi")], actions=ALL_ACTIONS)
    assert plan.messages == (
        m.ChangeHeader(index=1, name=b"Subject", value=b" \xff\xfe"),
        m.InsertHeader(index=0, name=b"X-I", value=b"\t\xe8"),
        m.AddHeader(name=b"X-A", value=b" Caf\xe9"),
    )


# ----------------------------------------------------------------- header names


@pytest.mark.parametrize("code", [pytest.param(c, id=f"0x{c:02X}") for c in range(0x80)])
def test_header_name_bytes(code: int) -> None:
    """A header name accepts exactly RFC 5322 ftext: printable ASCII 33-126 but ':'."""
    op = {"op": "add_header", "name": f"X{chr(code)}A", "value": "1"}
    if 33 <= code <= 126 and chr(code) != ":":
        parse_ops(op)
    else:
        with pytest.raises(DecisionError, match=r"\.name: "):
            parse_ops(op)


# ----------------------------------------------------------------- addresses

LOCAL_64 = "l" * 64
#: 254 octets: a 64-octet local part, "@", and labels of 47, 47, 46 and 46 octets with their dots.
ADDRESS_254 = LOCAL_64 + "@" + ".".join(["d" * 47, "d" * 47, "d" * 46, "d" * 46])

VALID_ADDRESSES = [
    pytest.param("user@example.org", id="plain"),
    pytest.param("a@b", id="single-label-domain"),
    pytest.param("first.last+tag@sub.example-host.org", id="dots-plus-hyphen"),
    pytest.param("!#$%&'*+/=?^_`{|}~-@example.org", id="every-atext-special"),
    pytest.param("User@EXAMPLE.ORG", id="mixed-case"),
    pytest.param("1@2.3", id="digits"),
    pytest.param("a@xn--exmple-cua.org", id="a-label"),
    pytest.param('"john doe"@example.org', id="quoted-space"),
    pytest.param('"a@b"@example.org', id="quoted-at"),
    pytest.param('"a\\"b"@example.org', id="quoted-escaped-quote"),
    pytest.param('"a\\\\b"@example.org', id="quoted-escaped-backslash"),
    pytest.param('"a..b."@example.org', id="quoted-dots"),
    pytest.param('""@example.org', id="quoted-empty"),
    pytest.param('"caf\u00e9 cr\u00e8me"@example.org', id="quoted-utf8"),
    pytest.param("ren\u00e9@ex\u00e4mple.org", id="utf8-local-and-domain"),
    pytest.param("\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a", id="utf8-cjk"),
    pytest.param("\U0001f600@example.org", id="utf8-astral"),
    pytest.param("a@[192.0.2.1]", id="ipv4-literal"),
    pytest.param("a@[255.255.255.255]", id="ipv4-max"),
    pytest.param("a@[IPv6:2001:db8::1]", id="ipv6-literal"),
    pytest.param("a@[ipv6:2001:DB8:0:0:0:0:0:1]", id="ipv6-tag-any-case"),
    pytest.param("a@[IPv6:::ffff:192.0.2.1]", id="ipv6v4-literal"),
    pytest.param(LOCAL_64 + "@example.org", id="local-64-octets"),
    pytest.param("\u00e9" * 32 + "@example.org", id="utf8-local-64-octets"),
    pytest.param(ADDRESS_254, id="address-254-octets"),
    pytest.param("a@" + "d" * 63 + ".org", id="label-63-octets"),
]

INVALID_ADDRESSES = [
    pytest.param("user", "local-part@domain expected", id="no-at"),
    pytest.param("@example.org", "local part", id="empty-local"),
    pytest.param("a@", "domain", id="empty-domain"),
    pytest.param(".a@b", "local part", id="leading-dot"),
    pytest.param("a.@b", "local part", id="trailing-dot-local"),
    pytest.param("a..b@c", "local part", id="double-dot"),
    pytest.param("a b@c", "local part", id="unquoted-space"),
    pytest.param("a@b@c", "local part", id="two-ats"),
    pytest.param("a(comment)@b", "local part", id="comment"),
    pytest.param("a,b@c", "local part", id="comma"),
    pytest.param(" a@b", "local part", id="leading-space"),
    pytest.param("a@b ", "domain", id="trailing-space"),
    pytest.param("a@b\t", "domain", id="trailing-htab"),
    pytest.param("a@b.", "domain", id="trailing-dot-domain"),
    pytest.param("a@.b", "domain", id="leading-dot-domain"),
    pytest.param("a@-b.org", "domain", id="label-leading-hyphen"),
    pytest.param("a@b-.org", "domain", id="label-trailing-hyphen"),
    pytest.param("a@b_c.org", "domain", id="underscore-in-domain"),
    pytest.param("<a@b>", "without angle brackets", id="angle-brackets"),
    pytest.param("<>", "without angle brackets", id="null-sender-in-brackets"),
    pytest.param("a@b>", "domain", id="closing-bracket"),
    pytest.param("<a@b", "local part", id="opening-bracket"),
    pytest.param("a@b>\r\nRCPT TO:<c@d", "local part", id="smtp-injection"),
    pytest.param('"a"b"@c', "local part", id="quoted-bare-quote"),
    pytest.param('"a\tb"@c', "local part", id="quoted-htab"),
    pytest.param('"a\\\x01"@c', "local part", id="quoted-escaped-control"),
    pytest.param('"a\\\u00e9"@c', "local part", id="quoted-escaped-utf8"),
    pytest.param('"ab@c', "local part", id="quoted-unclosed"),
    pytest.param("a\x7f@b", "local part", id="del-in-local"),
    pytest.param("a\x85@b", "local part", id="c1-in-local"),
    pytest.param("a@b\x85", "domain", id="c1-in-domain"),
    pytest.param("a@[256.0.0.1]", "address literal", id="ipv4-over-255"),
    pytest.param("a@[192.0.2]", "address literal", id="ipv4-three-parts"),
    pytest.param("a@[192.0.2.1", "address literal", id="literal-unclosed"),
    pytest.param("a@[2001:db8::1]", "address literal", id="ipv6-without-tag"),
    pytest.param("a@[IPv6:2001:db8:::1]", "not a valid IPv6", id="ipv6-bad"),
    pytest.param("a@[IPv6:fe80::1%eth0]", "address literal", id="ipv6-zone"),
    pytest.param("a@[x-tag:abc]", "address literal", id="general-literal"),
    pytest.param("a@[192.0.2.1].org", "address literal", id="literal-then-label"),
    pytest.param("l" * 65 + "@example.org", "longer than 64", id="local-65-octets"),
    pytest.param("\u00e9" * 33 + "@example.org", "longer than 64", id="utf8-local-66-octets"),
    pytest.param(ADDRESS_254 + "d", "longer than 254", id="address-255-octets"),
    pytest.param("a@" + "d" * 64 + ".org", "longer than 63", id="label-64-octets"),
    pytest.param("a@" + "\u00e4" * 60 + ".org", "longer than 63", id="u-label-ace-over-63"),
]


@pytest.mark.parametrize("op", ADDRESS_OPS)
@pytest.mark.parametrize("address", VALID_ADDRESSES)
def test_addresses_accepted(op: str, address: str) -> None:
    """An RFC 5321 Mailbox, UTF-8 as RFC 6531 allows, is valid in every address op."""
    assert len(address.encode()) <= 254
    assert mailbox_problem(address) is None
    parse_ops({"op": op, "address": address})


@pytest.mark.parametrize("op", ADDRESS_OPS)
@pytest.mark.parametrize(("address", "match"), INVALID_ADDRESSES)
def test_addresses_refused(op: str, address: str, match: str) -> None:
    """Anything that is not a Mailbox, or is over an RFC 5321 length limit, makes the answer invalid."""
    with pytest.raises(DecisionError, match=rf"modifications\[0\]\.address: .*{match}"):
        parse_ops({"op": op, "address": address})


@pytest.mark.parametrize("op", ADDRESS_OPS)
@pytest.mark.parametrize("char", [*C0_REFUSED, pytest.param("\t", id="U+0009"), pytest.param("\n", id="U+000A")])
def test_control_characters_in_addresses_are_refused(op: str, char: str) -> None:
    """No C0 control, HTAB and LF included, anywhere in an address."""
    for address in (f"a{char}b@example.org", f"ab@exa{char}mple.org", f'"a{char}b"@example.org'):
        with pytest.raises(DecisionError, match=r"\.address: "):
            parse_ops({"op": op, "address": address})


def test_null_sender_only_in_change_from() -> None:
    """ "" sets the null sender in change_from (<> on the wire) and is refused in the recipient ops."""
    doc = {"action": "continue", "modifications": [{"op": "change_from", "address": "", "args": ["RET=HDRS"]}]}
    decision = parse_decision(doc, Event.EOM, max_modifications=10)
    assert decision.modifications == (ChangeFromOp(address="", args=("RET=HDRS",)),)
    plan = plan_modifications([("policy", decision.modifications)], [], actions=ALL_ACTIONS)
    assert plan.messages == (m.ChangeSender(address=b"<>", args=b"RET=HDRS"),)
    for op in ("add_rcpt", "delete_rcpt"):
        with pytest.raises(DecisionError, match=r'must not be empty \(the null sender "" is only for change_from\)'):
            parse_ops({"op": op, "address": ""})


# ----------------------------------------------------------------- allowed_ops

ONE_OF_EACH = {
    ModOp.ADD_HEADER: {"op": "add_header", "name": "X-A", "value": "1"},
    ModOp.INSERT_HEADER: {"op": "insert_header", "index": 0, "name": "X-A", "value": "1"},
    ModOp.CHANGE_HEADER: {"op": "change_header", "index": 1, "name": "X-A", "value": "1"},
    ModOp.DELETE_HEADER: {"op": "delete_header", "index": 1, "name": "X-A"},
    ModOp.REPLACE_BODY: {"op": "replace_body", "base64": "YQ=="},
    ModOp.ADD_RCPT: {"op": "add_rcpt", "address": "a@example.org"},
    ModOp.DELETE_RCPT: {"op": "delete_rcpt", "address": "a@example.org"},
    ModOp.CHANGE_FROM: {"op": "change_from", "address": "a@example.org"},
}
HEADERS_ONLY = frozenset({ModOp.ADD_HEADER, ModOp.CHANGE_HEADER, ModOp.DELETE_HEADER})


def test_every_op_is_allowed_by_default() -> None:
    """Without allowed_ops (and with ALL_OPS) an answer may use every op."""
    assert frozenset(ONE_OF_EACH) == ALL_OPS
    parse_ops(*ONE_OF_EACH.values())
    parse_ops(*ONE_OF_EACH.values(), allowed_ops=ALL_OPS)


@pytest.mark.parametrize(
    ("allowed", "op", "ok"),
    [
        pytest.param(HEADERS_ONLY, ModOp.ADD_HEADER, True, id="headers-only-add-header"),
        pytest.param(HEADERS_ONLY, ModOp.DELETE_HEADER, True, id="headers-only-delete-header"),
        pytest.param(HEADERS_ONLY, ModOp.INSERT_HEADER, False, id="headers-only-insert-header"),
        pytest.param(HEADERS_ONLY, ModOp.ADD_RCPT, False, id="headers-only-add-rcpt"),
        pytest.param(HEADERS_ONLY, ModOp.CHANGE_FROM, False, id="headers-only-change-from"),
        pytest.param(HEADERS_ONLY, ModOp.REPLACE_BODY, False, id="headers-only-replace-body"),
        pytest.param(frozenset(), ModOp.ADD_HEADER, False, id="none-add-header"),
        pytest.param(frozenset({ModOp.DELETE_RCPT}), ModOp.DELETE_RCPT, True, id="only-delete-rcpt"),
        pytest.param(frozenset({ModOp.DELETE_RCPT}), ModOp.ADD_RCPT, False, id="only-delete-rcpt-add"),
    ],
)
def test_allowed_ops(allowed: frozenset[ModOp], op: ModOp, ok: bool) -> None:
    """An op outside the endpoint's allowed_ops makes the answer invalid."""
    if ok:
        parse_ops(ONE_OF_EACH[op], allowed_ops=allowed)
    else:
        with pytest.raises(DecisionError, match=rf"modifications\[0\]\.op: {op} is not in this endpoint's allowed_ops"):
            parse_ops(ONE_OF_EACH[op], allowed_ops=allowed)


def test_one_disallowed_op_invalidates_the_whole_answer() -> None:
    """Allowed ops before a disallowed one do not make it through: the answer is invalid as a whole."""
    allowed = [ONE_OF_EACH[ModOp.ADD_HEADER], ONE_OF_EACH[ModOp.CHANGE_HEADER]]
    with pytest.raises(DecisionError, match=r"modifications\[2\]\.op: add_rcpt"):
        parse_ops(*allowed, ONE_OF_EACH[ModOp.ADD_RCPT], allowed_ops=HEADERS_ONLY)


def test_no_ops_allowed_still_takes_decisions() -> None:
    """With allowed_ops empty, an answer without modifications (or with an empty list) is valid."""
    doc = {"action": "reject", "reply": {"code": 550}, "modifications": []}
    decision = parse_decision(doc, Event.EOM, max_modifications=10, allowed_ops=frozenset())
    assert decision.action == "reject"
