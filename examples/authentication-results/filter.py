"""Example filter: SPF, DKIM and DMARC verification with an Authentication-Results header.

Subscribe it to ``eom`` with ``include_body = true``. For every message it

* checks SPF (pyspf) for the client address, the MAIL FROM domain and the HELO name;
* verifies every DKIM-Signature (dkimpy) over the headers and body the bridge sends;
* evaluates DMARC: the From: domain's ``_dmarc`` TXT policy and whether a passing SPF or
  DKIM result is aligned with the From: domain (relaxed alignment needs a Public Suffix
  List, ``PUBLIC_SUFFIX_LIST``; without one it is as strict as ``s``);
* adds ``Authentication-Results`` (RFC 8601) under this filter's authserv-id at the top of
  the header block, and removes any such header that claims the same authserv-id;
* rejects with 550 5.7.1 when DMARC fails for a domain publishing ``p=reject`` and
  quarantines when it publishes ``p=quarantine``;
* rejects with 550 5.7.1, whatever the policies, a message whose From: names no single
  domain (no From: header or several, addresses in several domains), since DMARC could
  not be applied to it (RFC 7489 §6.6.1).

DNS goes through a :class:`Resolver`: :class:`DnsPythonResolver` asks the system's
resolvers, :class:`StaticResolver` answers from a dict (tests, a lab).

Run: ``FILTER_SECRET=whsec_... AUTHSERV_ID=mx.example.com python filter.py --port 8082``
and point an endpoint at ``http://127.0.0.1:8082/``.
"""

from __future__ import annotations

import argparse
import contextvars
import email.policy
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from email import errors
from email.headerregistry import Address
from typing import Final, Protocol

import dkim
import spf
from aiohttp import web

from milterbridge import sdk

HEADER: Final = "Authentication-Results"
#: Seconds one DNS question may take.
DNS_TIMEOUT: Final = 5.0


class DNSTempError(Exception):
    """A DNS question got no answer (timeout, SERVFAIL): the result is ``temperror``."""


class Resolver(Protocol):
    """The DNS answers the checks need, as text.

    ``rdtype`` is ``TXT`` (each record's strings joined), ``A``, ``AAAA`` (addresses),
    ``MX`` (``"10 mx.example.com"``) or ``PTR`` (a host name). A name or type without
    records gives ``[]``; a failed lookup raises :class:`DNSTempError`.
    """

    def query(self, name: str, rdtype: str) -> list[str]: ...


class StaticResolver:
    """Answers from a mapping ``(name, rdtype) -> records``; names compare case-insensitively."""

    def __init__(self, records: Mapping[tuple[str, str], Sequence[str]]) -> None:
        self.records = {(name.lower().rstrip("."), rdtype.upper()): list(v) for (name, rdtype), v in records.items()}

    def query(self, name: str, rdtype: str) -> list[str]:
        return list(self.records.get((name.lower().rstrip("."), rdtype.upper()), []))


class DnsPythonResolver:
    """Asks the resolvers of ``/etc/resolv.conf`` through dnspython."""

    def __init__(self, timeout: float = DNS_TIMEOUT) -> None:
        import dns.resolver

        self._resolver = dns.resolver.Resolver()
        self._resolver.lifetime = timeout

    def query(self, name: str, rdtype: str) -> list[str]:
        import dns.exception
        import dns.resolver

        try:
            answer = self._resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{name}/{rdtype}: {exc}") from exc
        if rdtype == "TXT":
            return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]
        return [record.to_text() for record in answer]


# --------------------------------------------------------------------------
# pyspf looks names up through its module-level DNSLookup; route that to the resolver of
# the check running in this thread (or context), and to pyspf's own lookup otherwise.

_spf_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("spf_resolver", default=None)
_spf_default_lookup = spf.DNSLookup


