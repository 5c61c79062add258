"""Hostile or broken webhook endpoints, seen through the whole bridge.

Every case runs one message through the real listener (MilterClient -> MilterServer ->
Dispatcher -> WebhookClient -> FakeWebhooks) with the endpoint answering badly at
end-of-message. Each must give the endpoint's ``on_error`` outcome, within its
``timeout`` plus a little slack, with nothing from the bad answer applied, and with the
Python heap peak (tracemalloc) around the call bounded whatever size the answer claims.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from milterbridge.client import Envelope, TransactionResult
from milterbridge.config import TlsSettings
from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, Action, Event
from milterbridge.policy.model import OnError
from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.hostile import MESSAGE, Bridge, endpoint

#: The endpoint's budget for the call and what the test allows on top of it.
TIMEOUT = 0.5
SLACK = 0.75
#: Bound on the Python heap peak around one message (the fake server's own buffers included).
#: The worst case is a body of ~300k tiny JSON objects: orjson builds them all before the
#: decision is checked, about 37x the 1 MiB max_response_bytes (docs/reliability.md).
MAX_PEAK_BYTES = 64 * 1024 * 1024
#: Filled in as the cases run; printed by the last test for docs/reliability.md.
PEAKS: dict[str, int] = {}


def _add_header(name: str = "X-Test", value: str = "1") -> dict[str, Any]:
    return {"op": "add_header", "name": name, "value": value}


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _deep_objects(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def _padded_array(item: bytes, total: int) -> bytes:
    """``{"action":"continue","modifications":[item,item,...]}`` just under ``total`` bytes."""
    head, tail = b'{"action":"continue","modifications":[', b"]}"
    count = (total - len(head) - len(tail)) // (len(item) + 1)
    return head + b",".join([item] * count) + tail


#: id -> what the endpoint answers at eom. Every one of them is a failure of the endpoint.
FAILURES: dict[str, Callable[[], FakeResponse]] = {
    # slow or endless
    "trickle": lambda: FakeResponse.trickle(b'{"action":"accept"}' + b" " * 200, interval=0.05),
    "trickle-chunked": lambda: FakeResponse.trickle(b'{"action":"accept"}' * 20, interval=0.05, chunked=True),
    "never-answers": FakeResponse.never_answer,
    "headers-then-silence": lambda: FakeResponse.trickle(b"{" + b" " * 10, chunk_bytes=1, interval=10.0),
    # gigantic
    "huge-with-length": lambda: FakeResponse.huge(256 * 1024 * 1024),
    "huge-chunked": lambda: FakeResponse.huge(256 * 1024 * 1024, chunked=True),
    # not a decision
    "html": lambda: FakeResponse.raw(b"<html><body>502 Bad Gateway</body></html>", content_type="text/html"),
    "invalid-utf8": lambda: FakeResponse.raw(b'{"action":"\xff\xfe"}'),
    "json-array": lambda: FakeResponse.raw(b'["accept"]'),
    "json-string": lambda: FakeResponse.raw(b'"accept"'),
    "truncated-json": lambda: FakeResponse.raw(b'{"action":"acc'),
    "nan": lambda: FakeResponse.raw(b'{"action":"reject","reply":{"code":NaN}}'),
    "unknown-key": lambda: FakeResponse.decision("continue", extra=True),
    "status-201": lambda: FakeResponse.json({"action": "accept"}, status=201),
    "status-500": lambda: FakeResponse.status_code(500, b"oops"),
    "connection-cut": FakeResponse.close_connection,
    # JSON bombs inside the size limit
    "nested-arrays-100k": lambda: FakeResponse.raw(_deep(100_000)),
    "nested-objects-50k": lambda: FakeResponse.raw(_deep_objects(50_000)),
    "array-of-300k-objects": lambda: FakeResponse.raw(_padded_array(b"{}", 1000 * 1000)),
    "array-of-500k-numbers": lambda: FakeResponse.raw(b'{"action":"continue","reason":[' + b"0," * 450_000 + b"0]}"),
    "long-string": lambda: FakeResponse.decision("reject", reply={"code": 550, "text": "a" * 900_000}),
    # injection attempts: CR, LF and NUL where the wire would carry them
    "crlf-in-header-name": lambda: FakeResponse.decision(
        "continue", modifications=[_add_header("X-A\r\nBcc", "victim@example.org")]
    ),
    "colon-in-header-name": lambda: FakeResponse.decision("continue", modifications=[_add_header("Bcc: x", "y")]),
    "crlf-in-header-value": lambda: FakeResponse.decision(
        "continue", modifications=[_add_header("X-A", "1\r\nBcc: victim@example.org")]
    ),
    "bare-lf-in-header-value": lambda: FakeResponse.decision(
        "continue", modifications=[_add_header("X-A", "1\nBcc: victim@example.org")]
    ),
    "nul-in-header-value": lambda: FakeResponse.decision("continue", modifications=[_add_header("X-A", "a\0b")]),
    "crlf-in-reply-text": lambda: FakeResponse.decision(
        "reject", reply={"code": 550, "text": "no\r\n250 2.0.0 Ok: queued"}
    ),
    "lf-in-reply-line": lambda: FakeResponse.decision("tempfail", reply={"code": 451, "text": ["a", "b\nc"]}),
    "nul-in-reply-text": lambda: FakeResponse.decision("reject", reply={"code": 550, "text": "a\0b"}),
    "crlf-in-reason": lambda: FakeResponse.decision("quarantine", reason="held\r\nX-Injected: 1"),
    "crlf-in-rcpt": lambda: FakeResponse.decision(
        "continue", modifications=[{"op": "add_rcpt", "address": "a@b\r\nRCPT TO:<c@d>"}]
    ),
    "space-in-esmtp-arg": lambda: FakeResponse.decision(
        "continue", modifications=[{"op": "change_from", "address": "a@b", "args": ["RET=FULL ENVID=x"]}]
    ),
    # too much
    "5000-modifications": lambda: FakeResponse.decision("continue", modifications=[_add_header()] * 5000),
    "33-reply-lines": lambda: FakeResponse.decision("reject", reply={"code": 550, "text": ["x"] * 33}),
    "reply-code-mismatch": lambda: FakeResponse.decision("reject", reply={"code": 451, "text": "x"}),
}


def expect_on_error(on_error: OnError, result: TransactionResult) -> None:
    """The final reply is ``on_error``'s outcome and nothing else was applied."""
    assert result.eom is not None, f"stopped at {result.stopped_at}: {result.stopped_by}"
    reply = result.eom.reply
    if on_error is OnError.TEMPFAIL:
        assert isinstance(reply, m.TempFail) or (isinstance(reply, m.ReplyCode) and 400 <= reply.smtp_code < 500)
    elif on_error is OnError.REJECT:
        assert isinstance(reply, m.Reject) or (isinstance(reply, m.ReplyCode) and 500 <= reply.smtp_code < 600)
    else:
        assert isinstance(reply, m.Accept | m.Continue)
    assert result.eom.modifications == ()


