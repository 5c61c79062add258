"""What the endpoints receive: payload contents, ids, HTTP headers, notifications and negotiation."""

from __future__ import annotations

import base64
import datetime
import re
import time
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

import milterbridge
from milterbridge.client import Envelope
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event, Family, MacroStage, Protocol
from milterbridge.milter.messages import Continue
from milterbridge.policy.model import Mode
from tests.engine.conftest import CONTRACT, MESSAGE, Engine
from tests.fakes.webhooks import FakeResponse

EVERY_EVENT = frozenset(Event)
HEADER_MESSAGE = (
    b"Subject:  two spaces\r\n"
    b"X-Tab:\tvalue\r\n"
    b"X-Fold: first\r\n\tsecond\r\n   third\r\n"
    b"X-Empty:\r\n"
    b"X-Utf8: caf\xc3\xa9\r\n"
    b"X-8bit: caf\xe9\r\n"
    b"\r\n"
    b"body\r\n"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------- the contract


@pytest.mark.asyncio
async def test_every_event_validates_against_the_contract(engine: Engine) -> None:
    """A session producing all twelve events: each request validates against the OpenAPI request schema."""
    await engine.start(engine.endpoint("policy", events=EVERY_EVENT, include_body=True))
    client = await engine.client()
    await client.send_message(Envelope(mail_args=(b"SIZE=100",)), HEADER_MESSAGE)
    await client.unknown(b"XFOO \xff")
    await client.mail_from(b"<>")
    await client.abort()
    await client.quit()
    await engine.fake.wait_for(1, event="close")
    await engine.settle()
    assert set(engine.events("policy")) == {e.value for e in Event}
    for body in engine.bodies("policy"):
        CONTRACT.validate_request(body["event"], body)


# --------------------------------------------------------------------- headers


@pytest.mark.asyncio
async def test_headers_are_byte_exact(engine: Engine) -> None:
    """Header values keep their leading whitespace and LF-joined folds; 8-bit bytes travel in value_b64."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.HEADER, Event.EOM})))
    await engine.send(HEADER_MESSAGE)
    expected = [
        {"name": "Subject", "value": "  two spaces"},
        {"name": "X-Tab", "value": "\tvalue"},
        {"name": "X-Fold", "value": " first\n\tsecond\n   third"},
        {"name": "X-Empty", "value": ""},
        {"name": "X-Utf8", "value": " café"},
        {"name": "X-8bit", "value": " caf\ufffd", "value_b64": b64(b" caf\xe9")},
    ]
    (eom,) = engine.bodies("policy", "eom")
    assert eom["message"]["headers"] == expected
    header_events = engine.bodies("policy", "header")
    assert [h["data"] for h in header_events] == expected
    # at each header event message.headers already ends with that header
    assert [len(h["message"]["headers"]) for h in header_events] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------ body


BODY = b"".join(b"line %04d \xe9\xff 8-bit\r\n" % n for n in range(8000))  # over two milter chunks


@pytest.mark.asyncio
async def test_body_at_eom_only_for_include_body(engine: Engine) -> None:
    """include_body endpoints get the whole body (base64, size) at eom; others and other events get none."""
    await engine.start(
        engine.endpoint("with", events=frozenset({Event.EOH, Event.EOM}), include_body=True),
        engine.endpoint("without", events=frozenset({Event.EOM})),
    )
    await engine.send(b"Subject: x\r\n\r\n" + BODY)
    (eom,) = engine.bodies("with", "eom")
    body = eom["message"]["body"]
    assert base64.b64decode(body["base64"]) == BODY
    assert body["size"] == len(BODY)
    assert not body.get("truncated", False)
    (other,) = engine.bodies("without", "eom")
    assert "body" not in other["message"]
    (eoh,) = engine.bodies("with", "eoh")
    assert "body" not in eoh["message"]


@pytest.mark.asyncio
async def test_body_truncated_at_max_body_bytes(engine: Engine) -> None:
    """Over max_body_bytes the endpoint gets the first bytes, the full size and truncated true."""
    await engine.start(engine.endpoint("policy", include_body=True, max_body_bytes=1000))
    await engine.send(b"Subject: x\r\n\r\n" + BODY)
    (eom,) = engine.bodies("policy", "eom")
    body = eom["message"]["body"]
    assert base64.b64decode(body["base64"]) == BODY[:1000]
    assert body["size"] == len(BODY)
    assert body["truncated"] is True


@pytest.mark.asyncio
async def test_body_chunks_carry_offsets(engine: Engine) -> None:
    """Body events carry each chunk in base64 with its offset; together they are the body."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.BODY})))
    await engine.send(b"Subject: x\r\n\r\n" + BODY)
    chunks = [b["data"] for b in engine.bodies("policy", "body")]
    assert [c["offset"] for c in chunks] == [0, 65535, 131070][: len(chunks)]
    assert b"".join(base64.b64decode(c["base64"]) for c in chunks) == BODY


# ----------------------------------------------------------------- event data


@pytest.mark.asyncio
async def test_event_data_and_accumulated_context(engine: Engine) -> None:
    """connect, helo, mail, rcpt and unknown carry their data; later payloads carry everything known so far."""
    await engine.start(engine.endpoint("policy", events=EVERY_EVENT - {Event.ABORT, Event.CLOSE}))
    envelope = Envelope(
        mail_from=b"<sender@example.org>",
        mail_args=(b"SIZE=123", b"BODY=8BITMIME"),
        recipients=(b"<a@example.net>", b"<b@example.net>"),
        rcpt_args=((b"NOTIFY=NEVER",), ()),
        helo=b"helo.example.org",
        client_name=b"client.example.org",
        client_address=b"192.0.2.7",
        client_port=40123,
        queue_id=b"QID42",
    )
    client = await engine.client()
    await client.send_message(envelope, MESSAGE)
    await client.unknown(b"XFOO bar")
    bodies = {b["event"]: b for b in engine.bodies("policy")}
    client_obj = {"name": "client.example.org", "address": "192.0.2.7", "port": 40123, "family": "inet"}
    assert bodies["connect"]["data"] == client_obj
    assert bodies["connect"]["message"] is None
    assert bodies["connect"]["session"]["helo"] is None
    assert bodies["helo"]["data"] == {"hostname": "helo.example.org"}
    assert bodies["mail"]["data"] == {
        "address": "sender@example.org",
        "raw": "<sender@example.org>",
        "args": ["SIZE=123", "BODY=8BITMIME"],
    }
    assert bodies["rcpt"]["data"]["address"] == "b@example.net"  # the last rcpt event
    eom = bodies["eom"]
    assert eom["session"]["client"] == client_obj
    assert eom["session"]["helo"] == "helo.example.org"
    assert eom["session"]["macros"] == {
        "j": "mta.example.test",
        "{daemon_name}": "mta.example.test",
        "v": "Postfix 3.7",
    }
    assert eom["message"]["mail_from"]["args"] == ["SIZE=123", "BODY=8BITMIME"]
    assert eom["message"]["rcpt_to"] == [
        {"address": "a@example.net", "raw": "<a@example.net>", "args": ["NOTIFY=NEVER"]},
        {"address": "b@example.net", "raw": "<b@example.net>", "args": []},
    ]
    assert eom["message"]["queue_id"] == "QID42"
    assert eom["message"]["macros"]["i"] == "QID42"
    assert bodies["unknown"]["data"] == {"command": "XFOO bar"}
    assert bodies["unknown"]["message"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("family", "address", "expected"),
    [
        pytest.param(Family.INET6, b"IPv6:2001:db8::1", {"address": "2001:db8::1", "family": "inet6"}, id="inet6"),
        pytest.param(
            Family.INET6,
            b"IPv6:2001:DB8:0:0:0:0:0:1",
            {"address": "2001:db8::1", "family": "inet6"},
            id="inet6-sendmail-uncompressed",
        ),
        pytest.param(Family.INET6, b"2001:db8::1", {"address": "2001:db8::1", "family": "inet6"}, id="inet6-postfix"),
        pytest.param(Family.UNIX, b"/run/sock", {"address": "/run/sock", "port": None, "family": "unix"}, id="unix"),
        pytest.param(Family.UNKNOWN, b"", {"address": None, "port": None, "family": "unknown"}, id="unknown"),
    ],
)
async def test_client_families(engine: Engine, family: Family, address: bytes, expected: dict[str, Any]) -> None:
    """The connect data names the family; IPv6 loses Sendmail's prefix; unix and unknown have no port."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.CONNECT})))
    client = await engine.client()
    await client.connect(b"localhost", family, address, 25 if family is Family.INET6 else 0)
    (connect,) = engine.bodies("policy", "connect")
    assert {k: connect["data"][k] for k in expected} == expected


@pytest.mark.asyncio
async def test_non_utf8_text_fields_use_b64_siblings(engine: Engine) -> None:
    """8-bit bytes in HELO, addresses, args and macros come as replacement text plus exact base64."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.HELO, Event.MAIL})))
    client = await engine.client()
    await client.connect(b"client", Family.INET, b"192.0.2.1", 1, macros=[(b"{x}", b"v\xe9")])
    await client.helo(b"h\xe9lo")
    await client.mail_from(b"<s\xe9@example.org>", [b"X=\xff"])
    helo, mail = engine.bodies("policy")
    assert helo["data"] == {"hostname": "h\ufffdlo", "hostname_b64": b64(b"h\xe9lo")}
    assert helo["session"]["macros_b64"] == {"{x}": b64(b"v\xe9")}
    assert mail["data"]["address_b64"] == b64(b"s\xe9@example.org")
    assert mail["data"]["raw_b64"] == b64(b"<s\xe9@example.org>")
    assert mail["data"]["args_b64"] == [b64(b"X=\xff")]
    assert mail["session"]["helo_b64"] == b64(b"h\xe9lo")


@pytest.mark.asyncio
async def test_null_sender(engine: Engine) -> None:
    """The null sender is address "" with raw "<>"."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL})))
    await engine.send(envelope=Envelope(mail_from=b"<>"))
    (mail,) = engine.bodies("policy", "mail")
    assert mail["data"] == {"address": "", "raw": "<>", "args": []}


# ------------------------------------------------------------- ids and headers


@pytest.mark.asyncio
async def test_ids_stable_within_message_and_session(engine: Engine) -> None:
    """message.id is shared by one message's events and new for the next; session.id lasts the connection."""
    await engine.start(engine.endpoint("policy", events=frozenset({Event.MAIL, Event.RCPT, Event.EOM})))
    client = await engine.client()
    await client.send_message(Envelope(), MESSAGE)
    await client.send_transaction(Envelope(), MESSAGE)
    await engine.send()  # another connection
    bodies = engine.bodies("policy")
    assert [b["event"] for b in bodies] == ["mail", "rcpt", "eom"] * 3
    message_ids = [b["message"]["id"] for b in bodies]
    assert len(set(message_ids[0:3])) == len(set(message_ids[3:6])) == len(set(message_ids[6:9])) == 1
    assert len(set(message_ids)) == 3
    session_ids = [b["session"]["id"] for b in bodies]
    assert len(set(session_ids[:6])) == 1
    assert session_ids[6] != session_ids[0]
    call_ids = [b["id"] for b in bodies]
    assert len(set(call_ids)) == len(call_ids)


@pytest.mark.asyncio
async def test_http_headers_of_a_request(engine: Engine) -> None:
    """id equals webhook-id; webhook-timestamp is now; content type, user agent and configured headers are sent."""
    await engine.start(engine.endpoint("policy", headers=(("Authorization", "Bearer t0ken"),)))
    await engine.send()
    (request,) = engine.requests("policy")
    assert request.method == "POST"
    assert request.headers["webhook-id"] == request.json["id"]
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 10
    # The body's timestamp: RFC 3339 UTC with milliseconds, and now.
    stamp = request.json["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    sent = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    assert abs(sent - time.time()) < 10
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"milterbridge/{milterbridge.__version__}"
    assert request.headers["Authorization"] == "Bearer t0ken"
    assert "webhook-signature" not in request.headers


@pytest.mark.asyncio
async def test_webhook_id_is_the_same_on_a_retry(engine: Engine) -> None:
    """A retried call keeps its webhook-id (header and body)."""
    engine.fake.enqueue(FakeResponse.status_code(503))
    await engine.start(engine.endpoint("policy"))
    result = await engine.send()
    assert result.eom is not None
    assert result.eom.reply == Continue()
    first, second = engine.requests("policy")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == first.json["id"] == second.json["id"]


@pytest.mark.asyncio
async def test_signature_verifies_with_standardwebhooks(engine: Engine) -> None:
    """With two secrets (rotation) the request carries two signatures, each verifiable with its key."""
    keys = ["whsec_" + b64(bytes(range(32))), "whsec_" + b64(bytes(range(32, 64)))]
    await engine.start(engine.endpoint("policy", secrets=tuple(keys)))
    await engine.send()
    (request,) = engine.requests("policy")
    headers = dict(request.headers)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in keys:
        assert Webhook(key).verify(request.body, headers) == request.json
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + b64(b"\x00" * 32)).verify(request.body, headers)


# --------------------------------------------------------------- notifications


@pytest.mark.asyncio
async def test_abort_fires_once_per_message_without_eom(engine: Engine) -> None:
    """A transaction ended by ABORT (twice, as Postfix may) or a new MAIL gives one abort; a completed one none."""
    await engine.start(engine.endpoint("notes", events=frozenset({Event.ABORT})))
    client = await engine.client()
    await client.send_message(Envelope(), MESSAGE)  # completed, then ABORT: not an event
    await client.mail_from(b"<early@example.org>")
    await client.rcpt_to(b"<r@example.net>")
    await client.abort()
    await client.abort()
    await client.mail_from(b"<replaced@example.org>")
    await client.mail_from(b"<next@example.org>")  # a new MAIL ends the open transaction
    await client.abort()
    await client.quit()
    await engine.fake.wait_for(3, path="/notes")
    await engine.settle()
    aborts = engine.bodies("notes")
    assert [a["message"]["mail_from"]["address"] for a in aborts] == [
        "early@example.org",
        "replaced@example.org",
        "next@example.org",
    ]
    assert [r["address"] for r in aborts[0]["message"]["rcpt_to"]] == ["r@example.net"]
    assert all(a["event"] == "abort" and a["data"] == {} for a in aborts)
    assert len({a["message"]["id"] for a in aborts}) == 3


@pytest.mark.asyncio
async def test_abort_fires_once_for_a_transaction_open_at_quit(engine: Engine) -> None:
    """QUIT inside a transaction ends it with exactly one abort notification."""
    await engine.start(engine.endpoint("notes", events=frozenset({Event.ABORT})))
    client = await engine.client()
    await client.open_session(Envelope())
    await client.mail_from(b"<open@example.org>")
    await client.quit()
    await engine.fake.wait_for(1, path="/notes")
    await engine.settle()
    assert engine.events("notes") == ["abort"]


@pytest.mark.asyncio
async def test_close_fires_once_at_quit(engine: Engine) -> None:
    """QUIT gives one close notification with message null, answered or not."""
    await engine.start(engine.endpoint("notes", events=frozenset({Event.CLOSE})))
    engine.fake.set_default(FakeResponse.decision("reject"))  # ignored: a notification
    client = await engine.client()
    await client.send_message(Envelope(), MESSAGE)
    await client.quit()
    (close,) = await engine.fake.wait_for(1, path="/notes")
    await engine.settle()
    assert len(engine.requests("notes")) == 1
    assert close.json["event"] == "close"
    assert close.json["message"] is None
    assert close.json["data"] == {}
    assert close.json["session"]["helo"] == "client.example.org"


@pytest.mark.asyncio
async def test_eof_mid_message_gives_abort_and_close(engine: Engine) -> None:
    """An MTA that vanishes inside a transaction yields one abort and one close."""
    await engine.start(engine.endpoint("notes", events=frozenset({Event.ABORT, Event.CLOSE})))
    client = await engine.client()
    await client.open_session(Envelope())
    await client.mail_from(b"<s@example.org>")
    await client.aclose()
    await engine.fake.wait_for(2, path="/notes")
    await engine.settle()
    assert sorted(engine.events("notes")) == ["abort", "close"]  # type: ignore[type-var]


# ----------------------------------------------------------------- negotiation


def _stages(macros: tuple[tuple[MacroStage, bytes], ...]) -> dict[MacroStage, list[bytes]]:
    return {stage: names.split(b" ") for stage, names in macros}


@pytest.mark.asyncio
async def test_negotiation_for_an_eom_only_config(engine: Engine) -> None:
    """With one eom endpoint: data, eoh, body and unknown are off; context events are no-reply."""
    await engine.start(engine.endpoint("policy"))
    reply = (await engine.client()).negotiated
    assert reply is not None
    off = Protocol.NO_DATA | Protocol.NO_EOH | Protocol.NO_BODY | Protocol.NO_UNKNOWN
    silent = Protocol.NR_CONNECT | Protocol.NR_HELO | Protocol.NR_MAIL | Protocol.NR_RCPT | Protocol.NR_HEADER
    assert reply.protocol & off == off
    assert reply.protocol & silent == silent
    assert not reply.protocol & (Protocol.NO_CONNECT | Protocol.NO_HELO | Protocol.NO_MAIL | Protocol.NO_RCPT)
    assert not reply.protocol & Protocol.NO_HEADERS
    assert reply.protocol & Protocol.HDR_LEADSPC
    assert reply.protocol & Protocol.SKIP
    assert reply.actions & ALL_ACTIONS & ~Action.SETSYMLIST == ALL_ACTIONS & ~Action.SETSYMLIST


@pytest.mark.asyncio
async def test_negotiation_follows_subscriptions(engine: Engine) -> None:
    """Subscribed events are switched on, enforced ones answered, observed ones no-reply, include_body brings body."""
    await engine.start(
        engine.endpoint("enforce", events=frozenset({Event.RCPT, Event.EOH, Event.EOM})),
        engine.endpoint("observe", events=frozenset({Event.DATA, Event.UNKNOWN}), mode=Mode.OBSERVE),
        engine.endpoint("archive", include_body=True),
    )
    reply = (await engine.client()).negotiated
    assert reply is not None
    protocol = reply.protocol
    assert not protocol & (Protocol.NO_DATA | Protocol.NO_EOH | Protocol.NO_UNKNOWN | Protocol.NO_BODY)
    assert not protocol & (Protocol.NR_RCPT | Protocol.NR_EOH)
    assert protocol & Protocol.NR_DATA
    assert protocol & Protocol.NR_UNKNOWN
    assert protocol & Protocol.NR_BODY
    assert protocol & Protocol.NR_MAIL


@pytest.mark.asyncio
async def test_negotiation_requests_endpoint_macros(engine: Engine) -> None:
    """Endpoint macros join Postfix's defaults in every stage's list, and i is asked from MAIL on."""
    await engine.start(engine.endpoint("policy", macros=("{auth_authen}", "{my_macro}", "i")))
    reply = (await engine.client()).negotiated
    assert reply is not None
    assert reply.actions & Action.SETSYMLIST
    stages = _stages(reply.macros)
    assert set(stages) == set(MacroStage)
    for names in stages.values():
        assert b"{my_macro}" in names
        assert b"{auth_authen}" in names
        assert len(names) == len(set(names))
    for stage in (MacroStage.ENVFROM, MacroStage.ENVRCPT, MacroStage.DATA, MacroStage.EOH, MacroStage.EOM):
        assert b"i" in stages[stage]
    assert b"{client_addr}" in stages[MacroStage.CONNECT]


@pytest.mark.asyncio
async def test_negotiation_within_a_small_offer(engine: Engine) -> None:
    """Against an MTA offering few actions and no SKIP, the answer stays inside the offer."""
    await engine.start(engine.endpoint("policy"))
    client = await engine.client(actions=Action.ADD_HEADERS, protocol=0x001FFFFF & ~Protocol.SKIP)
    assert client.negotiated is not None
    assert client.negotiated.actions == Action.ADD_HEADERS
    assert not client.negotiated.protocol & Protocol.SKIP
    assert client.negotiated.macros == ()  # no SETSYMLIST offered: no lists
    result = await engine.send(client=client)
    assert result.eom is not None
    assert result.eom.reply == Continue()


@pytest.mark.asyncio
async def test_message_macros_in_each_event_are_those_known_at_that_event(engine: Engine) -> None:
    """Per-stage requests of one message show the macros as they grow, not a stale copy."""
    events = frozenset({Event.MAIL, Event.RCPT, Event.EOM})
    await engine.start(engine.endpoint("policy", events=events))
    client = await engine.client()
    await client.open_session(Envelope())
    await client.mail_from(b"<s@example.org>", macros=((b"{mail_addr}", b"s@example.org"),))
    await client.rcpt_to(b"<a@example.net>", macros=((b"{rcpt_addr}", b"a@example.net"),))
    await client.rcpt_to(b"<b@example.net>", macros=((b"{rcpt_addr}", b"b@example.net"), (b"i", b"Q1")))
    await client.header(b"Subject", b"x", macros=((b"i", b"Q1"),))
    await client.end_of_headers(macros=((b"i", b"Q1"),))
    result = await client.end_of_message(macros=((b"i", b"Q2"),))
    assert result.reply == Continue()
    seen = [(b["event"], b["message"]["macros"], b["message"]["queue_id"]) for b in engine.bodies("policy")]
    assert seen == [
        ("mail", {"{mail_addr}": "s@example.org"}, None),
        ("rcpt", {"{mail_addr}": "s@example.org", "{rcpt_addr}": "a@example.net"}, None),
        ("rcpt", {"{mail_addr}": "s@example.org", "{rcpt_addr}": "b@example.net", "i": "Q1"}, "Q1"),
        ("eom", {"{mail_addr}": "s@example.org", "{rcpt_addr}": "b@example.net", "i": "Q2"}, "Q2"),
    ]
    rcpts = [[r["address"] for r in b["message"]["rcpt_to"]] for b in engine.bodies("policy")]
    assert rcpts == [[], ["a@example.net"], ["a@example.net", "b@example.net"], ["a@example.net", "b@example.net"]]
