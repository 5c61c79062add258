"""Telling the MTA apart, and reading what Sendmail's T= says (milter/mta.py)."""

from __future__ import annotations

import pytest

from milterbridge.milter.constants import Event
from milterbridge.milter.mta import (
    POSTFIX_LIMITS,
    Mta,
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
    assert SendmailTimeouts.parse(" r:2s ; e:1m ") == SendmailTimeouts(reply=2, eom=60)
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
    """Sendmail's R caps every event before eom, E the eom; Postfix's limits are checked at load."""
    caps = sendmail_limits(SendmailTimeouts.parse("R:10s;E:5m")).budget_caps()
    assert caps[Event.RCPT] == caps[Event.CONNECT] == 9.0
    assert caps[Event.EOM] == 299.0
    assert Event.ABORT not in caps
    assert Event.CLOSE not in caps
    short = sendmail_limits(SendmailTimeouts.parse("R:1s;E:1s")).budget_caps()
    assert short[Event.MAIL] == short[Event.EOM] == 0.5  # half, when a second would leave nothing
    assert POSTFIX_LIMITS.budget_caps() == {}
