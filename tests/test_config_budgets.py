"""Per-event budgets (``timeouts``) and the concurrency cap (``max_concurrency``) of an endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterbridge.config import Config, ConfigError, load_config
from milterbridge.milter.constants import Event

ENDPOINT = '[[endpoints]]\nname = "policy"\nurl = "https://hooks.example/milter"\n'


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "milterbridge.toml"
    path.write_text(text)
    return load_config(path, environ or {})


def _error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return info.value


def test_timeouts_and_max_concurrency_load(tmp_path: Path) -> None:
    """Event budgets load as (event, seconds) pairs in event order; max_concurrency as given."""
    text = ENDPOINT + "events = ['rcpt', 'eom']\ntimeouts = { eom = 20, rcpt = 2.5 }\nmax_concurrency = 4\n"
    (endpoint,) = _load(tmp_path, text).endpoints
    assert endpoint.timeouts == ((Event.RCPT, 2.5), (Event.EOM, 20.0))
    assert endpoint.max_concurrency == 4


def test_defaults_are_no_overrides_and_no_cap(tmp_path: Path) -> None:
    """Without the keys every event has timeout and there is no cap (0)."""
    (endpoint,) = _load(tmp_path, ENDPOINT).endpoints
    assert endpoint.timeouts == ()
    assert endpoint.max_concurrency == 0


def test_timeouts_from_the_environment(tmp_path: Path) -> None:
    """An environment override takes the table as JSON."""
    text = ENDPOINT + "events = ['rcpt']\n"
    config = _load(tmp_path, text, {"MILTERBRIDGE_ENDPOINTS__POLICY__TIMEOUTS": '{"rcpt": 1.5}'})
    assert config.endpoints[0].timeouts == ((Event.RCPT, 1.5),)


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        pytest.param("timeouts = 2", "endpoints.policy.timeouts", "expected a table", id="not-a-table"),
        pytest.param("timeouts = { rcp = 2 }", "endpoints.policy.timeouts.rcp", "is not an event", id="unknown-event"),
        pytest.param("timeouts = { eom = 0 }", "endpoints.policy.timeouts.eom", "greater than zero", id="zero"),
        pytest.param("timeouts = { eom = -1 }", "endpoints.policy.timeouts.eom", "greater than zero", id="negative"),
        pytest.param("timeouts = { eom = 'x' }", "endpoints.policy.timeouts.eom", "seconds", id="string"),
        pytest.param("timeouts = { eom = true }", "endpoints.policy.timeouts.eom", "seconds", id="boolean"),
        pytest.param(
            "timeouts = { rcpt = 2 }", "endpoints.policy.timeouts.rcpt", "not called at rcpt (events: eom)", id="unused"
        ),
        pytest.param(
            "events = ['rcpt', 'eom']\ntimeouts = { rcpt = 30 }",
            "endpoints.policy.timeouts.rcpt",
            "30 seconds is too long for events before end-of-message (rcpt): Postfix waits at most "
            "milter_command_timeout",
            id="rcpt-30",
        ),
        pytest.param(
            "events = ['mail', 'rcpt']\ntimeout = 40\ntimeouts = { rcpt = 2 }",
            "endpoints.policy.timeout",
            "40 seconds is too long for events before end-of-message (mail)",
            id="timeout-still-used-by-mail",
        ),
        pytest.param("max_concurrency = -1", "endpoints.policy.max_concurrency", "minimum of 0", id="cap-negative"),
        pytest.param("max_concurrency = 1.5", "endpoints.policy.max_concurrency", "integer", id="cap-float"),
        pytest.param("max_concurrency = true", "endpoints.policy.max_concurrency", "integer", id="cap-bool"),
    ],
)
def test_invalid_budgets_name_the_key(tmp_path: Path, text: str, key: str, needle: str) -> None:
    """Each bad value is refused with an error naming the exact key."""
    error = _error(tmp_path, ENDPOINT + text + "\n")
    assert error.key == key
    assert needle in str(error)


def test_a_long_timeout_is_fine_when_every_early_event_has_its_own(tmp_path: Path) -> None:
    """timeout may be 30 s or more once each pre-eom event has a budget under 30 s in timeouts."""
    text = ENDPOINT + "events = ['rcpt', 'eom']\ntimeout = 120\ntimeouts = { rcpt = 2 }\n"
    (endpoint,) = _load(tmp_path, text).endpoints
    assert endpoint.timeout == 120.0
    assert endpoint.timeouts == ((Event.RCPT, 2.0),)


def test_eom_budget_may_exceed_the_postfix_command_timeout(tmp_path: Path) -> None:
    """The 30 s rule is for events before end-of-message only."""
    text = ENDPOINT + "events = ['rcpt', 'eom']\ntimeouts = { rcpt = 2, eom = 120 }\n"
    (endpoint,) = _load(tmp_path, text).endpoints
    assert dict(endpoint.timeouts)[Event.EOM] == 120.0
