"""Which MTA is on the other end, and the facts about it the bridge must follow.

Postfix and Sendmail offer the same negotiation (milter-protocol.md §4.5), so the MTA is told
by the ``v`` macro at connect, which the bridge always requests (``negotiation.DEFAULT_MACROS``):
Postfix sends its name and version (``Postfix 3.7.11``), Sendmail its bare version
(``8.17.1.9``). Two things differ for the bridge:

* **Header numbering for INSHEADER.** Postfix counts its own Received header above the
  message's headers and skips deleted ones. Sendmail counts its internal header list, which
  starts with one entry per ``H`` line of its ``.cf`` (9 in a stock cf; the message's headers
  follow them, and a deleted header keeps its entry), and inserts after the entry at the index.
  ``policy.apply.HeaderNumbering`` says how; ``policy.apply`` converts with it.
* **Timeouts.** Postfix waits ``milter_command_timeout`` (30 s) for each reply before
  end-of-message and restarts ``milter_content_timeout`` with every keep-alive at
  end-of-message. Sendmail waits ``R`` (10 s) for each reply, and at most ``E`` (5 minutes) for
  the whole end-of-message, keep-alives or not: :class:`SendmailTimeouts` reads a filter's
  ``T=`` value.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

from .constants import Event


class Mta(enum.StrEnum):
    """The MTAs the bridge knows apart."""

    POSTFIX = "postfix"
    SENDMAIL = "sendmail"


_SENDMAIL_VERSION: Final = re.compile(rb"\d+\.\d+(\.\d+)*[A-Za-z0-9.+_-]*")


def identify(version: bytes | None) -> Mta | None:
    """The MTA that sent ``version`` (the ``v`` macro at connect), or None when it cannot be told."""
    if version is None:
        return None
    if version.startswith(b"Postfix"):
        return Mta.POSTFIX
    if _SENDMAIL_VERSION.fullmatch(version):
        return Mta.SENDMAIL
    return None


#: ``H`` lines in a stock Sendmail 8 cf (Return-Path, Received, Resent-Date, Date, Resent-From,
#: From, Full-Name, Resent-Message-Id, Message-Id).
STOCK_CF_HEADER_LINES: Final = 9


# ------------------------------------------------------------------ Sendmail's T= value

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME: Final = re.compile(r"(\d+)([smhdw]?)")
#: What each T= letter bounds (Sendmail's op guide, "Mail Filter Timeouts").
TIMEOUT_KEYS: Final = {
    "C": "connecting to the filter",
    "S": "sending one command to the filter",
    "R": "each reply from the filter",
    "E": "the whole end-of-message, from sending it to the final reply",
}


def sendmail_time(text: str) -> float:
    """Seconds in Sendmail's time syntax: ``10s``, ``5m``, ``1h30m``; a bare number is seconds."""
    pos, total = 0, 0
    if not text:
        raise ValueError("empty time")
    while pos < len(text):
        match = _TIME.match(text, pos)
        if match is None:
            raise ValueError(f"{text!r} is not a Sendmail time (digits with s, m, h, d or w, e.g. 10s or 5m)")
        total += int(match.group(1)) * _UNITS[match.group(2) or "s"]
        pos = match.end()
    return float(total)


@dataclass(frozen=True, slots=True)
class SendmailTimeouts:
    """A filter's ``T=`` timeouts in seconds (Sendmail's defaults where the value leaves one out; 0 is no limit)."""

    connect: float = 300.0
    send: float = 10.0
    reply: float = 10.0
    eom: float = 300.0

    @classmethod
    def parse(cls, text: str) -> SendmailTimeouts:
        """Read ``S:10s;R:10s;E:5m`` (the ``T=`` of an ``INPUT_MAIL_FILTER`` line; ``T=`` itself allowed).

        Raises ValueError naming the part that is wrong.
        """
        text = text.strip()
        if text[:2].upper() == "T=":
            text = text[2:]
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition(":")
            key = key.strip().upper()
            if not sep or key not in TIMEOUT_KEYS:
                raise ValueError(f"{part!r}: expected C:, S:, R: or E: followed by a time, e.g. R:10s")
            if key in values:
                raise ValueError(f"{key}: given twice")
            try:
                values[key] = sendmail_time(value.strip())
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        for key in ("R", "E"):
            seconds = values.get(key, 0.0)
            if 0 < seconds < SENDMAIL_SHORTEST:
                raise ValueError(
                    f"{key}: {seconds:g}s is too short: Sendmail counts whole seconds, so the bridge needs at "
                    f"least {SENDMAIL_SHORTEST:g}s to answer in time (0 is no limit)"
                )
        default = SendmailTimeouts()
        return cls(
            connect=values.get("C", default.connect),
            send=values.get("S", default.send),
            reply=values.get("R", default.reply),
            eom=values.get("E", default.eom),
        )

    def __str__(self) -> str:
        return f"C:{_short(self.connect)};S:{_short(self.send)};R:{_short(self.reply)};E:{_short(self.eom)}"


