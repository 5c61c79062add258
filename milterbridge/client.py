"""The MTA side of the milter protocol: drive any milter the way Postfix does.

Used by ``milterbridge send``, the benchmark and the tests. It negotiates,
sends macros before every event, sends every event the milter did not switch
off, waits for replies only where the milter did not negotiate no-reply, and
reads every modification up to the final reply at end-of-message.

::

    async with await MilterClient.open("inet:127.0.0.1:8890") as client:
        await client.negotiate()
        result = await client.send_message(Envelope(...), message_bytes)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

from milterbridge.milter.address import parse_listen_address
from milterbridge.milter.codec import FrameDecoder, response_decoder
from milterbridge.milter.constants import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    CHUNK_SIZE,
    MILTER_VERSION,
    Action,
    Family,
    MacroStage,
    Protocol,
)
from milterbridge.milter.errors import RemoteProtocolError
from milterbridge.milter.messages import (
    Abort,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macro,
    MailFrom,
    Modification,
    Negotiate,
    NegotiateReply,
    Progress,
    Quit,
    QuitNewConnection,
    RcptTo,
    Reject,
    Reply,
    ReplyCode,
    Skip,
    TempFail,
    Unknown,
)
from milterbridge.milter.negotiation import DEFAULT_MACROS

Macros = Iterable[tuple[bytes, bytes]]
#: Macro (name, value) pairs as one stage sends them.
MacroPairs = tuple[tuple[bytes, bytes], ...]

#: Macro stages by the name of the event they go with (``milterbridge send --macro STAGE:NAME=VALUE``).
MACRO_STAGES: Final[Mapping[str, MacroStage]] = {
    "connect": MacroStage.CONNECT,
    "helo": MacroStage.HELO,
    "mail": MacroStage.ENVFROM,
    "rcpt": MacroStage.ENVRCPT,
    "data": MacroStage.DATA,
    "eoh": MacroStage.EOH,
    "eom": MacroStage.EOM,
}

#: Bytes asked of the socket per read.
_READ_BYTES: Final = 256 * 1024
#: Codes of the envelope events (connect, helo, mail, rcpt, data, unknown) whose
#: macros Postfix still sends when the milter switched the event off.
_MACROS_OF_SKIPPED_EVENTS: Final = b"CHMRTU"


class MilterClientError(Exception):
    """The milter broke the protocol or went away."""


def postfix_macro_stage(name: bytes) -> MacroStage:
    """The first stage at which Postfix sends macro ``name`` by default; CONNECT for any other name.

    ``{auth_authen}`` goes with MAIL, ``{daemon_name}`` with CONNECT, ``i`` first with MAIL.
    """
    for stage, names in DEFAULT_MACROS.items():
        if name in names:
            return stage
    return MacroStage.CONNECT


@dataclass(frozen=True, slots=True, kw_only=True)
class EomResult:
    """Everything the milter sent in answer to end-of-message."""

    reply: Reply
    modifications: tuple[Modification, ...] = ()
    progress: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """What ``send_message`` presents to the milter besides the message itself."""

    mail_from: bytes = b"<sender@example.org>"
    mail_args: tuple[bytes, ...] = ()
    recipients: tuple[bytes, ...] = (b"<rcpt@example.net>",)
    rcpt_args: tuple[tuple[bytes, ...], ...] = ()
    helo: bytes = b"client.example.org"
    client_name: bytes = b"client.example.org"
    client_address: bytes = b"192.0.2.1"
    client_port: int = 40000
    family: Family = Family.INET
    queue_id: bytes = b"4ABC123DEF"
    connect_macros: MacroPairs = (
        (b"j", b"mta.example.test"),
        (b"{daemon_name}", b"mta.example.test"),
        (b"v", b"Postfix 3.7"),
    )
    #: Further macros as (stage, name, value), sent with the macros that stage sends anyway
    #: (``connect_macros`` at CONNECT, ``i`` from RCPT on); a name given here replaces a
    #: name of the same stage there. Header events get none of them.
    macros: tuple[tuple[MacroStage, bytes, bytes], ...] = ()

    def macros_at(self, stage: MacroStage, fixed: MacroPairs = ()) -> MacroPairs:
        """What goes before an event of ``stage``: ``fixed``, with ``macros`` of that stage put over it."""
        extra = tuple((name, value) for at, name, value in self.macros if at == stage)
        if not extra:
            return fixed
        names = {name for name, _ in extra}
        return tuple(pair for pair in fixed if pair[0] not in names) + extra


@dataclass(slots=True, kw_only=True)
class TransactionResult:
    """How far one message got and what the milter answered at each step."""

    connect: Reply | None = None
    helo: Reply | None = None
    mail: Reply | None = None
    rcpt: list[Reply | None] = field(default_factory=list)
    data: Reply | None = None
    headers: list[Reply | None] = field(default_factory=list)
    eoh: Reply | None = None
    body: list[Reply | None] = field(default_factory=list)
    eom: EomResult | None = None
    #: The reply that ended the transaction early (a decision other than continue).
    stopped_by: Reply | None = None
    stopped_at: str | None = None

    @property
    def final(self) -> Reply | None:
        """The decisive reply: the one that stopped the transaction, or the eom reply."""
        if self.stopped_by is not None:
            return self.stopped_by
        return self.eom.reply if self.eom else None


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split an RFC 5322 message as Postfix presents it to milters.

    Headers come back as (name, value) with the value byte-exact after the
    colon (leading whitespace kept, folds joined with LF); the body has CRLF
    line ends and starts after the empty line.
    """
    text = message.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep and not head.endswith(b"\n") and b":" not in head.split(b"\n", 1)[0]:
        head, body = b"", text
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        headers.append((name.rstrip(b" \t"), value))
    if body:
        body = body.replace(b"\n", b"\r\n")
    return headers, body


