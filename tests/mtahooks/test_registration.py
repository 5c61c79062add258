"""mtahooks.registration: the registration request, and what the bridge accepts of a scanner's answers."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from milterbridge.mtahooks.registration import (
    Registration,
    RegistrationError,
    discovered_registration_url,
    parse_registration,
    registration_request,
    renew_after,
)

BASE = "https://scanner.example/v1/hooks/register"
STAGES = ["connect", "data"]
PROPERTIES = ["/stage", "/envelope", "/rawMessage"]


def answer(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "registrationId": "reg_01:abc-DEF",
        "status": "active",
        "createdAt": "2026-12-06T10:00:00Z",
        "expiresAt": "2026-12-06T11:00:00Z",
        "hookEndpoint": "/v1/hooks/invoke/reg_01",
        "negotiated": {"serialization": "json", "inbound": {"stages": STAGES, "properties": PROPERTIES}},
        "endpoints": {"status": "/v1/hooks/register/reg_01", "deregistration": "/v1/hooks/register/reg_01"},
    }
    body.update(changes)
    return body


def test_the_request_asks_for_json_inbound_stages_and_properties():
    assert registration_request("milterbridge scan", "1.2.3", 5000, STAGES, PROPERTIES) == {
        "name": "milterbridge scan",
        "version": "1.2.3",
        "timeoutMs": 5000,
        "serialization": "json",
        "inbound": {"stages": STAGES, "properties": PROPERTIES},
        "outbound": None,
    }


def test_an_answer_is_read_with_its_urls_made_absolute():
    registration = parse_registration(answer(), BASE, STAGES, PROPERTIES)
    assert registration == Registration(
        id="reg_01:abc-DEF",
        hook_endpoint="https://scanner.example/v1/hooks/invoke/reg_01",
        expires_at=datetime.datetime(2026, 12, 6, 11, tzinfo=datetime.UTC).timestamp(),
        deregistration="https://scanner.example/v1/hooks/register/reg_01",
        stages=tuple(STAGES),
        properties=tuple(PROPERTIES),
    )
    assert Registration.from_json(registration.json()) == registration


def test_fewer_properties_are_kept_and_null_means_all_asked():
    fewer = answer(negotiated={"inbound": {"stages": STAGES, "properties": ["/stage"]}})
    assert parse_registration(fewer, BASE, STAGES, PROPERTIES).properties == ("/stage",)
    every = answer(negotiated={"inbound": {"stages": STAGES, "properties": None}}, expiresAt=None)
    registration = parse_registration(every, BASE, STAGES, PROPERTIES)
    assert registration.properties == tuple(PROPERTIES)
    assert registration.expires_at is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"registrationId": "has space"}, "registrationId"),
        ({"registrationId": "x" * 256}, "registrationId"),
        ({"status": "suspended"}, "not active"),
        ({"negotiated": {"serialization": "cbor", "inbound": {"stages": STAGES}}}, "not json"),
        ({"negotiated": {"inbound": {"stages": ["data"], "properties": None}}}, "not the stages asked"),
        ({"negotiated": {"inbound": {"stages": STAGES, "properties": ["/client"]}}}, "were not asked for"),
        ({"hookEndpoint": "https://elsewhere.example/hook"}, "not the origin"),
        ({"hookEndpoint": "http://scanner.example/hook"}, "not the origin"),
        ({"hookEndpoint": None}, "hookEndpoint"),
        ({"endpoints": {"deregistration": "https://other.example/x"}}, "endpoints.deregistration"),
        ({"expiresAt": "tomorrow"}, "expiresAt"),
        ({"expiresAt": "2026-12-06T11:00:00"}, "no time zone"),
    ],
)
def test_what_cannot_be_used_is_refused_saying_why(changes, message):
    with pytest.raises(RegistrationError, match=message):
        parse_registration(answer(**changes), BASE, STAGES, PROPERTIES)


def test_an_answer_that_is_not_an_object_is_refused():
    with pytest.raises(RegistrationError, match="expected an object"):
        parse_registration([], BASE, STAGES, PROPERTIES)


def discovery(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "version": "1.0",
        "endpoints": {"registration": "/v1/hooks/register", "deregistration": "/v1/hooks/register/{registration_id}"},
        "serialization": ["json", "cbor"],
        "capabilities": {"inbound": {"stages": ["connect", "ehlo", "data"]}, "outbound": None},
    }
    document.update(changes)
    return document


def test_discovery_names_the_registration_endpoint():
    url = discovered_registration_url(discovery(), "https://scanner.example/.well-known/mta-hooks", STAGES)
    assert url == BASE


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"serialization": ["cbor"]}, "has no json"),
        ({"capabilities": {"inbound": None}}, "no inbound hooks"),
        ({"capabilities": {"inbound": {"stages": ["data"]}}}, "no stage connect"),
        ({"endpoints": {"registration": "https://other.example/register"}}, "not the origin"),
    ],
)
def test_discovery_that_cannot_serve_the_endpoint_is_refused(changes, message):
    with pytest.raises(RegistrationError, match=message):
        discovered_registration_url(discovery(**changes), "https://scanner.example/.well-known/mta-hooks", STAGES)


@pytest.mark.parametrize(
    ("lifetime", "renew_in"),
    [(3600.0, 2880.0), (600.0, 480.0), (100.0, 50.0), (2.0, 1.0), (-5.0, 0.0)],
)
def test_renewal_comes_well_before_expiry(lifetime, renew_in):
    registration = parse_registration(answer(expiresAt=None), BASE, STAGES, PROPERTIES)
    assert renew_after(registration, 1000.0) is None
    expiring = Registration.from_json({**registration.json(), "expires_at": 1000.0 + lifetime})
    assert renew_after(expiring, 1000.0) == pytest.approx(renew_in)


def test_the_origin_ignores_case_and_default_ports_and_keeps_credentials_out_of_errors():
    base = "https://user:secret@Scanner.Example/v1/hooks/register?token=abc"
    same = answer(hookEndpoint="https://scanner.example:443/v1/hooks/invoke/reg_01")
    registration = parse_registration(same, base, STAGES, PROPERTIES)
    # The URL's user info (credentials) goes along to the same origin; its query does not.
    assert registration.hook_endpoint == "https://user:secret@Scanner.Example/v1/hooks/invoke/reg_01"
    assert registration.deregistration == "https://user:secret@Scanner.Example/v1/hooks/register/reg_01"
    with pytest.raises(RegistrationError) as info:
        parse_registration(answer(hookEndpoint="https://evil.example/hook"), base, STAGES, PROPERTIES)
    assert "secret" not in str(info.value)
    assert "https://evil.example:443 is not the origin of the url (https://scanner.example:443)" in str(info.value)


def test_an_expiry_already_past_is_refused_when_the_time_is_known():
    body = answer(expiresAt="2026-12-06T11:00:00Z")
    eleven = datetime.datetime(2026, 12, 6, 11, tzinfo=datetime.UTC).timestamp()
    assert parse_registration(body, BASE, STAGES, PROPERTIES, now=eleven - 1).expires_at == eleven
    with pytest.raises(RegistrationError, match="already past"):
        parse_registration(body, BASE, STAGES, PROPERTIES, now=eleven)
