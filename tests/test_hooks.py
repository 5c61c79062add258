"""milterbridge.hooks: the registrar against a real scanner, the books the calls read, and the config keys."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from pathlib import Path

import pytest

from milterbridge.config import ConfigError, load_config
from milterbridge.hooks import (
    GONE_PREFIX,
    FileHookBook,
    HookBook,
    Published,
    Registrar,
    file_publisher,
    fingerprint,
    read_published,
    take_gone_reports,
    wanted_properties,
)
from milterbridge.milter.constants import Event
from milterbridge.mtahooks.registration import Registration
from milterbridge.settings import EndpointProtocol, EndpointSettings
from tests.conftest import assert_no_leaked_tasks
from tests.fakes.hooks_scanner import TOKEN, HooksScanner


def endpoint(url: str, **overrides) -> EndpointSettings:
    fields = {
        "name": "scan",
        "url": url,
        "protocol": EndpointProtocol.MTA_HOOKS,
        "events": frozenset({Event.CONNECT, Event.EOM}),
        "headers": (("Authorization", f"Bearer {TOKEN}"),),
    }
    return EndpointSettings(**{**fields, **overrides})


async def registered(settings: EndpointSettings) -> tuple[HookBook, Registrar]:
    """A book and its registrar, after the registrar's first try for ``settings``."""
    book = HookBook()
    registrar = Registrar(book.publish)
    registrar.update([settings])
    await registrar.wait_registered(5.0)
    return book, registrar


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the scanner has no event to wait on
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_registration_reaches_the_book_and_is_deleted_at_close():
    async with HooksScanner() as scanner:
        settings = endpoint(scanner.url())
        book, registrar = await registered(settings)

        [registration] = scanner.active()
        assert registration.stages == ["connect", "data"]
        assert registration.properties == list(wanted_properties(settings))
        assert "/rawMessage" not in registration.properties  # include_body is off
        active = book.get(settings)
        assert active is not None
        assert active[0].id == registration.id
        assert active[1].settings.url == scanner.url(f"/v1/hooks/invoke/{registration.id}")
        # Other settings (a reload on its way) do not get this registration.
        assert book.get(dataclasses.replace(settings, url=scanner.url("/v1/hooks/register"))) is None

        await registrar.aclose()
        assert scanner.deregistered == [registration.id]
        assert book.get(settings) is None
        assert_no_leaked_tasks()


@pytest.mark.asyncio
async def test_the_registration_url_can_be_given_without_discovery():
    async with HooksScanner() as scanner:
        _, registrar = await registered(endpoint(scanner.url("/v1/hooks/register"), include_body=True))
        [registration] = scanner.active()
        assert registration.properties[-1] == "/rawMessage"
        await registrar.aclose()


@pytest.mark.asyncio
async def test_a_failed_registration_is_logged_and_tried_again(caplog, monkeypatch):
    monkeypatch.setattr("milterbridge.hooks.RETRY_FIRST", 0.05)
    caplog.set_level(logging.INFO, "milterbridge.hooks")
    async with HooksScanner() as scanner:
        settings = endpoint(scanner.url(), headers=(("Authorization", "Bearer wrong"),))
        book, registrar = await registered(settings)
        assert book.missing([settings]) == ["scan"]
        await until(lambda: len([r for r in caplog.records if "registration failed" in r.getMessage()]) >= 2)
        failure = next(r for r in caplog.records if "registration failed" in r.getMessage())
        assert "answered 401" in failure.getMessage()
        assert "INVALID_CREDENTIALS" in failure.getMessage()
        await registrar.aclose()
        assert scanner.registrations == {}


@pytest.mark.asyncio
async def test_a_scanner_that_grants_fewer_properties_gets_only_those():
    async with HooksScanner(properties=["/stage", "/envelope"]) as scanner:
        settings = endpoint(scanner.url())
        book, registrar = await registered(settings)
        active = book.get(settings)
        assert active is not None
        assert active[0].properties == ("/stage", "/envelope")
        await registrar.aclose()


@pytest.mark.asyncio
async def test_reload_keeps_an_unchanged_registration_and_retires_a_changed_one(monkeypatch):
    monkeypatch.setattr("milterbridge.hooks.RETIRE_AFTER", 0.3)
    async with HooksScanner() as scanner:
        settings = endpoint(scanner.url())
        book, registrar = await registered(settings)
        [first] = scanner.active()

        registrar.update([dataclasses.replace(settings, timeout=2.0)])  # does not touch the registration
        assert [r.id for r in scanner.active()] == [first.id]
        assert book.get(dataclasses.replace(settings, timeout=2.0))[0].id == first.id

        changed = dataclasses.replace(settings, events=frozenset({Event.EOM}))
        registrar.update([changed])
        await until(lambda: book.get(changed) is not None)
        second = book.get(changed)[0]
        assert second.id != first.id
        assert scanner.registrations[second.id].stages == ["data"]
        # Connections that started before the reload keep the old registration a while ...
        assert book.get(settings)[0].id == first.id
        assert first.id not in scanner.deregistered
        # ... then it is deleted.
        await until(lambda: first.id in scanner.deregistered)
        assert book.get(settings) is None
        assert book.get(changed)[0].id == second.id

        registrar.update([])  # the endpoint is gone
        await until(lambda: second.id in scanner.deregistered)
        assert book.missing([changed]) == ["scan"]
        await registrar.aclose()
        registrar.update([changed])  # after aclose (a SIGHUP during the stop): nothing starts
        assert_no_leaked_tasks()
        assert len(scanner.registrations) == 2