@dataclass
class Run:
    """One message through the bridge: its result, how long it took, the heap peak."""

    result: TransactionResult
    elapsed: float
    peak_bytes: int


async def one_message(bridge: Bridge, *, actions: int = ALL_ACTIONS) -> Run:
    """Send one message on a fresh client; time it and trace the heap around it."""
    client = await bridge.client(actions=actions)
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.monotonic()
    try:
        result = await client.send_message(Envelope(), MESSAGE)
    finally:
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    await client.quit()
    return Run(result=result, elapsed=elapsed, peak_bytes=peak)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(FAILURES))
async def test_broken_answer_gives_on_error(case: str) -> None:
    """Each broken answer yields on_error (reject here) within the timeout, with bounded memory."""
    async with FakeWebhooks() as fake:
        fake.set_default(FAILURES[case](), event="eom")
        ep = endpoint(fake, "policy", on_error=OnError.REJECT, timeout=TIMEOUT, max_response_bytes=1024 * 1024)
        async with Bridge(fake, ep) as bridge:
            run = await one_message(bridge)
    expect_on_error(OnError.REJECT, run.result)
    assert run.elapsed < TIMEOUT + SLACK, f"{case}: {run.elapsed:.2f} s"
    assert run.peak_bytes < MAX_PEAK_BYTES, f"{case}: heap peak {run.peak_bytes} bytes"
    assert len(fake.requests_for(path="/policy", event="eom")) >= 1
    PEAKS[case] = run.peak_bytes