class _ReplyReader:
    """The milter's side of the conversation: frames read off the socket and decoded."""

    def __init__(self, reader: asyncio.StreamReader, max_frame_bytes: int) -> None:
        self._reader = reader
        self._decoder: FrameDecoder[Reply | Modification] = response_decoder(max_frame_bytes)

    async def next(self) -> Reply | Modification:
        """The next message from the milter, reading the socket as needed."""
        while True:
            try:
                msg = self._decoder.next_message()
            except RemoteProtocolError as exc:
                raise MilterClientError(f"bad frame from milter: {exc}") from exc
            if msg is not None:
                return msg
            data = await self._reader.read(_READ_BYTES)
            if not data:
                raise MilterClientError("milter closed the connection")
            try:
                self._decoder.feed(data)
            except RemoteProtocolError as exc:
                raise MilterClientError(f"bad frame from milter: {exc}") from exc

    async def reply(self) -> Reply:
        """The reply to an event other than end-of-message, past any progress messages."""
        while True:
            msg = await self.next()
            if isinstance(msg, Modification):
                raise MilterClientError(f"{type(msg).__name__} outside end-of-message")
            if isinstance(msg, Progress):
                continue
            return msg

    async def eom_answer(self) -> EomResult:
        """Everything up to the final reply to end-of-message."""
        mods: list[Modification] = []
        progress = 0
        while True:
            msg = await self.next()
            if isinstance(msg, Progress):
                progress += 1
            elif isinstance(msg, Modification):
                mods.append(msg)
            else:
                return EomResult(reply=msg, modifications=tuple(mods), progress=progress)


