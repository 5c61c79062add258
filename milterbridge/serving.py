"""Rules for a config that serves mail, beyond loading it (design.md §3.7).

``load_serving_config`` is what a bridge may start or reload with: a loaded config
(``config.load_config``) in which some endpoint enforces. ``config_warnings`` lists what
loads but weakens security or may not fit an MTA's timeouts; ``serve`` logs them and
``check-config`` prints them, with ``mta_summary``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from milterbridge.config import ConfigError, load_config, reply_limits, wait_problems
from milterbridge.milter.constants import Event
from milterbridge.milter.mta import Mta
from milterbridge.policy.model import Mode
from milterbridge.settings import MTA_AUTO, Config

__all__ = ["check_enforcing", "config_warnings", "load_serving_config", "mta_summary"]

_NOTIFICATIONS = frozenset({Event.ABORT, Event.CLOSE})


def check_enforcing(config: Config) -> None:
    """Refuse a config in which no endpoint enforces, unless ``server.allow_no_endpoints`` says so.

    Such a config accepts every message unfiltered, which an empty or half-written file
    would do silently. ``serve``, ``check-config``, every SIGHUP reload and the worker
    supervisor call this, so they all apply the same rule.

    Raises:
        ConfigError: with the key ``server.allow_no_endpoints``.
    """
    if config.server.allow_no_endpoints or any(
        ep.mode is Mode.ENFORCE and ep.events - _NOTIFICATIONS for ep in config.endpoints
    ):
        return
    if not config.endpoints:
        what = "no endpoints"
    elif all(ep.mode is Mode.OBSERVE for ep in config.endpoints):
        what = "only observe endpoints"
    else:
        # An enforcing endpoint subscribed only to the notifications (abort, close) decides nothing.
        what = "no enforcing endpoint subscribed to an event other than abort and close"
    if config.source is not None and _is_empty_file(config.source):
        what += f" (the file {config.source!r} is empty)"
    raise ConfigError(
        "server.allow_no_endpoints",
        f"the config has {what}, so every message would pass unfiltered; add an endpoint with "
        f'mode = "enforce", or set allow_no_endpoints = true in [server] if that is intended',
    )


def _is_empty_file(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def load_serving_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """``load_config`` plus ``check_enforcing``: what a bridge may start or reload with."""
    config = load_config(path, environ)
    check_enforcing(config)
    return config


def _readable_by_others(path: str) -> str | None:
    """The file's mode as ``0o644`` when others, or a group other than this process's, may read it; else None.

    The process's own group is exempt: a Kubernetes secret volume can only reach a non-root
    container through its group (files owned by root, group ``fsGroup``, mode 0440).
    """
    try:
        status = os.stat(path)
    except OSError:
        return None
    mode = status.st_mode & 0o777
    loose = mode & 0o004 or (mode & 0o040 and status.st_gid != os.getegid())
    return f"0o{mode:o}" if loose else None


def config_warnings(config: Config) -> list[str]:
    """Things that load but weaken security: secrets others can read, TLS without verification.

    Printed by ``check-config`` and logged at warning level by ``serve`` (start and reload);
    they never stop either.
    """
    warnings = []
    mode = _readable_by_others(config.source) if config.source and config.inline_secrets else None
    if mode is not None:
        warnings.append(
            f"config file {config.source!r} is readable by group or others (mode {mode}) and holds secrets "
            f"inline ({', '.join(config.inline_secrets)}); chmod 600 it (owned by the user milterbridge "
            f"runs as), or take them from secret_env, secret_file or ${{VAR}}"
        )
    for path in dict.fromkeys(config.secret_files):
        mode = _readable_by_others(path)
        if mode is not None:
            warnings.append(
                f"secret file {path!r} is readable by group or others (mode {mode}); chmod 600 it "
                f"(owned by the user milterbridge runs as)"
            )
    warnings += [
        f"endpoints.{ep.name}.tls.verify is false: the endpoint's certificate is not checked, so anyone "
        f"on the network path can read the webhooks and answer them"
        for ep in config.endpoints
        if not ep.tls.verify
    ]
    if config.server.mta == MTA_AUTO:
        warnings += _sendmail_warnings(config)
    return warnings


def _sendmail_warnings(config: Config) -> list[str]:
    """Under ``mta = "auto"``: what Sendmail would not wait for (the config keeps Postfix's limits)."""
    limits = reply_limits(config.sendmail)[Mta.SENDMAIL]
    hint = 'set [server] mta = "postfix" if no Sendmail connects, or match [sendmail] timeouts to its T='
    out = []
    for key, message in wait_problems(config, limits):
        cut = "" if key == "server.progress_interval" else "; at a Sendmail connection the calls are cut to fit"
        out.append(f"{key}: {message}{cut}; {hint}")
    return out


def mta_summary(config: Config) -> list[str]:
    """What the bridge follows for each MTA it may serve, for ``check-config``."""
    limits = reply_limits(config.sendmail)
    mta = config.server.mta
    lines = [f"mta: {mta}" + (" (told apart per connection by the v macro)" if mta == MTA_AUTO else "")]
    if mta in (MTA_AUTO, Mta.POSTFIX):
        lines.append(
            "  postfix: each answer before end-of-message within milter_command_timeout (30s by default); "
            f"end-of-message kept alive every {config.server.progress_interval:g}s "
            "(milter_content_timeout, 300s by default, restarts with each)"
        )
    if mta in (MTA_AUTO, Mta.SENDMAIL):
        sendmail = limits[Mta.SENDMAIL]
        caps = sendmail.budget_caps()
        reply = f"each answer within R {sendmail.before_eom:g}s" if sendmail.before_eom else "no R limit"
        whole = (
            f"the whole end-of-message within E {sendmail.eom_total:g}s, keep-alives or not"
            if sendmail.eom_total
            else "no E limit"
        )
        places = ((Event.MAIL, "before"), (Event.EOM, "at"))
        cut = [f"{caps[event]:g}s {where}" for event, where in places if event in caps]
        capped = f"calls capped at {' and '.join(cut)} end-of-message" if cut else "calls not capped"
        lines.append(
            f"  sendmail ({sendmail.source}): {reply}, {whole}; {capped}; "
            f"header inserts counted after the cf's {config.sendmail.header_lines} H lines"
        )
    return lines
