"""Milter socket addresses as Postfix and Sendmail write them.

Both sides of the protocol need these: the listener parses ``server.listen`` and
the MTA-side client parses ``--milter``. The forms accepted are::

    inet:HOST:PORT          inet:127.0.0.1:8890, inet:milterbridge:8890
    inet:[V6ADDR]:PORT      inet:[::1]:8890 (Postfix writes IPv6 in brackets)
    inet:PORT@HOST          inet:8890@127.0.0.1 (Sendmail's order)
    inet6:[V6ADDR]:PORT     inet6:[::1]:8890
    inet6:PORT@HOST         inet6:8890@::1
    unix:/ABS/PATH          unix:/run/milterbridge/milter.sock (``local:`` is a synonym)

Port 0 is accepted so that tests can ask the kernel for a free port.
Parsing is pure: it never resolves names or touches the file system, and it
raises :class:`ValueError` with a message that quotes the text.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["ListenAddress", "is_loopback_host", "parse_listen_address", "split_host_port"]

# Letters, digits, '-', '_' and '.': '_' because container and compose service
# names often carry one, even though DNS host names may not.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL;
# a longer path fails only at bind() time with a less helpful message.
MAX_UNIX_PATH_BYTES = 107
#: TCP ports are 16-bit.
MAX_PORT = 65535


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenAddress:
    """A parsed milter socket address: ``inet`` (host and port) or ``unix`` (path)."""

    kind: Literal["inet", "unix"]
    #: Host name or IP literal (IPv6 without brackets); None for unix.
    host: str | None = None
    port: int | None = None
    #: Absolute socket path; None for inet.
    path: str | None = None

    def __str__(self) -> str:
        """Render the canonical Postfix form (``inet:host:port``, ``inet:[v6]:port``, ``unix:/path``)."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Parse a milter address in one of the forms of the module docstring.

    Raises:
        ValueError: the text is not one of those forms, or a part is invalid.
    """
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or not rest:
        raise ValueError(f"{text!r} is not a milter address (expected inet:host:port or unix:/path)")
    if scheme in ("unix", "local"):
        return ListenAddress(kind="unix", path=_check_unix_path(text, rest))
    if scheme not in ("inet", "inet6"):
        raise ValueError(f"{text!r}: unknown address type {scheme!r} (expected inet, inet6 or unix)")
    if "@" in rest:
        port_text, _, host = rest.partition("@")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    else:
        host, port_text = _split_host_port(text, rest)
    host = _check_host(text, host, ipv6_only=scheme == "inet6")
    return ListenAddress(kind="inet", host=host, port=_check_port(text, port_text))


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6addr]:port`` (an HTTP listen address) into its parts.

    Raises:
        ValueError: the text is not of that form, or a part is invalid.
    """
    host, port_text = _split_host_port(text, text)
    return _check_host(text, host, ipv6_only=False), _check_port(text, port_text)


def is_loopback_host(host: str) -> bool:
    """Whether a host (name or IP literal, without brackets) is this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host_port(text: str, rest: str) -> tuple[str, str]:
    if rest.startswith("["):
        host, sep, after = rest[1:].partition("]")
        if not sep or not after.startswith(":"):
            raise ValueError(f"{text!r}: expected [ipv6-address]:port")
        return host, after[1:]
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected host:port")
    if ":" in host:
        # Without brackets "::1:8890" could be ::1 port 8890 or ::1:8890 with no port.
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8890")
    return host, port_text


def _check_host(text: str, host: str, *, ipv6_only: bool) -> str:
    if not host:
        raise ValueError(f"{text!r}: the host is empty")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if ":" in host:
            raise ValueError(f"{text!r}: {host!r} is not a valid IPv6 address") from None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{text!r}: {host!r} is not a valid host name or address") from None
        return host
    if ipv6_only and ip.version != 6:
        raise ValueError(f"{text!r}: inet6 needs an IPv6 address, not {host!r}")
    return str(ip) if ip.version == 6 else host


def _check_port(text: str, port_text: str) -> int:
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: the port {port_text!r} is not a number")
    port = int(port_text)
    if port > MAX_PORT:
        raise ValueError(f"{text!r}: the port {port} is above {MAX_PORT}")
    return port


def _check_unix_path(text: str, path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{text!r}: a unix socket path must be absolute")
    if "\0" in path:
        raise ValueError(f"{text!r}: the path contains a NUL byte")
    if path.endswith("/"):
        raise ValueError(f"{text!r}: the path names a directory, not a socket")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_UNIX_PATH_BYTES:
        raise ValueError(f"{text!r}: the path is longer than {MAX_UNIX_PATH_BYTES} bytes (the unix socket limit)")
    return path
