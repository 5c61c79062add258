"""Standard Webhooks v1 signatures, checked against the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from milterbridge.webhook.signing import Signer, sign, verify

OLD_SECRET = "whsec_" + base64.b64encode(b"old-key-0123456789abcdef").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"new-key-fedcba9876543210").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"somebody-else-entirely!!").decode()
BODY = b'{"event":"eom","id":"msg_1","data":{}}'


def _headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_spec_vector() -> None:
    """The example from the Standard Webhooks specification signs to its published value."""
    signature = sign(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_reference_library_accepts_single_secret() -> None:
    """A signature made with one secret verifies with the reference library."""
    now = int(time.time())
    signature = sign([NEW_SECRET], "msg_1", now, BODY)
    assert signature.startswith("v1,")
    assert " " not in signature
    assert Webhook(NEW_SECRET).verify(BODY, _headers("msg_1", now, signature)) == {
        "event": "eom",
        "id": "msg_1",
        "data": {},
    }


@pytest.mark.parametrize("receiver_secret", [OLD_SECRET, NEW_SECRET], ids=["old-key", "new-key"])
def test_reference_library_accepts_rotated_secrets(receiver_secret: str) -> None:
    """During rotation both keys sign, so a receiver knowing either one accepts the call."""
    now = int(time.time())
    signature = sign([OLD_SECRET, NEW_SECRET], "msg_2", now, BODY)
    assert len(signature.split(" ")) == 2
    Webhook(receiver_secret).verify(BODY, _headers("msg_2", now, signature))


def test_reference_library_refuses_wrong_secret() -> None:
    """A receiver with a different secret refuses the signature."""
    now = int(time.time())
    signature = sign([OLD_SECRET, NEW_SECRET], "msg_3", now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(BODY, _headers("msg_3", now, signature))


@pytest.mark.parametrize(
    ("msg_id", "body"),
    [
        pytest.param("msg_4x", BODY, id="other-id"),
        pytest.param("msg_4", BODY + b" ", id="other-body"),
    ],
)
def test_reference_library_refuses_tampering(msg_id: str, body: bytes) -> None:
    """Changing the id or one byte of the body breaks the signature."""
    now = int(time.time())
    signature = sign([NEW_SECRET], "msg_4", now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW_SECRET).verify(body, _headers(msg_id, now, signature))


def test_own_verify_matches_reference_signatures() -> None:
    """Our verify accepts what the reference library signs, and only with the right key."""
    now = int(time.time())
    reference = Webhook(NEW_SECRET).sign("msg_5", datetime.fromtimestamp(now, tz=UTC), BODY.decode())
    assert verify([NEW_SECRET], "msg_5", now, BODY, reference)
    assert verify([OTHER_SECRET, NEW_SECRET], "msg_5", str(now), BODY, reference)
    assert not verify([OTHER_SECRET], "msg_5", now, BODY, reference)


def test_verify_timestamp_tolerance() -> None:
    """A timestamp outside the tolerance fails (replay protection) unless tolerance is off."""
    signer = Signer([NEW_SECRET])
    signature = signer.sign("msg_6", 1_000_000, BODY)
    assert not signer.verify("msg_6", 1_000_000, BODY, signature, now=1_000_301)
    assert signer.verify("msg_6", 1_000_000, BODY, signature, now=1_000_299)
    assert signer.verify("msg_6", 1_000_000, BODY, signature, tolerance=None)
    assert not signer.verify("msg_6", "not-a-number", BODY, signature, tolerance=None)


def test_verify_skips_unknown_and_malformed_entries() -> None:
    """Entries of other versions or broken base64 are skipped, a good v1 entry still counts."""
    signer = Signer([NEW_SECRET])
    good = signer.sign("msg_7", 42, BODY)
    assert signer.verify("msg_7", 42, BODY, f"v2,abc v1,%%%notbase64 junk {good}", tolerance=None)
    assert not signer.verify("msg_7", 42, BODY, "v2,abc v1,%%%", tolerance=None)


def test_secret_without_prefix_or_padding() -> None:
    """The whsec_ prefix and base64 padding are optional, as in the reference libraries."""
    raw = base64.b64encode(b"sixteen byte key!").decode()  # 17 bytes -> padded base64
    assert raw.endswith("=")
    expected = sign(["whsec_" + raw], "m", 1, b"x")
    assert sign([raw], "m", 1, b"x") == expected
    assert sign(["whsec_" + raw.rstrip("=")], "m", 1, b"x") == expected


@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param([], id="none"),
        pytest.param(["whsec_"], id="empty"),
        pytest.param(["whsec_not*base64!"], id="not-base64"),
    ],
)
def test_bad_secrets_are_refused_without_echo(secrets: list[str]) -> None:
    """Unusable secrets raise ValueError whose message does not contain the secret."""
    with pytest.raises(ValueError, match="secret") as info:
        Signer(secrets)
    assert "base64!" not in str(info.value)


def test_signer_repr_hides_keys() -> None:
    """The repr names how many keys there are, never the keys."""
    assert repr(Signer([OLD_SECRET, NEW_SECRET])) == "Signer(<2 key(s)>)"
