"""A hostile or broken MTA against the real listener on loopback, with raw sockets.

Each case misbehaves on one connection and checks three things: that connection is
closed, the reason is logged, and a well-behaved client running at the same time still
gets its message through. Limits are made small through ``SessionLimits`` so that the
cases stay fast; the defaults are in ``milterbridge.milter.session.SessionLimits`` and
``ServerSettings`` (docs/reliability.md lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import struct
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from milterbridge.client import Envelope, MilterClient
from milterbridge.connection import ConnectionSettings
from milterbridge.milter import messages as m
from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL, Family
from milterbridge.milter.negotiation import Requirements
from milterbridge.milter.session import MilterSession, SessionLimits
from milterbridge.policy.model import OnError
from milterbridge.server import MilterServer
from tests.conftest import running_server
from tests.fakes.handlers import StaticHandler
from tests.fakes.webhooks import FakeResponse, FakeWebhooks
from tests.hostile import MESSAGE, Bridge, endpoint, host_port, rss_kib, well_behaved

OFFER = m.Negotiate(version=6, actions=ALL_ACTIONS, protocol=ALL_PROTOCOL)
#: The client address the hostile connections present (the well-behaved one uses 192.0.2.1).
HOSTILE_ADDRESS = "198.51.100.7"
#: Seconds a misbehaving connection may take to be closed.
CLOSE_WITHIN = 3.0


def every_event(session: MilterSession) -> StaticHandler:
    """A fixed policy that asks the MTA for every event, with a reply to each."""
    return StaticHandler(session, Requirements())


class Raw:
    """A raw TCP connection to the listener, for writing bytes no real MTA would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> Raw:
        reader, writer = await asyncio.open_connection(*host_port(address))
        return cls(reader, writer)

    async def negotiate(self) -> None:
        """OPTNEG with Postfix's offer; read the 'O' answer."""
        await self.send(OFFER.to_frame())
        (length,) = struct.unpack(">I", await self.reader.readexactly(4))
        assert (await self.reader.readexactly(length))[:1] == b"O"

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_peer(self, timeout: float = CLOSE_WITHIN) -> bool:
        """True once the bridge has closed the connection (EOF or reset) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def frames(*commands: m.Command) -> bytes:
    return b"".join(c.to_frame() for c in commands)


OPENING = frames(
    m.Connect(hostname=b"hostile.example", family=Family.INET, port=4000, address=HOSTILE_ADDRESS.encode()),
    m.Helo(hostname=b"hostile.example"),
)


def closing_reason(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reasons the listener logged for closing connections."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "milterbridge.connection" and ("closing" in r.getMessage() or "closed" in r.getMessage())
    ]


async def misbehave_beside_good_client(address: str, hostile: Callable[[], Awaitable[None]]) -> None:
    """Run ``hostile`` while a well-behaved session is open; the good one must complete."""
    good = await MilterClient.open(address)
    try:
        await good.negotiate()
        await good.open_session(Envelope())
        await hostile()
        result = await good.send_transaction(Envelope(), MESSAGE)
        assert result.final == m.Accept() or isinstance(result.final, m.Continue)
        await good.quit()
    finally:
        await good.aclose()


# --------------------------------------------------------------------------
# frames that lie about their size, or stop halfway


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("declared", "after_opening"),
    [
        pytest.param(0xFFFFFFFF, False, id="4GiB-before-optneg"),
        pytest.param(0xFFFFFFFF, True, id="4GiB-mid-session"),
        pytest.param(64 * 1024 + 2, True, id="limit-plus-one"),
        pytest.param(0x7FFFFFFF, True, id="2GiB"),
    ],
)
async def test_frame_declaring_huge_length(
    declared: int, after_opening: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame header announcing more than max_frame_bytes closes the connection before any payload is read."""
    settings = ConnectionSettings(limits=SessionLimits(max_frame_bytes=64 * 1024))
    async with running_server(every_event, settings=settings) as server:

        async def hostile() -> None:
            raw = await Raw.open(server.bound[0])
            if after_opening:
                await raw.negotiate()
                await raw.send(OPENING)
            rss_before = rss_kib()
            await raw.send(struct.pack(">I", declared) + b"B" + b"x" * 1000)
            assert await raw.closed_by_peer()
            # Nothing near the declared size was allocated for it.
            assert rss_kib() - rss_before < 32 * 1024
            await raw.aclose()

        await misbehave_beside_good_client(server.bound[0], hostile)
    assert any("exceeds the limit" in reason for reason in closing_reason(caplog))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(struct.pack(">I", 100) + b"L" + b"Subject\0", id="payload-cut"),
        pytest.param(b"\x00\x00", id="length-cut"),
        pytest.param(struct.pack(">I", 5), id="code-missing"),
    ],
)
async def test_truncated_frame_then_eof(tail: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A frame cut short by EOF frees the connection and logs that it ended mid-frame."""
    caplog.set_level(logging.INFO, logger="milterbridge.connection")
    async with running_server(every_event) as server:

        async def hostile() -> None:
            raw = await Raw.open(server.bound[0])
            await raw.negotiate()
            await raw.send(OPENING + frames(m.MailFrom(address=b"<a@b>")) + tail)
            raw.writer.write_eof()
            assert await raw.closed_by_peer()
            await raw.aclose()

        await misbehave_beside_good_client(server.bound[0], hostile)
        assert server.state.total_connections == 2
    assert any("middle of a frame" in reason for reason in closing_reason(caplog))


# --------------------------------------------------------------------------
# slowloris


@pytest.mark.asyncio
async def test_slow_bytes_hit_the_idle_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A byte less often than idle_timeout: the connection is closed as idle (default 3600 s)."""
    caplog.set_level(logging.INFO, logger="milterbridge.connection")
    assert ConnectionSettings().idle_timeout == 3600.0
    settings = ConnectionSettings(idle_timeout=0.3)
    async with running_server(every_event, settings=settings) as server:

        async def hostile() -> None:
            raw = await Raw.open(server.bound[0])
            frame = OFFER.to_frame()
            started = time.monotonic()
            for byte in frame:
                await raw.send(bytes([byte]))
                if await raw.closed_by_peer(timeout=0.6):
                    break
            # The idle check re-arms at least 1 s apart, so allow up to about 1.3 s plus slack.
            assert time.monotonic() - started < 3.0
            assert raw.reader.at_eof()
            await raw.aclose()

        # The good client runs alongside in one quick session (it would hit the short timeout too).
        _, result = await asyncio.gather(hostile(), well_behaved(server.bound[0]))
        assert result.final == m.Accept()
    assert any("idle" in reason for reason in closing_reason(caplog))


@pytest.mark.asyncio
async def test_slowloris_never_completing_a_frame_is_closed() -> None:
    """Bytes faster than idle_timeout that never complete a frame still get the connection closed."""
    settings = ConnectionSettings(idle_timeout=0.3)
    async with running_server(every_event, settings=settings) as server:
        raw = await Raw.open(server.bound[0])
        await raw.negotiate()
        # A header frame announcing 1000 bytes, fed one byte every 0.1 s (3x faster than the timeout).
        stream = struct.pack(">I", 1000) + b"L" + b"x" * 995
        closed = False
        started = time.monotonic()
        for byte in stream:
            try:
                await raw.send(bytes([byte]))
            except ConnectionError:
                closed = True
                break
            if await raw.closed_by_peer(timeout=0.1):
                closed = True
                break
            if time.monotonic() - started > 2.5:
                break
        await raw.aclose()
        assert closed, "still open after 2.5 s of trickling, idle_timeout 0.3 s"


def folds_no_reply_commands(session: MilterSession) -> StaticHandler:
    """Every event delivered without a reply, the ones the session can fold in left to it."""
    session.set_unsubscribed({m.RcptTo, m.Data, m.Header, m.EndOfHeaders})
    return StaticHandler(session, Requirements(reply_events=frozenset()))


@pytest.mark.asyncio
async def test_folded_commands_count_as_activity() -> None:
    """Headers the session folds in by itself keep the connection alive like any other command."""
    settings = ConnectionSettings(idle_timeout=0.3)
    async with (
        running_server(folds_no_reply_commands, settings=settings) as server,
        await MilterClient.open(server.bound[0]) as client,
    ):
        await client.negotiate()
        await client.open_session(Envelope())
        assert await client.mail_from(b"<a@b>") is None  # no-reply
        started = time.monotonic()
        while time.monotonic() - started < 1.2:  # 4x the idle timeout, a header every 0.1 s
            assert await client.header(b"X-Slow", b"drip") is None
            await asyncio.sleep(0.1)
        result = await client.end_of_message()
        assert result.reply == m.Accept()
        await client.quit()


# --------------------------------------------------------------------------
# many idle connections


@pytest.mark.asyncio
async def test_thousand_idle_connections_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """1,000 negotiated idle connections cost a bounded amount of memory; a real client still gets served."""
    count = 1000
    gc.collect()
    async with running_server(every_event, max_connections=count + 10) as server:
        loop = asyncio.get_running_loop()
        host, port = host_port(server.bound[0])
        await well_behaved(server.bound[0])  # warm up code paths and pools before measuring
        gc.collect()
        before = rss_kib()
        tracemalloc.start()
        socks: list[socket.socket] = []
        try:
            offer = OFFER.to_frame()
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                socks.append(sock)
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, offer)
            for sock in socks:
                header = await loop.sock_recv(sock, 5)
                assert header[4:5] == b"O"
            assert len(server.state.connections) == count
            gc.collect()
            after = rss_kib()
            heap, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            result = await well_behaved(server.bound[0])
            assert result.final == m.Accept()
        finally:
            for sock in socks:
                sock.close()
        await asyncio.wait_for(server.state.idle.wait(), 5)
    delta = after - before
    with capsys.disabled():
        print(
            f"\nRSS before {before} KiB, with {count} idle connections {after} KiB: +{delta} KiB "
            f"({delta / count:.1f} KiB per connection, both socket ends in this process); "
            f"Python heap allocated meanwhile {heap // 1024} KiB ({heap / count / 1024:.1f} KiB per connection)"
        )
    assert delta < 64 * 1024, f"{delta} KiB for {count} idle connections"
    assert heap < 32 * 1024 * 1024


