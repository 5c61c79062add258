"""Is an address an RFC 5321 mailbox? The check endpoints' envelope changes must pass.

Pure (stdlib only): the productions of RFC 5321 §4.1.2 and §4.1.3, widened to UTF-8 by
RFC 6531 §3.3, with the length limits of §4.5.3.1.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

__all__ = ["MAX_ADDRESS_BYTES", "MAX_LABEL_BYTES", "MAX_LOCAL_PART_BYTES", "mailbox_problem"]

#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_ADDRESS_BYTES: Final = 254
#: RFC 5321 §4.5.3.1.1.
MAX_LOCAL_PART_BYTES: Final = 64
#: RFC 1035 §2.3.4; a U-label counts in its ACE (``xn--``) form.
MAX_LABEL_BYTES: Final = 63

# RFC 5321 §4.1.2 and §4.1.3 productions, widened by RFC 6531 §3.3 to UTF-8
# (UTF8-non-ascii of RFC 6532 §3.1, less the C1 controls U+0080-U+009F).
_UTF8_NON_ASCII: Final = "\u00a0-\U0010ffff"
#: Atom = 1*atext (RFC 5322 §3.2.3 atext).
_ATOM: Final = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8_NON_ASCII}]+"
#: Dot-string = Atom *("." Atom).
_DOT_STRING: Final = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
#: Quoted-string = DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE.
_QUOTED_STRING: Final = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]|\\[\x20-\x7e])*"')
#: sub-domain = Let-dig [Ldh-str], or a U-label (its shape; IDNA2008's tables are not in the stdlib).
_LET_DIG: Final = rf"[A-Za-z0-9{_UTF8_NON_ASCII}]"
_SUB_DOMAIN: Final = re.compile(rf"{_LET_DIG}(?:[A-Za-z0-9\-{_UTF8_NON_ASCII}]*{_LET_DIG})?")
#: IPv4-address-literal = Snum 3("." Snum), Snum 0-255.
_SNUM: Final = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9]{1,2})"
_IPV4_LITERAL: Final = re.compile(rf"{_SNUM}(?:\.{_SNUM}){{3}}")
#: IPv6-address-literal = "IPv6:" IPv6-addr (the tag is case-insensitive, as in all ABNF strings).
_IPV6_LITERAL: Final = re.compile(r"[Ii][Pp][Vv]6:([0-9A-Fa-f:.]+)")


def mailbox_problem(address: str) -> str | None:
    """Why ``address`` is not an RFC 5321 ``Mailbox``, or None when it is one.

    ``Mailbox = Local-part "@" ( Domain / address-literal )`` (RFC 5321 §4.1.2),
    written without angle brackets:

    * Local-part: a Dot-string (atoms of RFC 5322 §3.2.3 atext joined by
      dots) or a Quoted-string (printable ASCII and space, ``\\`` escaping
      a printable character or space); at most 64 octets (§4.5.3.1.1).
    * Domain: sub-domains of letters, digits and inner hyphens, joined by
      dots, each at most 63 octets (RFC 1035 §2.3.4).
    * address-literal (§4.1.3): ``[IPv4]`` or ``[IPv6:...]``; General-address-literal
      needs a registered tag and there is none besides IPv6, so it is refused.
    * RFC 6531 §3.3 (SMTPUTF8) adds UTF-8 to atext, qtextSMTP and sub-domain
      (U-labels); C1 controls stay refused. A U-label's length counts in its
      ``xn--`` form; its IDNA2008 validity is left to the MTA and DNS.
    * The whole address is at most 254 octets of UTF-8: a path of 256 with
      its brackets (§4.5.3.1.3), which also bounds the domain below its 255.
    """
    try:
        size = len(address.encode())
    except UnicodeEncodeError:
        return "not valid Unicode text (a lone surrogate)"
    if size > MAX_ADDRESS_BYTES:
        return f"longer than {MAX_ADDRESS_BYTES} bytes (RFC 5321 path limit)"
    if address[:1] == "<" and address[-1:] == ">":
        return "write it without angle brackets: the bridge adds them"
    local, at, domain = address.rpartition("@")
    if not at:
        return "not an address: local-part@domain expected"
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        return "the local part is neither a dot-string nor a quoted string (RFC 5321 §4.1.2)"
    if len(local.encode()) > MAX_LOCAL_PART_BYTES:
        return f"the local part is longer than {MAX_LOCAL_PART_BYTES} bytes"
    if domain.startswith("["):
        return _literal_problem(domain)
    for label in domain.split("."):
        if not _SUB_DOMAIN.fullmatch(label):
            return "the domain is not a domain name (RFC 5321 §4.1.2) or an address literal"
        ace = label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        if len(ace) > MAX_LABEL_BYTES:
            return f"a domain label is longer than {MAX_LABEL_BYTES} bytes"
    return None


def _literal_problem(literal: str) -> str | None:
    inner = literal[1:-1] if literal.endswith("]") else ""
    if _IPV4_LITERAL.fullmatch(inner):
        return None
    v6 = _IPV6_LITERAL.fullmatch(inner)
    if v6:
        try:
            ipaddress.IPv6Address(v6.group(1))
        except ValueError:
            return "the address literal is not a valid IPv6 address"
        return None
    return "the address literal is neither [IPv4] nor [IPv6:...] (RFC 5321 §4.1.3)"
