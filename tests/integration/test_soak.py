"""Soak: concurrent SMTP traffic through a real Postfix and a milterbridge process, with faults.

``test_soak`` runs in two modes (``SoakMode``), each for ``MILTERBRIDGE_SOAK_SECONDS`` seconds
of traffic (default 20; each mode then takes about 22-24 s). In both, ``CLIENTS`` SMTP client
threads run against the private Postfix. Each client opens a session, sends 1-4 messages in
it (every message has its own ``X-Soak-Id``), quits, and starts again. Postfix hands every
session to milterbridge, run as a real ``python -m milterbridge serve --workers 1`` process.
Randomness comes from one seed, printed in the terminal summary; ``MILTERBRIDGE_SOAK_SEED``
replays it (plans and per-request faults are derived from the seed and the message, so they
repeat; timing, outages and scheduling do not).

* ``tempfail``: Postfix has ``milter_default_action = tempfail``. Halfway through, the bridge
  gets SIGTERM, drains, exits, and a new process is started on the same milter port.
* ``accept``: Postfix has ``milter_default_action = accept``, the setting that would hide a
  gate left open: a message the bridge let go without a decision would be delivered. There is
  no restart (with ``accept`` Postfix delivers unfiltered while no milter listens, which is
  Postfix's documented behaviour, not the bridge's). Instead, during the traffic:

  - six SIGHUPs (``RELOADS``): two valid changed configs (the policy timeout, the observe
    timeout), the file truncated to 0 bytes, invalid TOML, a config with only the observe
    endpoint, and the original file restored. The three bad ones must be refused (the
    running config stays) and ``milterbridge_config_reloads_total{result}`` must say so.
  - ``include_body = true`` on the policy endpoint with ``[server] body_memory_bytes = 2048``:
    bodies over 2 KiB are spooled (some are 40-160 KB, several milter body chunks). Every
    message carries ``X-Soak-Body``, the SHA-256 of its body as sent (dot lines and 8-bit
    bytes included), and the endpoint checks the body it got against it.
  - ``HOSTILE_CLIENTS`` more threads, each a hostile SMTP client (``HOSTILE_KINDS``) in turn:
    a header flood over ``[server] max_headers = 100``; a recipient flood over
    ``max_recipients = 5``; a client that cuts its connection in the middle of DATA (FIN or
    RST); a client that sends junk commands, pipelines MAIL, RCPT and DATA, and pipelines
    junk after the end of the data. The endpoint continues their recipients and rejects their
    messages at end-of-message, so a hostile message that got through would be one the bridge
    let go unasked.

The webhooks (``FakeWebhooks``, real HTTP on loopback):

* ``policy`` (enforce; events rcpt and eom; on_error tempfail; timeout ``ENDPOINT_TIMEOUT``;
  breaker open at half of at least 5 calls in 1 s, probing after 0.5 s). It follows a plan
  the client wrote into the envelope: the sender ``<soak id>.<plan>@...`` and recipients
  ``ok<n>.<id>@...`` or ``deny<n>.<id>@...``.
  At rcpt: reject ``deny`` recipients (550), answer ``quarantine`` for plan quarantine_early,
  else continue. At eom by plan: continue; tag (``add_header X-Soak-Tag: <soak id>``);
  quarantine; discard; reject (554); tempfail (451 with its own text). Faults come on top:
  per request 500, a cut connection, invalid JSON, a slow answer inside the timeout, an answer
  after the timeout; and every ``OUTAGE_PERIOD`` s an outage of ``OUTAGE_SECONDS`` s where
  every call gets 503 or a cut connection (the breaker opens, then recovers). Hostile
  messages get no per-request faults (outages still apply). It records, per bridge message
  id, the plan whose decision it answered at eom without a fault (``eom_decided``).
* ``observe`` (observe; events mail, eom, close): 204, sometimes 500 or slow. Its ``mail``
  calls map the bridge's message ids to soak ids for the join below. During each drain it
  holds ``close`` notifications for ``CLOSE_HOLD_SECONDS``, which keeps the draining process
  (and its admin port) alive after its last milter connection closed, so a final /metrics
  scrape sees every message of that process.

Accounting (every assertion below can fail):

1. Each message the clients sent ends in exactly one bucket: *refused* (the client saw 4xx or
   5xx at MAIL, at every RCPT, at DATA or at end-of-data), *delivered* (250 at end-of-data and
   one Maildir file per accepted recipient, with ``X-Soak-Tag`` exactly when the plan is tag),
   *held* (quarantine plans: the 250's queue id is in the hold queue) or *discarded* (discard
   plan: 250, nothing delivered or queued, and the bridge logged ``outcome: discarded`` for that
   queue id). Each hostile message ends *hostile refused* (4xx or 5xx at every RCPT or at
   end-of-data, each reply the one its kind calls for) or *hostile aborted* (the client cut the
   connection in DATA). sent == the sum of the buckets; nothing else is in the Maildir or the
   queue.
2. The gate: every Maildir file and every held message is joined by its Postfix queue id (from
   the Received header, or the queue listing) to a bridge log line ``accepted`` (Maildir) or
   ``quarantined`` (hold), whose bridge message id the policy endpoint answered at eom with a
   decision that lets it through. That join uses neither the soak ids nor the plans.
3. Every per-message log line of the bridge processes is joined to its client transaction
   (bridge message id -> soak id): accepted, quarantined and discarded carry the queue id of
   the client's 250; rejected matches a 5xx and tempfailed a 4xx at end-of-data; aborted a
   transaction where no recipient was accepted, or one cut in DATA. Every end-of-data reply
   the clients got has a log line: Postfix itself refuses only at MAIL and RCPT (below).
4. ``milterbridge_messages_total{outcome}``, summed over the processes (each scraped when it
   could count no more messages: a drained one while draining with no connection left, the
   last one after the traffic ended), equals the log lines per outcome. So, with E250, E5xx
   and E4xx the clients' end-of-data replies (hostile clients included):

   * accepted + quarantined + discarded == E250 (Postfix never says 250 without the milter:
     with tempfail it has no choice; with accept, because the bridge never failed to answer);
   * rejected == E5xx and tempfailed == E4xx (no end-of-data refusal comes from Postfix);
   * aborted == transactions with MAIL 250 and no recipient accepted, plus the ones cut in
     DATA, minus P, where P counts those the bridge never saw: a session whose milter
     connection the drain closed while it sat between two messages (Postfix sends MAIL without
     waiting for an answer, then finds the connection gone at the first RCPT and answers 451
     4.7.1).
   * Postfix's own refusals (451 4.7.1 at MAIL, and the P transactions at RCPT) happen only in
     SMTP sessions that were open at some time between the SIGTERM and the new process being
     ready, and P is at most the number of those sessions; without a restart there are none.

   Should the first process ever exit before a scrape saw it drained, its counts come from the
   scrape before SIGTERM and the check weakens to metrics <= log lines (the summary says so).

5. RSS, open fds and ``milterbridge_asyncio_tasks`` after warm-up and at the end of each
   process's life: RSS grows by less than ``MAX_RSS_GROWTH_BYTES``, fds by at most
   ``MAX_FD_GROWTH`` and tasks by at most ``MAX_TASK_GROWTH``. These bounds are generous on
   purpose (a leak of one task or one fd per message would exceed them within seconds); the
   measured values are printed in the terminal summary.
6. The bridge saw each fault as what it is: ``webhook_requests_total{endpoint="policy"}``
   counts exactly one ``invalid_body`` per invalid JSON answer, and at least one ``timeout``
   per answer sent after the timeout; ``bridge_faults_total`` stays 0.
7. ``accept`` only: each SIGHUP got the answer due (``config reloaded`` or ``config reload
   refused`` at error level) and the metric counts 3 ok and 3 refused; the endpoint decided
   messages while a refused file was in place. Every body the endpoint got is the one sent;
   ``body_spooled_total`` equals the messages with a body over ``BODY_MEMORY_BYTES`` that
   reached end-of-data, and ``body_spool_bytes`` is back to 0. A header flood is answered
   451 4.3.4 naming max_headers at end-of-data without an eom call; a recipient flood gets
   452 4.5.3 naming max_recipients for exactly the recipients past the fifth kept one, and the
   endpoint sees at most five; ``oversize_messages_total{limit="max_headers"}`` equals the
   header floods answered at end-of-data, and ``{limit="max_recipients"}`` the recipient
   floods that got a 452.
8. The run exercised what it claims: messages in every bucket, an outage and an open breaker;
   refusals during the restart (tempfail); every hostile kind refused or cut, and spooled
   bodies (accept).

``test_discard_at_rcpt_is_logged_as_discarded`` pins a bug found while writing this soak.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.parser
import email.policy
import hashlib
import os
import random
import re
import secrets
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.webhooks import FakeResponse, FakeWebhooks, RecordedRequest
from tests.ops.conftest import BridgeLauncher, BridgeProcess, config_text, metric_value

from .postfix import (
    DEFAULT_HELO,
    PostfixInstance,
    PostfixTimeoutError,
    SmtpReply,
    SmtpSession,
    SmtpTransaction,
    free_port,
    make_message,
)

pytestmark = pytest.mark.postfix

#: Seconds of traffic per mode; each mode takes about 3-5 s more.
SOAK_SECONDS = float(os.environ.get("MILTERBRIDGE_SOAK_SECONDS") or 20)
#: The seed of every random choice; set it to replay a run.
SOAK_SEED = int(os.environ.get("MILTERBRIDGE_SOAK_SEED") or secrets.randbits(32))
CLIENTS = 6
MAX_MESSAGES_PER_SESSION = 4
MAX_RECIPIENTS = 3
SMTP_TIMEOUT = 30.0
#: The policy endpoint's budget per event; far below Postfix's milter timeouts (10 s / 30 s).
ENDPOINT_TIMEOUT = 1.0
OBSERVE_TIMEOUT = 2.0
OUTAGE_PERIOD = 10.0
OUTAGE_SECONDS = 1.0
BREAKER_RESET_SECONDS = 0.5
#: A client whose session got only temporary refusals waits this long before the next one, as
#: a real client backs off; without it an outage or the restart turns into a loop of instant
#: refusals that crowds out everything else.
REFUSED_BACKOFF_SECONDS = 0.25
CLOSE_HOLD_SECONDS = 1.0
DRAIN_TIMEOUT = 10.0
WARMUP_SECONDS = 3.0
SAMPLE_INTERVAL = 1.0 if SOAK_SECONDS <= 60 else 5.0
MAX_RSS_GROWTH_BYTES = 48 * 1024 * 1024
MAX_FD_GROWTH = 32
MAX_TASK_GROWTH = 64

#: Hostile SMTP client threads of the accept mode, and their pause between two sessions.
HOSTILE_CLIENTS = 2
HOSTILE_PAUSE_SECONDS = 0.1
#: ``[server]`` of the accept mode: small, so that bodies spool and hostile clients cross limits.
BODY_MEMORY_BYTES = 2048
LIMIT_MAX_HEADERS = 100
LIMIT_MAX_RECIPIENTS = 5
#: Share of the accept mode's messages with a body of 2,000-8,000 lines (about 40-160 KB).
BIG_BODY_PROBABILITY = 0.08

OUTCOMES = ("accepted", "quarantined", "discarded", "rejected", "tempfailed", "aborted")
WEBHOOK_OUTCOMES = ("ok", "timeout", "connection_error", "status_error", "invalid_body", "breaker_open")
#: Plan -> weight. "quarantine_early" quarantines at rcpt (remembered until end-of-message).
PLANS: Mapping[str, int] = {
    "continue": 25,
    "tag": 30,
    "quarantine": 8,
    "quarantine_early": 5,
    "discard": 12,
    "reject": 6,
    "tempfail": 6,
}
#: The plans whose end-of-message decision lets a message through: into the Maildir, or held.
PASSING_PLANS: Mapping[str, str] = {
    "continue": "accepted",
    "tag": "accepted",
    "quarantine": "quarantined",
    "quarantine_early": "quarantined",
}
DENY_PROBABILITY = 0.15
#: Per-request faults of the policy endpoint (outside outages) and their probabilities.
FAULTS: Mapping[str, float] = {
    "status_500": 0.03,
    "drop": 0.03,
    "invalid_json": 0.03,
    "slow": 0.08,
    "too_slow": 0.015,
}
#: What the hostile clients do, in turn (each thread starts at another one).
HOSTILE_KINDS = ("header_flood", "rcpt_flood", "drop_in_data", "garbage")
#: Junk the garbage client pipelines before its message; Postfix answers each line with a 5xx.
GARBAGE_LINES: tuple[bytes, ...] = (
    b"XYZZY plugh",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # the start of a TLS ClientHello
    b"RCPT TO:<nobody@example.net>",  # before MAIL
    b"DATA",  # before MAIL
    b"MAIL FROM:<<<unbalanced@example.org>",
    b"A" * 3000,  # longer than Postfix's line_length_limit
    b"HELP me",
    b"\x00\x01\x02 nul",
)
#: Junk the garbage client pipelines right after the end of its data, then QUIT.
GARBAGE_AFTER: tuple[bytes, ...] = (b"XYZZY after the data", b"RSET", b"NOOP")
GENERIC_TEMPFAIL = "4.7.1 Service unavailable - try again later"
RCPT_DENY_TEXT = "soak: recipient refused"
MESSAGE_REJECT_TEXT = "soak: message refused"
MESSAGE_TEMPFAIL_TEXT = "soak: try again later"
HOSTILE_REJECT_TEXT = "soak: hostile message refused"
BODY_MISMATCH_TEXT = "soak: the body differs from the one sent"
#: How the bridge refuses what is over a limit (on_oversize tempfail): (code, enhanced code).
#: A recipient over max_recipients at a RCPT the MTA waits for gets RFC 5321's "too many
#: recipients" (the client sends it again in another transaction); a message, 451 4.3.4.
OVER_LIMIT_REPLIES: Mapping[str, tuple[int, str]] = {"max_headers": (451, "4.3.4"), "max_recipients": (452, "4.5.3")}
_SENDER = re.compile(r"^(?P<id>[ch]\d+-\d+)\.(?P<plan>[a-z_]+)@")
_RECEIVED_ID = re.compile(r"\(Postfix\) with \S+ id ([0-9A-Za-z]+)")


# -- the two modes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakMode:
    """What a soak run does besides the healthy traffic and the endpoint faults."""

    name: str
    #: Postfix's milter_default_action.
    default_action: str
    #: SIGTERM halfway and a new bridge process on the same port.
    restart: bool
    #: The SIGHUPs of ``RELOADS`` during the traffic.
    reloads: bool
    #: include_body on the policy endpoint, small body_memory_bytes, and bodies checked.
    include_body: bool
    hostile_clients: int

    def server(self) -> dict[str, Any]:
        """The ``[server]`` keys the bridge's config adds for this mode."""
        if not self.include_body and not self.hostile_clients:
            return {}
        return {
            "body_memory_bytes": BODY_MEMORY_BYTES,
            "max_headers": LIMIT_MAX_HEADERS,
            "max_recipients": LIMIT_MAX_RECIPIENTS,
        }


