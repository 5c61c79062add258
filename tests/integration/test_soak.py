"""Soak: concurrent SMTP traffic through a real Postfix and a milterbridge process, with faults.

``test_soak`` runs ``CLIENTS`` SMTP client threads against the private Postfix for
``MILTERBRIDGE_SOAK_SECONDS`` seconds (default 20; the whole test then takes about 23-25 s).
Each client opens a session, sends 1-4 messages in it (every message has its own
``X-Soak-Id``), quits, and starts again. Postfix hands every session to milterbridge, run as
a real ``python -m milterbridge serve --workers 1`` process, with ``milter_default_action =
tempfail``. Halfway through, the bridge gets SIGTERM, drains, exits, and a new process is
started on the same milter port. Randomness comes from one seed, printed in the terminal
summary; ``MILTERBRIDGE_SOAK_SEED`` replays it (plans and per-request faults are derived from
the seed and the message, so they repeat; timing, outages and scheduling do not).

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
  every call gets 503 or a cut connection (the breaker opens, then recovers).
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
   queue id). sent == refused + delivered + held + discarded; nothing else is in the Maildir or
   the queue.
2. Every per-message log line of both bridge processes is joined to its client transaction
   (bridge message id -> soak id): accepted, quarantined and discarded carry the queue id of
   the client's 250; rejected matches a 5xx and tempfailed a 4xx at end-of-data; aborted a
   transaction where no recipient was accepted. Every end-of-data reply the clients got has a
   log line: Postfix itself refuses only at MAIL and RCPT (below).
3. ``milterbridge_messages_total{outcome}``, summed over the two processes (each scraped when
   it could count no more messages: the first while draining with no connection left, the
   second after the traffic ended), equals the log lines per outcome. So, with E250, E5xx
   and E4xx the clients' end-of-data replies:

   * accepted + quarantined + discarded == E250 (Postfix never says 250 without the milter:
     its default action is tempfail);
   * rejected == E5xx and tempfailed == E4xx (no end-of-data refusal comes from Postfix);
   * aborted == transactions with MAIL 250 and no recipient accepted, minus P, where P counts
     those the bridge never saw: a session whose milter connection the drain closed while it
     sat between two messages (Postfix sends MAIL without waiting for an answer, then finds
     the connection gone at the first RCPT and answers 451 4.7.1).
   * Postfix's own refusals (451 4.7.1 at MAIL, and the P transactions at RCPT) happen only in
     SMTP sessions that were open at some time between the SIGTERM and the new process being
     ready, and P is at most the number of those sessions.

   Should the first process ever exit before a scrape saw it drained, its counts come from the
   scrape before SIGTERM and the check weakens to metrics <= log lines (the summary says so).

4. RSS, open fds and ``milterbridge_asyncio_tasks`` after warm-up and at the end of each
   process's life: RSS grows by less than ``MAX_RSS_GROWTH_BYTES``, fds by at most
   ``MAX_FD_GROWTH`` and tasks by at most ``MAX_TASK_GROWTH``. These bounds are generous on
   purpose (a leak of one task or one fd per message would exceed them within seconds); the
   measured values are printed in the terminal summary.
5. The bridge saw each fault as what it is: ``webhook_requests_total{endpoint="policy"}``
   counts exactly one ``invalid_body`` per invalid JSON answer, and at least one ``timeout``
   per answer sent after the timeout. And the run exercised what it claims: messages in every
   bucket, refusals during the restart, an outage and an open breaker.

``test_discard_at_rcpt_is_logged_as_discarded`` pins a bug found while writing this soak.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import os
import random
import re
import secrets
import signal
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

from .postfix import PostfixInstance, PostfixTimeoutError, SmtpSession, SmtpTransaction, free_port, make_message

pytestmark = pytest.mark.postfix

#: Seconds of traffic (the restart happens halfway); the test takes about 12-20 s more.
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
DENY_PROBABILITY = 0.15
#: Per-request faults of the policy endpoint (outside outages) and their probabilities.
FAULTS: Mapping[str, float] = {
    "status_500": 0.03,
    "drop": 0.03,
    "invalid_json": 0.03,
    "slow": 0.08,
    "too_slow": 0.015,
}
GENERIC_TEMPFAIL = "4.7.1 Service unavailable - try again later"
RCPT_DENY_TEXT = "soak: recipient refused"
MESSAGE_REJECT_TEXT = "soak: message refused"
MESSAGE_TEMPFAIL_TEXT = "soak: try again later"
_SENDER = re.compile(r"^(?P<id>c\d+-\d+)\.(?P<plan>[a-z_]+)@")


# -- plans and client traffic ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What one message is and what the policy endpoint will decide for it."""

    soak_id: str
    plan: str
    rcpts: tuple[str, ...]
    denied: frozenset[str]
    body_lines: int

    @property
    def sender(self) -> str:
        """The envelope sender, which carries the plan to the endpoint."""
        return f"{self.soak_id}.{self.plan}@soak.milterbridge.test"

    def message(self) -> bytes:
        """The message itself, with its ``X-Soak-Id``."""
        body = "".join(f"line {n} of {self.soak_id}\n" for n in range(self.body_lines))
        return make_message(
            mail_from=self.sender,
            to=self.rcpts,
            subject=f"soak {self.soak_id}",
            body=body,
            headers=[("X-Soak-Id", self.soak_id)],
            message_id=f"<{self.soak_id}.{SOAK_SEED}@soak.milterbridge.test>",
        )