class MilterClient:
    """One milter connection, driven from the MTA side.

    One method per milter command (each sends the command with its macros and
    returns the milter's reply, or ``None`` when the milter asked for no reply
    or switched the event off), and three whole flows built from them:
    :meth:`open_session`, :meth:`send_transaction` and :meth:`send_message`.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._writer = writer
        self._replies = _ReplyReader(reader, max_frame_bytes)
        self.negotiated: NegotiateReply | None = None
        self.offer: Negotiate | None = None

    @classmethod
    async def open(cls, address: str, *, timeout: float = 10.0) -> MilterClient:
        """Connect to a milter at ``inet:host:port``, ``inet6:[addr]:port`` or ``unix:/path``."""
        async with asyncio.timeout(timeout):
            target = parse_listen_address(address)
            if target.path is not None:
                reader, writer = await asyncio.open_unix_connection(target.path)
            else:
                reader, writer = await asyncio.open_connection(target.host, target.port)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket (without QUIT; call :meth:`quit` first for a clean end)."""
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    # ------------------------------------------------------------- plumbing

    def _flag(self, bit: Protocol) -> bool:
        return bool(self.negotiated and self.negotiated.protocol & bit)

    def _send(self, *messages: Command) -> None:
        self._writer.write(b"".join(m.to_frame() for m in messages))

    async def _event(
        self, cmd: Command, skip_bit: Protocol, noreply_bit: Protocol, macros: Macros | None
    ) -> Reply | None:
        """Send macros and an event like Postfix; None when skipped or no-reply."""
        frames: list[Command] = []
        if macros is not None:
            frames.append(Macro(stage=cmd.code, macros=tuple(macros)))
        if self._flag(skip_bit):
            if frames and cmd.code in _MACROS_OF_SKIPPED_EVENTS:
                self._send(*frames)
            return None
        frames.append(cmd)
        self._send(*frames)
        if self._flag(noreply_bit):
            await self._writer.drain()
            return None
        return await self._replies.reply()

    # --------------------------------------------------------------- events

    async def negotiate(
        self, version: int = MILTER_VERSION, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL
    ) -> NegotiateReply:
        """Send OPTNEG (Postfix's default offer unless told otherwise) and read the answer."""
        self.offer = Negotiate(version=version, actions=Action(actions), protocol=Protocol(protocol))
        self._send(self.offer)
        reply = await self._replies.next()
        if not isinstance(reply, NegotiateReply):
            raise MilterClientError(f"expected an OPTNEG answer, got {type(reply).__name__}")
        if reply.version > version or reply.actions & ~self.offer.actions:
            raise MilterClientError("milter answered outside our offer")
        self.negotiated = reply
        return reply

    async def connect(
        self,
        hostname: bytes,
        family: Family = Family.INET,
        address: bytes = b"",
        port: int = 0,
        macros: Macros | None = (),
    ) -> Reply | None:
        cmd = Connect(hostname=hostname, family=family, port=port, address=address)
        return await self._event(cmd, Protocol.NO_CONNECT, Protocol.NR_CONNECT, macros)

    async def helo(self, hostname: bytes, macros: Macros | None = ()) -> Reply | None:
        return await self._event(Helo(hostname=hostname), Protocol.NO_HELO, Protocol.NR_HELO, macros)

    async def mail_from(self, address: bytes, args: Sequence[bytes] = (), macros: Macros | None = ()) -> Reply | None:
        cmd = MailFrom(address=address, args=tuple(args))
        return await self._event(cmd, Protocol.NO_MAIL, Protocol.NR_MAIL, macros)

    async def rcpt_to(self, address: bytes, args: Sequence[bytes] = (), macros: Macros | None = ()) -> Reply | None:
        cmd = RcptTo(address=address, args=tuple(args))
        return await self._event(cmd, Protocol.NO_RCPT, Protocol.NR_RCPT, macros)

    async def data(self, macros: Macros | None = ()) -> Reply | None:
        if self.negotiated and self.negotiated.version < 4:
            return None
        return await self._event(Data(), Protocol.NO_DATA, Protocol.NR_DATA, macros)

    async def header(self, name: bytes, value: bytes, macros: Macros | None = ()) -> Reply | None:
        if not self._flag(Protocol.HDR_LEADSPC) and value.startswith(b" "):
            value = value[1:]  # what an MTA does without HDR_LEADSPC
        return await self._event(Header(name=name, value=value), Protocol.NO_HEADERS, Protocol.NR_HEADER, macros)

    async def end_of_headers(self, macros: Macros | None = ()) -> Reply | None:
        return await self._event(EndOfHeaders(), Protocol.NO_EOH, Protocol.NR_EOH, macros)

    async def body_chunk(self, data: bytes, macros: Macros | None = ()) -> Reply | None:
        return await self._event(BodyChunk(data=data), Protocol.NO_BODY, Protocol.NR_BODY, macros)

    async def body(self, body: bytes, chunk_size: int = CHUNK_SIZE, macros: Macros | None = ()) -> list[Reply | None]:
        """Send a body in chunks; stops at the first reply other than continue (skip included)."""
        replies: list[Reply | None] = []
        for start in range(0, len(body), chunk_size):
            reply = await self.body_chunk(body[start : start + chunk_size], macros)
            replies.append(reply)
            if reply is not None and not isinstance(reply, Continue):
                break
        return replies

    async def end_of_message(self, macros: Macros | None = ()) -> EomResult:
        """Send end-of-message and collect modifications up to the final reply."""
        frames: list[Command] = []
        if macros is not None:
            frames.append(Macro(stage=b"E", macros=tuple(macros)))
        frames.append(EndOfMessage())
        self._send(*frames)
        return await self._replies.eom_answer()

    async def unknown(self, line: bytes, macros: Macros | None = ()) -> Reply | None:
        if self.negotiated and self.negotiated.version < 3:
            return None
        return await self._event(Unknown(line=line), Protocol.NO_UNKNOWN, Protocol.NR_UNKNOWN, macros)

    async def abort(self) -> None:
        self._send(Abort())
        await self._writer.drain()

    async def quit(self) -> None:
        """Send QUIT and close, as Postfix does."""
        self._send(Quit())
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        await self.aclose()

    async def quit_new_connection(self) -> None:
        self._send(QuitNewConnection())
        await self._writer.drain()

    # ---------------------------------------------------------- whole flows

    async def open_session(self, envelope: Envelope) -> TransactionResult:
        """CONNECT and HELO; the result's ``stopped_by`` is set if the milter refused."""
        result = TransactionResult()
        result.connect = await self.connect(
            envelope.client_name,
            envelope.family,
            envelope.client_address,
            envelope.client_port,
            envelope.macros_at(MacroStage.CONNECT, envelope.connect_macros),
        )
        if _stops(result.connect):
            result.stopped_by, result.stopped_at = result.connect, "connect"
            return result
        result.helo = await self.helo(envelope.helo, envelope.macros_at(MacroStage.HELO))
        if _stops(result.helo):
            result.stopped_by, result.stopped_at = result.helo, "helo"
        return result

    async def send_transaction(self, envelope: Envelope, message: bytes) -> TransactionResult:
        """One MAIL..end-of-message transaction, then ABORT as Postfix does."""
        result = TransactionResult()
        try:
            await _transaction(self, envelope, message, result)
        finally:
            if not self._writer.is_closing():
                await self.abort()
        return result

    async def send_message(self, envelope: Envelope, message: bytes) -> TransactionResult:
        """A whole SMTP session's worth: CONNECT, HELO and one transaction."""
        opening = await self.open_session(envelope)
        if opening.stopped_by is not None:
            return opening
        result = await self.send_transaction(envelope, message)
        result.connect, result.helo = opening.connect, opening.helo
        return result


