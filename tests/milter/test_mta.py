"""Telling the MTA apart, and reading what Sendmail's T= says (milter/mta.py)."""

from __future__ import annotations

import pytest

from milterbridge.milter.constants import Event
from milterbridge.milter.mta import (
    ANSWERED_BEFORE_EOM,
    POSTFIX_LIMITS,
    Mta,
    ReplyLimits,
    SendmailTimeouts,
    identify,
    sendmail_limits,
    sendmail_time,
)


@pytest.mark.parametrize(
    ("version", "mta"),
    [
        (b"Postfix 3.7.11", Mta.POSTFIX),
        (b"Postfix", Mta.POSTFIX),
        (b"8.17.1.9", Mta.SENDMAIL),
        (b"8.18.1", Mta.SENDMAIL),
        (b"8.14.4/Debian-2", None),
        (b"Exim 4.97", None),
        (b"", None),
        (None, None),
    ],
)
def test_identify(version: bytes | None, mta: Mta | None) -> None:
    assert identify(version) is mta


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("5m", 300), ("1h30m", 5400), ("2d", 172800), ("7", 7)])
def test_sendmail_time(text: str, seconds: float) -> None:
    assert sendmail_time(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "1.5s", "-1s", "10 s"])
def test_sendmail_time_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="time"):
        sendmail_time(text)


def test_timeouts_take_sendmails_defaults_for_what_is_left_out() -> None:
    assert SendmailTimeouts.parse("") == SendmailTimeouts(connect=300, send=10, reply=10, eom=300)
    assert SendmailTimeouts.parse("T=S:10s;R:30s;E:5m") == SendmailTimeouts(reply=30)
    assert SendmailTimeouts.parse(" r:3s ; e:1m ") == SendmailTimeouts(reply=3, eom=60)
    assert str(SendmailTimeouts.parse("C:1m;R:90s;E:1h")) == "C:1m;S:10s;R:90s;E:1h"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("R10s", "'R10s': expected C:, S:, R: or E: followed by a time"),
        ("X:1s", "'X:1s': expected C:, S:, R: or E:"),
        ("R:1s;R:2s", "R: given twice"),
        ("E:soon", "E: 'soon' is not a Sendmail time"),
    ],
)
def test_timeouts_name_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SendmailTimeouts.parse(text)


def test_caps_leave_the_bridge_time_to_answer() -> None:
    """Sendmail's R caps every event before eom, E the eom, each less 2 s (its whole-second clock,
    and the answer); Postfix's limits are checked at load."""
    caps = sendmail_limits(SendmailTimeouts.parse("R:10s;E:5m")).budget_caps()
    assert caps[Event.RCPT] == caps[Event.CONNECT] == 8.0
    assert caps[Event.EOM] == 298.0
    assert Event.ABORT not in caps
    assert Event.CLOSE not in caps
    assert POSTFIX_LIMITS.budget_caps() == {}


def test_zero_is_no_limit() -> None:
    """Sendmail applies a timeout only when it is above 0: nothing is cut then."""
    limits = sendmail_limits(SendmailTimeouts.parse("R:0;E:0s"))
    assert (limits.before_eom, limits.keepalive, limits.eom_total) == (None, None, None)
    assert limits.budget_caps() == {}
    assert sendmail_limits(SendmailTimeouts.parse("E:0")).budget_caps() == dict.fromkeys(ANSWERED_BEFORE_EOM, 8.0)
    assert str(SendmailTimeouts.parse("R:0")) == "C:5m;S:10s;R:0;E:5m"


@pytest.mark.parametrize("text", ["R:1s", "E:2s", "R:2s;E:5m"])
def test_limits_too_short_to_answer_in_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"too short: Sendmail counts whole seconds, so the bridge needs at least 3s"):
        SendmailTimeouts.parse(text)


SENDMAIL = sendmail_limits(SendmailTimeouts.parse("R:10s;E:5m"))


@pytest.mark.parametrize(
    ("limits", "event", "waited", "why"),
    [
        (SENDMAIL, Event.EOM, 299.4, "its E limit is 300s for the whole end-of-message, keep-alives or not"),
        (
            SENDMAIL,
            Event.EOM,
            2.5,
            "sooner than its E limit in [sendmail] timeouts (300s): a keep-alive came later than its R, "
            "or the filter's T= differs from [sendmail] timeouts",
        ),
        (SENDMAIL, Event.RCPT, 9.2, "its R limit is 10s"),
        (
            SENDMAIL,
            Event.RCPT,
            3.0,
            "sooner than its R limit in [sendmail] timeouts (10s): the filter's T= differs from [sendmail] timeouts",
        ),
        (
            sendmail_limits(SendmailTimeouts.parse("E:0")),
            Event.EOM,
            40.0,
            "no E limit is set in [sendmail] timeouts: Sendmail stopped for another reason",
        ),
        (POSTFIX_LIMITS, Event.EOM, 300.0, "milter_content_timeout if no keep-alive came in time"),
        (POSTFIX_LIMITS, Event.RCPT, 30.0, "milter_command_timeout, 30s by default"),
        (
            POSTFIX_LIMITS,
            Event.RCPT,
            4.0,
            "sooner than milter_command_timeout's default 30s: a shorter setting, or another reason",
        ),
    ],
)
def test_why_the_mta_gave_up(limits: ReplyLimits, event: Event, waited: float, why: str) -> None:
    assert limits.why_gave_up(event, waited) == why
