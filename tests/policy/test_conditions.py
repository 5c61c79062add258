"""Per-endpoint conditions: parsing and matching of ``when``, and how PolicyState leaves endpoints out."""

from __future__ import annotations

import pytest

from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, Event, MacroStage
from milterbridge.policy.conditions import (
    ConditionError,
    ConditionKey,
    address_domain,
    parse_condition,
    unknown_at,
)
from milterbridge.policy.model import CONTINUE, ActionName, Decision, EndpointPolicy, Mode
from milterbridge.policy.transaction import PolicyState

K = ConditionKey


def client_miss(entries: object, address: bytes) -> ConditionKey | None:
    return parse_condition({"client": entries}).connection_miss(address, b"smtpd")


# ------------------------------------------------------------------------------ client


@pytest.mark.parametrize(
    ("entries", "address", "matches"),
    [
        (["10.0.0.0/8"], b"10.1.2.3", True),
        (["10.0.0.0/8"], b"11.1.2.3", False),
        ("192.0.2.7", b"192.0.2.7", True),
        ("192.0.2.7", b"192.0.2.8", False),
        (["2001:db8::/32"], b"2001:db8::1", True),
        (["2001:db8::/32"], b"IPv6:2001:db8::1", True),  # sendmail's prefix
        (["2001:db8::/32"], b"2001:db9::1", False),
        (["2001:db8::/32"], b"10.1.2.3", False),  # another family never matches
        (["10.0.0.0/8"], b"::ffff:10.1.2.3", True),  # IPv4-mapped
        (["::ffff:10.0.0.0/104"], b"10.1.2.3", True),  # a mapped network is the IPv4 one
        (["!10.0.0.0/8"], b"10.1.2.3", False),
        (["!10.0.0.0/8"], b"192.0.2.1", True),
        (["!10.0.0.0/8", "!::1"], b"::1", False),
        (["!10.0.0.0/8", "!::1"], b"2001:db8::1", True),
        (["10.0.0.0/8", "!10.9.0.0/16"], b"10.1.2.3", True),
        (["10.0.0.0/8", "!10.9.0.0/16"], b"10.9.2.3", False),
        (["10.0.0.0/8", "!10.9.0.0/16"], b"192.0.2.1", False),
        (["10.0.0.0/8"], b"", False),  # a unix socket client is in no network
        (["!10.0.0.0/8"], b"", True),
        (["10.0.0.0/8"], b"not an address", False),
    ],
)
def test_client_networks_and_addresses(entries: object, address: bytes, matches: bool) -> None:
    assert client_miss(entries, address) == (None if matches else K.CLIENT)


