"""Verifier: the bridge's signatures and the reference library's pass; forgeries, stale calls and replays do not."""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from milterbridge.sdk import SignatureError, Verifier
from milterbridge.webhook.signing import Signer

OLD = "whsec_" + base64.b64encode(bytes(range(32))).decode()
NEW = "whsec_" + base64.b64encode(bytes(range(32, 64))).decode()
OTHER = "whsec_" + base64.b64encode(b"\x07" * 32).decode()
BODY = b'{"event":"eom","id":"wh-1"}'
NOW = 1_700_000_000


def headers(secrets: list[str], msg_id: str = "wh-1", timestamp: int = NOW, body: bytes = BODY) -> dict[str, str]:
    """What the bridge sends: one signature per secret of the endpoint."""
    signature = Signer(secrets).sign(msg_id, timestamp, body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_a_bridge_signature_verifies_and_returns_the_id() -> None:
    assert Verifier([OLD]).verify(headers([OLD]), BODY, now=NOW) == "wh-1"


@pytest.mark.parametrize(
    ("bridge_secrets", "filter_secrets"),
    [([OLD, NEW], [OLD]), ([OLD, NEW], [NEW]), ([NEW], [OLD, NEW]), ([OLD], [OTHER, OLD])],
)
def test_key_rotation_any_shared_secret_verifies(bridge_secrets: list[str], filter_secrets: list[str]) -> None:
    """During a rotation either side may know both keys; one key in common is enough."""
    assert Verifier(filter_secrets).verify(headers(bridge_secrets), BODY, now=NOW) == "wh-1"


def test_the_reference_library_signature_verifies() -> None:
    """A signature made by the standardwebhooks package passes, with the real clock."""
    now = int(time.time())
    signature = Webhook(NEW).sign("msg_2", datetime.fromtimestamp(now, UTC), BODY)
    sent = {"webhook-id": "msg_2", "webhook-timestamp": str(now), "webhook-signature": signature}
    assert Verifier([OLD, NEW]).verify(sent, BODY) == "msg_2"


@pytest.mark.parametrize(
    ("sent", "body", "message"),
    [
        (headers([OTHER]), BODY, "no valid signature by a known secret"),
        (headers([OLD]), BODY + b" ", "no valid signature by a known secret"),
        ({**headers([OLD]), "webhook-id": "wh-2"}, BODY, "no valid signature by a known secret"),
        ({**headers([OLD]), "webhook-signature": "v2," + headers([OLD])["webhook-signature"][3:]}, BODY, "no valid"),
        ({**headers([OLD]), "webhook-timestamp": "soon"}, BODY, "the webhook-timestamp header is not a number"),
        ({k: v for k, v in headers([OLD]).items() if k != "webhook-signature"}, BODY, "the webhook-signature header"),
        (headers([OLD], timestamp=NOW - 301), BODY, "the webhook-timestamp is more than 300 s from now"),
        (headers([OLD], timestamp=NOW + 301), BODY, "the webhook-timestamp is more than 300 s from now"),
    ],
)
def test_what_is_refused(sent: dict[str, str], body: bytes, message: str) -> None:
    with pytest.raises(SignatureError) as info:
        Verifier([OLD]).verify(sent, body, now=NOW)
    assert str(info.value).startswith(message)


def test_header_names_are_case_insensitive() -> None:
    sent = {k.title(): v for k, v in headers([OLD]).items()}
    assert Verifier([OLD]).verify(sent, BODY, now=NOW) == "wh-1"


def test_tolerance_is_configurable() -> None:
    sent = headers([OLD], timestamp=NOW - 20)
    assert Verifier([OLD], tolerance=30).verify(sent, BODY, now=NOW) == "wh-1"
    with pytest.raises(SignatureError, match="more than 10 s"):
        Verifier([OLD], tolerance=10).verify(sent, BODY, now=NOW)


def test_a_replay_is_refused_while_fresh_and_forgotten_after() -> None:
    """The same id is refused within the tolerance; past it the timestamp check refuses it, and memory is freed."""
    verifier = Verifier([OLD], tolerance=300)
    sent = headers([OLD])
    verifier.verify(sent, BODY, now=NOW)
    with pytest.raises(SignatureError, match="already received"):
        verifier.verify(sent, BODY, now=NOW + 299)
    with pytest.raises(SignatureError, match="more than 300 s"):
        verifier.verify(sent, BODY, now=NOW + 301)
    # Another id, later: the expired one is dropped from memory, so a new call with the old id
    # and a new timestamp (the bridge never does that, but a new signature makes it a new call) passes.
    verifier.verify(headers([OLD], msg_id="wh-9", timestamp=NOW + 400), BODY, now=NOW + 400)
    assert verifier.verify(headers([OLD], timestamp=NOW + 400), BODY, now=NOW + 400) == "wh-1"


def test_a_forged_request_does_not_use_up_an_id() -> None:
    """Only authentic requests are remembered: a forgery with a real id does not block the real call."""
    verifier = Verifier([OLD])
    with pytest.raises(SignatureError):
        verifier.verify(headers([OTHER]), BODY, now=NOW)
    assert verifier.verify(headers([OLD]), BODY, now=NOW) == "wh-1"


def test_memory_is_bounded() -> None:
    """With max_ids ids remembered, a new one pushes out the one closest to expiry."""
    verifier = Verifier([OLD], max_ids=2)
    for n, ts in enumerate((NOW - 10, NOW, NOW - 5)):
        verifier.verify(headers([OLD], msg_id=f"id-{n}", timestamp=ts), BODY, now=NOW)
    # id-0 (the oldest timestamp) was dropped; id-1 and id-2 are still refused.
    assert verifier.verify(headers([OLD], msg_id="id-0", timestamp=NOW - 10), BODY, now=NOW) == "id-0"
    with pytest.raises(SignatureError, match="already received"):
        verifier.verify(headers([OLD], msg_id="id-1"), BODY, now=NOW)


def test_bad_configuration_is_refused_without_showing_the_secret() -> None:
    with pytest.raises(ValueError, match="at least one webhook secret"):
        Verifier([])
    with pytest.raises(ValueError, match=r"webhook secret #1 is not valid base64") as info:
        Verifier(["whsec_not base64!"])
    assert "not base64!" not in str(info.value)
    with pytest.raises(TypeError, match="a list of secrets"):
        Verifier(OLD)
    with pytest.raises(ValueError, match="must be positive"):
        Verifier([OLD], tolerance=0)
    assert OLD.removeprefix("whsec_") not in repr(Verifier([OLD]))


def test_one_verifier_shared_by_threads_admits_each_id_once() -> None:
    """Under a threaded server, one request (the same id sent from eight threads at once) passes exactly once."""
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    verifier = Verifier([secret], max_ids=1000)
    signer = Signer([secret])
    now = int(time.time())
    requests = []
    for n in range(200):
        body = f'{{"n": {n}}}'.encode()
        headers = {"webhook-id": f"evt_{n}", "webhook-timestamp": str(now)}
        headers["webhook-signature"] = signer.sign(f"evt_{n}", now, body)
        requests.append((headers, body))
    admitted: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        for headers, body in requests:
            try:
                admitted.append(verifier.verify(headers, body))
            except SignatureError:
                pass
            except BaseException as exc:  # an IndexError from a raced heap would land here
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(admitted) == len(set(admitted)) == 200