# --------------------------------------------------------------------------
# connections dropped mid-message


@pytest.mark.asyncio
async def test_connections_dropped_mid_message_are_freed(caplog: pytest.LogCaptureFixture) -> None:
    """Clients vanishing at every stage (also while a webhook is pending) leave no connection or task behind."""
    caplog.set_level(logging.INFO)
    async with FakeWebhooks() as fake:
        fake.set_default(
            lambda req: (
                FakeResponse.never_answer()
                if req.json["session"]["client"]["address"] == HOSTILE_ADDRESS
                else FakeResponse.decision("accept")
            ),
            event="eom",
        )
        ep = endpoint(fake, "policy", timeout=5.0, on_error=OnError.TEMPFAIL)
        async with Bridge(fake, ep) as bridge:
            stages = ["after-helo", "after-rcpt", "in-headers", "mid-frame", "waiting-for-eom", "reset"]

            async def drop(stage: str) -> None:
                raw = await Raw.open(bridge.address)
                await raw.negotiate()
                stream = OPENING
                if stage != "after-helo":
                    stream += frames(m.MailFrom(address=b"<a@b>"), m.RcptTo(address=b"<c@d>"))
                if stage in ("in-headers", "mid-frame", "waiting-for-eom", "reset"):
                    stream += frames(m.Data(), m.Header(name=b"Subject", value=b" x"))
                if stage == "mid-frame":
                    stream += struct.pack(">I", 50) + b"B" + b"partial"
                if stage in ("waiting-for-eom", "reset"):
                    stream += frames(m.EndOfHeaders(), m.BodyChunk(data=b"hi\r\n"), m.EndOfMessage())
                await raw.send(stream)
                await asyncio.sleep(0.1)  # let the bridge read it (and start the eom webhook)
                if stage == "reset":
                    sock = raw.writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await raw.aclose()

            good = asyncio.create_task(well_behaved(bridge.address))
            await asyncio.gather(*(drop(stage) for stage in stages * 3))
            # The eom webhooks of the vanished clients are cancelled, not left hanging.
            await fake.wait_until(lambda: len(fake.cancelled) >= 6, timeout=5)
            result = await good
            assert result.final == m.Accept()
            await asyncio.wait_for(bridge.server.state.idle.wait(), 5)
    closed = [r for r in caplog.records if r.getMessage() == "connection closed"]
    assert len(closed) >= len(stages) * 3
    aborted = [r for r in caplog.records if r.getMessage() == "message aborted"]
    assert len(aborted) >= 5 * 3  # every stage but after-helo had a message open