def make_plan(rng: random.Random, client: int, number: int) -> Plan:
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
    return Plan(
        soak_id=soak_id, plan=plan, rcpts=tuple(rcpts), denied=frozenset(denied), body_lines=rng.randint(1, 200)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    """One message as its client saw it."""

    plan: Plan
    transaction: SmtpTransaction
    session: str


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
    sessions: list[SessionSpan] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_client(index: int, host: str, port: int, stop: threading.Event, out: ClientLog) -> None:
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
                    plan = make_plan(rng, index, number)
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


# -- the scripted endpoints ------------------------------------------------------------------


def _address(obj: Any) -> str:
    return str(obj.get("address", "")) if isinstance(obj, dict) else ""


class SoakEndpoints:
    """The policy and observe endpoints' scripts, with the faults they injected."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.faults: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        #: Bridge message id -> soak id, from every request that carried a message.
        self.soak_ids: dict[str, str] = {}
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

    def _note(self, request: RecordedRequest) -> tuple[str, str, str]:
        """(soak id, plan, recipient) of a request; records the bridge's message id."""
        document = request.json if isinstance(request.json, dict) else {}
        message = document.get("message") or {}
        match = _SENDER.match(_address(message.get("mail_from")))
        if match is None:
            return "", "", ""
        if isinstance(message.get("id"), str):
            self.soak_ids[message["id"]] = match["id"]
        rcpt = _address(document.get("data")) if request.event == "rcpt" else ""
        return match["id"], match["plan"], rcpt

    def policy(self, request: RecordedRequest) -> FakeResponse:
        """The enforcing endpoint: a fault, or the plan's decision."""
        soak_id, plan, rcpt = self._note(request)
        event = request.event or ""
        key = (soak_id, event, rcpt, request.headers.get("webhook-id", ""))
        attempt = self._attempts[key]
        self._attempts[key] += 1
        if self.in_outage():
            kind = "outage_503" if attempt == 0 else "outage_drop"
            self.faults[kind] += 1
            return FakeResponse.status_code(503, b"down") if kind == "outage_503" else FakeResponse.close_connection()
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
            case "slow":
                return self._decide(event, plan, rcpt, soak_id).after(rng.uniform(0.05, ENDPOINT_TIMEOUT * 0.5))
        return self._decide(event, plan, rcpt, soak_id)

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

    def observe(self, request: RecordedRequest) -> FakeResponse:
        """The observe endpoint: mostly 204, sometimes 500 or slow (never applied anyway)."""
        if request.event == "close":
            return FakeResponse.no_content().after(CLOSE_HOLD_SECONDS if self.hold_close else 0.0)
        soak_id, _, _ = self._note(request)
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


def point_postfix(postfix: PostfixInstance, address: str) -> None:
    """Empty the queue and the Maildir and send Postfix's SMTP sessions to ``address``."""
    with contextlib.suppress(PostfixTimeoutError):
        postfix.wait_for_queue_idle(timeout=5.0)
    postfix.delete_all()
    postfix.clear_maildir()
    postfix.set_milter(address, "tempfail")  # settles postlogd before and after


def bridge_config(milter_port: int, webhooks: FakeWebhooks) -> str:
    """The bridge's TOML config: one enforcing and one observing endpoint."""
    return config_text(
        listen=(f"inet:127.0.0.1:{milter_port}",),
        drain_timeout=DRAIN_TIMEOUT,
        endpoints=[
            {
                "name": "policy",
                "url": webhooks.url("/policy"),
                "events": ["rcpt", "eom"],
                "on_error": "tempfail",
                "timeout": ENDPOINT_TIMEOUT,
                "breaker_min_calls": 5,
                "breaker_window": 1.0,
                "breaker_probe": BREAKER_RESET_SECONDS,
                "breaker_reset": BREAKER_RESET_SECONDS,
            },
            {
                "name": "observe",
                "url": webhooks.url("/observe"),
                "events": ["mail", "eom", "close"],
                "mode": "observe",
                "timeout": OBSERVE_TIMEOUT,
                "breaker_min_calls": 0,
            },
        ],
    )


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
        )

    def line(self) -> str:
        """A one-line summary for the report."""
        return (
            f"t={self.at:6.1f}s process {self.process}: RSS {self.rss_bytes / 2**20:6.1f} MiB, "
            f"fds {self.open_fds:3.0f}, tasks {self.tasks:3.0f}, connections {self.connections:2.0f}, "
            f"messages {sum(self.messages.values()):6.0f}"
        )


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


