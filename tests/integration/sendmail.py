"""A private, throw-away Sendmail next to the test suite's Postfix.

Sendmail cannot be installed beside Postfix (the packages conflict), so
``scripts/install-sendmail`` unpacks Debian's sendmail-bin, -base and -cf into a prefix
(``.tools/sendmail`` in the checkout, or ``MILTERBRIDGE_SENDMAIL_PREFIX``). ``SendmailInstance``
builds its ``sendmail.cf`` with m4 in a fresh temporary directory and runs ``sendmail -bD``
there in a private mount and UTS namespace (``unshare -m -u``), where:

* the host name is ``mta.test`` and ``/etc/hosts``, ``/etc/resolv.conf`` and
  ``/etc/nsswitch.conf`` are the instance's own: no DNS is ever asked, so Sendmail never
  stalls looking itself up;
* ``/dev`` is a private tmpfs whose ``/dev/log`` is the instance's datagram socket: a thread
  of this harness receives Sendmail's syslog lines and appends them to ``BASE/maillog``.

Every address is delivered by a ``capture`` mailer (a ``LOCAL_RULE_0`` routes all of them to
it) that writes each recipient's copy to ``BASE/mail/new``. The facts behind each setting are in
the project's ``sendmail-e2e.md``.

Layout of one instance (``BASE`` is a ``tempfile.mkdtemp()`` directory beside the prefix, ``.tools/run-*``)::

    BASE/sendmail.mc, BASE/sendmail.cf   the configuration (rebuilt by ``set_milter``)
    BASE/queue/                          the queue (qf/df files; hf for a quarantined message)
    BASE/mail/{tmp,new}/                 one file per delivered recipient copy
    BASE/maillog                         the syslog lines
    BASE/sendmail.out                    the daemon's stdout and stderr
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .maillog import MaillogReader
from .postfix import (
    DEFAULT_HELO,
    SMTP_TIMEOUT,
    SmtpResult,
    SmtpSession,
    SmtpTransaction,
    _listening,
    free_port,
    send_smtp,
)
from .processes import kill_leftovers

__all__ = [
    "SendmailInstance",
    "SendmailHarnessError",
    "Delivered",
    "DEFAULT_TIMEOUTS",
    "HOSTNAME",
    "has_ipv6_loopback",
    "queue_id_of",
    "sendmail_prefix",
    "prerequisites_problem",
]

REPO = Path(__file__).resolve().parents[2]
HOSTNAME = "mta.test"
#: Sendmail's own defaults for a filter's T= (milter-protocol and sendmail-e2e.md).
DEFAULT_TIMEOUTS = "S:10s;R:10s;E:5m"
_START_TIMEOUT = 20.0


class SendmailHarnessError(Exception):
    """The private Sendmail could not be set up, started, or did not do what was waited for."""


def sendmail_prefix() -> Path:
    """Where scripts/install-sendmail unpacked Debian's Sendmail."""
    return Path(os.environ.get("MILTERBRIDGE_SENDMAIL_PREFIX") or REPO / ".tools" / "sendmail")


def _binary(prefix: Path) -> Path:
    return prefix / "usr" / "libexec" / "sendmail" / "sendmail"


def _cf_dir(prefix: Path) -> Path:
    return prefix / "usr" / "share" / "sendmail" / "cf"


def prerequisites_problem() -> str | None:
    """Say why a private Sendmail cannot run here, or return None when it can."""
    prefix = sendmail_prefix()
    if not _binary(prefix).is_file() or not (_cf_dir(prefix) / "m4" / "cf.m4").is_file():
        return f"Sendmail is not unpacked in {prefix}; run scripts/install-sendmail as root"
    if os.geteuid() != 0:
        return "not running as root (the private Sendmail runs in its own mount namespace)"
    for tool in ("m4", "unshare", "mount", "mknod", "hostname"):
        if shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) is None:
            return f"the {tool!r} command is missing (scripts/install-sendmail installs m4; util-linux the rest)"
    return None


def installed_version() -> str | None:
    """The unpacked Debian version (e.g. ``8.17.1.9-2+deb12u2``), or None."""
    try:
        return (sendmail_prefix() / ".unpacked").read_text().strip() or None
    except OSError:
        return None


def has_ipv6_loopback() -> bool:
    """True when ``::1`` can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Delivered:
    """One recipient's copy as the capture mailer got it: LF line ends, the ``From `` line removed."""

    recipient: str
    raw: bytes
    #: The envelope sender, as the ``From `` line Sendmail wrote above the message names it.
    envelope_from: str = ""


_ACCEPTED = re.compile(r"^2\.0\.0 (\w+) Message accepted for delivery")


