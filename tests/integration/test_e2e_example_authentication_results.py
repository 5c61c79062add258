"""examples/authentication-results through the bridge and the real Postfix, DNS answered by the test.

The filter runs in this process with a ``StaticResolver`` holding the SPF, DKIM and DMARC
records of four test domains; the DKIM key is generated here and the messages are signed
with dkimpy, so nothing leaves the loopback interface.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
import pytest_asyncio
from aiohttp import web

from milterbridge.config import EndpointSettings
from milterbridge.milter.constants import Event

from .bridge import BridgeRunner, blocking, header_lines, smtp
from .postfix import PostfixInstance, make_message

pytestmark = pytest.mark.postfix

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "authentication-results" / "filter.py"
SECRET = "whsec_" + base64.b64encode(b"authentication-results-test-key").decode()
AUTHSERV_ID = "mx.milterbridge.test"
SELECTOR = "sel"
DATE = ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")
#: Postfix's smtpd sees the test's SMTP client on this address.
CLIENT_SPF = "v=spf1 ip4:127.0.0.1 -all"


def _require(module: str) -> ModuleType:
    """Import a prerequisite; a missing one fails under CI=true and skips loudly elsewhere."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = f"examples/authentication-results needs {module} (pip install -e '.[test]'): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def example() -> ModuleType:
    for name in ("dkim", "spf", "dns.resolver", "cryptography"):
        _require(name)
    spec = importlib.util.spec_from_file_location("example_authentication_results", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up by name while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    """A fresh RSA key: the private key as PKCS#1 PEM (for dkimpy) and the DKIM TXT record."""
    serialization = importlib.import_module("cryptography.hazmat.primitives.serialization")
    rsa = importlib.import_module("cryptography.hazmat.primitives.asymmetric.rsa")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


@pytest.fixture(scope="module")
def records(dkim_key: tuple[bytes, str]) -> dict[tuple[str, str], list[str]]:
    """signed.example passes SPF; strict.example (p=reject), lax.example (p=none) and held.example
    (p=quarantine, no DKIM key) fail it."""
    _, key_record = dkim_key
    return {
        ("signed.example", "TXT"): [CLIENT_SPF],
        (f"{SELECTOR}._domainkey.signed.example", "TXT"): [key_record],
        ("_dmarc.signed.example", "TXT"): ["v=DMARC1; p=reject"],
        ("strict.example", "TXT"): ["v=spf1 -all"],
        (f"{SELECTOR}._domainkey.strict.example", "TXT"): [key_record],
        ("_dmarc.strict.example", "TXT"): ["v=DMARC1; p=reject; adkim=s"],
        ("lax.example", "TXT"): ["v=spf1 -all"],
        (f"{SELECTOR}._domainkey.lax.example", "TXT"): [key_record],
        ("_dmarc.lax.example", "TXT"): ["v=DMARC1; p=none"],
        ("held.example", "TXT"): ["v=spf1 -all"],
        ("_dmarc.held.example", "TXT"): ["v=DMARC1; p=quarantine"],
    }


@pytest_asyncio.fixture
async def filter_url(example: ModuleType, records: dict[tuple[str, str], list[str]]) -> AsyncIterator[str]:
    app = example.make_app(example.StaticResolver(records), AUTHSERV_ID, [SECRET])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    await runner.cleanup()


def signed(dkim_key: tuple[bytes, str], domain: str, *, headers: list[tuple[str, str]] | None = None) -> bytes:
    """A message from ``alice@domain`` with a DKIM signature by ``domain``'s key above it."""
    dkim = importlib.import_module("dkim")
    message = make_message(
        mail_from=f"Alice <alice@{domain}>",
        to=["bob@example.net"],
        subject=f"signed by {domain}",
        body="A signed body.\r\nSecond line.\r\n",
        headers=[DATE, *(headers or [])],
    )
    signature = dkim.sign(
        message,
        SELECTOR.encode(),
        domain.encode(),
        dkim_key[0],
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(signature) + message


async def start(bridges: BridgeRunner, url: str) -> None:
    endpoint = EndpointSettings(
        name="auth", url=url, events=frozenset({Event.EOM}), include_body=True, secrets=(SECRET,)
    )
    await bridges.start(endpoint)


def results_of(raw: bytes) -> list[str]:
    """Every Authentication-Results value of a delivered message, folds joined by spaces."""
    return [" ".join(value.split()) for name, value in header_lines(raw) if name.lower() == "authentication-results"]


@pytest.mark.asyncio
async def test_signed_message_passes_dkim_spf_and_dmarc(
    mta: PostfixInstance, bridges: BridgeRunner, filter_url: str, dkim_key: tuple[bytes, str]
) -> None:
    """A correctly signed message from an SPF-authorised client is delivered with three passes.

    A forged Authentication-Results that claims the filter's authserv-id is removed.
    """
    await start(bridges, filter_url)
    forged = ("Authentication-Results", f"{AUTHSERV_ID}; dmarc=pass header.from=evil.example")
    message = signed(dkim_key, "signed.example", headers=[forged])

    result = await smtp(mta, "alice@signed.example", ["bob@example.net"], message)

    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    [header] = results_of(raw)
    assert header.startswith(f"{AUTHSERV_ID}; dkim=pass header.d=signed.example header.s={SELECTOR} header.b=")
    assert "; spf=pass smtp.mailfrom=alice@signed.example;" in header
    assert header.endswith("; dmarc=pass (p=reject) header.from=signed.example")
    # Added at the very top: above Postfix's own Received header.
    names = [name for name, _ in header_lines(raw)]
    assert names.index("Authentication-Results") < names.index("Received")


@pytest.mark.asyncio
async def test_broken_signature_from_a_reject_domain_is_refused(
    mta: PostfixInstance, bridges: BridgeRunner, filter_url: str, dkim_key: tuple[bytes, str]
) -> None:
    """DKIM fails (body changed after signing), SPF fails, the domain says p=reject: 550 5.7.1."""
    await start(bridges, filter_url)
    message = signed(dkim_key, "strict.example").replace(b"A signed body.", b"A changed body.")

    result = await smtp(mta, "alice@strict.example", ["bob@example.net"], message)

    reply = result.transaction.end_of_data
    assert reply is not None
    assert reply.code == 550
    assert reply.text.startswith("5.7.1 ")
    assert "DMARC policy of strict.example" in reply.text
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
async def test_failure_under_p_none_is_delivered_with_dmarc_fail(
    mta: PostfixInstance, bridges: BridgeRunner, filter_url: str, dkim_key: tuple[bytes, str]
) -> None:
    """The same failures for a p=none domain: delivered, and the header says what failed."""
    await start(bridges, filter_url)
    message = signed(dkim_key, "lax.example").replace(b"A signed body.", b"A changed body.")

    result = await smtp(mta, "alice@lax.example", ["bob@example.net"], message)

    assert result.accepted
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    [header] = results_of(raw)
    assert f"{AUTHSERV_ID}; dkim=fail header.d=lax.example header.s={SELECTOR}" in header
    assert "; spf=fail smtp.mailfrom=alice@lax.example;" in header
    assert header.endswith("; dmarc=fail (p=none) header.from=lax.example")


@pytest.mark.asyncio
async def test_failure_under_p_quarantine_is_held(
    mta: PostfixInstance, bridges: BridgeRunner, filter_url: str, dkim_key: tuple[bytes, str]
) -> None:
    """A p=quarantine domain failing both checks (no key published, SPF -all) lands in the hold queue."""
    await start(bridges, filter_url)
    message = signed(dkim_key, "held.example")

    result = await smtp(mta, "alice@held.example", ["bob@example.net"], message)

    assert result.accepted
    [entry] = await blocking(mta.wait_for_queue, 1, "hold")
    assert entry.sender == "alice@held.example"
    assert await blocking(mta.wait_for_queue_idle) == [entry]
    assert mta.maildir_messages() == []