TEMPFAIL_MODE = SoakMode(
    name="tempfail", default_action="tempfail", restart=True, reloads=False, include_body=False, hostile_clients=0
)
ACCEPT_MODE = SoakMode(
    name="accept",
    default_action="accept",
    restart=False,
    reloads=True,
    include_body=True,
    hostile_clients=HOSTILE_CLIENTS,
)
#: The SIGHUPs of a mode with ``reloads``, in order: what the file holds, and the answer due.
RELOADS: tuple[tuple[str, str], ...] = (
    ("policy_timeout", "ok"),
    ("empty", "refused"),
    ("invalid_toml", "refused"),
    ("observe_timeout", "ok"),
    ("observe_only", "refused"),
    ("original", "ok"),
)


# -- plans and client traffic ---------------------------------------------------------------


def body_digest(body: str) -> str:
    """SHA-256 of ``body`` as it goes on the wire (CRLF line ends, UTF-8), as the endpoint gets it."""
    return hashlib.sha256(body.replace("\n", "\r\n").encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What one message is and what the policy endpoint will decide for it."""

    soak_id: str
    plan: str
    rcpts: tuple[str, ...]
    denied: frozenset[str]
    body_lines: int
    #: Add a dot line and 8-bit bytes to the body, and ``X-Soak-Body`` for the endpoint's check.
    check_body: bool = False

    @property
    def sender(self) -> str:
        """The envelope sender, which carries the plan to the endpoint."""
        return f"{self.soak_id}.{self.plan}@soak.milterbridge.test"

    def body(self) -> str:
        """The body text (LF line ends)."""
        lines = [f"line {n} of {self.soak_id}\n" for n in range(self.body_lines)]
        if self.check_body:
            # What a body check must get right: dot-stuffing and 8-bit bytes.
            lines.insert(len(lines) // 2, ".a line that starts with a dot\n..and one with two\n8-bit: h\u00e9llo\n")
        return "".join(lines)

    def body_bytes(self) -> int:
        """The size of the body as the bridge gets it."""
        return len(self.body().replace("\n", "\r\n").encode())

    def message(self) -> bytes:
        """The message itself, with its ``X-Soak-Id`` (and ``X-Soak-Body``)."""
        body = self.body()
        headers = [("X-Soak-Id", self.soak_id)]
        if self.check_body:
            headers.append(("X-Soak-Body", body_digest(body)))
        return make_message(
            mail_from=self.sender,
            to=self.rcpts,
            subject=f"soak {self.soak_id}",
            body=body,
            headers=headers,
            message_id=f"<{self.soak_id}.{SOAK_SEED}@soak.milterbridge.test>",
        )


def make_plan(rng: random.Random, client: int, number: int, mode: SoakMode) -> Plan:
    """Draw the plan of the ``number``-th message of ``client``."""
    soak_id = f"c{client}-{number}"
    plan = rng.choices(list(PLANS), weights=list(PLANS.values()))[0]
    rcpts = []
    denied = set()
    for n in range(rng.randint(1, MAX_RECIPIENTS)):
        kind = "deny" if rng.random() < DENY_PROBABILITY else "ok"
        address = f"{kind}{n}.{soak_id}@example.net"
        rcpts.append(address)
        if kind == "deny":
            denied.add(address)
    body_lines = rng.randint(1, 200)
    # Only with include_body, so that the tempfail mode draws what it always drew.
    if mode.include_body and rng.random() < BIG_BODY_PROBABILITY:
        body_lines = rng.randint(2000, 8000)
    return Plan(
        soak_id=soak_id,
        plan=plan,
        rcpts=tuple(rcpts),
        denied=frozenset(denied),
        body_lines=body_lines,
        check_body=mode.include_body,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """One message as its client saw it."""

    plan: Plan
    transaction: SmtpTransaction
    session: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostileSent:
    """One message of a hostile client as it saw it."""

    soak_id: str
    kind: str
    transaction: SmtpTransaction
    session: str
    #: garbage: the replies to the junk before the message (then NOOP's), and to the junk after.
    junk: tuple[SmtpReply, ...] = ()
    after: tuple[SmtpReply, ...] = ()
    #: drop_in_data: how the connection was cut in DATA ("fin" or "rst"), if it got that far.
    cut: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSpan:
    """When one SMTP session was open (seconds on the monotonic clock)."""

    name: str
    opened: float
    closed: float


@dataclass(slots=True)
class ClientLog:
    """What one client thread recorded."""

    sent: list[Sent] = field(default_factory=list)
    hostile: list[HostileSent] = field(default_factory=list)
    sessions: list[SessionSpan] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_client(index: int, host: str, port: int, stop: threading.Event, out: ClientLog, mode: SoakMode) -> None:
    """Send sessions of 1..MAX_MESSAGES_PER_SESSION messages until ``stop`` is set."""
    rng = random.Random(f"{SOAK_SEED}:client:{index}")
    number = 0
    sessions = 0
    try:
        while not stop.is_set():
            name = f"c{index}/s{sessions}"
            sessions += 1
            opened = time.monotonic()
            session = SmtpSession(host, port, timeout=SMTP_TIMEOUT)
            session.open()
            try:
                for _ in range(rng.randint(1, MAX_MESSAGES_PER_SESSION)):
                    plan = make_plan(rng, index, number, mode)
                    number += 1
                    transaction = session.send(plan.sender, plan.rcpts, plan.message())
                    out.sent.append(Sent(plan=plan, transaction=transaction, session=name))
            finally:
                result = session.close()
                out.sessions.append(SessionSpan(name=name, opened=opened, closed=time.monotonic()))
            if not any(t.accepted for t in result.transactions) and any(400 <= r.code < 500 for r in result.replies):
                stop.wait(REFUSED_BACKOFF_SECONDS)
    except Exception as exc:  # reported by the test, which then fails
        out.errors.append(f"client {index}: {type(exc).__name__}: {exc}")


# -- hostile clients -------------------------------------------------------------------------


def hostile_sender(soak_id: str, kind: str) -> str:
    """The envelope sender of a hostile message: the endpoint knows it by its kind."""
    return f"{soak_id}.{kind}@soak.milterbridge.test"


def hostile_message(soak_id: str, kind: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A small message (its body stays in memory) with ``headers`` first."""
    body = f"hostile {kind} {soak_id}\n.a line that starts with a dot\n"
    return make_message(
        mail_from=hostile_sender(soak_id, kind),
        to=[f"ok0.{soak_id}@example.net"],
        subject=f"hostile {soak_id}",
        body=body,
        headers=[*headers, ("X-Soak-Id", soak_id), ("X-Soak-Body", body_digest(body))],
        message_id=f"<{soak_id}.{SOAK_SEED}@soak.milterbridge.test>",
    )


def dot_stuffed(message: bytes) -> bytes:
    """``message`` as it goes after DATA, without the final dot."""
    return re.sub(rb"(?m)^\.", b"..", message)


class RawSmtp:
    """A bare SMTP connection for what smtplib will not do: pipelined junk, a cut in DATA."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=SMTP_TIMEOUT)
        self._file = self._sock.makefile("rb")

    def reply(self, step: str, argument: str = "") -> SmtpReply:
        """Read one (possibly multi-line) reply; code 0 when none came."""
        lines: list[bytes] = []
        try:
            while True:
                line = self._file.readline(8192)
                if not line:
                    return SmtpReply(step=step, code=0, text="connection closed", argument=argument)
                lines.append(line)
                if line[3:4] != b"-":
                    break
            code = int(lines[-1][:3])
        except (OSError, ValueError) as exc:
            return SmtpReply(step=step, code=0, text=f"{type(exc).__name__}: {exc}", argument=argument)
        text = "\n".join(line[4:].decode("utf-8", "replace").rstrip("\r\n") for line in lines)
        return SmtpReply(step=step, code=code, text=text, argument=argument)

    def send(self, data: bytes) -> None:
        """Write ``data`` as it is."""
        self._sock.sendall(data)

    def command(self, step: str, line: str) -> SmtpReply:
        """Send one command line and read its reply."""
        try:
            self.send(line.encode() + b"\r\n")
        except OSError as exc:
            return SmtpReply(step=step, code=0, text=f"{type(exc).__name__}: {exc}", argument=line)
        return self.reply(step, line)

    def greet(self) -> None:
        """Read the greeting and say EHLO; raises unless both are positive."""
        greeting = self.reply("greeting")
        ehlo = self.command("ehlo", f"EHLO {DEFAULT_HELO}")
        if not (greeting.ok and ehlo.ok):
            raise ConnectionError(f"no SMTP session: {greeting} {ehlo}")

    def close(self, *, reset: bool = False) -> None:
        """Close the connection; with ``reset``, abortively (the peer sees an RST)."""
        if reset:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._file.close()
        self._sock.close()


def send_flood(host: str, port: int, soak_id: str, kind: str, session: str, rng: random.Random) -> HostileSent:
    """A message with more headers than max_headers, or more recipients than max_recipients."""
    rcpts = [f"ok0.{soak_id}@example.net"]
    headers: list[tuple[str, str]] = []
    if kind == "header_flood":
        headers = [("X-Flood", f"header {n} of {soak_id}") for n in range(rng.randint(150, 400))]
    else:
        rcpts = [f"ok{n}.{soak_id}@example.net" for n in range(rng.randint(LIMIT_MAX_RECIPIENTS + 1, 12))]
    smtp = SmtpSession(host, port, timeout=SMTP_TIMEOUT)
    smtp.open()
    try:
        transaction = smtp.send(hostile_sender(soak_id, kind), rcpts, hostile_message(soak_id, kind, headers))
    finally:
        smtp.close()
    return HostileSent(soak_id=soak_id, kind=kind, transaction=transaction, session=session)


def send_dropped(host: str, port: int, soak_id: str, session: str, rng: random.Random) -> HostileSent:
    """MAIL, RCPT, DATA, half of the message, then the connection cut (FIN or RST)."""
    started = time.monotonic()
    raw = RawSmtp(host, port)
    cut = ""
    try:
        raw.greet()
        mail = raw.command("mail", f"MAIL FROM:<{hostile_sender(soak_id, 'drop_in_data')}>")
        rcpts: tuple[SmtpReply, ...] = ()
        data = None
        if mail.ok:
            rcpts = (raw.command("rcpt", f"RCPT TO:<ok0.{soak_id}@example.net>"),)
            if rcpts[0].ok:
                data = raw.command("data", "DATA")
        if data is not None and data.code == 354:
            payload = dot_stuffed(hostile_message(soak_id, "drop_in_data"))
            raw.send(payload[: len(payload) // 2])
            cut = "rst" if rng.random() < 0.5 else "fin"
        else:
            raw.command("quit", "QUIT")
    finally:
        raw.close(reset=cut == "rst")
    transaction = SmtpTransaction(
        mail=mail, rcpts=rcpts, data=data, end_of_data=None, duration=time.monotonic() - started
    )
    return HostileSent(soak_id=soak_id, kind="drop_in_data", transaction=transaction, session=session, cut=cut)


def send_garbage(host: str, port: int, soak_id: str, session: str) -> HostileSent:
    """Junk commands, a pipelined MAIL/RCPT/DATA, the message with junk pipelined after it."""
    started = time.monotonic()
    raw = RawSmtp(host, port)
    try:
        raw.greet()
        raw.send(b"".join(line + b"\r\n" for line in (*GARBAGE_LINES, b"NOOP")))
        junk = tuple(raw.reply("command", line[:40].decode("latin-1")) for line in (*GARBAGE_LINES, b"NOOP"))
        # RFC 2920: DATA may end a pipelined group.
        rcpt_to = f"ok0.{soak_id}@example.net"
        raw.send(f"MAIL FROM:<{hostile_sender(soak_id, 'garbage')}>\r\nRCPT TO:<{rcpt_to}>\r\nDATA\r\n".encode())
        mail, rcpt, data = raw.reply("mail"), raw.reply("rcpt", rcpt_to), raw.reply("data")
        end = None
        after: tuple[SmtpReply, ...] = ()
        if data.code == 354:
            trailer = b".\r\n" + b"".join(line + b"\r\n" for line in GARBAGE_AFTER)
            raw.send(dot_stuffed(hostile_message(soak_id, "garbage")) + trailer)
            end = raw.reply("end_of_data")
            after = tuple(raw.reply("command", line.decode()) for line in GARBAGE_AFTER)
        after += (raw.command("quit", "QUIT"),)
    finally:
        raw.close()
    transaction = SmtpTransaction(
        mail=mail, rcpts=(rcpt,), data=data, end_of_data=end, duration=time.monotonic() - started
    )
    return HostileSent(
        soak_id=soak_id, kind="garbage", transaction=transaction, session=session, junk=junk, after=after
    )


def run_hostile(index: int, host: str, port: int, stop: threading.Event, out: ClientLog) -> None:
    """One hostile session after the other, each kind in turn, until ``stop`` is set."""
    rng = random.Random(f"{SOAK_SEED}:hostile:{index}")
    number = 0
    try:
        while not stop.is_set():
            kind = HOSTILE_KINDS[(index + number) % len(HOSTILE_KINDS)]
            soak_id = f"h{index}-{number}"
            name = f"h{index}/s{number}"
            number += 1
            opened = time.monotonic()
            match kind:
                case "drop_in_data":
                    item = send_dropped(host, port, soak_id, name, rng)
                case "garbage":
                    item = send_garbage(host, port, soak_id, name)
                case _:
                    item = send_flood(host, port, soak_id, kind, name, rng)
            out.hostile.append(item)
            out.sessions.append(SessionSpan(name=name, opened=opened, closed=time.monotonic()))
            stop.wait(HOSTILE_PAUSE_SECONDS)
    except Exception as exc:  # reported by the test, which then fails
        out.errors.append(f"hostile client {index}: {type(exc).__name__}: {exc}")


# -- the scripted endpoints ------------------------------------------------------------------


def _address(obj: Any) -> str:
    return str(obj.get("address", "")) if isinstance(obj, dict) else ""


@dataclass(frozen=True, slots=True)
class Noted:
    """What the endpoints read from one request."""

    soak_id: str
    plan: str
    rcpt: str
    #: The bridge's message id.
    message_id: str
    message: Mapping[str, Any]


class SoakEndpoints:
    """The policy and observe endpoints' scripts, with the faults they injected."""

    def __init__(self, seed: int, *, check_bodies: bool = False) -> None:
        self.seed = seed
        self.check_bodies = check_bodies
        self.faults: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        #: Bridge message id -> soak id, from every request that carried a message.
        self.soak_ids: dict[str, str] = {}
        #: Bridge message id -> plan, for every eom call answered with the plan's decision in
        #: time (no fault): the messages the endpoint let through, if the plan says so.
        self.eom_decided: dict[str, str] = {}
        #: Soak id -> body size, for every body that matched its X-Soak-Body at eom.
        self.bodies: dict[str, int] = {}
        self.body_problems: list[str] = []
        #: Soak id of a hostile message -> recipients in its eom request.
        self.hostile_eom: dict[str, int] = {}
        #: Set while a bridge drains: close notifications are answered late.
        self.hold_close = False
        self._attempts: Counter[tuple[str, str, str, str]] = Counter()
        self._epoch = time.monotonic()
        self._outage_offset = random.Random(f"{seed}:outage").uniform(2.0, OUTAGE_PERIOD - OUTAGE_SECONDS)

    def start_clock(self) -> None:
        """Outages are timed from now (the start of the traffic)."""
        self._epoch = time.monotonic()

    def in_outage(self) -> bool:
        """True during an outage window."""
        phase = (time.monotonic() - self._epoch - self._outage_offset) % OUTAGE_PERIOD
        return phase < OUTAGE_SECONDS

    def _note(self, request: RecordedRequest) -> Noted:
        """What a request is about; records the bridge's message id."""
        document = request.json if isinstance(request.json, dict) else {}
        message = document.get("message") or {}
        match = _SENDER.match(_address(message.get("mail_from")))
        if match is None:
            return Noted("", "", "", "", message)
        message_id = str(message.get("id") or "")
        if message_id:
            self.soak_ids[message_id] = match["id"]
        rcpt = _address(document.get("data")) if request.event == "rcpt" else ""
        return Noted(match["id"], match["plan"], rcpt, message_id, message)

    def policy(self, request: RecordedRequest) -> FakeResponse:
        """The enforcing endpoint: a fault, or the plan's decision."""
        noted = self._note(request)
        soak_id, plan, rcpt = noted.soak_id, noted.plan, noted.rcpt
        event = request.event or ""
        key = (soak_id, event, rcpt, request.headers.get("webhook-id", ""))
        attempt = self._attempts[key]
        self._attempts[key] += 1
        if self.in_outage():
            kind = "outage_503" if attempt == 0 else "outage_drop"
            self.faults[kind] += 1
            return FakeResponse.status_code(503, b"down") if kind == "outage_503" else FakeResponse.close_connection()
        if plan in HOSTILE_KINDS:
            return self._hostile(event, noted)
        if event == "eom" and self.check_bodies and not self._body_matches(noted):
            return self._body_mismatch()
        rng = random.Random(f"{self.seed}:{soak_id}:{event}:{rcpt}:{attempt}")
        draw = rng.random()
        fault = None
        for kind, probability in FAULTS.items():
            if draw < probability:
                fault = kind
                break
            draw -= probability
        if fault is not None:
            self.faults[fault] += 1
        match fault:
            case "status_500":
                return FakeResponse.status_code(500, b"internal error")
            case "drop":
                return FakeResponse.close_connection()
            case "invalid_json":
                return FakeResponse.raw(b'{"action": "continue"' if rng.random() < 0.5 else b"<html>oops</html>")
            case "too_slow":
                return self._decide(event, plan, rcpt, soak_id).after(ENDPOINT_TIMEOUT + 0.4)
        answer = self._decide(event, plan, rcpt, soak_id)
        if event == "eom" and noted.message_id:
            self.eom_decided[noted.message_id] = plan
        if fault == "slow":
            return answer.after(rng.uniform(0.05, ENDPOINT_TIMEOUT * 0.5))
        return answer

    def _decide(self, event: str, plan: str, rcpt: str, soak_id: str) -> FakeResponse:
        if event == "rcpt":
            if rcpt.startswith("deny"):
                self.decisions["rcpt reject"] += 1
                return FakeResponse.decision("reject", reply={"code": 550, "enhanced": "5.7.1", "text": RCPT_DENY_TEXT})
            if plan == "quarantine_early":
                self.decisions["rcpt quarantine"] += 1
                return FakeResponse.decision("quarantine", reason=f"soak early {soak_id}")
            self.decisions["rcpt continue"] += 1
            return FakeResponse.no_content()
        self.decisions[f"eom {plan}"] += 1
        match plan:
            case "tag":
                tag = {"op": "add_header", "name": "X-Soak-Tag", "value": soak_id}
                return FakeResponse.decision("continue", modifications=[tag])
            case "quarantine":
                return FakeResponse.decision("quarantine", reason=f"soak {soak_id}")
            case "discard":
                return FakeResponse.decision("discard")
            case "reject":
                return FakeResponse.decision(
                    "reject", reply={"code": 554, "enhanced": "5.7.1", "text": MESSAGE_REJECT_TEXT}
                )
            case "tempfail":
                return FakeResponse.decision(
                    "tempfail", reply={"code": 451, "enhanced": "4.7.0", "text": MESSAGE_TEMPFAIL_TEXT}
                )
        return FakeResponse.decision("continue")

    def _hostile(self, event: str, noted: Noted) -> FakeResponse:
        """A hostile message's recipients are welcome; the message itself is refused."""
        if event != "eom":
            self.decisions[f"hostile {event} continue"] += 1
            return FakeResponse.no_content()
        rcpts = noted.message.get("rcpt_to")
        self.hostile_eom[noted.soak_id] = len(rcpts) if isinstance(rcpts, list) else -1
        if self.check_bodies and not self._body_matches(noted):
            return self._body_mismatch()
        self.decisions[f"hostile eom reject ({noted.plan})"] += 1
        return FakeResponse.decision("reject", reply={"code": 554, "enhanced": "5.7.1", "text": HOSTILE_REJECT_TEXT})

    def _body_mismatch(self) -> FakeResponse:
        self.decisions["eom body mismatch"] += 1
        return FakeResponse.decision("reject", reply={"code": 554, "enhanced": "5.7.1", "text": BODY_MISMATCH_TEXT})

    def _body_matches(self, noted: Noted) -> bool:
        """Whether the body in an eom request is the one the client sent (its X-Soak-Body)."""
        where = f"{noted.soak_id or noted.message_id}: body"
        headers = noted.message.get("headers")
        want = [
            str(h.get("value", "")).strip()
            for h in (headers if isinstance(headers, list) else [])
            if isinstance(h, dict) and str(h.get("name", "")).lower() == "x-soak-body"
        ]
        body = noted.message.get("body")
        if len(want) != 1 or not isinstance(body, dict):
            self.body_problems.append(f"{where} {body!r:.100} with X-Soak-Body {want}")
            return False
        try:
            data = base64.b64decode(str(body.get("base64", "")), validate=True)
        except binascii.Error as exc:
            self.body_problems.append(f"{where} is not base64: {exc}")
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest != want[0] or body.get("size") != len(data) or body.get("truncated") is not False:
            shown = {k: v for k, v in body.items() if k != "base64"}
            self.body_problems.append(f"{where} {shown}, {len(data)} bytes, sha256 {digest} (sent {want[0]})")
            return False
        self.bodies[noted.soak_id] = len(data)
        return True

    def observe(self, request: RecordedRequest) -> FakeResponse:
        """The observe endpoint: mostly 204, sometimes 500 or slow (never applied anyway)."""
        if request.event == "close":
            return FakeResponse.no_content().after(CLOSE_HOLD_SECONDS if self.hold_close else 0.0)
        soak_id = self._note(request).soak_id
        rng = random.Random(f"{self.seed}:observe:{soak_id}:{request.event}")
        draw = rng.random()
        if draw < 0.05:
            self.faults["observe_500"] += 1
            return FakeResponse.status_code(500)
        if draw < 0.15:
            self.faults["observe_slow"] += 1
            return FakeResponse.no_content().after(rng.uniform(0.2, OBSERVE_TIMEOUT + 0.5))
        return FakeResponse.no_content()


# -- Postfix and the bridge ------------------------------------------------------------------


def point_postfix(postfix: PostfixInstance, address: str, default_action: str) -> None:
    """Empty the queue and the Maildir and send Postfix's SMTP sessions to ``address``."""
    with contextlib.suppress(PostfixTimeoutError):
        postfix.wait_for_queue_idle(timeout=5.0)
    postfix.delete_all()
    postfix.clear_maildir()
    postfix.set_milter(address, default_action)  # settles postlogd before and after


def bridge_config(
    milter_port: int,
    webhooks: FakeWebhooks,
    mode: SoakMode,
    *,
    policy_timeout: float = ENDPOINT_TIMEOUT,
    observe_timeout: float = OBSERVE_TIMEOUT,
    enforcing: bool = True,
) -> str:
    """The bridge's TOML config: one enforcing (unless told not to) and one observing endpoint."""
    policy: dict[str, Any] = {
        "name": "policy",
        "url": webhooks.url("/policy"),
        "events": ["rcpt", "eom"],
        "on_error": "tempfail",
        "timeout": policy_timeout,
        "breaker_min_calls": 5,
        "breaker_window": 1.0,
        "breaker_probe": BREAKER_RESET_SECONDS,
        "breaker_reset": BREAKER_RESET_SECONDS,
    }
    if mode.include_body:
        policy["include_body"] = True
    observe = {
        "name": "observe",
        "url": webhooks.url("/observe"),
        "events": ["mail", "eom", "close"],
        "mode": "observe",
        "timeout": observe_timeout,
        "breaker_min_calls": 0,
    }
    return config_text(
        listen=(f"inet:127.0.0.1:{milter_port}",),
        drain_timeout=DRAIN_TIMEOUT,
        endpoints=[policy, observe] if enforcing else [observe],
        server=mode.server(),
    )


def reload_config(kind: str, milter_port: int, webhooks: FakeWebhooks, mode: SoakMode) -> str:
    """What the config file holds for one of the ``RELOADS``."""
    original = bridge_config(milter_port, webhooks, mode)
    match kind:
        case "policy_timeout":
            # Still below the late answers (ENDPOINT_TIMEOUT + 0.4 s), so they still time out.
            return bridge_config(milter_port, webhooks, mode, policy_timeout=ENDPOINT_TIMEOUT + 0.25)
        case "observe_timeout":
            return bridge_config(milter_port, webhooks, mode, observe_timeout=OBSERVE_TIMEOUT / 2)
        case "empty":
            return ""
        case "invalid_toml":  # a write caught half-way: an unterminated string
            return original + '\n[[endpoints]]\nname = "half-writ'
        case "observe_only":
            return bridge_config(milter_port, webhooks, mode, enforcing=False)
        case "original":
            return original
    raise AssertionError(f"no reload {kind!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One /metrics scrape of a bridge process."""

    at: float  # seconds since the traffic started
    process: int
    rss_bytes: float
    open_fds: float
    tasks: float
    connections: float
    draining: float
    messages: Mapping[str, float]
    webhooks: Mapping[tuple[str, str], float]
    retries: float
    reloads: Mapping[str, float]
    spooled: float
    spool_bytes: float
    bridge_faults: float
    oversize: Mapping[str, float]

    @classmethod
    def parse(cls, text: str, *, at: float, process: int) -> Sample:
        """Read the figures the soak follows from a /metrics page."""
        return cls(
            at=at,
            process=process,
            rss_bytes=metric_value(text, "process_resident_memory_bytes"),
            open_fds=metric_value(text, "process_open_fds"),
            tasks=metric_value(text, "milterbridge_asyncio_tasks"),
            connections=metric_value(text, "milterbridge_connections_active"),
            draining=metric_value(text, "milterbridge_draining"),
            messages={o: metric_value(text, "milterbridge_messages_total", outcome=o) for o in OUTCOMES},
            webhooks={
                (ep, o): metric_value(text, "milterbridge_webhook_requests_total", endpoint=ep, outcome=o)
                for ep in ("policy", "observe")
                for o in WEBHOOK_OUTCOMES
            },
            retries=metric_value(text, "milterbridge_webhook_retries_total", endpoint="policy"),
            reloads={r: metric_value(text, "milterbridge_config_reloads_total", result=r) for r in ("ok", "refused")},
            spooled=metric_value(text, "milterbridge_body_spooled_total"),
            spool_bytes=metric_value(text, "milterbridge_body_spool_bytes"),
            bridge_faults=metric_value(text, "milterbridge_bridge_faults_total"),
            oversize={
                limit: metric_value(text, "milterbridge_oversize_messages_total", limit=limit)
                for limit in ("max_headers", "max_recipients")
            },
        )

    def line(self) -> str:
        """A one-line summary for the report."""
        return (
            f"t={self.at:6.1f}s process {self.process}: RSS {self.rss_bytes / 2**20:6.1f} MiB, "
            f"fds {self.open_fds:3.0f}, tasks {self.tasks:3.0f}, connections {self.connections:2.0f}, "
            f"messages {sum(self.messages.values()):6.0f}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Life:
    """The samples of one bridge process: after warm-up, at the end, and the one that counts."""

    warm: Sample
    end: Sample
    #: Scraped when the process could count no more messages; None if it exited first.
    final: Sample | None


class Clock:
    """Seconds since the traffic started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


async def scrape(bridge: BridgeProcess, process: int, clock: Clock) -> Sample:
    """Scrape ``bridge`` now."""
    return Sample.parse(await bridge.metrics(), at=clock(), process=process)


async def sample_forever(
    current: list[tuple[int, BridgeProcess]], clock: Clock, into: list[Sample], webhooks: FakeWebhooks
) -> None:
    """Scrape the current bridge every ``SAMPLE_INTERVAL`` s (skipping while it is down)."""
    while True:
        await asyncio.sleep(SAMPLE_INTERVAL)
        # SoakEndpoints keeps what the checks need; the recorded requests would only pile up.
        webhooks.requests.clear()
        webhooks.cancelled.clear()
        process, bridge = current[-1]
        if bridge.proc.poll() is not None:
            continue
        with contextlib.suppress(Exception):  # a scrape during the restart may find nobody
            into.append(await scrape(bridge, process, clock))


async def last_scrape_while_draining(bridge: BridgeProcess, process: int, clock: Clock) -> Sample | None:
    """Scrape a draining bridge until it has no milter connection left; None if it went first."""
    while bridge.proc.poll() is None:
        try:
            sample = await scrape(bridge, process, clock)
        except Exception:  # the admin port closes just before the process exits
            await asyncio.sleep(0.01)
            continue
        if sample.draining == 1 and sample.connections == 0:
            return sample
        await asyncio.sleep(0.01)
    return None


async def scrape_when_idle(bridge: BridgeProcess, process: int, clock: Clock) -> Sample:
    """Scrape ``bridge`` until Postfix closed its last milter connection (or 10 s passed)."""
    sample = await scrape(bridge, process, clock)
    deadline = time.monotonic() + 10.0
    while sample.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        sample = await scrape(bridge, process, clock)
    return sample


def message_records(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """The bridge's per-message log lines."""
    return [r for r in bridge.records() if "outcome" in r and str(r.get("msg", "")).startswith("message ")]


def reload_records(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """The bridge's answers to SIGHUP, in order."""
    return [
        r for r in bridge.records() if str(r.get("msg", "")).startswith(("config reloaded", "config reload refused"))
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    """One SIGHUP and the bridge's answer."""

    kind: str
    expected: str
    got: str
    level: str
    msg: str
    #: Messages the policy endpoint had let through at eom when the SIGHUP was sent.
    decided_before: int


async def run_reloads(
    bridge: BridgeProcess,
    config: Path,
    texts: Mapping[str, str],
    clock: Clock,
    endpoints: SoakEndpoints,
    *,
    start: float,
    end: float,
) -> list[ReloadResult]:
    """Write each of ``RELOADS`` in turn and SIGHUP the bridge, evenly from ``start`` to ``end``."""
    results = []
    step = (end - start) / max(1, len(RELOADS) - 1)
    for n, (kind, expected) in enumerate(RELOADS):
        await _sleep_until(clock, start + step * n)
        config.write_text(texts[kind])
        decided = len(endpoints.eom_decided)
        bridge.send_signal(signal.SIGHUP)
        answers = n + 1
        await bridge.wait_until(
            lambda: len(reload_records(bridge)) >= answers,  # noqa: B023 - awaited in this iteration
            f"the answer to SIGHUP {answers} ({kind})",
        )
        record = reload_records(bridge)[n]
        msg = str(record.get("msg", ""))
        got = "ok" if msg.startswith("config reloaded") else "refused"
        level = str(record.get("level", ""))
        results.append(
            ReloadResult(kind=kind, expected=expected, got=got, level=level, msg=msg, decided_before=decided)
        )
    return results


# -- what Postfix ended up with --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """One Maildir file."""

    soak_id: str
    delivered_to: str
    tags: tuple[str, ...]
    #: Postfix's queue id, from its Received header ("" if none).
    queue_id: str


def read_maildir(postfix: PostfixInstance) -> list[Delivered]:
    """Every delivered file's soak id, final recipient, X-Soak-Tag values and queue id."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    found = []
    for _, raw in postfix.maildir_messages():
        headers = parser.parsebytes(raw)
        ids = [m[1] for r in headers.get_all("Received") or () if (m := _RECEIVED_ID.search(str(r)))]
        found.append(
            Delivered(
                soak_id=str(headers.get("X-Soak-Id", "")).strip(),
                delivered_to=str(headers.get("Delivered-To", "")).strip(),
                tags=tuple(str(v).strip() for v in headers.get_all("X-Soak-Tag") or ()),
                queue_id=ids[0] if ids else "",
            )
        )
    return found


# -- the accounting --------------------------------------------------------------------------


def _stage_of(transaction: SmtpTransaction) -> tuple[str, int]:
    """Where and with which code a transaction ended for the client ("accepted", 250 if it did)."""
    if transaction.mail is None:
        return "unsent", 0
    if not transaction.mail.ok:
        return "mail", transaction.mail.code
    if not any(reply.ok for reply in transaction.rcpts):
        codes = [reply.code for reply in transaction.rcpts]
        return "rcpt", max(codes) if codes else 0
    if transaction.data is None or transaction.data.code != 354:
        return "data", transaction.data.code if transaction.data else 0
    if transaction.end_of_data is None:
        return "end_of_data", 0
    if transaction.end_of_data.code != 250:
        return "end_of_data", transaction.end_of_data.code
    return "accepted", 250


def is_over_limit(reply: SmtpReply, limit: str) -> bool:
    """Whether ``reply`` is the bridge's refusal naming ``limit`` (see ``OVER_LIMIT_REPLIES``)."""
    code, enhanced = OVER_LIMIT_REPLIES[limit]
    return reply.code == code and reply.text.startswith(enhanced) and f"({limit})" in reply.text


@dataclass(slots=True)
class Ledger:
    """Every message's bucket, and the problems found while filling them."""

    buckets: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    #: "<kind> <how it ended>" for the hostile messages.
    hostile: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        """Note ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)


def account(
    sent: Sequence[Sent],
    hostile: Sequence[HostileSent],
    delivered: Sequence[Delivered],
    queue: Iterable[Any],
    records: Sequence[dict[str, Any]],
    endpoints: SoakEndpoints,
    restart_spans: Sequence[SessionSpan],
) -> tuple[Ledger, Counter[str]]:
    """Put every sent message in one bucket and join the bridge's log lines; see the module docstring.

    Returns the ledger and the client-side counts used by the metrics arithmetic.
    """
    ledger = Ledger()
    counts: Counter[str] = Counter()
    by_id = {s.plan.soak_id: s for s in sent}
    files: dict[str, list[Delivered]] = {}
    for copy in delivered:
        files.setdefault(copy.soak_id, []).append(copy)
    queue = list(queue)
    held = {entry.queue_id: entry for entry in queue if entry.queue_name == "hold"}
    others = [entry for entry in queue if entry.queue_name != "hold"]
    ledger.check(not others, f"mail left in other queues: {others[:5]}")
    by_queue_id: dict[str, dict[str, Any]] = {}
    by_soak_id: dict[str, dict[str, Any]] = {}
    for line in records:
        soak_id = endpoints.soak_ids.get(str(line.get("message")))
        ledger.check(soak_id is not None, f"log line for a message no endpoint saw: {line}")
        if soak_id is None:
            continue
        ledger.check(soak_id not in by_soak_id, f"two outcomes logged for {soak_id}: {line}")
        by_soak_id[soak_id] = line
        if line.get("queue_id"):
            by_queue_id[str(line["queue_id"])] = line
    restart_sessions = {span.name for span in restart_spans}

    for item in sent:
        plan, tx = item.plan, item.transaction
        stage, code = _stage_of(tx)
        record = by_soak_id.get(plan.soak_id)
        outcome = record.get("outcome") if record else None
        accepted_rcpts = {reply.argument for reply in tx.rcpts if reply.ok}
        for reply in tx.rcpts:
            denied = reply.argument in plan.denied
            ledger.check(not (denied and reply.ok), f"{plan.soak_id}: denied recipient accepted: {reply}")
            if 500 <= reply.code < 600:
                ledger.check(denied and RCPT_DENY_TEXT in reply.text, f"{plan.soak_id}: unexpected {reply}")
            if 400 <= reply.code < 500:
                ledger.check(GENERIC_TEMPFAIL in reply.text, f"{plan.soak_id}: unexpected {reply}")
        where = f"{plan.soak_id} ({plan.plan}, session {item.session})"
        if stage == "accepted":
            counts["E250"] += 1
            queue_id = tx.queue_id
            ledger.check(
                record is not None and record.get("queue_id") == queue_id,
                f"{where}: 250 queued as {queue_id} but the bridge logged {record}",
            )
            copies = files.pop(plan.soak_id, [])
            if plan.plan in ("continue", "tag"):
                ledger.buckets["delivered"] += 1
                ledger.check(outcome == "accepted", f"{where}: delivered but logged {outcome}")
                ledger.check(
                    sorted(c.delivered_to for c in copies) == sorted(accepted_rcpts),
                    f"{where}: delivered to {[c.delivered_to for c in copies]}, accepted {sorted(accepted_rcpts)}",
                )
                want_tags = (plan.soak_id,) if plan.plan == "tag" else ()
                ledger.check(all(c.tags == want_tags for c in copies), f"{where}: tags {[c.tags for c in copies]}")
            elif plan.plan in ("quarantine", "quarantine_early"):
                ledger.buckets["held"] += 1
                entry = held.pop(queue_id or "", None)
                ledger.check(entry is not None, f"{where}: {queue_id} is not in the hold queue")
                ledger.check(not copies, f"{where}: quarantined but delivered")
                ledger.check(outcome == "quarantined", f"{where}: held but logged {outcome}")
                if entry is not None:
                    ledger.check(sorted(entry.recipients) == sorted(accepted_rcpts), f"{where}: held for {entry}")
            elif plan.plan == "discard":
                ledger.buckets["discarded"] += 1
                ledger.check(not copies, f"{where}: discarded but delivered")
                ledger.check(queue_id not in held, f"{where}: discarded but held")
                discarded = by_queue_id.get(queue_id or "")
                ledger.check(
                    discarded is not None and discarded.get("outcome") == "discarded",
                    f"{where}: no 'discarded' log line for queue id {queue_id}: {discarded}",
                )
            else:
                ledger.problems.append(f"{where}: plan {plan.plan} but 250 at end-of-data")
            continue
        ledger.buckets["refused"] += 1
        ledger.refusals[f"{stage} {code}"] += 1
        ledger.check(plan.soak_id not in files, f"{where}: refused at {stage} but delivered")
        if stage == "unsent" or code == 0:
            ledger.problems.append(f"{where}: no answer at {stage}: {tx.replies[-1:]}")
        elif stage == "end_of_data":
            final = tx.end_of_data
            assert final is not None
            if code >= 500:
                counts["E5xx"] += 1
                ledger.check(
                    plan.plan == "reject" and MESSAGE_REJECT_TEXT in final.text, f"{where}: unexpected {final}"
                )
                ledger.check(outcome == "rejected", f"{where}: {code} but logged {outcome}")
            else:
                counts["E4xx"] += 1
                ok = GENERIC_TEMPFAIL in final.text or (plan.plan == "tempfail" and MESSAGE_TEMPFAIL_TEXT in final.text)
                ledger.check(ok, f"{where}: unexpected {final}")
                ledger.check(outcome == "tempfailed", f"{where}: {code} but logged {outcome}")
        elif stage == "rcpt":
            counts["no_rcpt"] += 1
            if record is None:
                # The bridge never saw it: its milter connection was gone (the restart).
                counts["P"] += 1
                ledger.check(item.session in restart_sessions, f"{where}: 4xx at RCPT from Postfix outside the restart")
                ledger.check(code < 500, f"{where}: refused at RCPT with {code} but the bridge never saw it")
            else:
                ledger.check(outcome == "aborted", f"{where}: no recipient accepted but logged {outcome}")
        elif stage == "mail":
            counts["mail_refused"] += 1
            mail = tx.mail
            assert mail is not None
            ledger.check(GENERIC_TEMPFAIL in mail.text, f"{where}: unexpected {mail}")
            ledger.check(item.session in restart_sessions, f"{where}: MAIL refused outside the restart window")
            ledger.check(record is None, f"{where}: MAIL refused but the bridge logged {record}")
        else:
            ledger.problems.append(f"{where}: refused at {stage} with {code}")

    for hostile_item in hostile:
        account_hostile(hostile_item, by_soak_id.get(hostile_item.soak_id), endpoints, ledger, counts)
        ledger.check(hostile_item.soak_id not in files, f"{hostile_item.soak_id}: a hostile message was delivered")
    ledger.check(not files, f"delivered files of no delivered message: {sorted(files)[:10]}")
    ledger.check(not held, f"held messages of no held message: {sorted(held)[:10]}")
    unknown = sorted(set(by_soak_id) - set(by_id) - {h.soak_id for h in hostile})
    ledger.check(not unknown, f"log lines for messages nobody sent: {unknown[:10]}")
    return ledger, counts


def account_hostile(
    item: HostileSent, record: Mapping[str, Any] | None, endpoints: SoakEndpoints, ledger: Ledger, counts: Counter[str]
) -> None:
    """Put one hostile message in its bucket: refused, or aborted when the client cut it in DATA."""
    tx = item.transaction
    stage, code = _stage_of(tx)
    outcome = record.get("outcome") if record else None
    where = f"{item.soak_id} ({item.kind}, session {item.session})"
    # Recipients: welcome (or the on_error tempfail of an outage), until max_recipients is reached.
    kept = 0
    for reply in tx.rcpts:
        if kept >= LIMIT_MAX_RECIPIENTS:
            ledger.check(is_over_limit(reply, "max_recipients"), f"{where}: over max_recipients but {reply}")
            counts["hostile rcpt over max_recipients"] += is_over_limit(reply, "max_recipients")
        elif reply.ok:
            kept += 1
        else:
            ledger.check(reply.code == 451 and GENERIC_TEMPFAIL in reply.text, f"{where}: unexpected {reply}")
    if item.kind == "garbage":
        junk_codes = [reply.code for reply in item.junk]
        ledger.check(
            len(junk_codes) == len(GARBAGE_LINES) + 1
            and all(500 <= c < 600 for c in junk_codes[:-1])
            and junk_codes[-1] == 250,
            f"{where}: junk answered {junk_codes}",
        )
        after_codes = [reply.code for reply in item.after]
        ledger.check(after_codes in ([221], [500, 250, 250, 221]), f"{where}: pipelined junk answered {after_codes}")
    if stage == "end_of_data" and tx.end_of_data is None and item.kind == "drop_in_data":
        # Cut in the middle of DATA: Postfix tells the bridge, which logs the message aborted.
        ledger.buckets["hostile aborted"] += 1
        ledger.hostile[f"{item.kind} cut in DATA ({item.cut})"] += 1
        counts["cut_in_data"] += 1
        ledger.check(outcome == "aborted", f"{where}: cut in DATA but logged {outcome}")
        return
    if stage == "accepted":
        ledger.buckets["hostile delivered"] += 1
        ledger.problems.append(f"{where}: 250 at end-of-data: {tx.end_of_data}")
        return
    ledger.buckets["hostile refused"] += 1
    ledger.hostile[f"{item.kind} {stage} {code}"] += 1
    if stage == "rcpt":
        counts["no_rcpt"] += 1
        ledger.check(code == 451, f"{where}: no recipient accepted, {code}")
        ledger.check(outcome == "aborted", f"{where}: no recipient accepted but logged {outcome}")
    elif stage == "end_of_data" and code:
        final = tx.end_of_data
        assert final is not None
        generic = code == 451 and GENERIC_TEMPFAIL in final.text
        if item.kind == "header_flood":
            ledger.check(is_over_limit(final, "max_headers"), f"{where}: {final}")
            ledger.check(item.soak_id not in endpoints.hostile_eom, f"{where}: the endpoint was asked at eom")
        else:
            ledger.check(generic or (code == 554 and HOSTILE_REJECT_TEXT in final.text), f"{where}: {final}")
        if item.kind == "rcpt_flood":
            seen = endpoints.hostile_eom.get(item.soak_id)
            ledger.check(seen is None or 0 < seen <= LIMIT_MAX_RECIPIENTS, f"{where}: the endpoint saw {seen} rcpts")
        counts["E5xx" if code >= 500 else "E4xx"] += 1
        ledger.check(outcome == ("rejected" if code >= 500 else "tempfailed"), f"{where}: {code} but logged {outcome}")
    else:
        ledger.problems.append(f"{where}: ended at {stage} with {code}: {tx.replies[-1:]}")


def gate_problems(
    delivered: Sequence[Delivered], queue: Iterable[Any], records: Sequence[dict[str, Any]], endpoints: SoakEndpoints
) -> list[str]:
    """Every Maildir file and held message has the endpoint's decision, joined by Postfix's queue id.

    That is: the bridge logged ``accepted`` (``quarantined`` for a held one) for its queue id,
    for a bridge message id the policy endpoint answered at eom with a plan that lets it
    through. Neither soak ids nor the clients' records are used.
    """
    problems = []
    logged = {str(r["queue_id"]): r for r in records if r.get("queue_id")}
    places = [("Maildir", copy.queue_id, "accepted") for copy in delivered]
    places += [("hold", entry.queue_id, "quarantined") for entry in queue if entry.queue_name == "hold"]
    for place, queue_id, want in places:
        record = logged.get(queue_id)
        if record is None or record.get("outcome") != want:
            problems.append(f"{place}: {queue_id or 'no queue id'} has no bridge line '{want}' ({record})")
            continue
        plan = endpoints.eom_decided.get(str(record.get("message")))
        if PASSING_PLANS.get(plan or "") != want:
            problems.append(f"{place}: {queue_id}, bridge message {record.get('message')}: eom answer {plan}")
    return problems


def sum_samples(samples: Iterable[Sample]) -> tuple[Counter[str], Counter[tuple[str, str]], float]:
    """Messages per outcome, webhook calls per (endpoint, outcome) and retries, over processes."""
    messages: Counter[str] = Counter()
    calls: Counter[tuple[str, str]] = Counter()
    retries = 0.0
    for sample in samples:
        messages.update({k: int(v) for k, v in sample.messages.items()})
        calls.update({k: int(v) for k, v in sample.webhooks.items()})
        retries += sample.retries
    return messages, calls, retries


def growth_problems(warm: Sample, end: Sample) -> list[str]:
    """Where ``end`` grew past the bounds relative to ``warm``."""
    problems = []
    if end.rss_bytes - warm.rss_bytes >= MAX_RSS_GROWTH_BYTES:
        problems.append(
            f"RSS grew by {(end.rss_bytes - warm.rss_bytes) / 2**20:.1f} MiB: {warm.line()} -> {end.line()}"
        )
    if end.open_fds - warm.open_fds > MAX_FD_GROWTH:
        problems.append(f"open fds grew by {end.open_fds - warm.open_fds:.0f}: {warm.line()} -> {end.line()}")
    if end.tasks - warm.tasks > MAX_TASK_GROWTH:
        problems.append(f"asyncio tasks grew by {end.tasks - warm.tasks:.0f}: {warm.line()} -> {end.line()}")
    return problems


# -- the tests -------------------------------------------------------------------------------


async def _sleep_until(clock: Clock, at: float) -> None:
    await asyncio.sleep(max(0.0, at - clock()))


@pytest.mark.timeout(int(SOAK_SECONDS * 2 + 120))
@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [TEMPFAIL_MODE, ACCEPT_MODE], ids=lambda mode: mode.name)
async def test_soak(
    postfix_instance: PostfixInstance, postfix_report: Callable[[str], None], tmp_path: Path, mode: SoakMode
) -> None:
    """Under faults and load, and a restart or SIGHUPs and hostile clients, every message is
    accounted for, none passes without the endpoint's decision, and the bridge stays flat."""
    postfix = postfix_instance

    def report(line: str) -> None:
        postfix_report(f"soak[{mode.name}] {line}")

    # In the terminal summary even when the test fails halfway, so the run can be replayed.
    report(f"seed {SOAK_SEED} (MILTERBRIDGE_SOAK_SEED={SOAK_SEED} replays it), {SOAK_SECONDS:.0f} s of traffic")
    milter_port = free_port()
    milter = f"inet:127.0.0.1:{milter_port}"
    endpoints = SoakEndpoints(SOAK_SEED, check_bodies=mode.include_body)
    launcher = BridgeLauncher(tmp_path)
    stop = threading.Event()
    logs = [ClientLog() for _ in range(CLIENTS)]
    hostile_logs = [ClientLog() for _ in range(mode.hostile_clients)]
    executor = ThreadPoolExecutor(max_workers=CLIENTS + mode.hostile_clients, thread_name_prefix="soak-client")
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    lives: list[Life] = []
    reloads: list[ReloadResult] = []
    sigterm_at = ready_at = 0.0
    async with FakeWebhooks() as webhooks:
        webhooks.set_default(endpoints.policy, path="/policy")
        webhooks.set_default(endpoints.observe, path="/observe")
        config = tmp_path / "soak.toml"
        config.write_text(bridge_config(milter_port, webhooks, mode))
        clients: list[asyncio.Future[None]] = []
        sampler: asyncio.Task[None] | None = None
        try:
            first = await launcher.start(config)
            await asyncio.to_thread(point_postfix, postfix, milter, mode.default_action)
            current = [(1, first)]
            clock = Clock()
            endpoints.start_clock()
            host, port = postfix.smtp_host, postfix.smtp_port
            clients = [
                loop.run_in_executor(executor, run_client, n, host, port, stop, logs[n], mode) for n in range(CLIENTS)
            ]
            clients += [
                loop.run_in_executor(executor, run_hostile, n, host, port, stop, hostile_logs[n])
                for n in range(mode.hostile_clients)
            ]
            sampler = asyncio.create_task(sample_forever(current, clock, samples, webhooks))
            warmup = min(WARMUP_SECONDS, SOAK_SECONDS / 6)
            await _sleep_until(clock, warmup)
            last, warm_last = first, await scrape(first, 1, clock)

            if mode.restart:
                # Process 1: load, then SIGTERM in the middle of the traffic.
                await _sleep_until(clock, SOAK_SECONDS / 2)
                end1 = await scrape(first, 1, clock)
                endpoints.hold_close = True
                sigterm_at = time.monotonic()
                first.send_signal(signal.SIGTERM)
                final1 = await last_scrape_while_draining(first, 1, clock)
                assert await first.wait_exit(timeout=DRAIN_TIMEOUT + 10) == 0, first.describe()
                endpoints.hold_close = False
                lives.append(Life(warm=warm_last, end=end1, final=final1))
                # Process 2, on the same port.
                last = await launcher.start(config)
                ready_at = time.monotonic()
                current.append((2, last))
                await _sleep_until(clock, clock() + warmup)
                warm_last = await scrape(last, 2, clock)
            if mode.reloads:
                texts = {kind: reload_config(kind, milter_port, webhooks, mode) for kind, _ in RELOADS}
                reloads = await run_reloads(
                    last, config, texts, clock, endpoints, start=warmup + 1.0, end=SOAK_SECONDS * 0.85
                )

            await _sleep_until(clock, SOAK_SECONDS)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), timeout=SMTP_TIMEOUT * 2)
            traffic_seconds = clock()
            sampler.cancel()
            assert last.proc.poll() is None, last.describe()
            end_last = await scrape_when_idle(last, current[-1][0], clock)
            lives.append(Life(warm=warm_last, end=end_last, final=end_last))
            last.send_signal(signal.SIGTERM)
            assert await last.wait_exit(timeout=DRAIN_TIMEOUT + 10) == 0, last.describe()
            queue = await asyncio.to_thread(postfix.wait_for_queue_idle, 30.0)
            delivered = await asyncio.to_thread(read_maildir, postfix)
            # Leave the shared instance empty for whichever test comes next.
            await asyncio.to_thread(postfix.delete_all)
            await asyncio.to_thread(postfix.clear_maildir)
        finally:
            stop.set()
            if sampler is not None:
                sampler.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), timeout=SMTP_TIMEOUT * 2)
            executor.shutdown(wait=False, cancel_futures=True)
            launcher.kill_all()
            if mode.default_action != "tempfail":
                # Whichever test comes next must not find Postfix passing mail to a dead milter.
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(postfix.set_milter, milter, "tempfail")

    errors = [e for log in logs + hostile_logs for e in log.errors]
    assert not errors, errors
    sent = [s for log in logs for s in log.sent]
    hostile = [h for log in hostile_logs for h in log.hostile]
    spans = [span for log in logs + hostile_logs for span in log.sessions]
    restart_spans = [span for span in spans if mode.restart and span.opened <= ready_at and span.closed >= sigterm_at]
    records = [r for bridge in launcher.started for r in message_records(bridge)]
    ledger, counts = account(sent, hostile, delivered, queue, records, endpoints, restart_spans)
    gate = gate_problems(delivered, queue, records, endpoints)
    held_count = sum(entry.queue_name == "hold" for entry in queue)

    logged = Counter(str(r["outcome"]) for r in records)
    exact = all(life.final is not None for life in lives)
    counted = [life.final or life.end for life in lives]
    metrics_messages, calls, retries = sum_samples(counted)
    final = lives[-1].end
    faults = dict(sorted(endpoints.faults.items()))
    hostile_note = f" + {mode.hostile_clients} hostile" if mode.hostile_clients else ""
    restart_note = f"; restart gap {ready_at - sigterm_at:.2f} s" if mode.restart else ""
    report(
        f"{traffic_seconds:.1f} s of traffic, {CLIENTS}{hostile_note} clients, "
        f"{len(spans)} SMTP sessions, {len(sent) + len(hostile)} messages "
        f"({(len(sent) + len(hostile)) / traffic_seconds:.1f}/s, {len(hostile)} hostile){restart_note}"
    )
    report(f"buckets: {dict(sorted(ledger.buckets.items()))}; refusals: {dict(sorted(ledger.refusals.items()))}")
    report(f"bridge outcomes (log): {dict(sorted(logged.items()))}; metrics: {dict(sorted(metrics_messages.items()))}")
    report(f"client counts: {dict(sorted(counts.items()))}")
    report(f"faults injected: {faults}")
    report(f"policy decisions sent: {dict(sorted(endpoints.decisions.items()))}")
    report(
        "policy calls: "
        + str({o: calls[("policy", o)] for o in WEBHOOK_OUTCOMES})
        + f", retries {retries:.0f}; observe calls: "
        + str({o: calls[("observe", o)] for o in WEBHOOK_OUTCOMES})
    )
    report(
        f"gate: {len(delivered)} Maildir files and {held_count} held messages, each joined by queue id to the "
        f"bridge's decision line and the endpoint's eom answer; {len(gate)} without"
    )
    expected_spooled = sum(
        s.plan.check_body
        and s.plan.body_bytes() > BODY_MEMORY_BYTES
        and s.transaction.end_of_data is not None
        and s.transaction.end_of_data.code > 0
        for s in sent
    )
    if mode.hostile_clients:
        report(f"hostile: {dict(sorted(ledger.hostile.items()))}; oversize metric: {dict(final.oversize)}")
    if mode.include_body:
        sizes = sorted(endpoints.bodies.values())
        report(
            f"bodies checked at eom: {len(sizes)} ({sum(s > BODY_MEMORY_BYTES for s in sizes)} over "
            f"{BODY_MEMORY_BYTES} B, largest {sizes[-1] if sizes else 0} B), "
            f"mismatches {len(endpoints.body_problems)}; spooled {sum(s.spooled for s in counted):.0f} "
            f"(expected {expected_spooled}), spool bytes at the end {final.spool_bytes:.0f}"
        )
    # Messages the endpoint let through at eom after each refused SIGHUP, before the next SIGHUP.
    refused_windows = {
        r.kind: (reloads[n + 1].decided_before if n + 1 < len(reloads) else len(endpoints.eom_decided))
        - r.decided_before
        for n, r in enumerate(reloads)
        if r.expected == "refused"
    }
    if mode.reloads:
        answers = ", ".join(f"{r.kind} {r.got}" for r in reloads)
        report(f"SIGHUP: {answers}; config_reloads_total {dict(final.reloads)}")
        prefix = "config reload refused, keeping the running config: "
        why = [r.msg.removeprefix(prefix).replace(str(config), config.name)[:72] for r in reloads if r.got == "refused"]
        report(f"SIGHUP refusals: {why}")
        report(f"messages let through at eom after each refused SIGHUP, before the next one: {refused_windows}")
    for n, life in enumerate(lives, start=1):
        report(f"warm {life.warm.line()}")
        report(f"end  {life.end.line()}")
        if life.final is None:
            report(f"process {n} exited before its final scrape; its counts come from the scrape before SIGTERM")
    if SOAK_SECONDS > 60:  # the series, for long runs
        for sample in samples:
            report(f"series {sample.line()}")

    assert not ledger.problems, "\n".join(ledger.problems[:40])
    assert not gate, "\n".join(gate[:40])
    assert sum(ledger.buckets.values()) == len(sent) + len(hostile)
    # The arithmetic of the module docstring.
    assert logged["accepted"] + logged["quarantined"] + logged["discarded"] == counts["E250"]
    assert logged["rejected"] == counts["E5xx"]
    assert logged["tempfailed"] == counts["E4xx"]
    assert logged["aborted"] == counts["no_rcpt"] + counts["cut_in_data"] - counts["P"]
    assert counts["P"] <= len(restart_spans)
    if exact:
        assert metrics_messages == logged, (metrics_messages, logged)
    else:
        assert all(metrics_messages[o] <= logged[o] for o in OUTCOMES), (metrics_messages, logged)
    # Each injected invalid JSON answer is an invalid_body failure at the bridge, none is missed.
    # (Exact unless some answer was late for a reason other than an injected delay, which
    # could turn an invalid body into a timeout on a badly overloaded machine.)
    assert calls[("policy", "timeout")] >= endpoints.faults["too_slow"]
    assert calls[("policy", "invalid_body")] <= endpoints.faults["invalid_json"]
    if exact and calls[("policy", "timeout")] == endpoints.faults["too_slow"]:
        assert calls[("policy", "invalid_body")] == endpoints.faults["invalid_json"]
    assert sum(sample.bridge_faults for sample in counted) == 0, "the bridge tempfailed messages for its own faults"
    # Bodies: the endpoint got each one whole, and the spool gave back every byte it held.
    assert not endpoints.body_problems, endpoints.body_problems[:10]
    spooled = sum(sample.spooled for sample in counted)
    assert spooled == expected_spooled, (spooled, expected_spooled)
    assert final.spool_bytes == 0
    # The run did exercise what it claims to.
    for bucket in ("delivered", "held", "discarded", "refused"):
        assert ledger.buckets[bucket], f"no message was {bucket}"
    assert endpoints.faults["outage_503"], "no outage happened"
    assert calls[("policy", "breaker_open")], "the breaker never opened"
    if mode.restart:
        assert counts["mail_refused"] + counts["P"] > 0, "the restart refused nothing"
    else:
        assert counts["mail_refused"] == counts["P"] == 0
    if mode.reloads:
        assert [(r.kind, r.got) for r in reloads] == [(kind, want) for kind, want in RELOADS], reloads
        assert all(r.level == "error" for r in reloads if r.got == "refused"), reloads
        want = Counter(expected for _, expected in RELOADS)
        assert dict(final.reloads) == {"ok": want["ok"], "refused": want["refused"]}, final.reloads
        assert all(refused_windows.values()), f"no message decided while a refused file was in place: {refused_windows}"
    if mode.include_body:
        assert expected_spooled > 0, "no body was large enough to spool"
        assert any(size > 10 * BODY_MEMORY_BYTES for size in endpoints.bodies.values()), "no large body was checked"
    if mode.hostile_clients:
        header_floods = sum(
            1 for h in hostile if h.kind == "header_flood" and _stage_of(h.transaction)[0] == "end_of_data"
        )
        assert final.oversize["max_headers"] == header_floods, (final.oversize, header_floods)
        rcpt_floods = sum(
            1 for h in hostile if h.kind == "rcpt_flood" and any(r.code == 452 for r in h.transaction.rcpts)
        )
        assert final.oversize["max_recipients"] == rcpt_floods, (final.oversize, rcpt_floods)
        for kind in HOSTILE_KINDS:
            assert any(key.startswith(kind) for key in ledger.hostile), f"no {kind} message"
        assert counts["cut_in_data"], "no client was cut in DATA"
        assert counts["hostile rcpt over max_recipients"], "no recipient was refused over max_recipients"
        assert ledger.hostile["header_flood end_of_data 451"], "no header flood was refused at end-of-data"
    growth = [problem for life in lives for problem in growth_problems(life.warm, life.end)]
    assert not growth, growth


@pytest.mark.asyncio
async def test_discard_at_rcpt_is_logged_as_discarded(postfix_instance: PostfixInstance, tmp_path: Path) -> None:
    """A message the endpoint discards at RCPT is logged and counted as discarded, not aborted."""
    postfix = postfix_instance
    milter_port = free_port()
    launcher = BridgeLauncher(tmp_path)
    async with FakeWebhooks() as webhooks:
        webhooks.set_default(FakeResponse.decision("discard"), event="rcpt")
        config = tmp_path / "discard.toml"
        config.write_text(
            config_text(
                listen=(f"inet:127.0.0.1:{milter_port}",),
                endpoints=[{"name": "policy", "url": webhooks.url("/policy"), "events": ["rcpt", "eom"]}],
            )
        )
        try:
            bridge = await launcher.start(config)
            await asyncio.to_thread(point_postfix, postfix, f"inet:127.0.0.1:{milter_port}", "tempfail")
            result = await asyncio.to_thread(
                postfix.send, "alice@example.org", ["bob@example.net"], make_message(subject="discard me")
            )
            assert result.transaction.accepted, result.replies  # Postfix says 250 and drops it
            await bridge.wait_log("connection closed")
            records = message_records(bridge)
            metrics = await bridge.metrics()
        finally:
            launcher.kill_all()
    assert await asyncio.to_thread(postfix.wait_for_queue_idle, 5.0) == []
    assert postfix.maildir_messages() == []
    assert [r["outcome"] for r in records] == ["discarded"], records
    assert metric_value(metrics, "milterbridge_messages_total", outcome="discarded") == 1
