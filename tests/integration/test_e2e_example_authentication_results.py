"""examples/authentication-results through the bridge and the real Postfix, DNS answered by the test.

The filter runs in this process with a ``StaticResolver`` holding the SPF, DKIM and DMARC
records of the test domains; the DKIM key is generated here and the messages are signed
with dkimpy, so nothing leaves the loopback interface. The tests without Postfix check the
Public Suffix List and alignment helpers alone.
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
    (p=quarantine, no DKIM key) fail it. evil.co.uk passes SPF and DKIM for itself; bank.co.uk
    (p=reject) passes neither, and its subdomain x.bank.co.uk publishes no policy of its own."""
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
        ("evil.co.uk", "TXT"): [CLIENT_SPF],
        (f"{SELECTOR}._domainkey.evil.co.uk", "TXT"): [key_record],
        ("_dmarc.evil.co.uk", "TXT"): ["v=DMARC1; p=none"],
        (f"{SELECTOR}._domainkey.mail.bank.co.uk", "TXT"): [key_record],
        (f"{SELECTOR}._domainkey.bank.co.uk", "TXT"): [key_record],
        ("bank.co.uk", "TXT"): ["v=spf1 -all"],
        ("_dmarc.bank.co.uk", "TXT"): ["v=DMARC1; p=reject"],
    }


#: The part of the Public Suffix List that the test domains fall under.
PSL_TEXT = "// ===BEGIN ICANN DOMAINS===\nuk\nco.uk\nexample\n"


@pytest_asyncio.fixture
async def filter_url(example: ModuleType, records: dict[tuple[str, str], list[str]]) -> AsyncIterator[str]:
    """The filter without a Public Suffix List (the default)."""
    async for url in serve(example.make_app(example.StaticResolver(records), AUTHSERV_ID, [SECRET])):
        yield url


@pytest_asyncio.fixture
async def psl_filter_url(example: ModuleType, records: dict[tuple[str, str], list[str]]) -> AsyncIterator[str]:
    """The filter with a Public Suffix List (``PSL_TEXT``)."""
    psl = example.PublicSuffixList(PSL_TEXT)
    async for url in serve(example.make_app(example.StaticResolver(records), AUTHSERV_ID, [SECRET], psl)):
        yield url


async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serves ``app`` on a free loopback port and yields its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    await runner.cleanup()


def signed(
    dkim_key: tuple[bytes, str],
    domain: str,
    *,
    author: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> bytes:
    """A message from ``author`` (``alice@domain``) with a DKIM signature by ``domain``'s key above it."""
    dkim = importlib.import_module("dkim")
    message = make_message(
        mail_from=author or f"Alice <alice@{domain}>",
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


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("message", "text"),
    [
        pytest.param(
            make_message(mail_from="alice@strict.example", headers=[("From", "mallory@signed.example")]),
            "5.7.1 Message rejected: it has 2 From: headers",
            id="two-from-headers",
        ),
        pytest.param(
            make_message(mail_from="alice@strict.example, mallory@signed.example"),
            "5.7.1 Message rejected: its From: header has addresses in several domains",
            id="two-domains-in-from",
        ),
        pytest.param(
            make_message(mail_from="alice@strict.example <mallory@signed.example>"),
            "5.7.1 Message rejected: its From: header does not parse",
            id="unparsable-from",
        ),
    ],
)
async def test_a_message_without_one_author_domain_is_refused(
    mta: PostfixInstance, bridges: BridgeRunner, filter_url: str, message: bytes, text: str
) -> None:
    """RFC 7489 §6.6.1: a From: that names no single domain cannot slip past strict.example's p=reject.

    The envelope sender passes SPF for signed.example, so a DMARC check of that domain alone
    would pass. (A message without From: cannot be sent here: Postfix adds one for a local
    client; ``test_author_domain`` covers it.)
    """
    await start(bridges, filter_url)

    result = await smtp(mta, "bounce@signed.example", ["bob@example.net"], message)

    reply = result.transaction.end_of_data
    assert reply is not None
    assert (reply.code, reply.text) == (550, text)
    assert await blocking(mta.wait_for_queue_idle) == []
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
@pytest.mark.parametrize("author_domain", ["bank.co.uk", "x.bank.co.uk"])
async def test_a_neighbour_under_a_public_suffix_does_not_align(
    mta: PostfixInstance,
    bridges: BridgeRunner,
    filter_url: str,
    dkim_key: tuple[bytes, str],
    author_domain: str,
) -> None:
    """evil.co.uk passes SPF and DKIM, but evil.co.uk is not bank.co.uk: the p=reject of bank.co.uk applies.

    x.bank.co.uk publishes no policy; without a Public Suffix List the filter finds that of
    its parent bank.co.uk.
    """
    await start(bridges, filter_url)
    message = signed(dkim_key, "evil.co.uk", author=f"Alice <alice@{author_domain}>")

    result = await smtp(mta, "bounce@evil.co.uk", ["bob@example.net"], message)

    reply = result.transaction.end_of_data
    assert reply is not None
    assert (reply.code, reply.text) == (550, "5.7.1 Message rejected: DMARC policy of " + author_domain)
    assert mta.maildir_messages() == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("signer", "with_list"),
    [
        pytest.param("mail.bank.co.uk", True, id="same-org-with-list"),
        pytest.param("bank.co.uk", False, id="same-name-without-list"),
    ],
)
async def test_relaxed_alignment(
    mta: PostfixInstance,
    bridges: BridgeRunner,
    dkim_key: tuple[bytes, str],
    filter_url: str,
    psl_filter_url: str,
    signer: str,
    with_list: bool,
) -> None:
    """A signature by bank.co.uk's own subdomain aligns with bank.co.uk given the list; the same name always does."""
    await start(bridges, psl_filter_url if with_list else filter_url)
    message = signed(dkim_key, signer, author="Alice <alice@bank.co.uk>")

    result = await smtp(mta, "bounce@evil.co.uk", ["bob@example.net"], message)

    assert result.accepted, result.replies
    [(_, raw)] = await blocking(mta.wait_for_delivery, 1)
    [header] = results_of(raw)
    assert f"dkim=pass header.d={signer} " in header
    assert header.endswith("; dmarc=pass (p=reject) header.from=bank.co.uk")


