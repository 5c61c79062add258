"""examples/node/filter.js, the tagger in Node.js, run with Debian's node as a subprocess on 127.0.0.1.

The Postfix tests send real mail through a bridge that signs its requests to the filter;
the others post to the filter directly, signed by the reference ``standardwebhooks``
library, to show it refuses what is not authentic, or load the file as a module into
node to drive its replay guard alone. Without node the tests skip, except
under CI=true (``tests.conftest.missing_prerequisite``).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from milterbridge.config import EndpointSettings
from milterbridge.milter.constants import Event
from tests.conftest import missing_prerequisite

from .bridge import BridgeRunner, blocking, parse, smtp
from .postfix import PostfixInstance, make_message

FILTER = Path(__file__).resolve().parents[2] / "examples" / "node" / "filter.js"
SECRET = "whsec_" + "bm9kZS1leGFtcGxlLXRlc3Qta2V5LW9ubHk="
OTHER_SECRET = "whsec_" + "YW5vdGhlci1rZXktdGhlLWZpbHRlci1kb2VzLW5vdC1rbm93"
SENDER = "alice@example.com"
RECIPIENT = "bob@example.net"
#: Where the filter adds a copy of mail from example.com (its ARCHIVE_DOMAIN).
ARCHIVE = "archive@example.com"
STARTUP_SECONDS = 10.0


@pytest.fixture
def node() -> str:
    """The node executable."""
    found = shutil.which("node") or shutil.which("nodejs")
    if found is None:
        missing_prerequisite("node (Debian package nodejs; scripts/install-test-tools installs it)")
    assert found is not None  # missing_prerequisite skipped or failed the test
    return found


@pytest.fixture
def node_filter(node: str) -> Iterator[str]:
    """The filter's URL; the filter runs with FILTER_SECRET=SECRET on a free loopback port."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "FILTER_SECRET": SECRET,
        "HOST": "127.0.0.1",
        "PORT": "0",
        "ARCHIVE_DOMAIN": "example.com",
    }
    with subprocess.Popen(
        [node, str(FILTER)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                ready = selector.select(STARTUP_SECONDS)
            line = process.stdout.readline() if ready else ""
            if not line.startswith("node-tagger listening on "):
                process.kill()
                pytest.fail(f"the node filter did not start: {line!r} {process.stderr.read()!r}")
            yield line.split()[-1]
        finally:
            process.terminate()
            try:
                process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def signed(body: bytes, *, secret: str = SECRET, msg_id: str = "msg_1", at: float | None = None) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed by the reference library."""
    timestamp = int(time.time() if at is None else at)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body),
    }


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST ``body`` to the filter; the status and the response body."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


EOM_BODY = json.dumps(
    {
        "event": "eom",
        "message": {"mail_from": {"address": "carol@example.org"}, "rcpt_to": [{"address": RECIPIENT}]},
    }
).encode()


def test_a_signed_request_gets_the_tags(node_filter: str) -> None:
    """The control case for the refusals below: a fresh signature by the secret is answered 200."""
    status, body = post(node_filter, EOM_BODY, signed(EOM_BODY))
    assert status == 200
    assert json.loads(body) == {
        "action": "continue",
        "modifications": [
            {"op": "add_header", "name": "X-Filtered-By", "value": "node-tagger"},
            {"op": "add_header", "name": "X-Recipient-Count", "value": "1"},
        ],
    }


@pytest.mark.parametrize(
    ("signed_by", "signed_body", "clock_offset"),
    [
        pytest.param(OTHER_SECRET, EOM_BODY, 0, id="signed-by-another-secret"),
        pytest.param(SECRET, b"{}", 0, id="signature-of-another-body"),
        pytest.param(SECRET, EOM_BODY, -400, id="timestamp-400s-old"),
        pytest.param(SECRET, EOM_BODY, 400, id="timestamp-400s-ahead"),
        pytest.param(None, EOM_BODY, 0, id="unsigned"),
    ],
)
def test_a_request_that_is_not_authentic_gets_401(
    node_filter: str, signed_by: str | None, signed_body: bytes, clock_offset: int
) -> None:
    """Another key, another body, a stale or future timestamp or no signature: 401, no decision."""
    headers = signed(signed_body, secret=signed_by or SECRET, at=time.time() + clock_offset)
    if signed_by is None:
        del headers["webhook-signature"]
    status, body = post(node_filter, EOM_BODY, headers)
    assert status == 401
    assert b"modifications" not in body


def test_a_replayed_request_gets_401(node_filter: str) -> None:
    """The same signed request twice: the second is refused; a new webhook-id passes again."""
    headers = signed(EOM_BODY, msg_id="msg_replayed")
    assert post(node_filter, EOM_BODY, headers)[0] == 200
    assert post(node_filter, EOM_BODY, headers)[0] == 401
    assert post(node_filter, EOM_BODY, signed(EOM_BODY, msg_id="msg_fresh"))[0] == 200


#: Drives filter.js's ReplayGuard with a cap of 3 ids and prints what it kept, as JSON.
GUARD_SCRIPT = r"""
const { ReplayGuard, TOLERANCE_SECONDS, Unauthorized } = require(process.argv[1]);
const refused = (guard, id, ts, now) => {
  try {
    guard.admit(id, ts, now);
    return false;
  } catch (error) {
    if (error instanceof Unauthorized) return true;
    throw error;
  }
};
const now = 1700000000;
const later = now + TOLERANCE_SECONDS + 1;
const guard = new ReplayGuard(3);
const sizes = [];
for (let i = 0; i < 10; i++) {
  guard.admit(`id${i}`, now, now);
  sizes.push(guard.size);
}
const result = {
  sizes,
  newestRefused: refused(guard, "id9", now, now),
  oldestAdmitted: !refused(guard, "id0", now, now),
};
guard.admit("late", later, later);
result.afterExpiry = guard.size;
const unbounded = new ReplayGuard();
for (let i = 0; i < 1000; i++) unbounded.admit(`x${i}`, now, now);
result.defaultKept = unbounded.size;
unbounded.admit("late", later, later);
result.defaultAfterExpiry = unbounded.size;
console.log(JSON.stringify(result));
"""


def test_the_replay_guard_is_bounded(node: str) -> None:
    """At most maxIds webhook-ids are kept (the first accepted goes first); stale ones are dropped."""
    run = subprocess.run(
        [node, "-e", GUARD_SCRIPT, str(FILTER)],
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "sizes": [1, 2, 3, 3, 3, 3, 3, 3, 3, 3],
        "newestRefused": True,  # still remembered: a replay
        "oldestAdmitted": True,  # dropped to make room, so no longer known
        "afterExpiry": 1,  # the stale ids went, only "late" is left
        "defaultKept": 1000,
        "defaultAfterExpiry": 1,
    }


def _endpoint(url: str, secret: str) -> EndpointSettings:
    return EndpointSettings(name="node-tagger", url=url, events=frozenset({Event.EOM}), secrets=(secret,))


@pytest.mark.postfix
@pytest.mark.asyncio
async def test_postfix_delivers_the_tags_and_the_archive_copy(
    mta: PostfixInstance, bridges: BridgeRunner, node_filter: str
) -> None:
    """Mail from example.com through the bridge (signing) and the node filter: tagged, plus an archive copy."""
    await bridges.start(_endpoint(node_filter, SECRET))
    result = await smtp(mta, SENDER, [RECIPIENT], make_message(mail_from=SENDER, to=[RECIPIENT], subject="hi"))
    assert result.accepted, result.replies

    delivered = await blocking(mta.wait_for_delivery, 2)
    assert len(delivered) == 2
    by_recipient = {str(parse(raw)["Delivered-To"]): parse(raw) for _, raw in delivered}
    assert set(by_recipient) == {RECIPIENT, ARCHIVE}
    for message in by_recipient.values():
        assert message.get_all("X-Filtered-By") == ["node-tagger"]
        assert message.get_all("X-Recipient-Count") == ["1"]
        assert message["Subject"] == "hi"


@pytest.mark.postfix
@pytest.mark.asyncio
async def test_postfix_tempfails_when_the_bridge_signs_with_another_secret(
    mta: PostfixInstance, bridges: BridgeRunner, node_filter: str
) -> None:
    """The filter answers 401 to the bridge, so the endpoint's on_error (tempfail) reaches the client."""
    await bridges.start(_endpoint(node_filter, OTHER_SECRET))
    result = await smtp(mta, SENDER, [RECIPIENT], make_message(mail_from=SENDER, to=[RECIPIENT]))
    end = result.transaction.end_of_data
    assert end is not None
    assert end.code == 451, result.replies
    assert mta.maildir_messages() == []
