"""Load profiles: what each benchmark message looks like and which events are in play.

A profile fixes the message (recipients, headers, body size), the events the
milter under test asks for (the bridge's webhook subscriptions, the reference
milters' callbacks), and whether the bridge sends the body to the endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from milterbridge.client import Envelope

#: The header every milter under test adds at end-of-message; the load
#: generator counts a message without it as an error.
BENCH_HEADER_NAME = "X-Bench"
BENCH_HEADER_VALUE = "ok"

#: Events a milter can be asked for, in protocol order (``eom`` always comes).
ALL_EVENTS = ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom")
#: What the issue calls "per-stage webhooks".
PER_STAGE_EVENTS = ("connect", "helo", "mail", "rcpt", "eoh", "eom")

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """One benchmark workload."""

    key: str
    title: str
    recipients: int = 2
    headers: int = 10
    body_bytes: int = 4 * KIB
    #: Events the milter under test asks for and answers (``eom`` always).
    events: tuple[str, ...] = ("eom",)
    #: The bridge sends the body to the endpoint at eom (so it must receive it).
    include_body: bool = False
    messages_per_connection: int = 5
    #: "sweep": throughput over a concurrency sweep; "idle": hold connections
    #: open and measure memory; "single": one big message, peak memory.
    kind: str = "sweep"
    idle_connections: int = 0

    @property
    def milter_events(self) -> tuple[str, ...]:
        """Events a reference milter asks for to do the same work as the bridge.

        The bridge needs body chunks when it forwards the body, so the
        references receive them as well (and answer continue to each).
        """
        events = list(self.events)
        if self.include_body and "body" not in events:
            events.insert(events.index("eom") if "eom" in events else len(events), "body")
        return tuple(events)

    def scaled(self, **changes: object) -> Profile:
        """A copy with some fields changed (command-line overrides)."""
        return replace(self, **changes)  # type: ignore[arg-type]


PROFILES: dict[str, Profile] = {
    p.key: p
    for p in (
        Profile(key="a", title="eom-only webhook, small message (2 rcpt, 10 headers, 4 KiB)"),
        Profile(key="b", title="per-stage webhooks (connect, helo, mail, rcpt, eoh, eom)", events=PER_STAGE_EVENTS),
        Profile(key="c", title="1 MiB body with include_body", body_bytes=MIB, include_body=True),
        Profile(
            key="d",
            title="1,000 idle connections (memory)",
            kind="idle",
            idle_connections=1000,
            messages_per_connection=0,
        ),
        Profile(
            key="e",
            title="one 50 MiB message with include_body (peak RSS)",
            body_bytes=50 * MIB,
            include_body=True,
            kind="single",
            messages_per_connection=1,
        ),
    )
}


def build_message(profile: Profile) -> bytes:
    """An RFC 5322 message with ``profile.headers`` headers and a body of exactly ``body_bytes``."""
    fixed = [
        b"From: Bench Sender <sender@example.org>",
        b"To: " + b", ".join(b"<rcpt%d@example.net>" % n for n in range(max(profile.recipients, 1))),
        b"Subject: milterbridge benchmark message",
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000",
        b"Message-ID: <bench.1@example.org>",
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=us-ascii",
    ]
    lines = fixed[: profile.headers]
    for n in range(len(lines), profile.headers):
        lines.append(b"X-Filler-%d: benchmark filler header value number %d" % (n, n))
    return b"\r\n".join(lines) + b"\r\n\r\n" + _body(profile.body_bytes)


def _body(size: int) -> bytes:
    """``size`` bytes of 78-byte CRLF-terminated text lines (the last one may be cut)."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-the-bench-body" + b"\r\n"
    body = line * (size // len(line) + 1)
    return body[:size]


def build_envelope(profile: Profile) -> Envelope:
    """The SMTP envelope sent with every message of ``profile``."""
    rcpts = tuple(b"<rcpt%d@example.net>" % n for n in range(profile.recipients))
    return Envelope(
        mail_from=b"<sender@example.org>",
        mail_args=(b"SIZE=%d" % profile.body_bytes,),
        recipients=rcpts,
    )
