"""Per-event budgets (``timeouts``) and the concurrency cap (``max_concurrency``) of an endpoint, and the
MTA waits they must fit (``[server] mta``, ``[sendmail]``), with what check-config says of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from milterbridge.app import merge_reload
from milterbridge.cli import main
from milterbridge.config import Config, ConfigError, load_config
from milterbridge.milter.constants import Event
from milterbridge.milter.mta import SendmailTimeouts
from milterbridge.serving import config_warnings, mta_summary

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


# ------------------------------------------------------------------ the MTA's waits


def test_mta_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, ENDPOINT)
    assert config.server.mta == "auto"
    assert config.sendmail.timeouts == SendmailTimeouts(connect=300, send=10, reply=10, eom=300)
    assert config.sendmail.header_lines == 9


def test_sendmail_section_and_environment(tmp_path: Path) -> None:
    text = '[server]\nmta = "Sendmail"\n[sendmail]\ntimeouts = "S:10s;R:30s;E:10m"\nheader_lines = 11\n' + ENDPOINT
    config = _load(tmp_path, text, {"MILTERBRIDGE_SENDMAIL__HEADER_LINES": "12"})
    assert config.server.mta == "sendmail"
    assert config.sendmail.timeouts == SendmailTimeouts(reply=30, eom=600)
    assert config.sendmail.header_lines == 12


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ('[server]\nmta = "exim"\n', "server.mta", "'exim'"),
        ('[sendmail]\ntimeouts = "R=10s"\n', "sendmail.timeouts", "copy the T= value of your INPUT_MAIL_FILTER line"),
        ("[sendmail]\ntimeouts = 10\n", "sendmail.timeouts", "expected a string"),
        ("[sendmail]\nheader_lines = 0\n", "sendmail.header_lines", "below the minimum of 1"),
        ("[sendmail]\nheaders = 9\n", "sendmail.headers", "unknown key"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, needle: str) -> None:
    error = _error(tmp_path, text + ENDPOINT)
    assert error.key == key
    assert needle in str(error)


SENDMAIL = '[server]\nmta = "sendmail"\n[sendmail]\ntimeouts = "R:10s;E:2m"\n'


@pytest.mark.parametrize(
    ("endpoint", "key", "needle"),
    [
        pytest.param(
            "events = ['rcpt']\ntimeout = 10\n",
            "endpoints.policy.timeout",
            "Sendmail waits at most R (10s, [sendmail] timeouts) for each reply",
            id="timeout-before-eom",
        ),
        pytest.param(
            "events = ['rcpt', 'eom']\ntimeouts = { rcpt = 12 }\n",
            "endpoints.policy.timeouts.rcpt",
            "counts it in whole seconds, and keep-alives exist only at end-of-message; use at most 8",
            id="timeouts-rcpt",
        ),
        pytest.param(
            "events = ['eom']\ntimeout = 120\n",
            "endpoints.policy.timeout",
            "Sendmail waits at most E (120s, [sendmail] timeouts) for the whole end-of-message, keep-alives or not",
            id="eom-timeout",
        ),
        pytest.param(
            "events = ['rcpt', 'eom']\ntimeouts = { eom = 200 }\n",
            "endpoints.policy.timeouts.eom",
            "use at most 118",
            id="eom-timeouts",
        ),
    ],
)
def test_sendmail_budgets_must_fit_its_waits(tmp_path: Path, endpoint: str, key: str, needle: str) -> None:
    error = _error(tmp_path, SENDMAIL + ENDPOINT + endpoint)
    assert error.key == key
    assert needle in str(error)


def test_progress_must_come_within_r(tmp_path: Path) -> None:
    text = '[server]\nmta = "sendmail"\nprogress_interval = 10\n' + ENDPOINT
    error = _error(tmp_path, text)
    assert error.key == "server.progress_interval"
    assert "Sendmail waits at most 10s (R, [sendmail] timeouts) between keep-alives" in str(error)


def test_postfix_keeps_its_own_rule(tmp_path: Path) -> None:
    """Under mta = "postfix" a 20 s rcpt budget and a 10 min eom budget load; 30 s before eom does not."""
    text = '[server]\nmta = "postfix"\n' + ENDPOINT + "events = ['rcpt', 'eom']\ntimeouts = { rcpt = 20, eom = 600 }\n"
    config = _load(tmp_path, text)
    assert config_warnings(config) == []
    error = _error(tmp_path, '[server]\nmta = "postfix"\n' + ENDPOINT + "events = ['rcpt']\ntimeout = 30\n")
    assert error.key == "endpoints.policy.timeout"
    assert "Postfix waits at most milter_command_timeout" in str(error)


def test_auto_enforces_postfix_and_warns_for_sendmail(tmp_path: Path) -> None:
    """Under auto, what only Sendmail would not wait for loads with a warning per key."""
    text = (
        "[server]\nprogress_interval = 12\n"
        + ENDPOINT
        + "events = ['rcpt', 'eom']\ntimeouts = { rcpt = 20, eom = 600 }\n"
    )
    warnings = config_warnings(_load(tmp_path, text))
    keys = [w.split(":", 1)[0] for w in warnings]
    assert keys == ["endpoints.policy.timeouts.rcpt", "endpoints.policy.timeouts.eom", "server.progress_interval"]
    assert all('set [server] mta = "postfix" if no Sendmail connects' in w for w in warnings)
    assert "at a Sendmail connection the calls are cut to fit" in warnings[0]
    assert _error(tmp_path, ENDPOINT + "events = ['rcpt']\ntimeout = 30\n").key == "endpoints.policy.timeout"


def test_summary_names_each_mtas_waits(tmp_path: Path) -> None:
    auto = mta_summary(_load(tmp_path, ENDPOINT))
    assert auto[0] == "mta: auto (told apart per connection by the v macro)"
    assert auto[1].startswith("  postfix: each answer before end-of-message within milter_command_timeout (30s")
    assert auto[2] == (
        "  sendmail (T=C:5m;S:10s;R:10s;E:5m): each answer within R 10s, the whole end-of-message within E 300s, "
        "keep-alives or not; calls capped at 8s before and 298s at end-of-message; header inserts counted after "
        "the cf's 9 H lines"
    )
    assert [line.split(":")[0] for line in mta_summary(_load(tmp_path, SENDMAIL + ENDPOINT))] == [
        "mta",
        "  sendmail (T=C",
    ]


def test_check_config_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "milterbridge.toml"
    path.write_text(SENDMAIL + ENDPOINT + 'secret = "whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3Q="\n')
    os.chmod(path, 0o600)
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\n  mta: sendmail\n    sendmail (T=C:5m;S:10s;R:10s;E:2m): each answer within R 10s" in out


def test_zero_in_sendmails_t_is_no_limit(tmp_path: Path) -> None:
    """R:0 and E:0 are Sendmail's "no limit": no budget is too long for them."""
    text = '[server]\nmta = "sendmail"\n[sendmail]\ntimeouts = "R:0;E:0"\n' + ENDPOINT
    config = _load(tmp_path, text + "events = ['rcpt', 'eom']\ntimeouts = { rcpt = 25, eom = 900 }\n")
    assert config.sendmail.timeouts == SendmailTimeouts(reply=0, eom=0)
    assert mta_summary(config)[1].startswith(
        "  sendmail (T=C:5m;S:10s;R:0;E:0): no R limit, no E limit; calls not capped"
    )


def test_a_reload_is_checked_against_the_mta_that_stays(tmp_path: Path) -> None:
    """[server] needs a restart, so a reload's budgets must fit the running mta, not the new file's."""
    running = _load(tmp_path, '[server]\nmta = "sendmail"\n' + ENDPOINT + "events = ['rcpt']\ntimeout = 5\n")
    new = _load(tmp_path, ENDPOINT + "events = ['rcpt']\ntimeout = 9\n")  # fine for auto: Postfix allows < 30
    with pytest.raises(ConfigError) as info:
        merge_reload(running, new)
    assert info.value.key == "endpoints.policy.timeout"
    assert "Sendmail waits at most R (10s" in str(info.value)
    merged, ignored = merge_reload(running, _load(tmp_path, '[server]\nmta = "sendmail"\n' + ENDPOINT))
    assert merged.server.mta == "sendmail"
    assert not ignored