def message_records(bridge: BridgeProcess) -> list[dict[str, Any]]:
    """The bridge's per-message log lines."""
    return [r for r in bridge.records() if "outcome" in r and str(r.get("msg", "")).startswith("message ")]


# -- what Postfix ended up with --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """One Maildir file."""

    soak_id: str
    delivered_to: str
    tags: tuple[str, ...]


def read_maildir(postfix: PostfixInstance) -> list[Delivered]:
    """Every delivered file's soak id, final recipient and X-Soak-Tag values."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    found = []
    for _, raw in postfix.maildir_messages():
        headers = parser.parsebytes(raw)
        found.append(
            Delivered(
                soak_id=str(headers.get("X-Soak-Id", "")).strip(),
                delivered_to=str(headers.get("Delivered-To", "")).strip(),
                tags=tuple(str(v).strip() for v in headers.get_all("X-Soak-Tag") or ()),
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


@dataclass(slots=True)
class Ledger:
    """Every message's bucket, and the problems found while filling them."""

    buckets: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        """Note ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)


def account(
    sent: Sequence[Sent],
    delivered: Sequence[Delivered],
    queue: Iterable[Any],
    records: Sequence[dict[str, Any]],
    soak_ids: Mapping[str, str],
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
    held = {entry.queue_id: entry for entry in queue if entry.queue_name == "hold"}
    others = [entry for entry in queue if entry.queue_name != "hold"]
    ledger.check(not others, f"mail left in other queues: {others[:5]}")
    by_queue_id: dict[str, dict[str, Any]] = {}
    by_soak_id: dict[str, dict[str, Any]] = {}
    for line in records:
        soak_id = soak_ids.get(str(line.get("message")))
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
    ledger.check(not files, f"delivered files of no delivered message: {sorted(files)[:10]}")
    ledger.check(not held, f"held messages of no held message: {sorted(held)[:10]}")
    unknown = sorted(set(by_soak_id) - set(by_id))
    ledger.check(not unknown, f"log lines for messages nobody sent: {unknown[:10]}")
    return ledger, counts


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
async def test_soak(postfix_instance: PostfixInstance, postfix_report: Callable[[str], None], tmp_path: Path) -> None:
    """Under faults, load and a restart, every message is accounted for and the bridge stays flat."""
    postfix = postfix_instance
    report = postfix_report
    # In the terminal summary even when the test fails halfway, so the run can be replayed.
    report(f"soak seed {SOAK_SEED} (MILTERBRIDGE_SOAK_SEED={SOAK_SEED} replays it), {SOAK_SECONDS:.0f} s of traffic")
    milter_port = free_port()
    endpoints = SoakEndpoints(SOAK_SEED)
    launcher = BridgeLauncher(tmp_path)
    stop = threading.Event()
    logs = [ClientLog() for _ in range(CLIENTS)]
    executor = ThreadPoolExecutor(max_workers=CLIENTS, thread_name_prefix="soak-client")
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    async with FakeWebhooks() as webhooks:
        webhooks.set_default(endpoints.policy, path="/policy")
        webhooks.set_default(endpoints.observe, path="/observe")
        config = tmp_path / "soak.toml"
        config.write_text(bridge_config(milter_port, webhooks))
        clients: list[asyncio.Future[None]] = []
        sampler: asyncio.Task[None] | None = None
        try:
            first = await launcher.start(config)
            await asyncio.to_thread(point_postfix, postfix, f"inet:127.0.0.1:{milter_port}")
            current = [(1, first)]
            clock = Clock()
            endpoints.start_clock()
            clients = [
                loop.run_in_executor(executor, run_client, n, postfix.smtp_host, postfix.smtp_port, stop, logs[n])
                for n in range(CLIENTS)
            ]
            sampler = asyncio.create_task(sample_forever(current, clock, samples, webhooks))
            warmup = min(WARMUP_SECONDS, SOAK_SECONDS / 6)

            # Process 1: warm-up, load, then SIGTERM in the middle of the traffic.
            await _sleep_until(clock, warmup)
            warm1 = await scrape(first, 1, clock)
            await _sleep_until(clock, SOAK_SECONDS / 2)
            end1 = await scrape(first, 1, clock)
            endpoints.hold_close = True
            sigterm_at = time.monotonic()
            first.send_signal(signal.SIGTERM)
            final1 = await last_scrape_while_draining(first, 1, clock)
            assert await first.wait_exit(timeout=DRAIN_TIMEOUT + 10) == 0, first.describe()
            endpoints.hold_close = False

            # Process 2, on the same port.
            second = await launcher.start(config)
            ready_at = time.monotonic()
            current.append((2, second))
            restart_gap = ready_at - sigterm_at
            await _sleep_until(clock, clock() + warmup)
            warm2 = await scrape(second, 2, clock)
            await _sleep_until(clock, SOAK_SECONDS)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), timeout=SMTP_TIMEOUT * 2)
            traffic_seconds = clock()
            sampler.cancel()
            assert second.proc.poll() is None, second.describe()
            end2 = await scrape(second, 2, clock)
            deadline = time.monotonic() + 10.0
            while end2.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                end2 = await scrape(second, 2, clock)
            second.send_signal(signal.SIGTERM)
            assert await second.wait_exit(timeout=DRAIN_TIMEOUT + 10) == 0, second.describe()
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

    errors = [e for log in logs for e in log.errors]
    assert not errors, errors
    sent = [s for log in logs for s in log.sent]
    spans = [span for log in logs for span in log.sessions]
    restart_spans = [span for span in spans if span.opened <= ready_at and span.closed >= sigterm_at]
    records = message_records(first) + message_records(second)
    ledger, counts = account(sent, delivered, queue, records, endpoints.soak_ids, restart_spans)

    logged = Counter(str(r["outcome"]) for r in records)
    exact1 = final1 is not None
    metrics_messages, calls, retries = sum_samples([final1 or end1, end2])
    faults = dict(sorted(endpoints.faults.items()))
    report(
        f"soak: {traffic_seconds:.1f} s of traffic, {CLIENTS} clients, "
        f"{len(spans)} SMTP sessions, {len(sent)} messages "
        f"({len(sent) / traffic_seconds:.1f}/s); restart gap {restart_gap:.2f} s"
    )
    report(f"soak buckets: {dict(sorted(ledger.buckets.items()))}; refusals: {dict(sorted(ledger.refusals.items()))}")
    report(
        f"soak bridge outcomes (log): {dict(sorted(logged.items()))}; metrics: {dict(sorted(metrics_messages.items()))}"
    )
    report(f"soak client counts: {dict(sorted(counts.items()))}")
    report(f"soak faults injected: {faults}")
    report(f"soak policy decisions sent: {dict(sorted(endpoints.decisions.items()))}")
    report(
        "soak policy calls: "
        + str({o: calls[("policy", o)] for o in WEBHOOK_OUTCOMES})
        + f", retries {retries:.0f}; observe calls: "
        + str({o: calls[("observe", o)] for o in WEBHOOK_OUTCOMES})
    )
    for label, sample in (("warm", warm1), ("end", end1), ("warm", warm2), ("end", end2)):
        report(f"soak {label:<4} {sample.line()}")
    if SOAK_SECONDS > 60:  # the series, for long runs
        for sample in samples:
            report(f"soak series {sample.line()}")
    if not exact1:
        report("soak: the first process exited before its final scrape; its counts come from the scrape before SIGTERM")

    assert not ledger.problems, "\n".join(ledger.problems[:40])
    assert sum(ledger.buckets.values()) == len(sent)
    # The arithmetic of the module docstring.
    assert logged["accepted"] + logged["quarantined"] + logged["discarded"] == counts["E250"]
    assert logged["rejected"] == counts["E5xx"]
    assert logged["tempfailed"] == counts["E4xx"]
    assert logged["aborted"] == counts["no_rcpt"] - counts["P"]
    assert counts["P"] <= len(restart_spans)
    if exact1:
        assert metrics_messages == logged, (metrics_messages, logged)
    else:
        assert all(metrics_messages[o] <= logged[o] for o in OUTCOMES), (metrics_messages, logged)
    # Each injected invalid JSON answer is an invalid_body failure at the bridge, none is missed.
    # (Exact unless some answer was late for a reason other than an injected delay, which
    # could turn an invalid body into a timeout on a badly overloaded machine.)
    assert calls[("policy", "timeout")] >= endpoints.faults["too_slow"]
    assert calls[("policy", "invalid_body")] <= endpoints.faults["invalid_json"]
    if exact1 and calls[("policy", "timeout")] == endpoints.faults["too_slow"]:
        assert calls[("policy", "invalid_body")] == endpoints.faults["invalid_json"]
    # The run did exercise what it claims to.
    for bucket in ("delivered", "held", "discarded", "refused"):
        assert ledger.buckets[bucket], f"no message was {bucket}"
    assert counts["mail_refused"] + counts["P"] > 0, "the restart refused nothing"
    assert endpoints.faults["outage_503"], "no outage happened"
    assert calls[("policy", "breaker_open")], "the breaker never opened"
    growth = growth_problems(warm1, end1) + growth_problems(warm2, end2)
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
            await asyncio.to_thread(point_postfix, postfix, f"inet:127.0.0.1:{milter_port}")
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