def _spf_lookup(
    name: str, qtype: str, strict: object = True, timeout: float = DNS_TIMEOUT
) -> list[tuple[object, object]]:
    resolver = _spf_resolver.get()
    if resolver is None:
        return _spf_default_lookup(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    try:
        records = resolver.query(name, qtype)
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    key = (name, qtype)
    if qtype in ("TXT", "SPF"):
        return [(key, (record.encode(),)) for record in records]
    if qtype == "MX":
        answers: list[tuple[object, object]] = []
        for record in records:
            preference, _, exchange = record.partition(" ")
            answers.append((key, (int(preference), exchange.rstrip("."))))
        return answers
    return [(key, record.rstrip(".") if qtype == "PTR" else record) for record in records]


spf.DNSLookup = _spf_lookup


# --------------------------------------------------------------------------
# the checks


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    #: The domain SPF checked: MAIL FROM's, or HELO's for the null sender.
    domain: str
    #: ``smtp.mailfrom=...`` or ``smtp.helo=...``.
    property: str


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str
    domain: str | None = None
    selector: str | None = None
    #: The first characters of the signature (``header.b``), telling signatures apart.
    b: str | None = None


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str
    from_domain: str | None
    #: The published ``p`` (or ``sp``) that applies, when a policy was found.
    policy: str | None = None


class PublicSuffixList:
    """The Public Suffix List (``public_suffix_list.dat`` of https://publicsuffix.org/), for
    the organizational domain of RFC 7489 §3.2.

    Both sections of the list count (ICANN and private), so ``a.github.io`` and
    ``b.github.io`` are different organizations. Rules in Unicode also match their A-label
    (``xn--``) form.
    """

    def __init__(self, text: str) -> None:
        self._rules: set[str] = set()
        self._exceptions: set[str] = set()
        for line in text.splitlines():
            fields = line.split(maxsplit=1)  # a rule ends at the first white space
            if not fields or fields[0].startswith("//"):
                continue
            rule = fields[0].lower()
            target = self._exceptions if rule.startswith("!") else self._rules
            rule = rule.removeprefix("!")
            target.add(rule)
            target.add(".".join(_a_label(label) for label in rule.split(".")))

    @classmethod
    def from_file(cls, path: str) -> PublicSuffixList:
        with open(path, encoding="utf-8") as file:
            return cls(file.read())

    def organizational_domain(self, domain: str) -> str | None:
        """The public suffix of ``domain`` plus one label; None when ``domain`` is itself a public suffix."""
        labels = domain.lower().rstrip(".").split(".")
        suffix = 1  # the implicit rule "*": an unlisted top-level domain
        for start in range(len(labels)):  # the longest candidate first
            candidate = ".".join(labels[start:])
            if candidate in self._exceptions:
                suffix = len(labels) - start - 1
                break
            if candidate in self._rules or ".".join(["*", *labels[start + 1 :]]) in self._rules:
                suffix = len(labels) - start
                break
        if len(labels) <= suffix:
            return None
        return ".".join(labels[-suffix - 1 :])


def _a_label(label: str) -> str:
    return label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")


def aligned(domain: str, from_domain: str, mode: str, psl: PublicSuffixList | None = None) -> bool:
    """DMARC identifier alignment: ``s`` needs the same name, ``r`` the same organizational domain.

    Without a Public Suffix List the organizational domain is unknown (``evil.co.uk`` and
    ``bank.co.uk`` share their last two labels but not their owner), so ``r`` needs the same
    name too.
    """
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if domain == from_domain:
        return True
    if mode == "s" or psl is None:
        return False
    org = psl.organizational_domain(from_domain)
    return org is not None and org == psl.organizational_domain(domain)


#: Without a Public Suffix List, policy discovery looks at ancestors of the From: domain
#: with at most this many labels (it bounds the DNS questions a long name causes).
MAX_POLICY_LABELS: Final = 5


def policy_domains(from_domain: str, psl: PublicSuffixList | None = None) -> list[str]:
    """The names whose ``_dmarc`` record may apply to ``from_domain``, in the order to ask.

    The From: domain first. Then, with a Public Suffix List, its organizational domain
    (RFC 7489 §6.6.3); without one, its ancestors from the closest one down to two labels,
    those of at most :data:`MAX_POLICY_LABELS` labels (the first record found applies).
    """
    from_domain = from_domain.lower().rstrip(".")
    if psl is not None:
        org = psl.organizational_domain(from_domain)
        return [from_domain] if org is None or org == from_domain else [from_domain, org]
    labels = from_domain.split(".")
    first = max(1, len(labels) - MAX_POLICY_LABELS)
    return [from_domain, *(".".join(labels[start:]) for start in range(first, len(labels) - 1))]


_PLAIN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+")


def _pvalue(text: str) -> str:
    """``text`` as an RFC 8601 property value: as it is when plain, else a quoted string."""
    if _PLAIN.fullmatch(text):
        return text
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_spf(resolver: Resolver, client_ip: str | None, mail_from: str, helo: str, receiver: str) -> SpfResult:
    """SPF for the MAIL FROM identity (RFC 7208), or for HELO when the sender is null."""
    if mail_from:
        domain, prop, sender = mail_from.rpartition("@")[2], f"smtp.mailfrom={_pvalue(mail_from)}", mail_from
    else:
        domain, prop, sender = helo, f"smtp.helo={_pvalue(helo)}", f"postmaster@{helo}"
    if client_ip is None or not domain:
        return SpfResult("none", domain, prop)
    token = _spf_resolver.set(resolver)
    try:
        result, _code, _explanation = spf.query(
            i=client_ip, s=sender, h=helo, receiver=receiver, querytime=DNS_TIMEOUT * 4
        ).check()
    finally:
        _spf_resolver.reset(token)
    return SpfResult(str(result), domain, prop)


def check_dkim(resolver: Resolver, message: bytes) -> list[DkimResult]:
    """One result per DKIM-Signature header (RFC 6376); ``none`` when there is none."""

    def txt(name: bytes, timeout: float = DNS_TIMEOUT) -> bytes | None:
        records = resolver.query(name.decode("ascii", "replace"), "TXT")
        return records[0].encode() if records else None

    verifier = dkim.DKIM(message, timeout=int(DNS_TIMEOUT))
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    if count == 0:
        return [DkimResult("none")]
    results = []
    for idx in range(count):
        try:
            result = "pass" if verifier.verify(idx=idx, dnsfunc=txt) else "fail"
        except (DNSTempError, dkim.DnsTimeoutError):
            result = "temperror"
        except dkim.ValidationError:  # a body hash or header check that failed
            result = "fail"
        except dkim.DKIMException:  # a malformed signature or key
            result = "permerror"
        fields = verifier.signature_fields or {}
        results.append(
            DkimResult(
                result,
                _text(fields.get(b"d")),
                _text(fields.get(b"s")),
                _text(re.sub(rb"\s+", b"", fields.get(b"b", b""))[:8]) or None,
            )
        )
    return results


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("ascii", "replace")


def _dmarc_record(resolver: Resolver, domain: str) -> dict[str, str] | None:
    for record in resolver.query(f"_dmarc.{domain}", "TXT"):
        if re.match(r"v\s*=\s*DMARC1\s*(;|$)", record):
            tags = (part.partition("=") for part in record.split(";") if "=" in part)
            return {name.strip().lower(): value.strip().lower() for name, _, value in tags}
    return None


def check_dmarc(
    resolver: Resolver,
    from_domain: str | None,
    spf_result: SpfResult,
    dkim_results: Sequence[DkimResult],
    psl: PublicSuffixList | None = None,
) -> DmarcResult:
    """DMARC (RFC 7489): the From: domain's policy and whether SPF or DKIM passed aligned."""
    if not from_domain:
        return DmarcResult("permerror", None)
    tags, inherited = None, False
    try:
        for name in policy_domains(from_domain, psl):
            tags = _dmarc_record(resolver, name)
            if tags is not None:
                break
            inherited = True
    except DNSTempError:
        return DmarcResult("temperror", from_domain)
    if tags is None:
        return DmarcResult("none", from_domain)
    policy = tags.get("sp", tags.get("p")) if inherited else tags.get("p")
    spf_ok = spf_result.result == "pass" and aligned(spf_result.domain, from_domain, tags.get("aspf", "r"), psl)
    dkim_ok = any(
        r.result == "pass" and r.domain is not None and aligned(r.domain, from_domain, tags.get("adkim", "r"), psl)
        for r in dkim_results
    )
    return DmarcResult("pass" if spf_ok or dkim_ok else "fail", from_domain, policy)


class AuthorError(Exception):
    """The message names no single author domain; ``str(error)`` is the SMTP reply text."""


def author_domain(headers: Sequence[sdk.Header]) -> str:
    """The domain of the From: address or addresses (the Author Domain, RFC 7489 §3.1.1).

    Raises :class:`AuthorError` when DMARC cannot be applied to one domain (§6.6.1): no
    From: header or several, one that does not parse, an address without a domain, or
    addresses in different domains. Several addresses in one domain give that domain.
    """
    values = [h.value for h in headers if h.name.lower() == "from"]
    if not values:
        raise AuthorError("Message rejected: it has no From: header")
    if len(values) > 1:
        raise AuthorError(f"Message rejected: it has {len(values)} From: headers")
    addresses: Sequence[Address] = ()
    try:
        parsed = _FROM_PARSER("From", re.sub(r"[\r\n]", "", values[0]).strip())
        addresses = parsed.addresses
        broken = any(isinstance(defect, errors.InvalidHeaderDefect) for defect in parsed.defects)
    except Exception:  # the stdlib parser raises assorted errors on malformed input
        broken = True
    if broken or not addresses:
        raise AuthorError("Message rejected: its From: header does not parse")
    domains = {address.domain.lower().rstrip(".") for address in addresses}
    if "" in domains:
        raise AuthorError("Message rejected: its From: header has an address without a domain")
    if len(domains) > 1:
        raise AuthorError("Message rejected: its From: header has addresses in several domains")
    return domains.pop()


_FROM_PARSER: Final = email.policy.default.header_factory


def rebuild_message(message: sdk.Message, body: bytes) -> bytes:
    """The message as the client sent it (headers in order, CRLF line ends), for DKIM."""
    head = b"".join(h.name_bytes + b":" + h.value_bytes + b"\n" for h in message.headers)
    return re.sub(rb"\r?\n", b"\r\n", head + b"\n") + re.sub(rb"\r?\n", b"\r\n", body)


def format_results(
    authserv_id: str, dkim_results: Sequence[DkimResult], spf_result: SpfResult, dmarc: DmarcResult
) -> str:
    """The Authentication-Results value (RFC 8601), one result per folded line."""
    parts = []
    for r in dkim_results:
        if r.domain is None:
            parts.append(f"dkim={r.result}")
        else:
            b = f" header.b={_pvalue(r.b)}" if r.b else ""
            parts.append(f"dkim={r.result} header.d={_pvalue(r.domain)} header.s={_pvalue(r.selector or '')}{b}")
    parts.append(f"spf={spf_result.result} {spf_result.property}")
    comment = f" (p={dmarc.policy})" if dmarc.policy else ""
    parts.append(
        f"dmarc={dmarc.result}{comment}" + (f" header.from={_pvalue(dmarc.from_domain)}" if dmarc.from_domain else "")
    )
    return ";\n\t".join([authserv_id, *parts])


def _claims(value: str, authserv_id: str) -> bool:
    """True when an Authentication-Results value names ``authserv_id`` (domain names ignore case)."""
    value = value.lower()
    return value.strip().split(";", 1)[0].split()[:1] == [authserv_id.lower()]


class AuthenticationFilter:
    """The handler: verifies at ``eom`` and answers with the header and, for DMARC, a verdict."""

    def __init__(self, resolver: Resolver, authserv_id: str, psl: PublicSuffixList | None = None) -> None:
        self.resolver = resolver
        self.authserv_id = authserv_id
        #: Without it relaxed alignment needs the same name (see :func:`aligned`).
        self.psl = psl

    def __call__(self, request: sdk.Request) -> sdk.Decision | None:
        if not isinstance(request, sdk.EomRequest):
            return None
        message, session = request.message, request.session
        try:
            from_domain = author_domain(message.headers)
        except AuthorError as exc:
            return sdk.reject(550, "5.7.1", str(exc), reason=f"dmarc=permerror ({exc})")
        if message.body is None:
            dkim_results = [DkimResult("temperror")]  # no include_body: nothing to verify
        elif message.body.truncated:
            dkim_results = [DkimResult("temperror")]  # raise the endpoint's max_body_bytes
        else:
            dkim_results = check_dkim(self.resolver, rebuild_message(message, message.body.bytes))
        spf_result = check_spf(
            self.resolver, session.client.address, message.mail_from.address, session.helo or "", self.authserv_id
        )
        dmarc = check_dmarc(self.resolver, from_domain, spf_result, dkim_results, self.psl)
        modifications = list(self._forged(message.headers))
        modifications.append(
            sdk.insert_header(0, HEADER, format_results(self.authserv_id, dkim_results, spf_result, dmarc))
        )
        reason = f"dmarc={dmarc.result} p={dmarc.policy} header.from={dmarc.from_domain}"
        if dmarc.result == "fail" and dmarc.policy == "reject":
            domain = "".join(ch if " " < ch < "\x7f" else "?" for ch in dmarc.from_domain or "")
            text = f"Message rejected: DMARC policy of {domain}"
            return sdk.reject(550, "5.7.1", text, reason=reason)
        if dmarc.result == "fail" and dmarc.policy == "quarantine":
            return sdk.quarantine(reason, modifications=modifications)
        return sdk.continue_(modifications=modifications)

    def _forged(self, headers: Sequence[sdk.Header]) -> Iterator[sdk.Modification]:
        """Deletions of Authentication-Results headers that claim our authserv-id (RFC 8601 §5)."""
        index = 0
        for header in headers:
            if header.name.lower() == HEADER.lower():
                index += 1
                if _claims(header.value, self.authserv_id):
                    yield sdk.delete_header(HEADER, index)


def make_app(
    resolver: Resolver, authserv_id: str, secrets: Sequence[str] | None, psl: PublicSuffixList | None = None
) -> web.Application:
    """The filter as an aiohttp application answering ``POST /``."""
    return sdk.make_app(AuthenticationFilter(resolver, authserv_id, psl), secrets=secrets)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args()
    secrets = os.environ.get("FILTER_SECRET", "").split()
    if not secrets:
        parser.error("set FILTER_SECRET to the endpoint's whsec_ secret (two, space-separated, during a rotation)")
    authserv_id = os.environ.get("AUTHSERV_ID") or socket.gethostname()
    psl = None
    if psl_path := os.environ.get("PUBLIC_SUFFIX_LIST"):
        try:
            psl = PublicSuffixList.from_file(psl_path)
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"PUBLIC_SUFFIX_LIST: {exc}")
    web.run_app(make_app(DnsPythonResolver(), authserv_id, secrets, psl), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