def queue_id_of(transaction: SmtpTransaction) -> str | None:
    """The queue id in Sendmail's ``250 2.0.0 QUEUEID Message accepted for delivery``, or None."""
    reply = transaction.end_of_data
    match = _ACCEPTED.match(reply.text) if reply is not None and reply.code == 250 else None
    return match.group(1) if match else None


# The capture mailer: one file per recipient copy, written under tmp/ then moved (atomic for readers).
_DELIVER = """#!/bin/sh
name="$(printf '%s' "$1" | tr -c 'A-Za-z0-9@._+-' '_').$$.$(date +%s%N)"
cat > "{mail}/tmp/$name" && mv "{mail}/tmp/$name" "{mail}/new/$name"
"""

# Runs inside `unshare -m -u`: private host name, /dev, name-service files, then the daemon.
_START = """#!/bin/sh
set -e
hostname {hostname}
mount -t tmpfs -o mode=755 tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
touch /dev/log
mount --bind {base}/log.sock /dev/log
mount --bind {base}/hosts /etc/hosts
mount --bind {base}/resolv.conf /etc/resolv.conf
mount --bind {base}/nsswitch.conf /etc/nsswitch.conf
exec {binary} -bD -C {base}/sendmail.cf
"""


class _Syslog:
    """A unix datagram socket standing in for /dev/log; a thread appends each line to a file."""

    def __init__(self, path: Path, out: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)  # Sendmail's children may run as another user
        self._sock.settimeout(0.1)
        self._out = out.open("ab", buffering=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sendmail-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            # "<22>Dec  6 07:45:56 sendmail[8504]: text": keep what follows the priority.
            self._out.write(re.sub(rb"^<\d+>", b"", line).rstrip(b"\n") + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()
        self._out.close()


@dataclass(frozen=True, slots=True)
class _Milter:
    port: int | None
    flags: str
    timeouts: str
    host: str


class SendmailInstance(MaillogReader):
    """A private Sendmail 8 daemon on loopback, its milter pointed where ``set_milter`` says."""

    log_timeout_error = SendmailHarnessError

    def __init__(self, *, milter_port: int | None = None, keep_files: bool = False) -> None:
        self.prefix = sendmail_prefix()
        self.keep_files = keep_files
        self.smtp_host = "127.0.0.1"
        self.smtp_port = free_port()
        #: The ``::1`` listener's port, or None where the machine has no IPv6 loopback.
        self.smtp6_port = free_port("::1") if has_ipv6_loopback() else None
        self._default_milter = _Milter(milter_port, "T", DEFAULT_TIMEOUTS, "127.0.0.1")
        self._milter = self._default_milter
        self._extra_cf = ""
        self._base: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._syslog: _Syslog | None = None

    # ----------------------------------------------------------------- paths

    @property
    def base(self) -> Path:
        if self._base is None:
            raise SendmailHarnessError("the instance is not started")
        return self._base

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def _log_file(self) -> Path | None:
        return None if self._base is None else self._base / "maillog"

    @property
    def queue_dir(self) -> Path:
        return self.base / "queue"

    @property
    def milter_port(self) -> int | None:
        """The port the filter points at by default (the run's bridge address)."""
        return self._default_milter.port

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> SendmailInstance:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> SendmailInstance:
        """Build the instance's tree and configuration and start the daemon; raises with its log."""
        problem = prerequisites_problem()
        if problem is not None:
            raise SendmailHarnessError(problem)
        try:
            if self._base is None:
                # Beside the unpacked Sendmail, not in /tmp: Sendmail warns about a mailer program
                # below a world-writable directory on every delivery.
                self._base = Path(tempfile.mkdtemp(prefix="run-", dir=self.prefix.parent))
                self._build_tree()
                self._syslog = _Syslog(self.base / "log.sock", self.maillog)
            self._write_cf()
            self._start_daemon()
        except BaseException:
            self.stop()  # no run directory or syslog thread left behind
            raise
        return self

    def stop(self) -> None:
        """Stop the daemon and its children; remove the tree unless ``keep_files``."""
        self._stop_daemon()
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None
        if self._base is not None and not self.keep_files:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def restart(self) -> None:
        """Stop the daemon and start it again with the current configuration (the queue is kept)."""
        self._stop_daemon()
        self._write_cf()
        self._start_daemon()

    def _build_tree(self) -> None:
        base = self.base
        for sub in ("queue", "mail/tmp", "mail/new"):
            (base / sub).mkdir(parents=True)
        os.chmod(base / "queue", 0o700)
        for name in ("statistics", "local-host-names", "trusted-users", "maillog"):
            (base / name).touch()
        shutil.copy(self.prefix / "etc" / "mail" / "helpfile", base / "helpfile")
        (base / "hosts").write_text(f"127.0.0.1 {HOSTNAME} mta localhost\n::1 localhost ip6-localhost\n")
        (base / "service.switch").write_text("hosts files\n")
        (base / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (base / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\nservices: files\n")
        deliver = base / "deliver"
        deliver.write_text(_DELIVER.format(mail=base / "mail"))
        deliver.chmod(0o755)
        start = base / "start.sh"
        start.write_text(_START.format(hostname=HOSTNAME, base=base, binary=_binary(self.prefix)))
        start.chmod(0o755)

    def _mc(self) -> str:
        base = self.base
        milter = self._milter
        lines = [
            "divert(-1)",
            "divert(0)dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{HOSTNAME}')dnl",
            f"define(`MAIL_SETTINGS_DIR', `{base}/')dnl",
            f"define(`QUEUE_DIR', `{base}/queue')dnl",
            f"define(`STATUS_FILE', `{base}/statistics')dnl",
            f"define(`confPID_FILE', `{base}/sendmail.pid')dnl",
            f"define(`HELP_FILE', `{base}/helpfile')dnl",
            f"define(`confCW_FILE', `{base}/local-host-names')dnl",
            f"define(`confCT_FILE', `{base}/trusted-users')dnl",
            f"define(`confHOSTS_FILE', `{base}/hosts')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{base}/service.switch')dnl",
            "define(`ALIAS_FILE', `')dnl",
            "define(`confTO_IDENT', `0s')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            # A loaded test machine must not make Sendmail queue or refuse mail.
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confMILTER_LOG_LEVEL', `20')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`no_default_msa')dnl",  # no listener on port 587
            f"DAEMON_OPTIONS(`Port={self.smtp_port}, Addr=127.0.0.1, Name=MTA')dnl",
        ]
        if self.smtp6_port is not None:
            lines.append(f"DAEMON_OPTIONS(`Port={self.smtp6_port}, Addr=::1, Family=inet6, Name=MTA-v6')dnl")
        if milter.port is not None:
            family = "inet6" if ":" in milter.host else "inet"
            flags = f"F={milter.flags}, " if milter.flags else ""
            lines.append(
                f"INPUT_MAIL_FILTER(`bridge', `S={family}:{milter.port}@{milter.host}, {flags}T={milter.timeouts}')dnl"
            )
        lines += [
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
        ]
        if self._extra_cf:
            lines += ["LOCAL_CONFIG", self._extra_cf.rstrip("\n")]
        lines += [
            "LOCAL_RULE_0",
            "R$*\t\t\t$#capture $: $1",
            "MAILER_DEFINITIONS",
            f"Mcapture,\tP={base}/deliver, F=lsDFMhuS8, A=deliver $u",
        ]
        return "\n".join(lines) + "\n"

    def _write_cf(self) -> None:
        mc = self.base / "sendmail.mc"
        mc.write_text(self._mc())
        cf_dir = _cf_dir(self.prefix)
        proc = subprocess.run(
            ["m4", f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4" / "cf.m4"), str(mc)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0 or proc.stderr.strip():
            raise SendmailHarnessError(f"m4 failed on {mc}: {proc.stderr.decode(errors='replace')}")
        (self.base / "sendmail.cf").write_bytes(proc.stdout)

    def cf_header_lines(self) -> int:
        """How many ``H`` lines the instance's sendmail.cf has (Sendmail's header list starts with them)."""
        text = (self.base / "sendmail.cf").read_text()
        return sum(1 for line in text.splitlines() if line.startswith("H"))

    def _start_daemon(self) -> None:
        base = self.base
        out = (base / "sendmail.out").open("ab")
        try:
            self._process = subprocess.Popen(
                ["unshare", "-m", "-u", "--propagation", "private", "/bin/sh", str(base / "start.sh")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + _START_TIMEOUT
        ports = [("127.0.0.1", self.smtp_port)]
        if self.smtp6_port is not None:
            ports.append(("::1", self.smtp6_port))
        while not all(_listening(host, port) for host, port in ports):
            if self._process.poll() is not None or time.monotonic() > deadline:
                output = (base / "sendmail.out").read_text(errors="replace")
                self._stop_daemon()
                raise SendmailHarnessError(
                    f"Sendmail did not start listening on {ports}:\n{output[-2000:]}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _instance_pids(self) -> list[int]:
        """The daemon and its children: every process whose working directory is our queue."""
        queue = str(self.queue_dir) if self._base is not None else None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd") == queue:
                    pids.append(int(entry.name))
        return pids

    def _stop_daemon(self) -> None:
        process = self._process
        self._process = None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5.0)
        kill_leftovers(self._instance_pids)

    # ----------------------------------------------------------------- configuration

    def set_milter(
        self,
        port: int | None,
        *,
        flags: str = "T",
        timeouts: str = DEFAULT_TIMEOUTS,
        host: str = "127.0.0.1",
        extra_cf: str = "",
    ) -> None:
        """Point the ``INPUT_MAIL_FILTER`` line at ``host``:``port`` (None: no filter) with ``F=flags``
        and ``T=timeouts``; ``extra_cf`` is added as LOCAL_CONFIG (e.g. more ``H`` lines). Restarts
        the daemon when anything changed."""
        milter = _Milter(port, flags, timeouts, host)
        if milter == self._milter and extra_cf == self._extra_cf:
            return
        self._milter = milter
        self._extra_cf = extra_cf
        if self._base is not None:
            self.restart()

    def reset_settings(self) -> None:
        """Back to the milter settings the instance was created with."""
        self.set_milter(
            self._default_milter.port,
            flags=self._default_milter.flags,
            timeouts=self._default_milter.timeouts,
            host=self._default_milter.host,
        )

    def reset(self) -> None:
        """Default settings, an empty queue and no delivered mail."""
        self.reset_settings()
        self.clear_queue()
        self.clear_mail()

    # ----------------------------------------------------------------- mail and queue

    def delivered(self) -> list[Delivered]:
        """Every recipient copy delivered so far, oldest first."""
        out = []
        files = sorted((self.base / "mail" / "new").iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        for path in files:
            raw = path.read_bytes()
            envelope_from = ""
            if raw.startswith(b"From "):
                from_line, _, raw = raw.partition(b"\n")
                envelope_from = from_line.split(b" ")[1].decode(errors="replace")
            out.append(Delivered(path.name.rsplit(".", 2)[0], raw, envelope_from))
        return out

    def wait_for_delivery(self, count: int, timeout: float = 10.0) -> list[Delivered]:
        """Wait until ``count`` recipient copies were delivered; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered()
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise SendmailHarnessError(
                    f"{len(got)} of {count} deliveries after {timeout}s; queue: {self.queue_ids()}\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def wait_for_empty_queue(self, timeout: float = 10.0) -> None:
        """Wait until no message waits in the queue (quarantined ones aside): every delivery is over."""
        deadline = time.monotonic() + timeout
        while self.queue_ids():
            if time.monotonic() > deadline:
                raise SendmailHarnessError(
                    f"the queue still holds {self.queue_ids()} after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def clear_mail(self) -> None:
        for sub in ("new", "tmp"):
            for path in (self.base / "mail" / sub).iterdir():
                path.unlink()

    def queue_ids(self) -> list[str]:
        """Queue ids of the messages in the queue (not quarantined)."""
        return sorted(p.name[2:] for p in self.queue_dir.iterdir() if p.name.startswith("qf"))

    def quarantined(self) -> dict[str, str]:
        """Quarantined messages: queue id -> the reason recorded in the queue file."""
        out = {}
        for path in self.queue_dir.iterdir():
            if path.name.startswith("hf"):
                reason = next(
                    (line[1:] for line in path.read_text(errors="replace").splitlines() if line.startswith("q")), ""
                )
                out[path.name[2:]] = reason
        return out

    def clear_queue(self) -> None:
        for path in self.queue_dir.iterdir():
            if path.is_file():
                path.unlink()

    # ----------------------------------------------------------------- SMTP

    def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        message: bytes,
        *,
        helo: str = DEFAULT_HELO,
        timeout: float = SMTP_TIMEOUT,
        ipv6: bool = False,
    ) -> SmtpResult:
        """One message over a fresh SMTP connection (to the ``::1`` listener with ``ipv6``); never raises."""
        host, port = self._listener(ipv6)
        return send_smtp(host, port, mail_from, rcpts, message, helo=helo, timeout=timeout)

    def smtp_session(
        self, *, helo: str = DEFAULT_HELO, timeout: float = SMTP_TIMEOUT, ipv6: bool = False
    ) -> SmtpSession:
        """An unopened ``SmtpSession`` to this instance (use it with ``with``)."""
        host, port = self._listener(ipv6)
        return SmtpSession(host, port, helo=helo, timeout=timeout)

    def _listener(self, ipv6: bool) -> tuple[str, int]:
        if not ipv6:
            return self.smtp_host, self.smtp_port
        if self.smtp6_port is None:
            raise SendmailHarnessError("this machine has no IPv6 loopback")
        return "::1", self.smtp6_port