def _short(seconds: float) -> str:
    whole = int(seconds)
    if whole == 0:
        return "0"
    for unit, size in (("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


# ------------------------------------------------------------------ how long the MTA waits

#: Events the MTA waits for an answer to before end-of-message (abort and close are notifications).
ANSWERED_BEFORE_EOM: Final = frozenset(Event) - {Event.EOM, Event.ABORT, Event.CLOSE}
#: Sendmail reads its clock in whole seconds and checks R and E against it, so a limit of N s
#: may end after N - 1 s; the bridge keeps one more second back to write its answer.
SENDMAIL_MARGIN: Final = 2.0
#: The shortest R or E the bridge can answer within (a call then still gets a second).
SENDMAIL_SHORTEST: Final = SENDMAIL_MARGIN + 1.0


@dataclass(frozen=True, slots=True)
class ReplyLimits:
    """How long an MTA waits for the milter's replies, in seconds; None where it sets no limit.

    ``before_eom``: each reply before end-of-message (no keep-alive exists there).
    ``keepalive``: at end-of-message, the wait each keep-alive (SMFIR_PROGRESS) restarts.
    ``eom_total``: the whole end-of-message, keep-alives or not.
    ``margin``: what a budget must leave of a limit: Postfix's are kept exactly (a budget below
    them), Sendmail's lose :data:`SENDMAIL_MARGIN` to its whole-second clock and the answer.
    ``source`` names the MTA's settings, for messages.
    """

    mta: Mta
    before_eom: float | None
    keepalive: float | None
    eom_total: float | None
    margin: float
    source: str

    def longest(self, limit: float) -> float:
        """The longest budget that fits ``limit`` (Postfix: exclusive; Sendmail: inclusive)."""
        return limit - self.margin

    def fits(self, budget: float, limit: float | None) -> bool:
        """Whether a call of ``budget`` seconds is answered within ``limit``."""
        if limit is None:
            return True
        return budget < limit if self.margin == 0 else budget <= self.longest(limit)

    def budget_caps(self) -> dict[Event, float]:
        """Event -> the longest budget an endpoint call may have at that event at this MTA.

        Only limits that can bind are given: Postfix's are checked when the config loads.
        """
        if self.mta is Mta.POSTFIX:
            return {}
        caps: dict[Event, float] = {}
        if self.before_eom is not None:
            caps = dict.fromkeys(ANSWERED_BEFORE_EOM, self.longest(self.before_eom))
        if self.eom_total is not None:
            caps[Event.EOM] = self.longest(self.eom_total)
        return caps

    def why_gave_up(self, event: Event, waited: float) -> str:
        """Why the MTA closed the connection ``waited`` seconds after asking for ``event``'s answer."""
        name = self.mta.value.capitalize()
        if self.mta is Mta.SENDMAIL:
            letter, limit = ("E", self.eom_total) if event is Event.EOM else ("R", self.before_eom)
            if limit is None:
                return f"no {letter} limit is set in [sendmail] timeouts: {name} stopped for another reason"
            if waited >= limit - 1:  # its whole-second clock may end a limit a second early
                scope = " for the whole end-of-message, keep-alives or not" if event is Event.EOM else ""
                return f"its {letter} limit is {limit:g}s{scope}"
            cause = "a keep-alive came later than its R, or " if event is Event.EOM else ""
            return (
                f"sooner than its {letter} limit in [sendmail] timeouts ({limit:g}s): {cause}"
                f"the filter's T= differs from [sendmail] timeouts"
            )
        if event is Event.EOM:
            return "milter_content_timeout if no keep-alive came in time"
        assert self.before_eom is not None
        if waited >= self.before_eom - 1:
            return f"milter_command_timeout, {self.before_eom:g}s by default"
        return (
            f"sooner than milter_command_timeout's default {self.before_eom:g}s: a shorter setting, or another reason"
        )


#: Postfix's defaults: milter_command_timeout 30s, milter_content_timeout 300s.
POSTFIX_LIMITS: Final = ReplyLimits(
    mta=Mta.POSTFIX,
    before_eom=30.0,
    keepalive=300.0,
    eom_total=None,
    margin=0.0,
    source="milter_command_timeout 30s, milter_content_timeout 300s",
)


def sendmail_limits(timeouts: SendmailTimeouts) -> ReplyLimits:
    """Sendmail's waits from a filter's ``T=``: R for each reply, E for the whole end-of-message (0: none)."""
    return ReplyLimits(
        mta=Mta.SENDMAIL,
        before_eom=timeouts.reply or None,
        keepalive=timeouts.reply or None,
        eom_total=timeouts.eom or None,
        margin=SENDMAIL_MARGIN,
        source=f"T={timeouts}",
    )