async def _transaction(client: MilterClient, envelope: Envelope, message: bytes, result: TransactionResult) -> None:
    """MAIL to end-of-message as Postfix sends it, filling ``result`` up to where the milter stops it.

    A refused recipient stops the transaction only when every recipient is
    refused; a skip at a header or a body chunk ends that part only.
    """
    qid: MacroPairs = ((b"i", envelope.queue_id),)
    result.mail = await client.mail_from(envelope.mail_from, envelope.mail_args, envelope.macros_at(MacroStage.ENVFROM))
    if _stops(result.mail):
        result.stopped_by, result.stopped_at = result.mail, "mail"
        return
    accepted = 0
    first_rcpt, rcpt_macros = envelope.macros_at(MacroStage.ENVRCPT), envelope.macros_at(MacroStage.ENVRCPT, qid)
    for n, rcpt in enumerate(envelope.recipients):
        args = envelope.rcpt_args[n] if n < len(envelope.rcpt_args) else ()
        reply = await client.rcpt_to(rcpt, args, rcpt_macros if n else first_rcpt)
        result.rcpt.append(reply)
        if reply is None or isinstance(reply, Continue):
            accepted += 1
        elif not _is_refusal(reply):
            result.stopped_by, result.stopped_at = reply, "rcpt"
            return
    if not accepted:
        result.stopped_by, result.stopped_at = result.rcpt[-1] if result.rcpt else None, "rcpt"
        return
    result.data = await client.data(envelope.macros_at(MacroStage.DATA, qid))
    if _stops(result.data):
        result.stopped_by, result.stopped_at = result.data, "data"
        return
    headers, body = split_message(message)
    for name, value in headers:
        reply = await client.header(name, value, qid)
        result.headers.append(reply)
        if isinstance(reply, Skip):
            break
        if _stops(reply):
            result.stopped_by, result.stopped_at = reply, "header"
            return
    result.eoh = await client.end_of_headers(envelope.macros_at(MacroStage.EOH, qid))
    if _stops(result.eoh):
        result.stopped_by, result.stopped_at = result.eoh, "eoh"
        return
    if body:
        result.body = await client.body(body, macros=qid)
        last = result.body[-1] if result.body else None
        if _stops(last) and not isinstance(last, Skip):
            result.stopped_by, result.stopped_at = last, "body"
            return
    result.eom = await client.end_of_message(envelope.macros_at(MacroStage.EOM, qid))


def _stops(reply: Reply | None) -> bool:
    return reply is not None and not isinstance(reply, Continue)


def _is_refusal(reply: Reply) -> bool:
    return isinstance(reply, Reject | TempFail | ReplyCode)
