"""The ``when`` key of an endpoint: parsing, errors that name the key, the earliest-event rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterbridge.config import ConfigError, load_config
from milterbridge.policy.conditions import ConditionKey

ENDPOINT = '[[endpoints]]\nname = "policy"\nurl = "https://hooks.example/m"\n'


def load(tmp_path: Path, lines: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "milterbridge.toml"
    path.write_text(ENDPOINT + lines)
    return load_config(path, environ or {})


def test_when_is_unset_by_default(tmp_path: Path) -> None:
    assert load(tmp_path, "").endpoints[0].when is None


def test_the_issue_examples_load(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'events = ["rcpt", "eom"]\n'
        'when = { client = ["!10.0.0.0/8", "!192.168.0.0/16", "!127.0.0.0/8"], '
        'recipient_domains = ["example.com", "*.example.com"], authenticated = false, daemon = ["smtpd"] }\n',
    )
    when = config.endpoints[0].when
    assert when is not None
    assert when.keys == (
        ConditionKey.CLIENT,
        ConditionKey.DAEMON,
        ConditionKey.AUTHENTICATED,
        ConditionKey.RECIPIENT_DOMAINS,
    )
    assert when.connection_miss(b"10.0.0.1", b"smtpd") is ConditionKey.CLIENT
    assert when.connection_miss(b"192.0.2.1", b"smtpd") is None


def test_when_from_the_environment(tmp_path: Path) -> None:
    environ = {"MILTERBRIDGE_ENDPOINTS__POLICY__WHEN": '{"authenticated": true, "daemon": "submission"}'}
    when = load(tmp_path, "", environ).endpoints[0].when
    assert when is not None
    assert when.authenticated is True
    assert when.connection_miss(b"192.0.2.1", b"submission") is None


@pytest.mark.parametrize(
    ("lines", "key", "fragment"),
    [
        ('when = "yes"\n', "endpoints.policy.when", "expected a table"),
        ("when = { clients = [] }\n", "endpoints.policy.when.clients", "unknown key"),
        ('when = { client = ["10.1.0.0/8"] }\n', "endpoints.policy.when.client", "host bits set"),
        ('when = { client = ["example.com"] }\n', "endpoints.policy.when.client", "'example.com'"),
        ('when = { authenticated = "yes" }\n', "endpoints.policy.when.authenticated", "expected true or false"),
        ("when = { daemon = [] }\n", "endpoints.policy.when.daemon", "at least one entry"),
        ('when = { sender_domains = ["a@example.com"] }\n', "endpoints.policy.when.sender_domains", "a domain"),
        (
            'events = ["mail", "eom"]\nwhen = { recipient_domains = ["example.com"] }\n',
            "endpoints.policy.when.recipient_domains",
            "is known only from rcpt on, but the endpoint is called from mail",
        ),
        (
            'events = ["connect", "rcpt"]\nwhen = { recipient_domains = ["example.com"] }\n',
            "endpoints.policy.when.recipient_domains",
            "called from connect",
        ),
        (
            'events = ["helo", "eom"]\nwhen = { client = "10.0.0.0/8", sender_domains = "example.com" }\n',
            "endpoints.policy.when.sender_domains",
            "is known only from mail on, but the endpoint is called from helo",
        ),
        (
            'events = ["connect"]\nwhen = { authenticated = true }\n',
            "endpoints.policy.when.authenticated",
            "called from connect",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, lines: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, lines)
    assert caught.value.key == key
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "lines",
    [
        'events = ["rcpt", "eom", "abort", "close"]\nwhen = { recipient_domains = "example.com" }\n',
        'events = ["mail"]\nwhen = { authenticated = true, sender_domains = "example.com" }\n',
        'events = ["connect", "close"]\nwhen = { client = "10.0.0.0/8", daemon = "smtpd" }\n',
    ],
)
def test_keys_known_at_the_earliest_event_pass(tmp_path: Path, lines: str) -> None:
    assert load(tmp_path, lines).endpoints[0].when is not None