@pytest.mark.asyncio
@pytest.mark.parametrize("on_error", [OnError.TEMPFAIL, OnError.CONTINUE, OnError.ACCEPT])
@pytest.mark.parametrize("case", ["never-answers", "nested-arrays-100k", "crlf-in-header-value"])
async def test_every_on_error_applies(case: str, on_error: OnError) -> None:
    """The outcome is the endpoint's own on_error, whichever it is."""
    async with FakeWebhooks() as fake:
        fake.set_default(FAILURES[case](), event="eom")
        async with Bridge(fake, endpoint(fake, "policy", on_error=on_error, timeout=TIMEOUT)) as bridge:
            run = await one_message(bridge)
    expect_on_error(on_error, run.result)
    assert run.elapsed < TIMEOUT + SLACK


@pytest.mark.asyncio
async def test_broken_answer_before_eom() -> None:
    """At rcpt a hanging endpoint refuses only that recipient (4xx), within the timeout."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.never_answer(), event="rcpt")
        ep = endpoint(fake, "policy", events=frozenset({Event.RCPT}), timeout=TIMEOUT)
        async with Bridge(fake, ep) as bridge:
            run = await one_message(bridge)
    reply = run.result.rcpt[0]
    assert isinstance(reply, m.TempFail) or (isinstance(reply, m.ReplyCode) and reply.smtp_code // 100 == 4)
    assert run.elapsed < TIMEOUT + SLACK


@pytest.mark.asyncio
async def test_redirect_is_not_followed() -> None:
    """A 302 is a failure: the redirect target never receives a request."""
    async with FakeWebhooks() as fake, FakeWebhooks() as elsewhere:
        fake.set_default(FakeResponse.redirect(elsewhere.url("/steal")), event="eom")
        async with Bridge(fake, endpoint(fake, "policy", on_error=OnError.REJECT, timeout=TIMEOUT)) as bridge:
            run = await one_message(bridge)
        assert elsewhere.requests == []
    expect_on_error(OnError.REJECT, run.result)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("missing", "answer"),
    [
        pytest.param(Action.ADD_HEADERS, {"modifications": [_add_header()]}, id="add_header"),
        pytest.param(Action.CHANGE_HEADERS, {"modifications": [{"op": "delete_header", "name": "To", "index": 1}]},
                     id="delete_header"),
        pytest.param(Action.CHANGE_BODY, {"modifications": [{"op": "replace_body", "base64": "aGk="}]},
                     id="replace_body"),
        pytest.param(Action.CHANGE_FROM, {"modifications": [{"op": "change_from", "address": "x@y"}]},
                     id="change_from"),
        pytest.param(Action.QUARANTINE, {"action": "quarantine", "reason": "hold"}, id="quarantine"),
    ],
)  # fmt: skip
async def test_modification_not_negotiated(missing: Action, answer: dict[str, Any]) -> None:
    """A modification the MTA did not grant makes the whole response invalid: on_error, nothing applied."""
    async with FakeWebhooks() as fake:
        fake.set_default(FakeResponse.json({"action": "accept", **answer}), event="eom")
        async with Bridge(fake, endpoint(fake, "policy", on_error=OnError.REJECT, timeout=TIMEOUT)) as bridge:
            run = await one_message(bridge, actions=ALL_ACTIONS & ~missing)
    expect_on_error(OnError.REJECT, run.result)


@pytest.mark.asyncio
async def test_thousand_modifications_at_the_limit_are_applied() -> None:
    """Exactly max_modifications valid ops are applied (and bounded): the limit is a limit, not a failure."""
    async with FakeWebhooks() as fake:
        mods = [_add_header(f"X-N{n}", str(n)) for n in range(1000)]
        fake.set_default(FakeResponse.decision("accept", modifications=mods), event="eom")
        async with Bridge(fake, endpoint(fake, "policy", max_modifications=1000)) as bridge:
            run = await one_message(bridge)
    assert run.result.eom is not None
    assert len(run.result.eom.modifications) == 1000
    # With changes pending the bridge answers continue at eom (which accepts the message too).
    assert isinstance(run.result.eom.reply, m.Accept | m.Continue)
    assert run.peak_bytes < MAX_PEAK_BYTES


# --------------------------------------------------------------------------
# TLS failures


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_cert(directory: Path, name: str, san: str) -> Cert:
    """A self-signed certificate made with the openssl command line tool."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Cert(cert=cert, key=key)


