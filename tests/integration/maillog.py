"""Reading a private MTA's log file: what the Postfix and Sendmail harnesses share."""

from __future__ import annotations

import re
import time
from pathlib import Path


class MaillogReader:
    """Log-reading methods for an MTA instance; ``_log_file`` names its file (None before it starts)."""

    #: What ``wait_for_log`` raises when no line matched in time (a harness's own TimeoutError).
    log_timeout_error: type[Exception] = TimeoutError

    def _log_file(self) -> Path | None:
        raise NotImplementedError

    def log_text(self) -> str:
        """The whole log of this instance ("" before it starts)."""
        path = self._log_file()
        try:
            return path.read_text(errors="replace") if path is not None else ""
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_mark(self) -> int:
        """An offset into the log; pass it to ``log_since`` to read only newer lines."""
        path = self._log_file()
        try:
            return path.stat().st_size if path is not None else 0
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> str:
        """The log text written after ``mark`` (from ``log_mark``)."""
        path = self._log_file()
        if path is None:
            return ""
        try:
            with path.open("rb") as fh:
                fh.seek(mark)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """Poll until a line after ``since`` matches the regex ``pattern``; return the match.

        The MTA logs asynchronously (Postfix through postlogd, Sendmail through syslog), so a
        line may appear shortly after the SMTP reply.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_since(since))
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise self.log_timeout_error(
                    f"no maillog line matched {pattern!r} after {timeout}s:\n{self.log_since(since)[-4000:]}"
                )
            time.sleep(0.02)
