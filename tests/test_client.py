"""The MTA-side client (milterbridge.client) against a scripted milter on loopback.

The other suites drive the bridge with the client; these pin the client's own rules: what it
sends for an event the milter switched off, how it reads replies, and where a transaction stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest

from milterbridge.client import Envelope, MilterClient, MilterClientError, split_message
from milterbridge.milter import messages as m
from milterbridge.milter.codec import command_decoder
from milterbridge.milter.constants import ALL_ACTIONS, MILTER_VERSION, Protocol

#: What the scripted milter writes for one command: messages, or raw bytes as they are;
#: ``None`` closes the connection instead.
Answer = Sequence[m.Message | bytes] | None

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"


class ScriptedMilter:
    """Records every command it reads; answers each with ``script(command)``.

    OPTNEG is answered with the offer's version and actions and ``protocol``;
    macros, abort and quit get no answer, as from a real milter. One connection.
    """

    def __init__(self, script: Callable[[m.Command], Answer], protocol: Protocol = Protocol.NONE) -> None:
        self.script = script
        self.protocol = protocol
        self.received: list[m.Command] = []
        #: Set when the connection is over and every command the client sent was read.
        self.finished = asyncio.Event()

    def answer(self, command: m.Command) -> Answer:
        if isinstance(command, m.Negotiate):
            return (m.NegotiateReply(version=command.version, actions=command.actions, protocol=self.protocol),)
        if isinstance(command, m.Macro | m.Abort | m.Quit):
            return ()
        return self.script(command)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = command_decoder()
        try:
            while data := await reader.read(65536):
                decoder.feed(data)
                while (command := decoder.next_message()) is not None:
                    self.received.append(command)
                    answer = self.answer(command)
                    if answer is None:
                        return
                    writer.write(b"".join(a if isinstance(a, bytes) else a.to_frame() for a in answer))
                    await writer.drain()
        finally:
            writer.close()
            self.finished.set()

    def kinds(self) -> list[str]:
        """The received commands by class name, macros with their stage."""
        return [f"Macro:{c.stage.decode()}" if isinstance(c, m.Macro) else type(c).__name__ for c in self.received]


@asynccontextmanager
async def connected(milter: ScriptedMilter) -> AsyncIterator[MilterClient]:
    """A negotiated client connected to ``milter`` over loopback TCP; on exit, closed and fully read."""
    server = await asyncio.start_server(milter.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with await MilterClient.open(f"inet:127.0.0.1:{port}") as client:
            await client.negotiate()
            yield client
        await milter.finished.wait()
    finally:
        server.close()
        await server.wait_closed()


def always(*answer: m.Message | bytes) -> Callable[[m.Command], Answer]:
    return lambda command: answer


def hang_up(command: m.Command) -> Answer:
    return None


# ----------------------------------------------------------------- negotiation and replies


@pytest.mark.asyncio
async def test_negotiate_records_offer_and_answer():
    """negotiate() sends Postfix's default offer and keeps the milter's answer."""
    milter = ScriptedMilter(always(m.Continue()), protocol=Protocol.NR_HELO)
    async with connected(milter) as client:
        assert client.offer == m.Negotiate(version=MILTER_VERSION, actions=ALL_ACTIONS, protocol=client.offer.protocol)
        assert client.negotiated is not None
        assert client.negotiated.protocol == Protocol.NR_HELO


@pytest.mark.asyncio
async def test_progress_is_skipped_at_events_and_counted_at_eom():
    """Progress never stands for a reply; at end-of-message it is counted beside the modifications."""

    def script(command: m.Command) -> Answer:
        if isinstance(command, m.EndOfMessage):
            return (m.Progress(), m.AddHeader(name=b"X-A", value=b" 1"), m.Progress(), m.Accept())
        return (m.Progress(), m.Continue())

    async with connected(ScriptedMilter(script)) as client:
        assert await client.helo(b"client.example") == m.Continue()
        eom = await client.end_of_message()
    assert eom.reply == m.Accept()
    assert eom.modifications == (m.AddHeader(name=b"X-A", value=b" 1"),)
    assert eom.progress == 2


@pytest.mark.parametrize(
    ("script", "match"),
    [
        pytest.param(always(m.AddHeader(name=b"X", value=b"y")), "AddHeader outside end-of-message", id="modification"),
        pytest.param(hang_up, "milter closed the connection", id="hang-up"),
        pytest.param(always(b"\x00\x00\x00\x01?"), "bad frame from milter", id="unknown-code"),
    ],
)
@pytest.mark.asyncio
async def test_protocol_faults_raise_client_errors(script, match):
    """What the milter breaks surfaces as MilterClientError with the reason."""
    async with connected(ScriptedMilter(script)) as client:
        with pytest.raises(MilterClientError, match=match):
            await client.helo(b"client.example")


# ----------------------------------------------------------------- switched-off and no-reply events


@pytest.mark.asyncio
async def test_switched_off_events_send_envelope_macros_only():
    """A switched-off envelope event still gets its macros (as Postfix does); a header gets nothing."""
    milter = ScriptedMilter(always(m.Continue()), protocol=Protocol.NO_MAIL | Protocol.NO_HEADERS)
    async with connected(milter) as client:
        assert await client.mail_from(b"<a@example.org>", macros=((b"i", b"QID"),)) is None
        assert await client.header(b"Subject", b" hi", macros=((b"i", b"QID"),)) is None
        assert await client.helo(b"client.example") == m.Continue()  # a round trip: all sent before
    assert milter.kinds() == ["Negotiate", "Macro:M", "Macro:H", "Helo"]


@pytest.mark.asyncio
async def test_no_reply_events_are_not_waited_for():
    """With NR_HELO negotiated helo() returns None and the next reply belongs to the next event."""
    milter = ScriptedMilter(always(m.Continue()), protocol=Protocol.NR_HELO)
    async with connected(milter) as client:
        assert await client.helo(b"client.example") is None
        assert await client.mail_from(b"<a@example.org>") == m.Continue()


# ----------------------------------------------------------------- whole transactions


def refuse_recipients(*refused: bytes) -> Callable[[m.Command], Answer]:
    def script(command: m.Command) -> Answer:
        if isinstance(command, m.RcptTo) and command.address in refused:
            return (m.Reject(),)
        if isinstance(command, m.EndOfMessage):
            return (m.Accept(),)
        return (m.Continue(),)

    return script


@pytest.mark.parametrize(
    ("refused", "stopped_at", "eom_sent"),
    [
        pytest.param((b"<b@example.net>",), None, True, id="one-of-two-refused"),
        pytest.param((b"<a@example.net>", b"<b@example.net>"), "rcpt", False, id="all-refused"),
    ],
)
@pytest.mark.asyncio
async def test_transaction_goes_on_while_a_recipient_is_left(refused, stopped_at, eom_sent):
    """A refused recipient stops the transaction only when it was the last one left."""
    envelope = Envelope(recipients=(b"<a@example.net>", b"<b@example.net>"))
    milter = ScriptedMilter(refuse_recipients(*refused))
    async with connected(milter) as client:
        result = await client.send_message(envelope, MESSAGE)
    assert result.stopped_at == stopped_at
    assert ("EndOfMessage" in milter.kinds()) is eom_sent
    assert milter.kinds()[-1] == "Abort"
    assert result.rcpt == [m.Continue() if r not in refused else m.Reject() for r in envelope.recipients]


@pytest.mark.asyncio
async def test_skip_ends_headers_or_body_only():
    """Skip at a header goes on with end-of-headers, skip at a body chunk with end-of-message."""

    def script(command: m.Command) -> Answer:
        if isinstance(command, m.Header | m.BodyChunk):
            return (m.Skip(),)
        if isinstance(command, m.EndOfMessage):
            return (m.Accept(),)
        return (m.Continue(),)

    milter = ScriptedMilter(script, protocol=Protocol.SKIP)
    async with connected(milter) as client:
        result = await client.send_message(Envelope(), MESSAGE)
    assert result.headers == [m.Skip()]
    assert result.body == [m.Skip()]
    assert result.final == m.Accept()
    assert result.stopped_by is None
    assert [k for k in milter.kinds() if not k.startswith("Macro")] == [
        "Negotiate",
        "Connect",
        "Helo",
        "MailFrom",
        "RcptTo",
        "Data",
        "Header",
        "EndOfHeaders",
        "BodyChunk",
        "EndOfMessage",
        "Abort",
    ]


@pytest.mark.asyncio
async def test_refusal_at_data_stops_before_the_headers():
    """A decision other than continue ends the transaction where it was given, and ABORT follows."""

    def script(command: m.Command) -> Answer:
        return (m.TempFail(),) if isinstance(command, m.Data) else (m.Continue(),)

    milter = ScriptedMilter(script)
    async with connected(milter) as client:
        result = await client.send_message(Envelope(), MESSAGE)
    assert (result.stopped_at, result.final) == ("data", m.TempFail())
    assert result.headers == []
    assert milter.kinds()[-2:] == ["Data", "Abort"]


@pytest.mark.parametrize(
    ("message", "headers", "body"),
    [
        pytest.param(
            MESSAGE, [(b"From", b" a@example.org"), (b"Subject", b" hi")], b"line one\r\nline two\r\n", id="crlf"
        ),
        pytest.param(b"Subject: a\n\tb\n\nx\n", [(b"Subject", b" a\n\tb")], b"x\r\n", id="folded-lf"),
        pytest.param(b"Subject: x\r\n\r\n", [(b"Subject", b" x")], b"", id="no-body"),
        pytest.param(b"no header here", [], b"no header here", id="body-only"),
    ],
)
def test_split_message(message, headers, body):
    """Headers keep their value bytes after the colon (folds joined with LF); the body gets CRLF."""
    assert split_message(message) == (headers, body)
