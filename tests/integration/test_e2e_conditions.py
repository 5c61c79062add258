"""Per-endpoint conditions (``when``) through a real Postfix set to ``milter_default_action = accept``.

``accept`` is the setting that hides a gate left open: a bridge that failed would let the
mail through unfiltered. So each endpoint with a condition here rejects whatever it is asked
about, and every test shows both sides: mail the condition selects gets the endpoint's 550,
mail it leaves out is delivered, the endpoint never saw it, and
``milterbridge_endpoint_skipped_total`` names the key that did not match.

The ``daemon`` and ``authenticated`` tests add a second smtpd listener to the private
Postfix (``PostfixInstance.add_smtpd_service``), the second one with real Cyrus SASL
(sasldb), as a submission service would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest

from milterbridge.milter.constants import Event
from milterbridge.policy.conditions import parse_condition
from tests.fakes.webhooks import FakeResponse, FakeWebhooks

from .bridge import BridgeRunner, RunningBridge, blocking, smtp
from .postfix import PostfixInstance, PostfixUnavailableError, SmtpResult, make_message

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"
RCPT = "bob@example.net"
SKIPPED = "milterbridge_endpoint_skipped_total"
DAEMON = "submission-test"
USER, PASSWORD = "alice", "correct horse"


def refusal(text: str) -> FakeResponse:
    return FakeResponse.decision("reject", reply={"code": 550, "enhanced": "5.7.1", "text": text})


def end_code(result: SmtpResult) -> int | None:
    reply = result.transaction.end_of_data
    return None if reply is None else reply.code


async def delivered(mta: PostfixInstance) -> int:
    """The number of delivered files once the queue is idle (asserts nothing is left queued)."""
    assert await blocking(mta.wait_for_queue_idle) == []
    return len(mta.maildir_messages())


@pytest.fixture
def services(mta: PostfixInstance) -> Iterator[Callable[..., int]]:
    """``services(name, options)`` adds an smtpd listener; all are removed after the test."""
    try:
        yield mta.add_smtpd_service
    finally:
        mta.remove_smtpd_services()


async def start(webhooks: FakeWebhooks, bridges: BridgeRunner, **whens: Mapping[str, object]) -> RunningBridge:
    """One eom endpoint per ``name=when``, each rejecting with its own name as the text."""
    endpoints = []
    for name, when in whens.items():
        webhooks.set_default(refusal(f"refused by {name}"), path=f"/{name}")
        endpoints.append(webhooks.endpoint(name, path=f"/{name}", timeout=5.0, when=parse_condition(when)))
    return await bridges.start(*endpoints, default_action="accept")


@pytest.mark.asyncio
async def test_client_selects_by_network(mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner) -> None:
    """Loopback mail skips the endpoint for outside clients and reaches the one for loopback."""
    bridge = await start(
        webhooks, bridges, outside={"client": ["!127.0.0.0/8", "!::1"]}, inside={"client": ["127.0.0.0/8"]}
    )
    result = await smtp(mta, SENDER, [RCPT], make_message(subject="loopback"))
    assert end_code(result) == 550, result.transaction
    assert result.transaction.end_of_data is not None
    assert "refused by inside" in result.transaction.end_of_data.text
    assert len(webhooks.requests_for(path="/inside", event="eom")) == 1
    assert webhooks.requests_for(path="/outside") == []
    assert bridge.metric(SKIPPED, endpoint="outside", reason="client") == 1
    assert bridge.metric(SKIPPED, endpoint="inside") == 0
    assert await delivered(mta) == 0


@pytest.mark.asyncio
async def test_client_left_out_lets_loopback_mail_through(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """With only the outside endpoint, loopback mail is delivered and the endpoint is never called."""
    bridge = await start(webhooks, bridges, outside={"client": ["!127.0.0.0/8"]})
    results = [await smtp(mta, SENDER, [RCPT], make_message(subject=f"loopback {n}")) for n in range(2)]
    assert [end_code(r) for r in results] == [250, 250]
    assert webhooks.requests_for(path="/outside") == []
    assert bridge.metric(SKIPPED, endpoint="outside", reason="client") == 2
    assert await delivered(mta) == 2


@pytest.mark.asyncio
async def test_daemon_selects_the_second_smtpd_service(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, services: Callable[..., int]
) -> None:
    """An endpoint for ``daemon = submission-test`` decides only mail through that service."""
    port = await blocking(services, DAEMON, {"milter_macro_daemon_name": DAEMON})
    bridge = await start(webhooks, bridges, submission={"daemon": [DAEMON]})
    plain = await smtp(mta, SENDER, [RCPT], make_message(subject="port 25 style"))
    assert end_code(plain) == 250, plain.transaction
    assert bridge.metric(SKIPPED, endpoint="submission", reason="daemon") == 1
    assert webhooks.requests_for(path="/submission") == []
    submitted = await smtp(mta, SENDER, [RCPT], make_message(subject="submission"), port=port)
    assert end_code(submitted) == 550, submitted.transaction
    assert len(webhooks.requests_for(path="/submission", event="eom")) == 1
    assert bridge.metric(SKIPPED, endpoint="submission", reason="daemon") == 1
    assert await delivered(mta) == 1


@pytest.mark.asyncio
async def test_sender_domains(mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner) -> None:
    """Mail from the listed domain (any case) gets the endpoint's decision; other senders pass."""
    bridge = await start(webhooks, bridges, outbound={"sender_domains": ["example.org"]})
    own = await smtp(mta, "Alice@EXAMPLE.org", [RCPT], make_message(subject="own domain"))
    foreign = await smtp(mta, "carol@elsewhere.test", [RCPT], make_message(subject="foreign"))
    bounce = await smtp(mta, "", [RCPT], make_message(subject="null sender"))
    assert [end_code(own), end_code(foreign), end_code(bounce)] == [550, 250, 250]
    assert len(webhooks.requests_for(path="/outbound", event="eom")) == 1
    assert bridge.metric(SKIPPED, endpoint="outbound", reason="sender_domains") == 2
    assert await delivered(mta) == 2