@pytest.mark.asyncio
async def test_a_changed_header_tls_or_property_needs_a_new_registration():
    settings = endpoint("https://scanner.example/.well-known/mta-hooks")
    same = {fingerprint(dataclasses.replace(settings, timeout=9.0, retry=False, max_concurrency=3))}
    assert same == {fingerprint(settings)}
    changed = [
        dataclasses.replace(settings, headers=(("Authorization", "Bearer other"),)),
        dataclasses.replace(settings, tls=dataclasses.replace(settings.tls, verify=False)),
        dataclasses.replace(settings, properties=("/stage",)),
        dataclasses.replace(settings, include_body=True),
        dataclasses.replace(settings, url="https://scanner.example/v1/hooks/register"),
    ]
    prints = {fingerprint(s) for s in changed}
    assert len(prints) == len(changed)
    assert fingerprint(settings) not in prints


@pytest.mark.asyncio
async def test_a_registration_that_would_expire_at_once_is_refused(caplog, monkeypatch):
    monkeypatch.setattr("milterbridge.hooks.RETRY_FIRST", 0.05)
    caplog.set_level(logging.ERROR, "milterbridge.hooks")
    async with HooksScanner(ttl=-60.0) as scanner:  # expiresAt a minute ago: a clock off
        _, registrar = await registered(endpoint(scanner.url()))
        await asyncio.sleep(0.3)
        await registrar.aclose()
    assert any("is already past" in r.getMessage() for r in caplog.records)
    assert len(scanner.registrations) <= 4  # tried again with a pause each time, not in a loop


@pytest.mark.asyncio
async def test_a_failed_publish_is_tried_again():
    published = []
    failures = iter([OSError("disk full"), None])

    def publish(entries):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        published.append([p.registration.id for p in entries])

    async with HooksScanner() as scanner:
        registrar = Registrar(publish)
        registrar.update([endpoint(scanner.url())])
        await registrar.wait_registered(5.0)
        [registration] = scanner.active()
        assert published == [[registration.id]]
        await registrar.aclose()


@pytest.mark.asyncio
async def test_a_gone_report_registers_again_and_others_are_ignored():
    async with HooksScanner() as scanner:
        book = HookBook(lambda name, registration: registrar.gone(name, registration))
        registrar = Registrar(book.publish)
        settings = endpoint(scanner.url())
        registrar.update([settings])
        await registrar.wait_registered(5.0)
        [first] = scanner.active()

        book.report_gone("scan", "reg_other")  # not the current one: nothing happens
        book.report_gone("nobody", first.id)
        await asyncio.sleep(0.1)
        assert len(scanner.registrations) == 1

        book.report_gone("scan", first.id)
        await until(lambda: len(scanner.registrations) == 2 and book.get(settings) is not None)
        assert book.get(settings)[0].id != first.id
        await registrar.aclose()


@pytest.mark.asyncio
async def test_workers_read_the_shared_file_and_report_through_it(tmp_path: Path):
    async with HooksScanner() as scanner:
        registrar = Registrar(file_publisher(str(tmp_path)))
        settings = endpoint(scanner.url())
        registrar.update([settings])
        await registrar.wait_registered(5.0)
        [first] = scanner.active()

        worker = FileHookBook(str(tmp_path))
        await worker.wait_for([settings], 1.0)
        assert worker.get(settings)[0].id == first.id

        worker.report_gone("scan", first.id)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(GONE_PREFIX)] == [GONE_PREFIX + "scan"]
        for name, registration in take_gone_reports(str(tmp_path)):
            registrar.gone(name, registration)
        assert take_gone_reports(str(tmp_path)) == []  # each report is read once

        def renewed() -> bool:
            worker.refresh()
            active = worker.get(settings)
            return active is not None and active[0].id != first.id

        await until(renewed)
        await registrar.aclose()
        worker.refresh()
        assert worker.missing([settings]) == ["scan"]


