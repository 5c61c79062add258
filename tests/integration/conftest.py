"""Fixtures for the real-Postfix suite.

One private Postfix instance serves the whole run (``postfix_instance``, session scope);
``postfix`` hands it to a test after emptying the queue and the Maildir and restoring the
default settings, which is far cheaper than an instance per test.

When Postfix is missing or we are not root, the tests are skipped with a loud reason, except
under ``CI=true``, where they fail: CI must never skip the end-to-end suite silently. The
terminal summary names the Postfix version used (or the reason for skipping).

Set ``MILTERBRIDGE_KEEP_POSTFIX=1`` to keep the instance's directory (config, queue, maillog,
Maildir) after the run for inspection; the summary prints its path.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio

# The end-to-end suite's fixtures (a bridge runner and fake endpoints) live with their helpers.
from . import sendmail as sm
from .bridge import BridgeRunner, bridges, milter_listen, mta, processes, webhooks
from .postfix import PostfixInstance, closed_port, installed_version, prerequisites_problem

__all__ = ["bridges", "milter_listen", "mta", "processes", "webhooks"]

_SUMMARY = pytest.StashKey[list[str]]()
_SKIPPED = pytest.StashKey[str]()


def _summary(config: pytest.Config) -> list[str]:
    return config.stash.setdefault(_SUMMARY, [])


def _require(config: pytest.Config, mta: str, problem: str | None) -> None:
    """Fail (in CI) or skip loudly (elsewhere) when a private ``mta`` cannot run here."""
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, but the real-{mta} tests cannot run: {problem}", pytrace=False)
    config.stash[_SKIPPED] = f"{mta}: {problem}"
    pytest.skip(f"REAL-{mta.upper()} TESTS SKIPPED: {problem}")


def _require_postfix(config: pytest.Config) -> None:
    _require(config, "Postfix", prerequisites_problem())


@pytest.fixture(scope="session")
def postfix_version(pytestconfig: pytest.Config) -> str:
    """The installed Postfix's ``mail_version``, e.g. ``"3.7.11"``."""
    _require_postfix(pytestconfig)
    version = installed_version()
    assert version is not None, "postconf -d mail_version printed nothing"
    return version


@pytest.fixture(scope="session")
def postfix_instance(pytestconfig: pytest.Config, postfix_version: str) -> Iterator[PostfixInstance]:
    """The run's private Postfix, started once; prefer the reset-per-test ``postfix`` fixture."""
    keep = os.environ.get("MILTERBRIDGE_KEEP_POSTFIX", "") not in ("", "0")
    instance = PostfixInstance(keep_files=keep)
    with instance:
        _summary(pytestconfig).append(
            f"Postfix version: {postfix_version} (private instance on {instance.smtp_host}:{instance.smtp_port})"
        )
        if keep:
            _summary(pytestconfig).append(f"Postfix instance kept in {instance.base}")
        yield instance


@pytest.fixture
def postfix(postfix_instance: PostfixInstance) -> PostfixInstance:
    """The shared Postfix with an empty queue, an empty Maildir and default settings (no milter)."""
    # Reset before rather than after the test, so a test always starts clean even when the
    # previous one broke the instance's state halfway through a teardown.
    postfix_instance.reset()
    return postfix_instance


@pytest.fixture(autouse=True)
def _settled_postlog(request: pytest.FixtureRequest) -> None:
    """After ``postfix`` reset (and reloaded) the instance, wait until postlogd runs again.

    A test that changes main.cf right after the reset could otherwise catch the new postlogd
    while it starts and wedge the whole instance (see ``PostfixInstance.settle_logging``). Tests that
    do not use ``postfix`` are left alone.
    """
    if "postfix" in request.fixturenames:
        request.getfixturevalue("postfix").settle_logging()


@pytest.fixture(scope="session")
def sendmail_instance(pytestconfig: pytest.Config, milter_listen: str) -> Iterator[sm.SendmailInstance]:
    """The run's private Sendmail, its filter pointed at the run's fixed bridge address (``milter_listen``)."""
    _require(pytestconfig, "Sendmail", sm.prerequisites_problem())
    keep = os.environ.get("MILTERBRIDGE_KEEP_POSTFIX", "") not in ("", "0")
    port = int(milter_listen.rsplit(":", 1)[1])
    with sm.SendmailInstance(milter_port=port, keep_files=keep) as instance:
        ipv6 = f", [::1]:{instance.smtp6_port}" if instance.smtp6_port else ", no IPv6 loopback"
        _summary(pytestconfig).append(
            f"Sendmail version: {sm.installed_version()} (private instance on "
            f"{instance.smtp_host}:{instance.smtp_port}{ipv6}; {instance.cf_header_lines()} H lines in its cf)"
        )
        if keep:
            _summary(pytestconfig).append(f"Sendmail instance kept in {instance.base}")
        yield instance


@pytest.fixture
def sendmail(sendmail_instance: sm.SendmailInstance) -> sm.SendmailInstance:
    """The shared Sendmail with default settings, an empty queue and no delivered mail."""
    sendmail_instance.reset()
    return sendmail_instance


@pytest_asyncio.fixture
async def sendmail_bridges(sendmail: sm.SendmailInstance, milter_listen: str) -> AsyncIterator[BridgeRunner]:
    """Start bridges with ``await sendmail_bridges.start(...)``: Sendmail's filter already points at them."""
    runner = BridgeRunner(None, milter_listen)
    try:
        yield runner
    finally:
        await runner.aclose()


@pytest.fixture
def closed_milter_port() -> Iterator[int]:
    """A loopback port that refuses connections, to play a milter that is down."""
    with closed_port() as port:
        yield port


@pytest.fixture
def postfix_report(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Add a line to the real-Postfix section of the terminal summary (shown even without -s)."""
    return _summary(pytestconfig).append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the Postfix version and timings, or shout why the suite was skipped."""
    skipped = config.stash.get(_SKIPPED, None)
    if skipped is not None:
        terminalreporter.write_sep("!", f"REAL-MTA TESTS SKIPPED: {skipped}", yellow=True, bold=True)
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.write_sep("-", "real MTAs")
        for line in lines:
            terminalreporter.write_line(line)