@pytest.mark.asyncio
async def test_without_the_list_a_subdomain_signature_does_not_align(
    mta: PostfixInstance, bridges: BridgeRunner, filter_url: str, dkim_key: tuple[bytes, str]
) -> None:
    """Without a Public Suffix List relaxed alignment needs the same name: mail.bank.co.uk's signature fails it."""
    await start(bridges, filter_url)
    message = signed(dkim_key, "mail.bank.co.uk", author="Alice <alice@bank.co.uk>")

    result = await smtp(mta, "bounce@evil.co.uk", ["bob@example.net"], message)

    reply = result.transaction.end_of_data
    assert reply is not None
    assert (reply.code, reply.text) == (550, "5.7.1 Message rejected: DMARC policy of bank.co.uk")


def test_public_suffix_list_rules(example: ModuleType) -> None:
    """Plain, wildcard and exception rules, in Unicode and A-label form, as publicsuffix.org defines them."""
    psl = example.PublicSuffixList("// comment\nuk\nco.uk\n*.ck\n!www.ck\n\u0430\u043a.\u0440\u0444\ngithub.io\n")
    org = psl.organizational_domain
    assert org("mail.bank.co.uk") == org("bank.co.uk") == "bank.co.uk"
    assert org("co.uk") is None
    assert org("a.b.ck") == "a.b.ck"
    assert org("b.ck") is None
    assert org("x.www.ck") == "www.ck"
    assert org("y.x.xn--80au.xn--p1ai") == "x.xn--80au.xn--p1ai"
    assert org("y.x.ак.рф") == "x.ак.рф"
    assert org("a.github.io") != org("b.github.io")
    assert org("mail.example.com") == "example.com"  # the implicit rule "*"


def test_alignment_needs_the_list_for_relaxed_mode(example: ModuleType) -> None:
    """evil.co.uk never aligns with bank.co.uk; a subdomain aligns in relaxed mode only given the list."""
    psl = example.PublicSuffixList(PSL_TEXT)
    for mode in ("r", "s"):
        assert not example.aligned("evil.co.uk", "bank.co.uk", mode)
        assert not example.aligned("evil.co.uk", "bank.co.uk", mode, psl)
        assert example.aligned("Bank.CO.uk.", "bank.co.uk", mode)
    assert not example.aligned("mail.bank.co.uk", "bank.co.uk", "r")
    assert example.aligned("mail.bank.co.uk", "bank.co.uk", "r", psl)
    assert not example.aligned("mail.bank.co.uk", "bank.co.uk", "s", psl)


def test_policy_discovery_is_bounded(example: ModuleType) -> None:
    """Without the list the ancestors are asked, at most MAX_POLICY_LABELS labels long; with it, the org domain."""
    assert example.policy_domains("x.bank.co.uk") == ["x.bank.co.uk", "bank.co.uk", "co.uk"]
    long_name = ".".join(f"l{i}" for i in range(30)) + ".example"
    asked = example.policy_domains(long_name)
    assert asked[0] == long_name
    assert [name.count(".") + 1 for name in asked[1:]] == list(range(example.MAX_POLICY_LABELS, 1, -1))
    psl = example.PublicSuffixList(PSL_TEXT)
    assert example.policy_domains("x.y.bank.co.uk", psl) == ["x.y.bank.co.uk", "bank.co.uk"]
    assert example.policy_domains("bank.co.uk", psl) == ["bank.co.uk"]


def header(name: str, value: str) -> object:
    from milterbridge import sdk

    return sdk.Header(name=name, name_bytes=name.encode(), value=value, value_bytes=value.encode())


@pytest.mark.parametrize(
    ("headers", "domain"),
    [
        pytest.param([("From", " Alice <alice@Bank.example>")], "bank.example", id="one-address"),
        pytest.param([("from", " a@bank.example,\n\tb@bank.example")], "bank.example", id="one-domain-folded"),
    ],
)
def test_author_domain(example: ModuleType, headers: list[tuple[str, str]], domain: str) -> None:
    """One From: header whose addresses share a domain gives that domain, in lower case."""
    assert example.author_domain([header(*h) for h in headers]) == domain


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param([("Subject", " hi")], "it has no From: header", id="no-from"),
        pytest.param([("From", " a@bank.example"), ("FROM", " a@bank.example")], "it has 2 From: headers", id="two"),
        pytest.param(
            [("From", " a@bank.example, b@evil.example")],
            "its From: header has addresses in several domains",
            id="two-domains",
        ),
        pytest.param([("From", " undisclosed")], "its From: header does not parse", id="no-domain"),
        pytest.param([("From", " <>")], "its From: header does not parse", id="null"),
        pytest.param([("From", " a@bank.example)<b@evil.example>")], "its From: header does not parse", id="garbled"),
    ],
)
def test_author_domain_refusals(example: ModuleType, headers: list[tuple[str, str]], reason: str) -> None:
    """No single author domain: AuthorError, whose text is the SMTP reply."""
    with pytest.raises(example.AuthorError) as caught:
        example.author_domain([header(*h) for h in headers])
    assert str(caught.value) == "Message rejected: " + reason