@pytest.mark.parametrize("entry", ["10.1.0.0/8", "10.0.0.0/33", "example.com", "", "!", "10.0.0.0/8 x"])
def test_client_refuses_what_is_no_network(entry: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition({"client": [entry]})
    assert caught.value.key == "client"


# ------------------------------------------------------------------------ daemon, auth


def test_daemon_is_compared_exactly() -> None:
    condition = parse_condition({"daemon": ["submission", "smtps"]})
    assert condition.connection_miss(b"192.0.2.1", b"submission") is None
    assert condition.connection_miss(b"192.0.2.1", b"smtps") is None
    assert condition.connection_miss(b"192.0.2.1", b"smtpd") is K.DAEMON
    assert condition.connection_miss(b"192.0.2.1", b"Submission") is K.DAEMON
    assert condition.connection_miss(b"192.0.2.1", None) is K.DAEMON
    excluded = parse_condition({"daemon": "!smtpd"})
    assert excluded.connection_miss(b"192.0.2.1", b"smtpd") is K.DAEMON
    assert excluded.connection_miss(b"192.0.2.1", None) is None


def test_client_is_checked_before_daemon() -> None:
    condition = parse_condition({"daemon": "smtpd", "client": "10.0.0.0/8"})
    assert condition.connection_miss(b"192.0.2.1", b"other") is K.CLIENT
    assert condition.connection_miss(b"10.0.0.1", b"other") is K.DAEMON


@pytest.mark.parametrize(
    ("wanted", "auth_authen", "matches"),
    [(True, b"alice", True), (True, b"", False), (True, None, False), (False, None, True), (False, b"alice", False)],
)
def test_authenticated(wanted: bool, auth_authen: bytes | None, matches: bool) -> None:
    condition = parse_condition({"authenticated": wanted})
    assert condition.message_miss(auth_authen, b"<a@example.com>") == (None if matches else K.AUTHENTICATED)


def test_authenticated_takes_a_boolean_only() -> None:
    with pytest.raises(ConditionError, match="expected true or false") as caught:
        parse_condition({"authenticated": "yes"})
    assert caught.value.key == "authenticated"


# ------------------------------------------------------------------------------ domains


@pytest.mark.parametrize(
    ("patterns", "address", "matches"),
    [
        (["example.com"], b"<alice@example.com>", True),
        (["example.com"], b"<alice@EXAMPLE.Com>", True),
        (["Example.COM"], b"alice@example.com", True),
        (["example.com"], b"<alice@example.com.>", True),
        (["example.com"], b"<alice@mail.example.com>", False),
        (["*.example.com"], b"<alice@mail.example.com>", True),
        (["*.example.com"], b"<alice@a.b.example.com>", True),
        (["*.example.com"], b"<alice@example.com>", False),
        (["*.example.com"], b"<alice@badexample.com>", False),
        (["example.com", "*.example.com"], b"<alice@example.com>", True),
        (["!example.com"], b"<alice@example.org>", True),
        (["!example.com"], b"<alice@example.com>", False),
        (["*.example.com", "!spam.example.com"], b"<a@spam.example.com>", False),
        (["*.example.com", "!spam.example.com"], b"<a@ok.example.com>", True),
        (["example.com"], b"<>", False),
        (["!example.com"], b"<>", True),
        (["example.com"], b"<@relay.example.org:alice@example.com>", True),  # source route
        # IDNA: a U-label pattern matches the A-label form and the other way round.
        (["bücher.example"], b"<a@xn--bcher-kva.example>", True),
        (["xn--bcher-kva.example"], "<a@bücher.example>".encode(), True),
        (["BÜCHER.example"], "<a@Bücher.Example>".encode(), True),
        (["*.bücher.example"], "<a@shop.bücher.example>".encode(), True),
        (["bücher.example"], b"<a@bucher.example>", False),
    ],
)
def test_domain_patterns(patterns: list[str], address: bytes, matches: bool) -> None:
    sender = parse_condition({"sender_domains": patterns})
    assert sender.message_miss(None, address) == (None if matches else K.SENDER_DOMAINS)
    recipient = parse_condition({"recipient_domains": patterns})
    assert recipient.recipient_matches(address) is matches


@pytest.mark.parametrize("pattern", ["", "*", "*.", "a*.example.com", "alice@example.com", "a..b", "x" * 64 + ".com"])
def test_domain_patterns_are_checked(pattern: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition({"recipient_domains": [pattern]})
    assert caught.value.key == "recipient_domains"


def test_any_recipient_matches() -> None:
    condition = parse_condition({"recipient_domains": ["example.com"]})
    assert condition.any_recipient_matches([b"<a@example.org>", b"<b@example.com>"])
    assert not condition.any_recipient_matches([b"<a@example.org>"])
    assert not condition.any_recipient_matches([])
    assert parse_condition({}).any_recipient_matches([])


def test_address_domain() -> None:
    assert address_domain(b"<Alice@Example.COM>") == "example.com"
    assert address_domain(b"<>") == ""
    assert address_domain(b"postmaster") == ""


# ------------------------------------------------------------------------ the table


def test_every_key_given_must_match() -> None:
    condition = parse_condition({"authenticated": True, "sender_domains": "example.com"})
    assert condition.keys == (K.AUTHENTICATED, K.SENDER_DOMAINS)
    assert condition.message_miss(b"alice", b"<a@example.com>") is None
    assert condition.message_miss(None, b"<a@example.com>") is K.AUTHENTICATED
    assert condition.message_miss(b"alice", b"<a@example.org>") is K.SENDER_DOMAINS


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"clients": ["10.0.0.0/8"]}, "clients", "unknown key"),
        ({"daemon": []}, "daemon", "at least one entry"),
        ({"daemon": ["a", "a"]}, "daemon", "duplicate"),
        ({"daemon": [1]}, "daemon", "expected a string or an array of strings"),
        ({"sender_domains": {"a": 1}}, "sender_domains", "expected a string or an array of strings"),
    ],
)
def test_table_errors_name_the_key(table: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConditionError, match=message) as caught:
        parse_condition(table)
    assert caught.value.key == key


def test_macros_the_conditions_need() -> None:
    assert parse_condition({"client": "10.0.0.0/8"}).macros == ()
    condition = parse_condition({"daemon": "smtpd", "authenticated": True})
    assert condition.macros == ((MacroStage.CONNECT, b"{daemon_name}"), (MacroStage.ENVFROM, b"{auth_authen}"))


