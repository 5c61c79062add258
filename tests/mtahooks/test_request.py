"""MTA Hooks hook requests built from the bridge's own request documents (the contract's examples)."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

from milterbridge.milter.constants import Event
from milterbridge.mtahooks import PROPERTIES, STAGES, hook_request
from milterbridge.mtahooks.request import parameters
from tests import contract


def example(name: str) -> dict[str, Any]:
    return copy.deepcopy(contract.SPEC["components"]["examples"][name]["value"])


def test_the_data_stage_carries_the_whole_message():
    ours = example("request-eom")
    hook = hook_request(ours, Event.EOM)
    assert hook["stage"] == "data"
    assert hook["action"] == "accept"
    assert hook["protocol"] == {"version": "1.0"}
    assert hook["timestamp"] == ours["timestamp"]
    assert hook["envelope"] == {
        "from": {"address": "alice@example.org", "parameters": {"SIZE": "1834", "BODY": "8BITMIME"}},
        "to": [
            {"address": "bob@example.net", "parameters": {}},
            {
                "address": "carol@example.net",
                "parameters": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;carol@example.net"},
            },
        ],
    }
    assert hook["client"] == {"ip": "192.0.2.1", "port": 54321, "ehlo": "mail.example.org", "ptr": "mail.example.org"}
    assert hook["queue"] == {"id": "4dFk2R0xyzz9sWF"}
    assert hook["tls"] == {
        "version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "cipherBits": None,
        "certIssuer": None,
        "certSubject": None,
    }
    assert hook["auth"] is None
    assert hook["server"] == {"name": "mx.example.net", "ip": "198.51.100.25", "port": None}
    headers = hook["message"]["headers"]
    assert headers[0] == {"name": "From", "value": " Alice <alice@example.org>"}
    assert [h["name"] for h in headers] == [h["name"] for h in ours["message"]["headers"]]
    raw = base64.b64decode(hook["rawMessage"])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == base64.b64decode(ours["message"]["body"]["base64"])
    assert head.split(b"\r\n")[1] == b"To: Bob <bob@example.net>,"  # a folded header keeps its fold, as CRLF
    assert b"Subject: Caf\xe9 cr\xe8me" in head  # the exact bytes, not the replacement characters
    assert hook["message"]["size"] == len(raw)


def test_before_data_there_is_no_message():
    ours = example("request-eom")
    ours["event"] = "rcpt"
    hook = hook_request(ours, Event.RCPT)
    assert hook["stage"] == "rcpt"
    assert hook["message"] is None
    assert hook["rawMessage"] is None
    assert hook["envelope"]["to"][-1]["address"] == "carol@example.net"


def test_connect_has_neither_envelope_nor_queue():
    ours = example("request-eom")
    del ours["message"]
    hook = hook_request(ours, Event.CONNECT)
    assert hook["stage"] == "connect"
    assert hook["envelope"] is None
    assert hook["queue"] is None


def test_the_null_sender_has_a_null_address():
    ours = example("request-eom")
    ours["message"]["mail_from"] = {"address": "", "raw": "<>", "args": []}
    assert hook_request(ours, Event.MAIL)["envelope"]["from"] == {"address": None, "parameters": {}}


def test_auth_and_server_port_come_from_the_macros():
    ours = example("request-eom")
    ours["message"]["macros"] |= {"{auth_authen}": "alice", "{auth_type}": "PLAIN"}
    ours["session"]["macros"]["{daemon_port}"] = "587"
    hook = hook_request(ours, Event.EOM)
    assert hook["auth"] == {"login": "alice", "method": "PLAIN"}
    assert hook["server"]["port"] == 587


def test_only_the_negotiated_properties_are_sent():
    hook = hook_request(example("request-eom"), Event.EOM, ["/stage", "/action", "/envelope/from"])
    assert set(hook) == {"stage", "action", "envelope"}


def test_every_offered_property_is_built():
    hook = hook_request(example("request-eom"), Event.EOM)
    assert {"/" + key for key in hook} == set(PROPERTIES)


def test_stages_are_the_drafts_inbound_ones():
    assert sorted(STAGES.values()) == ["connect", "data", "ehlo", "mail", "rcpt"]
    with pytest.raises(KeyError):
        hook_request(example("request-eom"), Event.HEADER)


def test_parameters_without_a_value():
    assert parameters(["SMTPUTF8", "SIZE=10", "ORCPT=rfc822;a=b"]) == {
        "SMTPUTF8": "",
        "SIZE": "10",
        "ORCPT": "rfc822;a=b",
    }
