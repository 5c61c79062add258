"""``milterbridge send`` against a real bridge: macros, ESMTP arguments, the client, outcomes, exit codes.

Each test runs the command in a child process, as a user or a script would, against an
``app.Bridge`` (``tests.harness.BridgeHarness``) whose endpoint is a fake webhook server
that records what the bridge made of the milter conversation.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from milterbridge.config import Config, ServerSettings
from milterbridge.milter.constants import Event
from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest
from tests.harness import LOOPBACK, BridgeHarness

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello there.\r\n"
#: The endpoint sees the envelope events and end-of-message.
EVENTS = frozenset({Event.CONNECT, Event.HELO, Event.MAIL, Event.RCPT, Event.EOM})


@dataclass
class Ran:
    """One finished ``milterbridge send``."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class Setup:
    """A running bridge, its fake endpoint and a message file."""

    bridge: BridgeHarness
    webhooks: FakeWebhooks
    message: Path

    async def send(self, *args: str) -> Ran:
        """``milterbridge send MESSAGE --milter ADDR ARGS`` to completion."""
        return await run_send(str(self.message), "--milter", self.bridge.address, *args)

    def request(self, event: str, n: int = 0) -> dict[str, Any]:
        """The JSON body of the ``n``-th request for ``event``."""
        body = self.webhooks.requests_for(event=event)[n].json
        assert isinstance(body, dict)
        return body


async def run_send(*args: str) -> Ran:
    """``python -m milterbridge send ARGS`` in a child process (this loop keeps serving the bridge)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "milterbridge",
        "send",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Ran(proc.returncode, stdout.decode(), stderr.decode())


@pytest_asyncio.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    async with FakeWebhooks() as webhooks:
        config = Config(
            server=ServerSettings(listen=LOOPBACK),
            endpoints=(webhooks.endpoint("policy", events=EVENTS, timeout=5.0),),
        )
        async with BridgeHarness(config) as bridge:
            yield Setup(bridge, webhooks, message)


# -- what reaches the bridge -------------------------------------------------------------


@pytest.mark.asyncio
async def test_macros_arrive_at_the_stage_postfix_sends_them(setup):
    """Macros go with CONNECT, HELO or MAIL as Postfix sends them, or with the stage named."""
    ran = await setup.send(
        "--macro",
        "{auth_authen}=alice",
        "--macro",
        "auth_type=PLAIN",
        "--macro",
        "{tls_version}=TLSv1.3",
        "--macro",
        "eom:{spam_score}=1.5",
        "--daemon-name",
        "submission",
    )
    assert ran.returncode == 0, ran.stderr
    connect = setup.request("connect")
    assert connect["session"]["macros"]["{daemon_name}"] == "submission"
    assert connect["session"]["macros"]["{client_addr}"] == "192.0.2.1"
    assert "{auth_authen}" not in connect["session"]["macros"]
    assert setup.request("helo")["session"]["macros"]["{tls_version}"] == "TLSv1.3"
    mail = setup.request("mail")["message"]["macros"]
    assert mail["{auth_authen}"] == "alice"
    assert mail["{auth_type}"] == "PLAIN"
    assert "{spam_score}" not in mail
    eom = setup.request("eom")["message"]["macros"]
    assert eom["{spam_score}"] == "1.5"
    assert eom["i"] == "4ABC123DEF"


@pytest.mark.asyncio
async def test_a_macro_given_twice_at_one_stage_sends_the_last_value(setup):
    """``--macro {daemon_name}=X`` replaces the default daemon name instead of adding a second one."""
    ran = await setup.send("--macro", "{daemon_name}=smtps", "--macro", "connect:{daemon_name}=submission")
    assert ran.returncode == 0, ran.stderr
    assert setup.request("connect")["session"]["macros"]["{daemon_name}"] == "submission"


@pytest.mark.asyncio
async def test_esmtp_arguments_of_mail_and_rcpt(setup):
    """Words after an address are that command's ESMTP arguments, per recipient."""
    ran = await setup.send(
        "--from",
        "<alice@example.org> SIZE=1000 BODY=8BITMIME",
        "--rcpt",
        "bob@example.net NOTIFY=NEVER ORCPT=rfc822;bob@example.net",
        "--rcpt",
        "carol@example.net",
    )
    assert ran.returncode == 0, ran.stderr
    mail = setup.request("mail")["data"]
    assert (mail["address"], mail["args"]) == ("alice@example.org", ["SIZE=1000", "BODY=8BITMIME"])
    first, second = (setup.request("rcpt", n)["data"] for n in (0, 1))
    assert (first["address"], first["args"]) == ("bob@example.net", ["NOTIFY=NEVER", "ORCPT=rfc822;bob@example.net"])
    assert (second["address"], second["args"]) == ("carol@example.net", [])