@pytest.mark.asyncio
async def test_a_restarted_registrar_leaves_the_published_registrations_until_it_has_its_own(
    tmp_path: Path, closed_port: int
):
    settings = endpoint(f"http://127.0.0.1:{closed_port}/.well-known/mta-hooks")
    registration = Registration("reg_1", "http://127.0.0.1:9/hook", None, None, ("connect", "data"), ("/stage",))
    file_publisher(str(tmp_path))([Published("scan", fingerprint(settings), registration)])

    restarted = Registrar(file_publisher(str(tmp_path)))  # its scanner cannot be reached
    restarted.update([settings])
    await restarted.wait_registered(5.0)
    worker = FileHookBook(str(tmp_path))
    worker.refresh()
    assert worker.get(settings)[0] == registration
    await restarted.aclose()


@pytest.mark.asyncio
async def test_a_renewed_registration_is_deleted_later_and_never_published_again(monkeypatch):
    monkeypatch.setattr("milterbridge.hooks.RETIRE_AFTER", 0.3)
    async with HooksScanner(ttl=2.0) as scanner:  # renewed after 1 s
        settings = endpoint(scanner.url())
        book, registrar = await registered(settings)
        [first] = scanner.active()
        await until(lambda: book.get(settings)[0].id != first.id)
        second = book.get(settings)[0]
        assert first.id not in scanner.deregistered  # calls that took it may still be on their way
        await until(lambda: first.id in scanner.deregistered)
        assert book.get(settings)[0].id == second.id
        await registrar.aclose()
        assert second.id in scanner.deregistered


@pytest.mark.asyncio
async def test_a_restarted_registrar_adopts_and_later_deletes_what_its_predecessor_published(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setattr("milterbridge.hooks.RETIRE_AFTER", 0.3)
    async with HooksScanner() as scanner:
        settings = endpoint(scanner.url())
        gone = endpoint(scanner.url(), name="gone")
        crashed = Registrar(file_publisher(str(tmp_path)))
        crashed.update([settings, gone])
        await crashed.wait_registered(5.0)
        before = {r.name: r.id for r in scanner.active()}
        assert len(before) == 2
        # The old registrar is gone without a word (SIGKILL): its tasks just stop.
        for task in [s.task for s in crashed._scanners.values()]:
            task.cancel()
        await crashed._client().close()  # what the process's end does to its connections

        published = read_published(str(tmp_path / "mta-hooks.json"))
        restarted = Registrar(file_publisher(str(tmp_path)))
        restarted.adopt(published, [settings])  # "gone" is no longer configured: it cannot be deleted
        restarted.update([settings])
        worker = FileHookBook(str(tmp_path))
        worker.refresh()
        assert worker.get(settings) is not None
        await restarted.wait_registered(5.0)
        await until(lambda: before["milterbridge scan"] in scanner.deregistered)
        worker.refresh()
        assert worker.get(settings)[0].id not in before.values()
        assert before["milterbridge gone"] not in scanner.deregistered
        await restarted.aclose()
        assert read_published(str(tmp_path / "mta-hooks.json")) == []


def load(tmp_path: Path, text: str):
    path = tmp_path / "milterbridge.toml"
    path.write_text(text)
    return load_config(str(path), {})


BASE = '[[endpoints]]\nname = "scan"\nurl = "https://scanner.example/.well-known/mta-hooks"\n'


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ('protocol = "mta-hooks"\nevents = ["eom", "abort"]\n', "endpoints.scan.events", "has no stage for it"),
        ('protocol = "stalwart"\nevents = ["header", "eoh"]\n', "endpoints.scan.events", "has no stage for them"),
        ('properties = ["/stage"]\n', "endpoints.scan.properties", 'only for protocol = "mta-hooks"'),
        ('protocol = "stalwart"\nproperties = ["/stage"]\n', "endpoints.scan.properties", "only for protocol"),
        ('protocol = "mta-hooks"\nproperties = ["/rawMessage"]\n', "endpoints.scan.properties", "include_body"),
        ('protocol = "mta-hooks"\nproperties = ["/senderAuth"]\n', "endpoints.scan.properties", "not a property"),
        ('protocol = "mta-hook"\n', "endpoints.scan.protocol", "is not one of"),
        (
            'protocol = "mta-hooks"\nheaders = { X-MTA-Hooks-Request-Id = "x" }\n',
            "endpoints.scan.headers.X-MTA-Hooks-Request-Id",
            "set by milterbridge",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, extra, key, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, BASE + extra)
    assert info.value.key == key
    assert message in str(info.value)


def test_a_hook_endpoint_loads(tmp_path):
    config = load(tmp_path, BASE + 'protocol = "mta-hooks"\nevents = ["connect", "helo", "mail", "rcpt", "eom"]\n')
    [settings] = config.endpoints
    assert settings.protocol is EndpointProtocol.MTA_HOOKS
    assert wanted_properties(settings)[-1] != "/rawMessage"
    assert wanted_properties(dataclasses.replace(settings, include_body=True))[-1] == "/rawMessage"