@pytest.mark.asyncio
async def test_recipient_domains_per_recipient_at_rcpt(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """An rcpt endpoint that rejects every recipient it sees is asked only for its domain's;
    the message to two domains is delivered to the other one."""
    webhooks.set_default(refusal("not for partners"), path="/partner", event="rcpt")
    endpoint = webhooks.endpoint(
        "partner",
        path="/partner",
        events=frozenset({Event.RCPT}),
        timeout=5.0,
        when=parse_condition({"recipient_domains": ["partner.example", "*.partner.example"]}),
    )
    bridge = await bridges.start(endpoint, default_action="accept")
    rcpts = ["ann@Partner.Example", "bob@example.net", "cid@mx.partner.example"]
    result = await smtp(mta, SENDER, rcpts, make_message(subject="two domains", to=rcpts))
    assert [reply.code for reply in result.transaction.rcpts] == [550, 250, 550]
    assert end_code(result) == 250
    asked = webhooks.requests_for(path="/partner", event="rcpt")
    assert len(asked) == 2
    assert [request.json["data"]["address"] for request in asked] == ["ann@Partner.Example", "cid@mx.partner.example"]
    # Counted once for bob at RCPT and once for the message, whose only accepted recipient is bob's.
    assert bridge.metric(SKIPPED, endpoint="partner", reason="recipient_domains") == 2
    assert await delivered(mta) == 1
    ((_, raw),) = mta.maildir_messages()
    assert b"Delivered-To: bob@example.net" in raw


@pytest.mark.asyncio
async def test_recipient_domains_at_eom_holds_when_any_recipient_matches(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner
) -> None:
    """At eom the condition holds if any accepted recipient matches; with none, the endpoint is skipped."""
    bridge = await start(webhooks, bridges, partner={"recipient_domains": ["partner.example"]})
    mixed = await smtp(mta, SENDER, ["ann@partner.example", RCPT], make_message(subject="mixed"))
    other = await smtp(mta, SENDER, [RCPT], make_message(subject="other"))
    assert [end_code(mixed), end_code(other)] == [550, 250]
    assert len(webhooks.requests_for(path="/partner", event="eom")) == 1
    assert bridge.metric(SKIPPED, endpoint="partner", reason="recipient_domains") == 1
    assert await delivered(mta) == 1


def sasl_submission(mta: PostfixInstance, services: Callable[..., int]) -> int:
    """A submission-like smtpd service with Cyrus SASL (sasldb) for USER; return its port."""
    try:
        options = mta.sasl_options({USER: PASSWORD})
    except PostfixUnavailableError as exc:
        pytest.skip(f"SASL cannot be set up here: {exc}")
    return services(DAEMON, {**options, "milter_macro_daemon_name": DAEMON})


def submit(
    mta: PostfixInstance, port: int, login: tuple[str, str] | None, subject: str
) -> tuple[int | None, SmtpResult]:
    """One session on ``port``, logged in with ``login`` first when given: (AUTH code, result)."""
    with mta.smtp_session(port=port) as session:
        auth = session.login(*login) if login is not None else None
        session.send(SENDER, [RCPT], make_message(subject=subject))
    return (auth.code if auth is not None else None), session.result()


@pytest.mark.asyncio
async def test_authenticated_selects_sasl_logins(
    mta: PostfixInstance, webhooks: FakeWebhooks, bridges: BridgeRunner, services: Callable[..., int]
) -> None:
    """Through real SASL: a logged-in session gets the endpoint's decision, an anonymous one on
    the same service is delivered with the endpoint skipped, and a wrong password does not log in."""
    port = await blocking(sasl_submission, mta, services)
    bridge = await start(webhooks, bridges, dlp={"authenticated": True, "daemon": [DAEMON]})
    auth, logged_in = await blocking(submit, mta, port, (USER, PASSWORD), "logged in")
    assert auth == 235, logged_in.replies
    assert end_code(logged_in) == 550, logged_in.transaction
    assert len(webhooks.requests_for(path="/dlp", event="eom")) == 1

    auth, anonymous = await blocking(submit, mta, port, None, "anonymous")
    assert auth is None
    assert end_code(anonymous) == 250, anonymous.transaction
    bad, wrong = await blocking(submit, mta, port, (USER, "wrong"), "wrong password")
    assert bad == 535, wrong.replies
    assert end_code(wrong) == 250, wrong.transaction
    assert len(webhooks.requests_for(path="/dlp", event="eom")) == 1
    assert bridge.metric(SKIPPED, endpoint="dlp", reason="authenticated") == 2
    assert await delivered(mta) == 2