# --------------------------------------------------------------------------
# illegal orders and limits


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        pytest.param(frames(OFFER), "Negotiate not allowed", id="second-optneg"),
        pytest.param(frames(m.RcptTo(address=b"<a@b>")), "RcptTo not allowed", id="rcpt-before-mail"),
        pytest.param(frames(m.Header(name=b"a", value=b"b")), "Header not allowed", id="header-before-mail"),
        pytest.param(frames(m.EndOfMessage()), "EndOfMessage not allowed", id="eom-without-message"),
        pytest.param(frames(m.BodyChunk(data=b"x")), "BodyChunk not allowed", id="body-without-message"),
        pytest.param(frames(m.Connect(hostname=b"again")), "Connect not allowed", id="second-connect"),
        pytest.param(
            frames(m.MailFrom(address=b"<a@b>"), m.RcptTo(address=b"<c@d>"), m.Data(), m.RcptTo(address=b"<e@f>")),
            "RcptTo not allowed",
            id="rcpt-after-data",
        ),
        pytest.param(struct.pack(">I", 1) + b"Z", "unknown message code", id="unknown-code"),
        pytest.param(struct.pack(">I", 3) + b"Hab", "NUL", id="helo-without-nul"),
    ],
)
async def test_illegal_command_order(stream: bytes, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    """A command out of order (or malformed) closes that connection with the reason logged."""
    async with running_server(every_event) as server:

        async def hostile() -> None:
            raw = await Raw.open(server.bound[0])
            await raw.negotiate()
            await raw.send(OPENING)
            await raw.send(stream)
            assert await raw.closed_by_peer()
            await raw.aclose()

        await misbehave_beside_good_client(server.bound[0], hostile)
    assert any(reason in text for text in closing_reason(caplog)), closing_reason(caplog)


@pytest.mark.asyncio
async def test_data_after_quit_closes(caplog: pytest.LogCaptureFixture) -> None:
    """Bytes after QUIT are never processed: the connection is closed at QUIT."""
    async with running_server(every_event) as server:
        raw = await Raw.open(server.bound[0])
        await raw.negotiate()
        await raw.send(OPENING + frames(m.Quit(), m.Connect(hostname=b"x")))
        assert await raw.closed_by_peer()
        await raw.aclose()
        await well_behaved(server.bound[0])


@pytest.mark.asyncio
async def test_connection_flood_over_the_limit_is_refused() -> None:
    """Past max_connections and the over-limit cap, new sockets are closed at once and counted; sessions go on."""
    async with running_server(every_event, max_connections=3, max_overflow=5) as server:
        assert isinstance(server, MilterServer)
        good = await MilterClient.open(server.bound[0])
        await good.negotiate()
        await good.open_session(Envelope())
        hogs = [await Raw.open(server.bound[0]) for _ in range(2)]
        for hog in hogs:
            await hog.negotiate()
        # The first 5 extra sockets are over-limit connections (negotiated, tempfailed), the rest closed.
        extra = [await Raw.open(server.bound[0]) for _ in range(20)]
        for raw in extra[:5]:
            await raw.negotiate()
        for raw in extra[5:]:
            assert await raw.closed_by_peer()
        assert server.refused_connections == 15
        assert server.state.overflow == 5
        for raw in extra:
            await raw.aclose()
        result = await good.send_transaction(Envelope(), MESSAGE)
        assert result.final == m.Accept()
        await good.quit()
        for hog in hogs:
            await hog.aclose()


@pytest.mark.asyncio
async def test_half_an_optneg_is_closed_at_the_negotiation_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that sends part of OPTNEG and stalls is closed at negotiate_timeout, far before idle_timeout."""
    settings = ConnectionSettings(negotiate_timeout=0.3)
    assert settings.idle_timeout > 60
    async with running_server(every_event, settings=settings) as server:

        async def hostile() -> None:
            raw = await Raw.open(server.bound[0])
            await raw.send(OFFER.to_frame()[:7])
            assert await raw.closed_by_peer()
            await raw.aclose()

        await misbehave_beside_good_client(server.bound[0], hostile)
    assert any("no option negotiation" in text for text in closing_reason(caplog))


@pytest.mark.asyncio
async def test_over_limit_peer_cannot_hold_its_slot() -> None:
    """An over-limit peer that keeps sending ABORT (activity) is still closed after twice negotiate_timeout."""
    settings = ConnectionSettings(negotiate_timeout=0.2)
    async with running_server(every_event, settings=settings, max_connections=1, max_overflow=1) as server:
        good = await MilterClient.open(server.bound[0])
        await good.negotiate()
        await good.open_session(Envelope())  # as Postfix does, before negotiate_timeout
        raw = await Raw.open(server.bound[0])
        await raw.negotiate()
        assert server.state.overflow == 1
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 2.0:
            try:
                await raw.send(m.Abort().to_frame())
            except ConnectionError:
                closed = True
                break
            if await raw.closed_by_peer(timeout=0.05):
                closed = True
                break
        await raw.aclose()
        assert closed, "an over-limit connection outlived 2 s with negotiate_timeout 0.2 s"
        for _ in range(100):
            if server.state.overflow == 0:
                break
            await asyncio.sleep(0.01)
        assert server.state.overflow == 0
        result = await good.send_transaction(Envelope(), MESSAGE)
        assert result.final == m.Accept()
        await good.quit()
