"""Listener tests over real loopback sockets with the project's MTA-side client."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import socket
import stat
import struct
import tempfile

import pytest

from milterbridge.client import Envelope, MilterClient, MilterClientError
from milterbridge.connection import ConnectionSettings, HandlerResult
from milterbridge.milter import messages as m
from milterbridge.milter.context import MessageContext
from milterbridge.milter.negotiation import Requirements, negotiate
from milterbridge.milter.session import MilterSession
from milterbridge.tcp import TCP_QUICKACK, BorrowedSocket
from tests.conftest import running_server
from tests.fakes.handlers import StaticHandler

MESSAGE = b"From: a@example.org\r\nSubject: caf\xe9 \r\n folded\r\n\r\nline one\r\n\xff\xfe 8-bit\r\n"


class Recorder:
    """Asks for every event, records what it saw, and at eom echoes the body back."""

    def __init__(self, session: MilterSession, slow_eom: float = 0.0) -> None:
        self.session = session
        self.body = bytearray()
        self.commands: list[m.Command] = []
        self.slow_eom = slow_eom

    def negotiate(self, offer: m.Negotiate) -> m.NegotiateReply:
        return negotiate(offer, Requirements()).reply()

    def handle(self, command: m.Command) -> HandlerResult:
        self.commands.append(command)
        if isinstance(command, m.BodyChunk):
            self.body += command.data
        if not self.session.needs_reply:
            return None
        if isinstance(command, m.EndOfMessage):
            digest = hashlib.sha256(self.body).hexdigest().encode()
            replies = [m.AddHeader(name=b"X-Body-SHA256", value=b" " + digest), *m.replace_body(bytes(self.body))]
            replies.append(m.Accept())
            if self.slow_eom:
                return self._later(replies)
            return replies
        return [m.Continue()]

    async def _later(self, replies: list[m.Reply | m.Modification]) -> list[m.Reply | m.Modification]:
        await asyncio.sleep(self.slow_eom)
        return replies

    def message_ended(self, message: MessageContext, *, mta_gave_up: bool = False) -> None:
        return None

    def connection_lost(self) -> None:
        return None


class Journal:
    """Asks for every event and records, in order, the commands, the messages that ended and the close."""

    def __init__(self, session: MilterSession) -> None:
        self.session = session
        self.seen: list[str] = []

    def negotiate(self, offer: m.Negotiate) -> m.NegotiateReply:
        return negotiate(offer, Requirements()).reply()

    def handle(self, command: m.Command) -> HandlerResult:
        self.seen.append(type(command).__name__)
        if not self.session.needs_reply:
            return None
        return [m.Accept()] if isinstance(command, m.EndOfMessage) else [m.Continue()]

    def message_ended(self, message: MessageContext, *, mta_gave_up: bool = False) -> None:
        self.seen.append(f"ended {message.mail_from.decode()}")

    def connection_lost(self) -> None:
        self.seen.append("lost")


def _split_body(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


async def _one_message(address: str, message: bytes = MESSAGE) -> tuple[MilterClient, m.Reply | None, tuple]:
    client = await MilterClient.open(address)
    await client.negotiate()
    result = await client.send_message(Envelope(), message)
    assert result.eom is not None
    return client, result.final, result.eom.modifications


@pytest.mark.asyncio
@pytest.mark.parametrize("listen", ["inet:127.0.0.1:0", "inet6:[::1]:0", "unix"])
async def test_full_conversation_each_transport(listen: str) -> None:
    """A whole message over TCP, IPv6 and a unix socket; 8-bit body bytes survive both ways."""
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix:{tmp}/milter.sock" if listen == "unix" else listen
        async with running_server(Recorder, [address]) as server:
            client, final, mods = await _one_message(server.bound[0])
            await client.quit()
    body = _split_body(MESSAGE)
    assert final == m.Accept()
    assert mods[0] == m.AddHeader(name=b"X-Body-SHA256", value=b" " + hashlib.sha256(body).hexdigest().encode())
    assert b"".join(x.data for x in mods[1:]) == body


@pytest.mark.asyncio
async def test_five_mib_body_in_64k_chunks() -> None:
    """A 5 MiB body arrives intact in 64 KiB chunks and is echoed back in 65535-byte pieces."""
    body = os.urandom(5 * 1024 * 1024)
    seen: list[Recorder] = []

    def factory(session: MilterSession) -> Recorder:
        seen.append(Recorder(session))
        return seen[-1]

    async with running_server(factory) as server:
        client = await MilterClient.open(server.bound[0])
        await client.negotiate()
        await client.open_session(Envelope())
        await client.mail_from(b"<a@b>")
        await client.rcpt_to(b"<c@d>")
        replies = await client.body(body, chunk_size=64 * 1024)
        eom = await client.end_of_message()
        await client.quit()
    assert len(replies) == 80
    assert bytes(seen[0].body) == body
    assert b"".join(x.data for x in eom.modifications if isinstance(x, m.ReplaceBody)) == body
    assert all(len(x.data) <= 65535 for x in eom.modifications if isinstance(x, m.ReplaceBody))


@pytest.mark.asyncio
async def test_several_messages_on_one_connection() -> None:
    """Three transactions on one connection each get their own answer."""
    async with running_server(Recorder) as server:
        client = await MilterClient.open(server.bound[0])
        await client.negotiate()
        await client.open_session(Envelope())
        for n in range(3):
            result = await client.send_transaction(Envelope(), MESSAGE.replace(b"line one", b"msg %d" % n))
            assert result.final == m.Accept()
        await client.quit()


@pytest.mark.asyncio
async def test_two_hundred_concurrent_connections() -> None:
    """200 clients at once all complete."""
    async with running_server(StaticHandler) as server:

        async def one() -> m.Reply | None:
            client = await MilterClient.open(server.bound[0])
            try:
                await client.negotiate()
                result = await client.send_message(Envelope(), MESSAGE)
                return result.final
            finally:
                await client.quit()

        results = await asyncio.gather(*(one() for _ in range(200)))
        assert server.state.total_connections == 200
    assert results == [m.Accept()] * 200


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack(">I", 0xFFFFFFF0) + b"x", id="huge-length"),
        pytest.param(struct.pack(">I", 0), id="zero-length"),
        pytest.param(m.Helo(hostname=b"x").to_frame(), id="helo-before-optneg"),
        pytest.param(struct.pack(">I", 1) + b"Z", id="unknown-code"),
    ],
)
async def test_garbage_closes_only_that_connection(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A malformed frame closes its own connection (logged) while another completes normally."""
    async with running_server(Recorder) as server:
        good = await MilterClient.open(server.bound[0])
        await good.negotiate()
        await good.open_session(Envelope())
        host, port = server.bound[0].removeprefix("inet:").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(garbage)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        result = await good.send_transaction(Envelope(), MESSAGE)
        assert result.final == m.Accept()
        await good.quit()
    assert any("closing milter connection" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_messages_ended_without_end_of_message_reach_the_handler() -> None:
    """An aborted message is reported before its ABORT, one open at EOF before connection_lost;
    a message completed at end-of-message is not reported."""
    journals: list[Journal] = []

    def factory(session: MilterSession) -> Journal:
        journals.append(Journal(session))
        return journals[-1]

    async with running_server(factory) as server:
        client = await MilterClient.open(server.bound[0])
        await client.negotiate()
        await client.open_session(Envelope())
        result = await client.send_transaction(Envelope(), MESSAGE)  # end-of-message, then ABORT
        assert result.final == m.Accept()
        await client.mail_from(b"<aborted@example.org>")
        await client.abort()
        await client.mail_from(b"<open@example.org>")
        await client.rcpt_to(b"<rcpt@example.net>")  # answered: the server has read the MAIL
        await client.aclose()
        async with asyncio.timeout(5):
            await server.state.idle.wait()
    seen = journals[0].seen
    assert seen.count("EndOfMessage") == 1
    after_eom = seen[seen.index("EndOfMessage") + 1 :]
    assert after_eom == [
        "Abort",
        "MailFrom",
        "ended <aborted@example.org>",
        "Abort",
        "MailFrom",
        "RcptTo",
        "ended <open@example.org>",
        "lost",
    ]


@pytest.mark.asyncio
async def test_connection_limit() -> None:
    """A connection over max_connections is not hung up on: its session gets a tempfail; the others are served."""
    async with running_server(Recorder, max_connections=2) as server:
        clients = [await MilterClient.open(server.bound[0]) for _ in range(2)]
        for c in clients:
            await c.negotiate()
        extra = await MilterClient.open(server.bound[0])
        await extra.negotiate()
        result = await extra.send_message(Envelope(), MESSAGE)
        assert isinstance(result.final, m.ReplyCode)
        assert result.final.text.startswith(b"451 4.3.2 ")
        await extra.quit()
        assert server.refused_connections == 0
        for c in clients:
            result = await c.send_message(Envelope(), MESSAGE)
            assert result.final == m.Accept()
            await c.quit()


@pytest.mark.asyncio
async def test_progress_keepalives_while_eom_is_slow() -> None:
    """A slow end-of-message answer is preceded by PROGRESS packets."""
    settings = ConnectionSettings(progress_interval=0.05)
    async with running_server(lambda s: Recorder(s, slow_eom=0.3), settings=settings) as server:
        client, final, _ = await _one_message(server.bound[0])
        await client.quit()
    assert final == m.Accept()


@pytest.mark.asyncio
async def test_progress_count_seen_by_client() -> None:
    """The client counts the keep-alives it received."""
    settings = ConnectionSettings(progress_interval=0.05)
    async with running_server(lambda s: Recorder(s, slow_eom=0.3), settings=settings) as server:
        client = await MilterClient.open(server.bound[0])
        await client.negotiate()
        await client.open_session(Envelope())
        await client.mail_from(b"<a@b>")
        await client.rcpt_to(b"<c@d>")
        eom = await client.end_of_message()
        await client.quit()
    assert eom.progress >= 3
    assert eom.reply == m.Accept()


@pytest.mark.asyncio
async def test_unix_socket_mode_and_stale_file() -> None:
    """The socket gets the configured mode; a stale socket file is replaced, a live one is not."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/m.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # leaves a socket file nobody listens on
        async with running_server(StaticHandler, [f"unix:{path}"], socket_mode=0o660) as server:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            second = type(server)([f"unix:{path}"], StaticHandler)
            with pytest.raises(OSError, match="another process"):
                await second.start()
        assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_drain_finishes_busy_message_and_keeps_sessions() -> None:
    """shutdown() stops accepting, lets a busy message finish and keeps open sessions until they end."""
    settings = ConnectionSettings(progress_interval=5)
    async with running_server(lambda s: Recorder(s, slow_eom=0.3), settings=settings) as server:
        idle = await MilterClient.open(server.bound[0])
        await idle.negotiate()
        busy = await MilterClient.open(server.bound[0])
        await busy.negotiate()
        await busy.open_session(Envelope())
        await busy.mail_from(b"<a@b>")
        await busy.rcpt_to(b"<c@d>")
        eom_task = asyncio.ensure_future(busy.end_of_message())
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        drain = asyncio.ensure_future(server.shutdown(timeout=5.0))
        eom = await eom_task
        assert eom.reply == m.Accept()
        # The idle session is still served (an SMTP session in flight); it ends the drain by quitting.
        opened = await idle.open_session(Envelope())
        assert opened.connect == m.Continue()
        assert not drain.done()
        await idle.quit()
        await busy.quit()
        await drain
        assert asyncio.get_running_loop().time() - started < 4.0
        assert not server.is_serving


@pytest.mark.asyncio
async def test_drain_deadline_aborts_stuck_connection() -> None:
    """A connection still busy at the drain deadline is closed."""
    async with running_server(lambda s: Recorder(s, slow_eom=30)) as server:
        client = await MilterClient.open(server.bound[0])
        await client.negotiate()
        await client.open_session(Envelope())
        await client.mail_from(b"<a@b>")
        eom_task = asyncio.ensure_future(client.end_of_message())
        await asyncio.sleep(0.05)
        await server.shutdown(timeout=0.2)
        with pytest.raises(MilterClientError):
            await eom_task
        await client.aclose()


@pytest.mark.asyncio
async def test_closed_connections_never_close_a_reused_descriptor() -> None:
    """The per-connection socket object used for TCP_QUICKACK must not close the descriptor later.

    The connections' objects are kept alive past their close; the descriptor numbers are then
    reused by pipes, and only after that are the objects dropped and collected. A socket
    object still owning its descriptor would close the pipes.
    """
    kept = []
    async with running_server(lambda s: StaticHandler(s)) as server:
        for _ in range(20):
            async with await MilterClient.open(server.bound[0]) as client:
                await client.negotiate()
                await client.send_message(Envelope(), b"Subject: x\r\n\r\nbody\r\n")
                kept.extend(server.state.connections)
                await client.quit()
        for _ in range(50):
            if not server.state.connections:
                break
            await asyncio.sleep(0.01)
        assert kept
        assert all(conn.transport.is_closing() for conn in kept)
        pipes = [os.pipe() for _ in range(20)]
        try:
            kept.clear()
            gc.collect()
            for read, write in pipes:
                os.write(write, b"x")
                assert os.read(read, 1) == b"x"
        finally:
            for read, write in pipes:
                os.close(read)
                os.close(write)


@pytest.mark.asyncio
@pytest.mark.parametrize("listen", ["inet:127.0.0.1:0", "inet6:[::1]:0"])
async def test_accepted_inet_sockets_send_without_delay(listen: str) -> None:
    """TCP_NODELAY is on for an accepted connection (the event loop sets it; the bridge relies on
    that), and the connection holds a socket object for TCP_QUICKACK where Linux has it."""
    async with (
        running_server(lambda s: StaticHandler(s), listen=(listen,)) as server,
        await MilterClient.open(server.bound[0]) as client,
    ):
        await client.negotiate()
        (conn,) = server.state.connections
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert conn.peer.startswith(("127.0.0.1:", "::1:"))
        if TCP_QUICKACK is not None:
            assert isinstance(conn._sock, BorrowedSocket)
        await client.quit()


@pytest.mark.asyncio
async def test_a_unix_client_bound_to_an_abstract_address_is_served() -> None:
    """A unix client may bind a Linux abstract address before it connects; its peer name is then
    bytes, which the connection names in its log and serves like any unix client."""
    name = b"\0milterbridge-test-" + os.urandom(6).hex().encode()
    with tempfile.TemporaryDirectory() as tmp:
        async with running_server(lambda s: StaticHandler(s), [f"unix:{tmp}/milter.sock"]) as server:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(name)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, f"{tmp}/milter.sock")
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            client = MilterClient(reader, writer)
            await client.negotiate()
            (conn,) = server.state.connections
            assert conn.peer == "@" + name[1:].decode()
            result = await client.send_message(Envelope(), b"Subject: x\r\n\r\nbody\r\n")
            assert result.eom is not None
            await client.quit()
            await client.aclose()


def test_a_borrowed_socket_never_closes_its_descriptor() -> None:
    """Collected without a detach (its connection never saw connection_lost), even in a cycle."""
    owner, peer = socket.socketpair()
    with owner, peer:
        borrowed = BorrowedSocket(owner.family, socket.SOCK_STREAM, 0, fileno=owner.fileno())
        borrowed.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        holder: dict[str, object] = {"sock": borrowed}
        holder["self"] = holder  # a reference cycle: collected by the cyclic GC
        del borrowed, holder
        gc.collect()
        owner.sendall(b"x")
        assert peer.recv(1) == b"x"