def server_context(cert: Cert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    return context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    """A certificate for 127.0.0.1 and one for another name, both self-signed."""
    directory = tmp_path_factory.mktemp("certs")
    return {
        "loopback": make_cert(directory, "loopback", "IP:127.0.0.1"),
        "other": make_cert(directory, "other", "DNS:other.example"),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["self-signed", "wrong-name", "plain-http-server"])
async def test_tls_failures(certs: dict[str, Cert], kind: str) -> None:
    """TLS that cannot be verified (or is not TLS at all) fails the call: on_error, no decision used."""
    if kind == "plain-http-server":
        context, tls = None, TlsSettings()
    elif kind == "self-signed":
        context, tls = server_context(certs["loopback"]), TlsSettings()
    else:  # trusted, but issued for another name
        context, tls = server_context(certs["other"]), TlsSettings(ca_file=str(certs["other"].cert))
    async with FakeWebhooks(ssl_context=context) as fake:
        fake.set_default(FakeResponse.decision("accept", modifications=[_add_header()]))
        url = fake.url("/policy").replace("http://", "https://")
        ep = replace(endpoint(fake, "policy", on_error=OnError.REJECT, timeout=TIMEOUT, tls=tls), url=url)
        async with Bridge(fake, ep) as bridge:
            run = await one_message(bridge)
        # The handshake failed, so the endpoint never saw a request.
        assert fake.requests == []
    expect_on_error(OnError.REJECT, run.result)
    assert run.elapsed < TIMEOUT + SLACK


@pytest.mark.asyncio
async def test_tls_trusted_ca_works(certs: dict[str, Cert]) -> None:
    """The same endpoint with its CA configured is called normally (so the failures above are TLS ones)."""
    async with FakeWebhooks(ssl_context=server_context(certs["loopback"])) as fake:
        fake.set_default(FakeResponse.decision("accept", modifications=[_add_header()]))
        tls = TlsSettings(ca_file=str(certs["loopback"].cert))
        ep = endpoint(fake, "policy", timeout=TIMEOUT, tls=tls)
        async with Bridge(fake, ep) as bridge:
            run = await one_message(bridge)
    assert run.result.eom is not None
    assert isinstance(run.result.eom.reply, m.Accept | m.Continue)
    assert run.result.eom.modifications == (m.AddHeader(name=b"X-Test", value=b" 1"),)


def test_heap_peaks_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Print the heap peaks measured above (figures for docs/reliability.md)."""
    if not PEAKS:
        pytest.skip("run together with test_broken_answer_gives_on_error")
    with capsys.disabled():
        print("\nheap peak per broken answer (KiB):")
        for case, peak in sorted(PEAKS.items(), key=lambda kv: -kv[1]):
            print(f"  {case:28} {peak // 1024:8}")
    assert max(PEAKS.values()) < MAX_PEAK_BYTES