@pytest.mark.asyncio
async def test_null_sender(setup):
    """``--from ''`` is the null sender."""
    ran = await setup.send("--from", "")
    assert ran.returncode == 0, ran.stderr
    assert setup.request("mail")["data"]["raw"] == "<>"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("given", "address", "family", "macro"),
    [
        pytest.param("198.51.100.7", "198.51.100.7", "inet", "198.51.100.7", id="ipv4"),
        pytest.param("2001:db8::25", "2001:db8::25", "inet6", "IPv6:2001:db8::25", id="ipv6"),
        pytest.param("[2001:DB8::25]", "2001:db8::25", "inet6", "IPv6:2001:db8::25", id="ipv6-bracketed"),
    ],
)
async def test_client_address_and_name_reach_connect(setup, given, address, family, macro):
    """--client-addr (IPv4 or IPv6) and --client-name are the CONNECT's client, as Postfix sends it."""
    ran = await setup.send("--client-addr", given, "--client-name", "mx.example.com")
    assert ran.returncode == 0, ran.stderr
    connect = setup.request("connect")
    assert connect["data"]["name"] == "mx.example.com"
    assert connect["data"]["address"] == address
    assert connect["data"]["family"] == family
    assert connect["session"]["macros"]["{client_addr}"] == macro
    assert connect["session"]["macros"]["{client_name}"] == "mx.example.com"


@pytest.mark.asyncio
async def test_client_name_defaults_to_the_bracketed_address(setup):
    ran = await setup.send("--client-addr", "203.0.113.9")
    assert ran.returncode == 0, ran.stderr
    assert setup.request("connect")["data"]["name"] == "[203.0.113.9]"


# -- outcomes and exit codes -------------------------------------------------------------


def answer_eom(setup: Setup, response: FakeResponse) -> None:
    setup.webhooks.set_default(response, event="eom")


@pytest.mark.asyncio
async def test_quarantine_is_the_outcome(setup):
    """A quarantined message prints as outcome quarantine with its reason, in text and JSON; --exit-code 0."""
    answer_eom(setup, FakeResponse.decision("quarantine", reason="held for review"))
    text = await setup.send("--exit-code")
    assert text.returncode == 0, text.stderr
    assert "decision: quarantine (at eom)" in text.stdout
    assert "reason: held for review" in text.stdout

    document = json.loads((await setup.send("--json")).stdout)
    assert document["decision"] == {"action": "quarantine", "reason": "held for review"}
    assert document["stopped_at"] == "eom"
    assert {"op": "quarantine", "reason": "held for review"} in document["modifications"]


def rcpt_answer(action: str) -> FakeResponse:
    if action in ("reject", "tempfail"):
        code = 550 if action == "reject" else 451
        return FakeResponse.decision(action, reply={"code": code, "text": f"{action} here"})
    return FakeResponse.decision(action)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("action", "status"),
    [("continue", 0), ("accept", 0), ("reject", 3), ("tempfail", 4), ("discard", 5)],
)
async def test_exit_code_by_outcome(setup, action, status):
    """With --exit-code the status tells the outcome; without it a decision always exits 0."""
    answer_eom(setup, rcpt_answer(action))
    ran = await setup.send("--exit-code")
    assert ran.returncode == status, ran.stdout + ran.stderr
    assert f"decision: {action} (at eom)" in ran.stdout
    assert (await setup.send()).returncode == 0


@pytest.mark.asyncio
async def test_exit_code_of_a_recipient_refused_at_rcpt(setup):
    """A refusal before end-of-message (the only recipient refused at RCPT) counts the same."""

    def rcpt(request: RecordedRequest) -> FakeResponse:
        return rcpt_answer("tempfail")

    setup.webhooks.set_default(rcpt, event="rcpt")
    ran = await setup.send("--exit-code", "--json")
    assert ran.returncode == 4, ran.stdout + ran.stderr
    document = json.loads(ran.stdout)
    assert document["decision"]["action"] == "tempfail"
    assert document["stopped_at"] == "rcpt"


# -- usage -------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["--macro", "auth_authen"], "NAME=VALUE", id="no-value"),
        pytest.param(["--macro", "=x"], "NAME=VALUE", id="no-name"),
        pytest.param(["--macro", "envelope:{x}=y"], "unknown stage 'envelope'", id="bad-stage"),
        pytest.param(["--client-addr", "mx.example.com"], "not an IPv4 or IPv6 address", id="bad-address"),
    ],
)
async def test_bad_arguments_are_usage_errors(tmp_path, args, says):
    """A malformed --macro or --client-addr exits 2 with one line saying what is wrong, before connecting."""
    message = tmp_path / "m.eml"
    message.write_bytes(MESSAGE)
    ran = await run_send(str(message), "--milter", "inet:127.0.0.1:9", *args)
    assert ran.returncode == 2
    assert says in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.asyncio
async def test_help_shows_the_envelope_defaults():
    """``send --help`` names the default sender, recipient, client and daemon name, and the exit codes."""
    ran = await run_send("--help")
    assert ran.returncode == 0
    out = " ".join(ran.stdout.split())
    for text in (
        "sender@example.org",
        "rcpt@example.net",
        "192.0.2.1",
        "client.example.org",
        "mta.example.test",
        "not the message's From:",
        "3 reject; 4 tempfail",
        "5 discard",
    ):
        assert text in out, text