@pytest.mark.parametrize(
    ("table", "events", "refused"),
    [
        ({"recipient_domains": "a.example"}, {Event.CONNECT, Event.EOM}, (K.RECIPIENT_DOMAINS, Event.CONNECT)),
        ({"recipient_domains": "a.example"}, {Event.HELO}, (K.RECIPIENT_DOMAINS, Event.HELO)),
        ({"recipient_domains": "a.example"}, {Event.MAIL, Event.EOM}, (K.RECIPIENT_DOMAINS, Event.MAIL)),
        ({"recipient_domains": "a.example"}, {Event.RCPT, Event.EOM, Event.ABORT}, None),
        ({"recipient_domains": "a.example"}, {Event.EOM, Event.CLOSE}, None),
        ({"sender_domains": "a.example"}, {Event.UNKNOWN, Event.EOM}, (K.SENDER_DOMAINS, Event.UNKNOWN)),
        ({"authenticated": True}, {Event.HELO}, (K.AUTHENTICATED, Event.HELO)),
        ({"authenticated": True}, {Event.MAIL}, None),
        ({"client": "10.0.0.0/8", "daemon": "smtpd"}, {Event.CONNECT}, None),
        ({"client": "10.0.0.0/8"}, {Event.CLOSE}, None),
    ],
)
def test_unknown_at_the_earliest_event(
    table: dict[str, object], events: set[Event], refused: tuple[ConditionKey, Event] | None
) -> None:
    assert unknown_at(parse_condition(table), events) == refused


# ---------------------------------------------------------------- PolicyState


def ep(name: str, index: int, *events: Event, mode: Mode = Mode.ENFORCE) -> EndpointPolicy:
    return EndpointPolicy(name=name, index=index, events=frozenset(events), mode=mode)


def names(endpoints: list[EndpointPolicy]) -> list[str]:
    return [e.name for e in endpoints]


def test_skipped_for_the_connection_is_left_out_until_it_ends() -> None:
    policy = PolicyState(
        [ep("a", 0, Event.CONNECT, Event.EOM), ep("b", 1, Event.EOM)], actions=ALL_ACTIONS, skip_negotiated=True
    )
    policy.skip(Event.CONNECT, ["a"])
    assert names(policy.targets(Event.CONNECT)) == []
    assert names(policy.targets(Event.EOM)) == ["b"]
    policy.finish_eom({"b": CONTINUE}, [])
    assert names(policy.targets(Event.EOM)) == ["b"]  # still skipped for the next message
    assert names(policy.targets(Event.CLOSE)) == []


def test_the_only_endpoint_skipped_answers_accept_early() -> None:
    policy = PolicyState([ep("a", 0, Event.MAIL, Event.EOM)], actions=ALL_ACTIONS, skip_negotiated=True)
    policy.skip(Event.MAIL, ["a"])
    assert policy.targets(Event.MAIL) == []
    assert isinstance(policy.decide(Event.MAIL, {}).reply, m.Accept)
    policy.reset_message()
    assert names(policy.targets(Event.MAIL)) == ["a"]  # the next message asks again


def test_skipped_observers_are_left_out() -> None:
    policy = PolicyState(
        [ep("a", 0, Event.EOM), ep("o", 1, Event.RCPT, Event.EOM, mode=Mode.OBSERVE)],
        actions=ALL_ACTIONS,
        skip_negotiated=True,
        conditional=True,
    )
    policy.pass_recipient(["o"])
    assert policy.observers(Event.RCPT) == []
    policy.pass_recipient([])
    assert names(policy.observers(Event.RCPT)) == ["o"]
    policy.skip(Event.DATA, ["o"])
    assert policy.observers(Event.EOM) == []
    policy.reset_message()
    assert names(policy.observers(Event.EOM)) == ["o"]


def test_passed_for_one_recipient_only() -> None:
    policy = PolicyState(
        [ep("a", 0, Event.RCPT, Event.EOM), ep("b", 1, Event.RCPT)],
        actions=ALL_ACTIONS,
        skip_negotiated=True,
        conditional=True,
    )
    policy.pass_recipient(["a"])
    assert names(policy.targets(Event.RCPT)) == ["b"]
    result = policy.decide(Event.RCPT, {"b": Decision(action=ActionName.CONTINUE)})
    assert isinstance(result.reply, m.Continue)
    policy.pass_recipient(["a", "b"])
    # Nobody is asked about this recipient, but that is no accept: the next one may match.
    assert isinstance(policy.decide(Event.RCPT, {}).reply, m.Continue)
    policy.pass_recipient([])
    assert names(policy.targets(Event.RCPT)) == ["a", "b"]
    policy.pass_recipient(["a"])
    policy.reset_message()
    assert names(policy.targets(Event.RCPT)) == ["a", "b"]
