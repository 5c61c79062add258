"""A private, throw-away Postfix instance and an SMTP client that records every reply.

The end-to-end suite runs a real Postfix as the milter client. ``PostfixInstance`` builds a
self-contained instance under a fresh temporary directory (its own ``main.cf``, ``master.cf``,
queue, log file and Maildir) and never reads or touches the system Postfix. The facts behind
every setting are in the project's ``postfix-e2e.md``; the comments here name the pitfall
each choice avoids.

Layout of one instance (``BASE`` is a ``tempfile.mkdtemp()`` directory, mode 755)::

    BASE/etc/main.cf, BASE/etc/master.cf   the directory passed to ``-c``
    BASE/spool/                             queue_directory (root-owned; Postfix fills it)
    BASE/data/                              data_directory (created by ``postfix start``)
    BASE/maillog                            maillog_file, written by postlogd
    BASE/mail/inbox/{new,cur,tmp}           the one Maildir every recipient is delivered to

``send_smtp`` and ``SmtpSession`` drive an SMTP conversation with ``smtplib`` and never raise
on a refusal or a dropped connection: every step's reply is recorded and returned.

Errors::

    PostfixHarnessError
     +-- PostfixUnavailableError    Postfix is not installed, or we are not root
     +-- PostfixCommandError        a postfix/postconf/postqueue/postsuper/postcat call failed
     +-- PostfixStartError          the instance did not come up (carries ``postfix check`` output)
     +-- PostfixTimeoutError        (also TimeoutError) a delivery, queue or log wait timed out
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import smtplib
import socket
import stat
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .maillog import MaillogReader
from .processes import kill_leftovers

__all__ = [
    "PostfixHarnessError",
    "PostfixUnavailableError",
    "PostfixCommandError",
    "PostfixStartError",
    "PostfixTimeoutError",
    "PostfixInstance",
    "QueueEntry",
    "SmtpReply",
    "SmtpTransaction",
    "SmtpResult",
    "SmtpSession",
    "send_smtp",
    "make_message",
    "free_port",
    "closed_port",
    "installed_version",
    "prerequisites_problem",
    "median_seconds",
]

# Debian installs the admin commands in /usr/sbin, which a non-login PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
_COMMAND_TIMEOUT = 30.0
# Longer than milter_content_timeout (30s), so a test can watch Postfix give up on a slow milter.
SMTP_TIMEOUT = 40.0
DEFAULT_HELO = "client.milterbridge.test"


class PostfixHarnessError(Exception):
    """Root of the harness errors."""


class PostfixUnavailableError(PostfixHarnessError):
    """Postfix cannot run here: not installed, or not root."""


class PostfixCommandError(PostfixHarnessError):
    """A Postfix command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        super().__init__(f"{shlex.join(argv)} exited {returncode}:\n{output}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output = output


class PostfixStartError(PostfixHarnessError):
    """The instance failed to start; the message holds ``postfix check`` output and the log tail."""


class PostfixTimeoutError(PostfixHarnessError, TimeoutError):
    """Waiting for a delivery, a queue state or a log line took too long."""


# --------------------------------------------------------------------------- prerequisites


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def installed_version() -> str | None:
    """Return Postfix's ``mail_version`` (e.g. ``"3.7.11"``), or None when it is not installed."""
    postconf = _which("postconf")
    if postconf is None:
        return None
    # -d reads compiled-in defaults, so this works without any main.cf.
    proc = subprocess.run(
        [postconf, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
    )
    version = proc.stdout.strip()
    return version if proc.returncode == 0 and version else None


def prerequisites_problem() -> str | None:
    """Say why a private Postfix cannot run here, or return None when it can."""
    missing = [name for name in ("postfix", "postconf", "postqueue", "postsuper", "postcat") if _which(name) is None]
    if missing:
        return f"Postfix is not installed (missing {', '.join(missing)}); run scripts/install-postfix as root"
    if os.geteuid() != 0:
        return "not running as root (Postfix's master must be started by root)"
    if _which("script") is None:
        return "the 'script' command (util-linux) is missing; it is needed to read 'postfix check' errors"
    for account, lookup in (("user postfix", "postfix"), ("user nobody", "nobody")):
        try:
            pwd.getpwnam(lookup)
        except KeyError:
            return f"{account} does not exist (the Debian postfix package creates it)"
    return None


# --------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """Yield a port that refuses connections: bound (so nobody else takes it) but not listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


def _listening(host: str, port: int) -> bool | None:
    """Tell whether something listens on host:port, from /proc/net (None when unknown).

    Reading /proc instead of connecting keeps the probe from opening an SMTP session, which
    would reach a configured milter and confuse a test that counts milter connections.
    """
    table = Path("/proc/net/tcp6" if ":" in host else "/proc/net/tcp")
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    suffix = f":{port:04X}"
    # State 0A is LISTEN; the address check is loose on purpose (any address on that port).
    return any(len(cols) > 3 and cols[1].endswith(suffix) and cols[3] == "0A" for cols in map(str.split, lines))


def _proc_alive(pid: int) -> bool:
    """True when ``pid`` runs; a zombie (a daemon's exit nobody reaped yet) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------- queue


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEntry:
    """One message as ``postqueue -j`` reports it."""

    queue_name: str  # maildrop, incoming, active, deferred or hold
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    message_size: int
    arrival_time: int
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> QueueEntry:
        """Build an entry from one decoded ``postqueue -j`` line."""
        return cls(
            queue_name=str(obj.get("queue_name", "")),
            queue_id=str(obj.get("queue_id", "")),
            sender=str(obj.get("sender", "")),
            recipients=tuple(str(r.get("address", "")) for r in obj.get("recipients", [])),
            message_size=int(obj.get("message_size", 0)),
            arrival_time=int(obj.get("arrival_time", 0)),
            raw=obj,
        )


# --------------------------------------------------------------------------- the instance

# (service, type, private, unpriv, wakeup, maxproc, command). The chroot column is always "n":
# a chroot would need copies of /etc files inside the private queue directory.
_MASTER_SERVICES: tuple[tuple[str, str, str, str, str, str, str], ...] = (
    ("pickup", "unix", "n", "-", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "-", "1", "proxymap"),
    ("smtp", "unix", "-", "-", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "-", "-", "showq"),
    ("error", "unix", "-", "-", "-", "-", "error"),
    ("retry", "unix", "-", "-", "-", "-", "error"),
    ("discard", "unix", "-", "-", "-", "-", "discard"),
    ("local", "unix", "-", "n", "-", "-", "local"),
    ("virtual", "unix", "-", "n", "-", "-", "virtual"),
    ("lmtp", "unix", "-", "-", "-", "-", "lmtp"),
    ("anvil", "unix", "-", "-", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "-", "1", "scache"),
    # Without postlogd, maillog_file silently gets nothing.
    ("postlog", "unix-dgram", "n", "-", "-", "1", "postlogd"),
)

# Milter timeouts short enough to fail fast (Postfix defaults: 30s, 30s, 300s). Endpoint
# timeouts in tests must stay below these.
MILTER_TIMEOUTS: Mapping[str, str] = {
    "milter_connect_timeout": "5s",
    "milter_command_timeout": "10s",
    "milter_content_timeout": "30s",
}


class PostfixInstance(MaillogReader):
    """A private Postfix with one SMTP listener on loopback; construct, then ``start()``.

    Nothing happens in ``__init__``. ``start()`` builds the directory tree and starts master
    (cleaning up after itself if that fails); ``stop()`` stops master, kills any process of
    this instance that outlives it, and removes the tree unless ``keep_files`` is set. Use it
    as a context manager to get both. ``params`` adds or overrides main.cf defaults.
    """

    log_timeout_error = PostfixTimeoutError

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        syslog_name: str = "postfix-test",
        myhostname: str = "mta.milterbridge.test",
        params: Mapping[str, str] | None = None,
        keep_files: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._syslog_name = syslog_name
        self._myhostname = myhostname
        self._extra_params = dict(params or {})
        self._keep_files = keep_files
        self._base: Path | None = None
        self._defaults: dict[str, str] = {}
        self._changed: set[str] = set()
        self._running = False
        self._version: str | None = None
        #: Extra smtpd listeners (``add_smtpd_service``): port -> ``-o`` options.
        self._services: dict[int, dict[str, str]] = {}

    # ----------------------------------------------------------------- properties

    @property
    def base(self) -> Path:
        """The instance's base directory (exists after ``start()``)."""
        if self._base is None:
            raise PostfixHarnessError("the instance has not been started")
        return self._base

    @property
    def config_dir(self) -> Path:
        """The directory passed to every command's ``-c``."""
        return self.base / "etc"

    @property
    def maildir(self) -> Path:
        """The Maildir every recipient is delivered to."""
        return self.base / "mail" / "inbox"

    @property
    def maillog(self) -> Path:
        """Postfix's log file for this instance."""
        return self.base / "maillog"

    def _log_file(self) -> Path | None:
        return None if self._base is None else self._base / "maillog"

    @property
    def smtp_host(self) -> str:
        """The address the SMTP listener is bound to."""
        return self._host

    @property
    def smtp_port(self) -> int:
        """The SMTP listener's port (chosen at ``start()`` unless given)."""
        if self._port is None:
            raise PostfixHarnessError("the instance has not been started")
        return self._port

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._running

    @property
    def version(self) -> str:
        """Postfix's ``mail_version``, e.g. ``"3.7.11"``."""
        if self._version is None:
            self._version = installed_version() or "unknown"
        return self._version

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """``version`` as integers, for comparisons such as ``>= (3, 11)``."""
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> PostfixInstance:
        """Create the instance's files and start master; return self."""
        if self._running:
            raise PostfixHarnessError("the instance is already running")
        problem = prerequisites_problem()
        if problem is not None:
            raise PostfixUnavailableError(problem)
        pick_port = self._port is None
        if self._port is None:
            self._port = free_port(self._host)
        self._base = Path(tempfile.mkdtemp(prefix="milterbridge-postfix-"))
        try:
            self._build_tree()
            for attempt in range(3):
                try:
                    self._start_master()
                    break
                except PostfixStartError:
                    # A port picked by free_port() can be taken by someone else before master
                    # binds it; pick another, unless the caller chose the port.
                    if not pick_port or attempt == 2 or "Address already in use" not in self.log_text():
                        raise
                    self.maillog.unlink(missing_ok=True)
                    self._port = free_port(self._host)
                    self._write(self.config_dir / "master.cf", self._master_cf())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop master (or kill what is left of it) and remove the files unless kept."""
        if self._base is None:
            return
        try:
            if self.config_dir.exists():
                self._stop_master()
        finally:
            self._running = False
            if not self._keep_files:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    def _build_tree(self) -> None:
        base = self.base
        # Daemons run as postfix and virtual(8) as nobody, both using absolute paths, so every
        # parent must be world-searchable (a pytest tmp_path under a 0700 directory is not).
        base.chmod(0o755)
        for parent in base.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise PostfixStartError(f"{parent} is not world-searchable (o+x); Postfix daemons cannot reach {base}")
        (base / "etc").mkdir(mode=0o755)
        # The queue directory must exist and be root-owned; Postfix creates its subdirectories.
        (base / "spool").mkdir(mode=0o755)
        # data/ is deliberately not created: a root-owned one makes master fail on master.lock.
        nobody = pwd.getpwnam("nobody")
        mail = base / "mail"
        mail.mkdir(mode=0o755)
        os.chown(mail, nobody.pw_uid, nobody.pw_gid)
        self._defaults = self._default_params(nobody.pw_uid, nobody.pw_gid)
        main_cf = "".join(f"{name} = {value}\n" for name, value in self._defaults.items())
        self._write(base / "etc" / "main.cf", "# Generated by the milterbridge test harness.\n" + main_cf)
        self._write(base / "etc" / "master.cf", self._master_cf())
        self._changed.clear()

    def _default_params(self, uid: int, gid: int) -> dict[str, str]:
        base = self.base
        ipv6 = ":" in self._host
        params = {
            "compatibility_level": "3.6",
            "queue_directory": f"{base}/spool",
            "data_directory": f"{base}/data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # There is no syslogd; the prefix list must cover the file or Postfix refuses it.
            "maillog_file": f"{base}/maillog",
            "maillog_file_prefixes": str(base),
            "syslog_name": self._syslog_name,
            # Fixed names: no hostname or DNS lookups anywhere.
            "myhostname": self._myhostname,
            "mydomain": "milterbridge.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self._host,
            "inet_protocols": "all" if ipv6 else "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # Every recipient of any domain, milter-added ones included, lands in one Maildir.
            "default_transport": "virtual",
            "relay_transport": "virtual",
            "local_transport": "virtual",
            "virtual_mailbox_base": f"{base}/mail",
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_minimum_uid": "1",
            "smtpd_milters": "",
            "non_smtpd_milters": "",
            "milter_protocol": "6",
            # Explicit, because the default differs between Postfix versions.
            "milter_default_action": "tempfail",
            **MILTER_TIMEOUTS,
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
        }
        params.update(self._extra_params)
        return params

    def _master_cf(self) -> str:
        listen = f"[{self._host}]:{self.smtp_port}" if ":" in self._host else f"{self._host}:{self.smtp_port}"
        rows = [(listen, "inet", "n", "-", "-", "-", "smtpd"), *_MASTER_SERVICES]
        lines = ["# Generated by the milterbridge test harness; chroot is off on every line."]
        for name, kind, private, unpriv, wakeup, maxproc, command in rows:
            lines.append(f"{name:<16} {kind:<10} {private:<3} {unpriv:<3} n   {wakeup:<6} {maxproc:<4} {command}")
        for port, options in self._services.items():
            lines.append(f"{self._host}:{port:<6} inet       n   -   n   -      -    smtpd")
            lines.extend(f"  -o {name}={value}" for name, value in options.items())
        return "\n".join(lines) + "\n"

    def _start_master(self) -> None:
        # master -w makes "postfix start" return only after master initialised (listener bound).
        proc = self._postfix_cmd("postfix", "start", check=False)
        if proc.returncode != 0:
            raise PostfixStartError(self._start_diagnostics(f"postfix start exited {proc.returncode}", proc.stdout))
        self._running = True
        deadline = time.monotonic() + 5.0
        while _listening(self._host, self.smtp_port) is False:
            if time.monotonic() > deadline:
                raise PostfixStartError(self._start_diagnostics("the SMTP listener did not appear", proc.stdout))
            time.sleep(0.02)

    def _start_diagnostics(self, what: str, start_output: str) -> str:
        # Errors raised before main.cf is parsed go only to a tty (else to syslog, which we do
        # not have), so rerun the check under a pseudo-terminal to see them.
        check = [self._command("postfix"), "-c", str(self.config_dir), "check"]
        try:
            pty = subprocess.run(
                [self._command("script"), "-qec", shlex.join(check), "/dev/null"],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=_COMMAND_TIMEOUT,
                check=False,
            )
            check_output = (pty.stdout + pty.stderr).strip() or "(no output)"
        except (OSError, subprocess.SubprocessError) as exc:
            check_output = f"(could not run postfix check: {exc})"
        return (
            f"Postfix failed to start in {self._base}: {what}\n"
            f"--- postfix start output:\n{start_output.strip() or '(none)'}\n"
            f"--- postfix check (under a pty):\n{check_output}\n"
            f"--- maillog tail:\n{self.log_tail(40) or '(empty)'}"
        )

    def _stop_master(self) -> None:
        # What "postfix stop" does (SIGTERM to master, which stops its children), minus the
        # script's one-second sleeps while it polls for master to go.
        pid = self.master_pid()
        if pid is not None and self._master_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self._master_alive():
                time.sleep(0.01)
        elif pid is None and self.instance_pids():
            self._postfix_cmd("postfix", "stop", check=False)
        # Anything that outlived master (or a master that ignored SIGTERM) is killed outright.
        self._kill_leftovers()

    def master_pid(self) -> int | None:
        try:
            return int((self.base / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _master_alive(self) -> bool:
        pid = self.master_pid()
        if pid is None:
            return False
        return _proc_alive(pid)

    def instance_pids(self) -> list[int]:
        """PIDs of processes that belong to this instance: master and its children."""
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        master = self.master_pid()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if not _proc_alive(pid):
                continue
            if pid == master:
                pids.append(pid)
                continue
            # master exports MAIL_CONFIG to every daemon it spawns.
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(pid)
        return pids

    def _kill_leftovers(self) -> None:
        # Children get master's SIGTERM and usually exit within milliseconds: give them a
        # moment before signalling them ourselves.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and self.instance_pids():
            time.sleep(0.01)
        kill_leftovers(self.instance_pids)

    # ----------------------------------------------------------------- commands

    @staticmethod
    def _command(name: str) -> str:
        path = _which(name)
        if path is None:
            raise PostfixUnavailableError(f"{name} not found")
        return path

    def _postfix_cmd(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [self._command(name), "-c", str(self.config_dir), *args]
        proc = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise PostfixCommandError(argv, proc.returncode, proc.stdout)
        return proc

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self._backdate_config()

    def _backdate_config(self) -> None:
        # Postfix re-reads a main.cf younger than 1 s in 300 ms steps (about 2 s per command).
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            path = self.config_dir / name
            if path.exists():
                os.utime(path, (past, past))

    # ----------------------------------------------------------------- settings

    def get(self, name: str) -> str:
        """Return the effective value of one main.cf parameter."""
        return self._postfix_cmd("postconf", "-h", name).stdout.rstrip("\n")

    def set(self, **params: str) -> None:
        """Set main.cf parameters (``postconf -e``) and reload; see ``configure``."""
        self.configure(params)

    def configure(self, params: Mapping[str, str], *, reload: bool = True) -> None:
        """Set main.cf parameters, backdate the file and reload (when running and asked to)."""
        if not params:
            return
        self.settle_logging()
        self._postfix_cmd("postconf", "-e", *(f"{name}={value}" for name, value in params.items()))
        self._backdate_config()
        self._changed.update(params)
        if reload and self._running:
            self.reload()

    def set_milter(
        self,
        address: str | None,
        default_action: str = "tempfail",
        protocol: str = "6",
        *,
        connect_timeout: str = MILTER_TIMEOUTS["milter_connect_timeout"],
        command_timeout: str = MILTER_TIMEOUTS["milter_command_timeout"],
        content_timeout: str = MILTER_TIMEOUTS["milter_content_timeout"],
        macros: Mapping[str, str] | None = None,
        reload: bool = True,
    ) -> None:
        """Point ``smtpd_milters`` at ``address`` (e.g. ``"inet:127.0.0.1:8890"``; None for none).

        Also sets ``milter_default_action`` (tempfail, accept, reject, quarantine; shutdown
        from Postfix 3.11), ``milter_protocol``, the milter timeouts (Postfix time values such
        as ``"5s"``; the defaults fail fast) and any macro overrides given as
        ``{"milter_connect_macros": "..."}``.
        """
        params = {
            "smtpd_milters": address or "",
            "milter_default_action": default_action,
            "milter_protocol": protocol,
            "milter_connect_timeout": connect_timeout,
            "milter_command_timeout": command_timeout,
            "milter_content_timeout": content_timeout,
            **(macros or {}),
        }
        self.configure(params, reload=reload)

    def reset_settings(self) -> bool:
        """Restore every parameter changed since ``start()``; return True when a reload happened."""
        if not self._changed:
            return False
        restore = {name: self._defaults[name] for name in self._changed if name in self._defaults}
        extra = sorted(self._changed - restore.keys())
        self.settle_logging()
        if restore:
            self._postfix_cmd("postconf", "-e", *(f"{name}={value}" for name, value in restore.items()))
        if extra:
            # Parameters the defaults never named go back to Postfix's built-in value.
            self._postfix_cmd("postconf", "-X", *extra)
        self._backdate_config()
        self._changed.clear()
        if self._running:
            self.reload()
        return True

    def _smtpd_pids(self) -> frozenset[int]:
        master = self.master_pid()
        if master is None:
            return frozenset()
        found: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                # stat_fields[1] is the parent pid; comm is in the part before ")".
                if int(stat_fields[1]) == master and (entry / "comm").read_text().strip() == "smtpd":
                    found.append(int(entry.name))
        return frozenset(found)

    def reload(self, *, settle_timeout: float = 1.0) -> None:
        """``postfix reload``, then wait briefly for the smtpd processes started before it to exit.

        Each smtpd reads main.cf when it starts and "postfix reload" only signals master, so
        an idle old smtpd could serve the next session with the old settings. In practice
        master ends them before the next connection (30 toggles, no stale session), so the
        wait usually returns at once. It is capped and never fails: an old smtpd still busy
        with a session (say, waiting on a slow milter) serves no new client and exits after.
        """
        old = self._smtpd_pids()
        self._postfix_cmd("postfix", "reload")
        deadline = time.monotonic() + settle_timeout
        while old and old & self._smtpd_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.settle_logging()

    def settle_logging(self, timeout: float = 5.0) -> None:
        """Log a marker through postlogd and wait until it is written.

        Why: after ``postfix reload`` the old postlogd exits and log records queue in its
        datagram socket (10 by default before senders block); the next record starts a new
        postlogd, which reads main.cf twice while starting. If main.cf changes in between
        (the next ``postconf -e``), it warns "overriding earlier entry" into its own full
        socket and blocks for good, and so does every process that logs, master included
        (seen with Postfix 3.7.11). Settling after every reload and before every main.cf
        change closes that window. A no-op when the instance is not running.
        """
        if not self._running:
            return
        postlog = _which("postlog")
        if postlog is None:
            raise PostfixUnavailableError("the postlog command is missing")
        mark = self.log_mark()
        token = f"milterbridge-settle-{secrets.token_hex(6)}"
        try:
            subprocess.run(
                [postlog, "-c", str(self.config_dir), "-t", f"{self._syslog_name}/settle", token],
                timeout=timeout,
                check=True,
                capture_output=True,
            )
            self.wait_for_log(re.escape(token), since=mark, timeout=timeout)
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError, PostfixTimeoutError) as exc:
            raise PostfixTimeoutError(f"postlogd of {self.base} does not write its log: {exc}") from exc

    # ----------------------------------------------------------------- extra smtpd services

    def add_smtpd_service(self, name: str, options: Mapping[str, str] | None = None) -> int:
        """Add an smtpd listener on another loopback port with its own ``-o`` options; return the port.

        ``name`` tags its log lines (``syslog_name = <instance>/<name>``). Postfix's
        ``{daemon_name}`` macro is ``milter_macro_daemon_name`` (default ``$myhostname``, not
        the service name, which for an inet service is ``host:port``), so pass
        ``{"milter_macro_daemon_name": ...}`` to give the milter a name to tell it by. Values
        may not contain whitespace; an empty one clears the parameter for the service (``-o
        content_filter=``). ``remove_smtpd_services`` (and ``reset``) take them away.
        """
        if ":" in self._host:
            raise PostfixHarnessError("extra smtpd services are supported on an IPv4 listener only")
        wanted = {"syslog_name": f"{self._syslog_name}/{name}", **(options or {})}
        for key, value in wanted.items():
            if not key or any(ch.isspace() for ch in f"{key}{value}"):
                raise ValueError(f"master.cf option {key}={value!r} has no name or contains whitespace")
        port = free_port(self._host)
        self._services[port] = wanted
        self._write(self.config_dir / "master.cf", self._master_cf())
        if self._running:
            self.reload()
            deadline = time.monotonic() + 5.0
            while _listening(self._host, port) is False:
                if time.monotonic() > deadline:
                    raise PostfixTimeoutError(f"smtpd service {name} on port {port} did not appear:\n{self.log_tail()}")
                time.sleep(0.02)
        return port

    def remove_smtpd_services(self) -> bool:
        """Remove every listener ``add_smtpd_service`` added; return True when Postfix was reloaded."""
        if not self._services:
            return False
        self._services.clear()
        self._write(self.config_dir / "master.cf", self._master_cf())
        if self._running:
            self.reload()
        return True

    def sasl_options(self, users: Mapping[str, str], *, realm: str = "milterbridge.test") -> dict[str, str]:
        """Set up Cyrus SASL (sasldb) for ``users`` (name -> password); return smtpd ``-o`` options.

        Writes a private ``smtpd.conf`` (``auxprop``/``sasldb``, PLAIN and LOGIN) and a sasldb
        file made with ``saslpasswd2 -f`` in ``etc/sasl/``, readable by smtpd. Debian's Postfix
        reads ``smtpd.conf`` from ``$config_directory/sasl`` whatever ``cyrus_sasl_config_path``
        says (seen with strace on 3.7.11), so the file goes there; the option is set as well
        for other builds. Pass the result to ``add_smtpd_service`` for a submission-like listener; clients
        log in as the bare user name (smtpd appends ``realm``). Needs Debian's ``sasl2-bin``.
        """
        saslpasswd2 = _which("saslpasswd2")
        if saslpasswd2 is None:
            raise PostfixUnavailableError("saslpasswd2 is missing (Debian package sasl2-bin)")
        directory = self.config_dir / "sasl"
        directory.mkdir(mode=0o755, exist_ok=True)
        db = directory / "sasldb2"
        conf = f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {db}\n"
        (directory / "smtpd.conf").write_text(conf)
        db.unlink(missing_ok=True)
        for user, password in users.items():
            subprocess.run(
                [saslpasswd2, "-f", str(db), "-c", "-p", "-u", realm, user],
                input=password,
                text=True,
                capture_output=True,
                timeout=_COMMAND_TIMEOUT,
                check=True,
            )
        postfix = pwd.getpwnam("postfix")
        os.chown(db, postfix.pw_uid, postfix.pw_gid)
        db.chmod(0o600)
        return {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(directory),
            "smtpd_sasl_local_domain": realm,
            "smtpd_sasl_security_options": "noanonymous",
        }

    # ----------------------------------------------------------------- mail and queue

    def maildir_messages(self) -> list[tuple[str, bytes]]:
        """Delivered messages as (file name, content), oldest first (``new/`` and ``cur/``)."""
        files: list[tuple[float, str, Path]] = []
        for sub in ("new", "cur"):
            directory = self.maildir / sub
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    files.append((path.stat().st_mtime, path.name, path))
        files.sort()
        return [(name, path.read_bytes()) for _, name, path in files]

    def wait_for_delivery(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Poll until at least ``count`` messages are in the Maildir; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.maildir_messages()
            if len(messages) >= count:
                return messages
            if time.monotonic() > deadline:
                raise PostfixTimeoutError(
                    f"{len(messages)} of {count} messages delivered after {timeout}s; "
                    f"queue: {self.queue()}\n--- maillog tail:\n{self.log_tail(30)}"
                )
            time.sleep(0.02)

    def clear_maildir(self) -> None:
        """Remove every delivered message (the Maildir itself stays)."""
        for sub in ("new", "cur", "tmp"):
            directory = self.maildir / sub
            if directory.is_dir():
                for path in directory.iterdir():
                    path.unlink(missing_ok=True)

    def queue(self) -> list[QueueEntry]:
        """Every queued message (``postqueue -j``), whatever its queue."""
        out = self._postfix_cmd("postqueue", "-j").stdout
        return [QueueEntry.from_json(json.loads(line)) for line in out.splitlines() if line.strip()]

    def hold_queue(self) -> list[QueueEntry]:
        """The messages in the hold queue (quarantined by a milter)."""
        return [entry for entry in self.queue() if entry.queue_name == "hold"]

    def wait_for_queue(self, count: int, queue_name: str = "hold", timeout: float = 5.0) -> list[QueueEntry]:
        """Poll until at least ``count`` messages sit in ``queue_name``; return those entries."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [entry for entry in self.queue() if entry.queue_name == queue_name]
            if len(entries) >= count:
                return entries
            if time.monotonic() > deadline:
                raise PostfixTimeoutError(
                    f"{len(entries)} of {count} messages in queue {queue_name!r} after {timeout}s; "
                    f"queue: {self.queue()}\n--- maillog tail:\n{self.log_tail(30)}"
                )
            time.sleep(0.02)

    def wait_for_queue_idle(self, timeout: float = 5.0) -> list[QueueEntry]:
        """Poll until no message is waiting for or in delivery; return what is left (held, deferred).

        After this, a count of Maildir files is final: use it to assert "exactly N delivered".
        """
        busy = {"maildrop", "incoming", "active"}
        deadline = time.monotonic() + timeout
        while True:
            entries = self.queue()
            if not any(entry.queue_name in busy for entry in entries):
                return entries
            if time.monotonic() > deadline:
                raise PostfixTimeoutError(
                    f"queue still busy after {timeout}s: {entries}\n--- maillog tail:\n{self.log_tail(30)}"
                )
            time.sleep(0.02)

    def postcat(self, queue_id: str, *, headers: bool = False, body: bool = False, envelope: bool = False) -> str:
        """Return ``postcat -q`` output for a queued message; the flags select -h, -b and -e."""
        flags = [flag for flag, wanted in (("-h", headers), ("-b", body), ("-e", envelope)) if wanted]
        return self._postfix_cmd("postcat", *flags, "-q", queue_id).stdout

    def release_held(self) -> None:
        """Release every held message (``postsuper -H ALL``) and ask for delivery at once."""
        self._postfix_cmd("postsuper", "-H", "ALL")
        # Released mail goes to the deferred queue; without a flush qmgr takes it on its next
        # scan (queue_run_delay later).
        self.flush_queue()

    def flush_queue(self) -> None:
        """Ask for immediate delivery of deferred mail (``postqueue -f``); nothing is deleted."""
        self._postfix_cmd("postqueue", "-f")

    def delete_all(self) -> None:
        """Delete every queued message, held ones included (``postsuper -d ALL``)."""
        self._postfix_cmd("postsuper", "-d", "ALL")

    def reset(self) -> None:
        """Empty the queue and the Maildir and restore the default settings."""
        # A delivery still in flight would land after clear_maildir() and leak into the next
        # test, so let the queue settle first (deleting active mail does not stop a delivery
        # agent that already has it). Held or deferred mail is deleted below.
        with contextlib.suppress(PostfixTimeoutError):
            self.wait_for_queue_idle(timeout=2.0)
        self.remove_smtpd_services()
        self.reset_settings()
        self.delete_all()
        self.clear_maildir()

    # ----------------------------------------------------------------- SMTP shortcuts

    def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        message: bytes,
        *,
        helo: str = DEFAULT_HELO,
        timeout: float = SMTP_TIMEOUT,
        source_address: str | None = None,
        port: int | None = None,
    ) -> SmtpResult:
        """``send_smtp`` to this instance's listener, or to ``port`` (from ``source_address``, e.g. ``127.0.0.2``)."""
        return send_smtp(
            self.smtp_host,
            port or self.smtp_port,
            mail_from,
            rcpts,
            message,
            helo=helo,
            timeout=timeout,
            source_address=source_address,
        )

    def smtp_session(
        self, *, helo: str = DEFAULT_HELO, timeout: float = SMTP_TIMEOUT, port: int | None = None
    ) -> SmtpSession:
        """An unopened ``SmtpSession`` to this instance's listener, or to ``port`` (use it with ``with``)."""
        return SmtpSession(self.smtp_host, port or self.smtp_port, helo=helo, timeout=timeout)


# --------------------------------------------------------------------------- SMTP client

_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")
NO_REPLY = 0  # SmtpReply.code when the server sent nothing (refused, dropped or timed out)


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpReply:
    """One SMTP reply, or the absence of one (``code == NO_REPLY``, ``text`` says why)."""

    step: str  # greeting, ehlo, auth, mail, rcpt, data, end_of_data, rset, quit, command
    code: int
    text: str
    argument: str = ""  # the address for mail and rcpt, the command line for command

    @property
    def ok(self) -> bool:
        """True for a positive reply (2xx or 3xx)."""
        return 200 <= self.code < 400

    @property
    def dropped(self) -> bool:
        """True when no reply came (connection refused, closed or timed out)."""
        return self.code == NO_REPLY


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpTransaction:
    """The replies of one MAIL..end-of-data transaction; steps not attempted are None or empty."""

    mail: SmtpReply | None
    rcpts: tuple[SmtpReply, ...]
    data: SmtpReply | None  # the reply to DATA itself (354 when the server wants the message)
    end_of_data: SmtpReply | None  # the final reply after the terminating dot
    duration: float  # seconds, from MAIL to the last reply of the transaction

    @property
    def accepted(self) -> bool:
        """True when the message was accepted (250 after the dot)."""
        return self.end_of_data is not None and self.end_of_data.code == 250

    @property
    def queue_id(self) -> str | None:
        """The queue id from Postfix's "queued as" reply, when the message was accepted."""
        if self.end_of_data is None:
            return None
        match = _QUEUED_AS.search(self.end_of_data.text)
        return match.group(1) if match else None

    @property
    def replies(self) -> tuple[SmtpReply, ...]:
        """The transaction's replies in order."""
        head = (self.mail,) if self.mail else ()
        tail = tuple(reply for reply in (self.data, self.end_of_data) if reply is not None)
        return head + self.rcpts + tail


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpResult:
    """Everything one SMTP connection produced."""

    greeting: SmtpReply
    ehlo: SmtpReply | None
    transactions: tuple[SmtpTransaction, ...]
    quit: SmtpReply | None
    replies: tuple[SmtpReply, ...]  # every reply in order, RSET and raw commands included
    duration: float  # seconds, from connect to the end of QUIT

    @property
    def transaction(self) -> SmtpTransaction:
        """The first (usually the only) transaction."""
        if not self.transactions:
            raise IndexError("no transaction was attempted")
        return self.transactions[0]

    @property
    def accepted(self) -> bool:
        """True when there was at least one transaction and every one was accepted."""
        return bool(self.transactions) and all(t.accepted for t in self.transactions)


def _decode(text: bytes | str) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _crlf(message: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", message)


class SmtpSession:
    """One SMTP connection: ``open()``, any number of ``send()``, then ``close()`` (or ``with``).

    Every reply is recorded; nothing raises on a refusal. A 421 reply or a lost connection
    ends the session: later steps are not sent and show up as None (or empty) in the results.
    Like a real client it sends no RCPT after a refused MAIL and no DATA without an accepted
    RCPT (it sends RSET instead).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        helo: str = DEFAULT_HELO,
        timeout: float = SMTP_TIMEOUT,
        source_address: str | None = None,
    ) -> None:
        self._host = host
        self._port = port
        # local_hostname keeps smtplib from calling socket.getfqdn() (a DNS lookup).
        source = (source_address, 0) if source_address is not None else None
        self._smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout, source_address=source)
        self._replies: list[SmtpReply] = []
        self._transactions: list[SmtpTransaction] = []
        self._greeting: SmtpReply | None = None
        self._ehlo: SmtpReply | None = None
        self._quit: SmtpReply | None = None
        self._alive = False
        self._started = 0.0
        self._duration = 0.0

    @property
    def alive(self) -> bool:
        """True while the connection is usable."""
        return self._alive

    @property
    def greeting(self) -> SmtpReply | None:
        """The server's greeting (after ``open()``)."""
        return self._greeting

    def __enter__(self) -> SmtpSession:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _record(self, reply: SmtpReply) -> SmtpReply:
        self._replies.append(reply)
        # 421 means the server is closing the connection; a dropped one is gone already.
        if reply.dropped or reply.code == 421:
            self._alive = False
            self._smtp.close()
        return reply

    def _step(self, step: str, argument: str, call: Callable[[], tuple[int, bytes | str]]) -> SmtpReply:
        try:
            code, text = call()
        except smtplib.SMTPResponseException as exc:
            code, text = exc.smtp_code, exc.smtp_error
        except (smtplib.SMTPException, OSError) as exc:
            return self._record(
                SmtpReply(step=step, code=NO_REPLY, text=f"{type(exc).__name__}: {exc}", argument=argument)
            )
        return self._record(SmtpReply(step=step, code=int(code), text=_decode(text), argument=argument))

    def open(self) -> SmtpReply:
        """Connect, record the greeting and, unless the connection is gone, EHLO."""
        self._started = time.monotonic()
        self._alive = True
        # SMTP() + connect(): the constructor with a host raises on a non-220 greeting.
        self._greeting = self._step("greeting", "", lambda: self._smtp.connect(self._host, self._port))
        # A 554 greeting leaves the session open (Postfix answers later commands), so go on.
        if self._alive:
            self._ehlo = self._step("ehlo", self._smtp.local_hostname, self._smtp.ehlo)
        return self._greeting

    def login(self, user: str, password: str) -> SmtpReply | None:
        """AUTH PLAIN with ``user`` and ``password``; record the reply (None when the session is over)."""
        if not self._alive:
            return None
        self._smtp.user, self._smtp.password = user, password
        return self._step("auth", user, lambda: self._smtp.auth("PLAIN", self._smtp.auth_plain))

    def command(self, line: str) -> SmtpReply | None:
        """Send one raw command line and record its reply (None when the session is over)."""
        if not self._alive:
            return None
        return self._step("command", line, lambda: self._smtp.docmd(line))

    def send(
        self,
        mail_from: str,
        rcpts: Iterable[str],
        message: bytes,
        *,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
        fix_newlines: bool = True,
    ) -> SmtpTransaction:
        """Run one transaction; ``message`` gets CRLF line ends unless ``fix_newlines`` is False."""
        started = time.monotonic()
        mail: SmtpReply | None = None
        rcpt_replies: list[SmtpReply] = []
        data: SmtpReply | None = None
        end: SmtpReply | None = None
        if self._alive:
            mail = self._step("mail", mail_from, lambda: self._smtp.mail(mail_from, list(mail_options)))
        if mail is not None and mail.ok:
            for rcpt in rcpts:
                if not self._alive:
                    break
                rcpt_replies.append(
                    self._step("rcpt", rcpt, functools.partial(self._smtp.rcpt, rcpt, list(rcpt_options)))
                )
        if any(reply.ok for reply in rcpt_replies) and self._alive:
            payload = _crlf(message) if fix_newlines else message
            data, end = self._data(payload)
        elif mail is not None and mail.ok and self._alive:
            self._step("rset", "", self._smtp.rset)
        transaction = SmtpTransaction(
            mail=mail, rcpts=tuple(rcpt_replies), data=data, end_of_data=end, duration=time.monotonic() - started
        )
        self._transactions.append(transaction)
        return transaction

    def _data(self, payload: bytes) -> tuple[SmtpReply, SmtpReply | None]:
        # smtplib.SMTP.data() hides the 354; send DATA ourselves to record both replies.
        data = self._step("data", "", lambda: self._smtp.docmd("data"))
        if data.code != 354 or not self._alive:
            return data, None
        quoted = re.sub(rb"(?m)^\.", b"..", payload)
        if not quoted.endswith(b"\r\n"):
            quoted += b"\r\n"

        def finish() -> tuple[int, bytes]:
            self._smtp.send(quoted + b".\r\n")
            return self._smtp.getreply()

        return data, self._step("end_of_data", "", finish)

    def close(self) -> SmtpResult:
        """QUIT (if the connection is still up), close, and return everything recorded."""
        if self._greeting is None:
            raise PostfixHarnessError("the SMTP session was never opened")
        if self._alive:
            self._quit = self._step("quit", "", self._smtp.quit)
            self._alive = False
        self._smtp.close()
        if not self._duration:
            self._duration = time.monotonic() - self._started
        return self.result()

    def result(self) -> SmtpResult:
        """Everything recorded so far."""
        if self._greeting is None:
            raise PostfixHarnessError("the SMTP session was never opened")
        return SmtpResult(
            greeting=self._greeting,
            ehlo=self._ehlo,
            transactions=tuple(self._transactions),
            quit=self._quit,
            replies=tuple(self._replies),
            duration=self._duration or time.monotonic() - self._started,
        )


def send_smtp(
    host: str,
    port: int,
    mail_from: str,
    rcpts: Sequence[str],
    message: bytes,
    *,
    helo: str = DEFAULT_HELO,
    timeout: float = SMTP_TIMEOUT,
    source_address: str | None = None,
) -> SmtpResult:
    """Deliver one message over a fresh SMTP connection and return every reply; never raises."""
    session = SmtpSession(host, port, helo=helo, timeout=timeout, source_address=source_address)
    session.open()
    session.send(mail_from, rcpts, message)
    return session.close()


def make_message(
    *,
    mail_from: str = "sender@example.org",
    to: Sequence[str] = ("rcpt@example.net",),
    subject: str = "test",
    body: str = "Hello.\n",
    headers: Sequence[tuple[str, str]] = (),
    message_id: str | None = None,
) -> bytes:
    """Build a small RFC 5322 message with CRLF line ends (no DNS: the Message-ID is synthetic)."""
    message_id = message_id or f"<{time.monotonic_ns()}.{os.getpid()}@client.milterbridge.test>"
    lines = [
        f"From: {mail_from}",
        f"To: {', '.join(to)}",
        f"Subject: {subject}",
        f"Message-ID: {message_id}",
        *(f"{name}: {value}" for name, value in headers),
        "",
        body,
    ]
    return _crlf("\n".join(lines).encode())


def median_seconds(values: Iterable[float]) -> float:
    """The median of durations in seconds (for timing reports)."""
    return statistics.median(list(values))
