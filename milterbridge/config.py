"""Frozen, validated settings and their loader (TOML file plus environment).

The settings types below are the contract other modules read. The loader
(``load_config``) is called once, from ``app.py`` or ``cli.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milterbridge.milter.constants import Event
from milterbridge.policy.model import Mode, OnError, OnOversize


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """TLS options of one endpoint (verification is on unless turned off)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSettings:
    """One webhook endpoint ([[endpoints]] in the TOML)."""

    name: str
    url: str
    events: frozenset[Event] = frozenset({Event.EOM})
    mode: Mode = Mode.ENFORCE
    on_error: OnError = OnError.TEMPFAIL
    #: Whole budget for one event, retry included, in seconds.
    timeout: float = 5.0
    include_body: bool = False
    #: Body bytes sent to this endpoint at eom; a larger body is cut (and flagged).
    max_body_bytes: int = 10 * 1024 * 1024
    #: Macro names as Postfix spells them, e.g. "{auth_authen}", "i".
    macros: tuple[str, ...] = ()
    #: Standard Webhooks secrets ("whsec_..."), several during rotation; never logged.
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: Extra HTTP headers, ${VAR} already expanded; never logged (may hold tokens).
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    tls: TlsSettings = TlsSettings()
    allow_insecure_http: bool = False
    #: Largest response body accepted.
    max_response_bytes: int = 1024 * 1024
    #: Retry once (inside the timeout) on connection errors and 429/502/503/504.
    retry: bool = True
    #: Consecutive failures that open the circuit breaker (0 disables it).
    breaker_failures: int = 5
    #: Seconds the breaker stays open before one trial call.
    breaker_reset: float = 30.0
    #: Most modifications accepted in one response.
    max_modifications: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The milter listener ([server])."""

    listen: tuple[str, ...] = ("inet:127.0.0.1:8890",)
    max_connections: int = 1000
    max_message_bytes: int = 50 * 1024 * 1024
    on_oversize: OnOversize = OnOversize.TEMPFAIL
    body_memory_bytes: int = 1024 * 1024
    drain_timeout: float = 30.0
    #: Seconds a milter connection may sit idle between commands.
    idle_timeout: float = 7200.0
    #: Largest inbound milter frame payload.
    max_frame_bytes: int = 1024 * 1024
    max_recipients: int = 10_000
    max_headers: int = 10_000
    max_header_bytes: int = 16 * 1024 * 1024
    max_macros: int = 1_000
    #: Mode of the unix socket file.
    socket_mode: int = 0o660
    #: Seconds between SMFIR_PROGRESS keep-alives while an eom webhook is slow.
    progress_interval: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    """The admin HTTP listener ([admin]): /livez /readyz /metrics."""

    listen: str = "127.0.0.1:8891"


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """Logging ([log])."""

    level: str = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration."""

    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    endpoints: tuple[EndpointSettings, ...] = ()
