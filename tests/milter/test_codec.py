"""Codec tests: known byte layouts for every message, round trips, and hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterbridge.milter import messages as m
from milterbridge.milter.codec import NO_FRAME, FrameDecoder, command_decoder, encode, response_decoder
from milterbridge.milter.constants import Action, Family, MacroStage, Protocol
from milterbridge.milter.errors import FrameTooLargeError, LocalProtocolError, RemoteProtocolError


def frame(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + code + payload


COMMAND_CASES = [
    pytest.param(
        m.Negotiate(version=6, actions=Action(0x1FF), protocol=Protocol(0x1FFFFF)),
        frame(b"O", bytes.fromhex("00000006000001ff001fffff")),
        id="optneg-postfix-default",
    ),
    pytest.param(
        m.Macro(stage=b"C", macros=((b"j", b"mx.example.net"), (b"{daemon_addr}", b"192.0.2.10"))),
        frame(b"D", b"Cj\0mx.example.net\0{daemon_addr}\x00192.0.2.10\0"),
        id="macro",
    ),
    pytest.param(m.Macro(stage=b"U"), frame(b"D", b"U"), id="macro-empty"),
    pytest.param(
        m.Connect(hostname=b"mail.example.org", family=Family.INET, port=54321, address=b"192.0.2.1"),
        bytes.fromhex("0000001f43") + b"mail.example.org\x004\xd4\x31192.0.2.1\x00",
        id="connect-inet",
    ),
    pytest.param(
        m.Connect(hostname=b"[2001:db8::1]", family=Family.INET6, port=40000, address=b"2001:db8::1"),
        bytes.fromhex("0000001e43") + b"[2001:db8::1]\x006\x9c\x402001:db8::1\x00",
        id="connect-inet6",
    ),
    pytest.param(
        m.Connect(hostname=b"localhost", family=Family.UNIX, port=0, address=b"/run/x.sock"),
        frame(b"C", b"localhost\0L\0\0/run/x.sock\0"),
        id="connect-unix",
    ),
    pytest.param(m.Connect(hostname=b"localhost"), bytes.fromhex("0000000c43") + b"localhost\0U", id="connect-unknown"),
    pytest.param(m.Helo(hostname=b"client.example"), frame(b"H", b"client.example\0"), id="helo"),
    pytest.param(
        m.MailFrom(address=b"<a@example.org>", args=(b"SIZE=1234",)),
        bytes.fromhex("0000001b4d") + b"<a@example.org>\0SIZE=1234\0",
        id="mail-args",
    ),
    pytest.param(m.MailFrom(address=b"<>"), frame(b"M", b"<>\0"), id="mail-null-sender"),
    pytest.param(
        m.RcptTo(address=b"<b@example.net>", args=(b"NOTIFY=SUCCESS,FAILURE", b"ORCPT=rfc822;b@example.net")),
        frame(b"R", b"<b@example.net>\0NOTIFY=SUCCESS,FAILURE\0ORCPT=rfc822;b@example.net\0"),
        id="rcpt-args",
    ),
    pytest.param(m.Data(), frame(b"T"), id="data"),
    pytest.param(
        m.Header(name=b"Subject", value=b"hello"), bytes.fromhex("0000000f4c") + b"Subject\0hello\0", id="header"
    ),
    pytest.param(
        m.Header(name=b"Subject", value=b" caf\xe9\n\tfolded"),
        frame(b"L", b"Subject\0 caf\xe9\n\tfolded\0"),
        id="header-8bit",
    ),
    pytest.param(m.EndOfHeaders(), frame(b"N"), id="eoh"),
    pytest.param(m.BodyChunk(data=b"line\r\n\0\xff"), frame(b"B", b"line\r\n\0\xff"), id="body-binary"),
    pytest.param(m.EndOfMessage(), frame(b"E"), id="eom"),
    pytest.param(m.EndOfMessage(data=b"tail"), frame(b"E", b"tail"), id="eom-with-data"),
    pytest.param(m.Abort(), frame(b"A"), id="abort"),
    pytest.param(m.Quit(), frame(b"Q"), id="quit"),
    pytest.param(m.QuitNewConnection(), frame(b"K"), id="quit-nc"),
    pytest.param(m.Unknown(line=b"XYZZY arg"), frame(b"U", b"XYZZY arg\0"), id="unknown"),
]

RESPONSE_CASES = [
    pytest.param(
        m.NegotiateReply(
            version=6,
            actions=Action(0x111),
            protocol=Protocol.NONE,
            macros=((MacroStage.HELO, b"{tls_version} {cipher}"), (MacroStage.ENVRCPT, b"{rcpt_addr}")),
        ),
        bytes.fromhex("000000384f00000006000001110000000000000001")
        + b"{tls_version} {cipher}\0"
        + bytes.fromhex("00000003")
        + b"{rcpt_addr}\0",
        id="optneg-reply-symlist",
    ),
    pytest.param(m.Continue(), frame(b"c"), id="continue"),
    pytest.param(m.Accept(), frame(b"a"), id="accept"),
    pytest.param(m.Reject(), frame(b"r"), id="reject"),
    pytest.param(m.TempFail(), frame(b"t"), id="tempfail"),
    pytest.param(m.Discard(), frame(b"d"), id="discard"),
    pytest.param(m.Skip(), frame(b"s"), id="skip"),
    pytest.param(m.Progress(), frame(b"p"), id="progress"),
    pytest.param(m.ConnFail(), frame(b"f"), id="conn-fail"),
    pytest.param(m.Shutdown(), frame(b"4"), id="shutdown"),
    pytest.param(
        m.ReplyCode(text=b"550 5.7.1 No thanks"), bytes.fromhex("0000001579") + b"550 5.7.1 No thanks\0", id="replycode"
    ),
    pytest.param(
        m.ReplyCode(text=b"550-5.7.1 one\r\n550 5.7.1 two"),
        frame(b"y", b"550-5.7.1 one\r\n550 5.7.1 two\0"),
        id="replycode-ml",
    ),
    pytest.param(m.AddHeader(name=b"X-A", value=b" 1"), frame(b"h", b"X-A\0 1\0"), id="addheader"),
    pytest.param(
        m.InsertHeader(index=1, name=b"X-B", value=b" 2"), frame(b"i", b"\0\0\0\x01X-B\0 2\0"), id="insheader"
    ),
    pytest.param(
        m.ChangeHeader(index=2, name=b"Subject", value=b""),
        frame(b"m", b"\0\0\0\x02Subject\0\0"),
        id="chgheader-delete",
    ),
    pytest.param(m.AddRecipient(address=b"<x@y>"), frame(b"+", b"<x@y>\0"), id="addrcpt"),
    pytest.param(
        m.AddRecipientWithArgs(address=b"<x@y>", args=b"NOTIFY=NEVER ORCPT=rfc822;x@y"),
        frame(b"2", b"<x@y>\0NOTIFY=NEVER ORCPT=rfc822;x@y\0"),
        id="addrcpt-par",
    ),
    pytest.param(m.AddRecipientWithArgs(address=b"<x@y>"), frame(b"2", b"<x@y>\0"), id="addrcpt-par-noargs"),
    pytest.param(m.RemoveRecipient(address=b"<x@y>"), frame(b"-", b"<x@y>\0"), id="delrcpt"),
    pytest.param(m.ChangeSender(address=b"<s@y>", args=b"RET=HDRS"), frame(b"e", b"<s@y>\0RET=HDRS\0"), id="chgfrom"),
    pytest.param(m.ChangeSender(address=b"<s@y>"), frame(b"e", b"<s@y>\0"), id="chgfrom-noargs"),
    pytest.param(m.ReplaceBody(data=b"new\r\nbody\xff"), frame(b"b", b"new\r\nbody\xff"), id="replbody"),
    pytest.param(m.Quarantine(reason=b"suspicious"), frame(b"q", b"suspicious\0"), id="quarantine"),
]


@pytest.mark.parametrize(("message", "wire"), COMMAND_CASES)
def test_command_layout(message: m.Command, wire: bytes) -> None:
    """Each command encodes to its known bytes and decodes back."""
    assert message.to_frame() == wire
    decoder = command_decoder()
    decoder.feed(wire)
    assert decoder.next_message() == message
    assert decoder.next_message() is None


@pytest.mark.parametrize(("message", "wire"), RESPONSE_CASES)
def test_response_layout(message: m.Reply | m.Modification, wire: bytes) -> None:
    """Each reply and modification encodes to its known bytes and decodes back."""
    assert message.to_frame() == wire
    decoder = response_decoder()
    decoder.feed(wire)
    assert decoder.next_message() == message


def test_every_code_has_a_case() -> None:
    """The tables above cover every registered command and response code."""
    covered_commands = {p.values[0].code for p in COMMAND_CASES}
    covered_responses = {p.values[0].code for p in RESPONSE_CASES}
    assert covered_commands == set(m.COMMANDS)
    assert covered_responses == set(m.RESPONSES)


def test_partial_frame_waits_and_many_frames_come_out() -> None:
    """A frame split anywhere waits for its rest; several frames in one read all come out."""
    stream = encode([m.Macro(stage=b"M"), m.MailFrom(address=b"<a@b>"), m.RcptTo(address=b"<c@d>"), m.Data()])
    for cut in range(len(stream) + 1):
        decoder = command_decoder()
        decoder.feed(stream[:cut])
        got = decoder.messages()
        decoder.feed(stream[cut:])
        got += decoder.messages()
        assert [type(x) for x in got] == [m.Macro, m.MailFrom, m.RcptTo, m.Data]
        assert decoder.at_boundary


def test_next_raw_takes_frames_off_undecoded() -> None:
    """next_raw gives (code byte, payload) per whole frame, NO_FRAME while a frame is partial,
    and decode turns a raw frame into the message next_message would have returned."""
    commands = [m.Macro(stage=b"M", macros=((b"i", b"Q1"),)), m.MailFrom(address=b"<a@b>"), m.Data()]
    stream = encode(commands)
    for cut in range(len(stream) + 1):
        decoder = command_decoder()
        raw: list[tuple[int, bytes]] = []
        for piece in (stream[:cut], stream[cut:]):
            decoder.feed(piece)
            while (frame := decoder.next_raw())[0] != NO_FRAME:
                raw.append(frame)
        assert [code for code, _ in raw] == [c.code[0] for c in commands]
        assert [payload for _, payload in raw] == [c.encode_payload() for c in commands]
        assert all(type(payload) is bytes for _, payload in raw)
        assert [decoder.decode(*frame) for frame in raw] == commands
        assert decoder.at_boundary


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        pytest.param(b"\0\0\0\0", RemoteProtocolError, id="zero-length"),
        pytest.param(struct.pack(">I", 102) + b"B", FrameTooLargeError, id="too-large"),
    ],
)
def test_next_raw_refuses_a_bad_length_after_a_good_frame(wire: bytes, error: type[Exception]) -> None:
    """A bad length behind a whole frame (so feed did not check it) is refused when read."""
    decoder = command_decoder(max_frame_bytes=100)
    decoder.feed(m.Data().to_frame() + wire)
    assert decoder.next_raw() == (m.Data.code[0], b"")
    with pytest.raises(error):
        decoder.next_raw()


def test_clear_drops_what_is_buffered() -> None:
    """After clear nothing is left to read, a partial frame included."""
    decoder = command_decoder()
    decoder.feed(m.Data().to_frame() + m.Helo(hostname=b"h").to_frame()[:6])
    decoder.clear()
    assert decoder.buffered == 0
    assert decoder.at_boundary
    assert decoder.next_raw() == (NO_FRAME, b"")


def test_oversized_frame_refused_before_payload() -> None:
    """A header announcing more than the limit is refused on the header alone."""
    decoder = command_decoder(max_frame_bytes=1000)
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(struct.pack(">I", 1_000_000_000))
    assert info.value.length == 1_000_000_000 - 1
    assert decoder.buffered == 4


def test_frame_at_limit_accepted() -> None:
    """A payload of exactly max_frame_bytes is fine."""
    decoder = command_decoder(max_frame_bytes=100)
    decoder.feed(m.BodyChunk(data=b"x" * 100).to_frame())
    assert decoder.next_message() == m.BodyChunk(data=b"x" * 100)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        pytest.param(b"\0\0\0\0", "length 0", id="zero-length"),
        pytest.param(frame(b"Z"), "unknown message code", id="unknown-code"),
        pytest.param(frame(b"H", b"no-nul"), "NUL", id="missing-nul"),
        pytest.param(frame(b"H", b"a\0b\0"), "expected 1 strings", id="left-over"),
        pytest.param(frame(b"O", b"\0\0\0\x06"), "12 bytes", id="short-optneg"),
        pytest.param(frame(b"C", b"host\0X\0\0"), "unknown family", id="bad-family"),
        pytest.param(frame(b"C", b"host\x004\x01"), "truncated", id="truncated-connect"),
        pytest.param(frame(b"C", b"host\0U\0"), "empty payload", id="family-u-with-data"),
        pytest.param(frame(b"N", b"x"), "empty payload", id="eoh-with-payload"),
        pytest.param(frame(b"D"), "stage", id="macro-no-stage"),
        pytest.param(frame(b"M"), "missing address", id="mail-empty"),
    ],
)
def test_malformed_commands(wire: bytes, match: str) -> None:
    """Malformed frames raise RemoteProtocolError with a useful message."""
    decoder = command_decoder()

    def decode() -> None:
        decoder.feed(wire)
        decoder.next_message()

    with pytest.raises(RemoteProtocolError, match=match):
        decode()


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(frame(b"c", b"x"), id="continue-with-payload"),
        pytest.param(frame(b"e", b"a\0b\0c\0"), id="chgfrom-three-strings"),
        pytest.param(frame(b"m", b"\0\0"), id="chgheader-truncated"),
        pytest.param(frame(b"O", b"\0\0\0\x06\0\0\0\0\0\0\0\0\0\0\0\x01x"), id="symlist-no-nul"),
        pytest.param(frame(b"O", b"\0\0\0\x06\0\0\0\0\0\0\0\0\0\0\0\x09x\0"), id="symlist-bad-stage"),
    ],
)
def test_malformed_responses(wire: bytes) -> None:
    """The MTA-side decoder is as strict as Postfix about replies."""
    decoder = response_decoder()
    decoder.feed(wire)
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_macro_odd_count_keeps_last_name() -> None:
    """A trailing macro name without a value is kept with an empty value."""
    decoder = command_decoder()
    decoder.feed(frame(b"D", b"Ca\0b\0c\0"))
    assert decoder.next_message() == m.Macro(stage=b"C", macros=((b"a", b"b"), (b"c", b"")))


@pytest.mark.parametrize(
    ("code", "lines", "enhanced", "text"),
    [
        pytest.param(550, [b"No"], b"5.7.1", b"550 5.7.1 No", id="single"),
        pytest.param(451, [b"a", b"b"], b"", b"451-a\r\n451 b", id="multi-no-enhanced"),
        pytest.param(550, [b"100% spam"], b"5.7.1", b"550 5.7.1 100%% spam", id="percent-doubled"),
        pytest.param(421, [b"bye"], b"4.7.0", b"421 4.7.0 bye", id="421"),
        pytest.param(550, [], b"", b"550 ", id="bare-code-keeps-space"),
        pytest.param(550, [], b"5.7.1", b"550 5.7.1", id="enhanced-only"),
    ],
)
def test_reply_code_build(code: int, lines: list[bytes], enhanced: bytes, text: bytes) -> None:
    """ReplyCode.build writes the portable multi-line format."""
    assert m.ReplyCode.build(code, lines, enhanced).text == text


@pytest.mark.parametrize(
    ("code", "lines", "enhanced"),
    [
        pytest.param(250, [b"ok"], b"", id="2xx"),
        pytest.param(550, [b"x"], b"4.7.1", id="class-mismatch"),
        pytest.param(550, [b"a\r\nb"], b"", id="crlf-inside"),
        pytest.param(550, [b"x"] * 33, b"", id="too-many-lines"),
        pytest.param(550, [b"x" * 600], b"", id="line-too-long"),
        pytest.param(550, [b"x"], b"5.7", id="bad-enhanced"),
    ],
)
def test_reply_code_build_refuses(code: int, lines: list[bytes], enhanced: bytes) -> None:
    """Invalid replies are refused before they reach the wire."""
    with pytest.raises(ValueError):
        m.ReplyCode.build(code, lines, enhanced)


def test_replace_body_chunks() -> None:
    """A body is cut into pieces of at most 65535 bytes; an empty body is one empty piece."""
    body = bytes(range(256)) * 1000
    pieces = m.replace_body(body)
    assert [len(p.data) for p in pieces] == [65535, 65535, 65535, 256000 - 3 * 65535]
    assert b"".join(p.data for p in pieces) == body
    assert m.replace_body(b"") == [m.ReplaceBody(data=b"")]


def test_nul_in_string_field_refused() -> None:
    """A NUL inside a string field would split it on the wire: refused locally."""
    with pytest.raises(LocalProtocolError):
        m.AddHeader(name=b"X", value=b"a\0b").to_frame()


def test_duplicate_code_fails_at_definition() -> None:
    """Declaring a second class with a used code raises at class creation."""
    with pytest.raises(TypeError, match="already used"):

        class Clash(m.Command, code=b"C"):
            __slots__ = ()


# ----------------------------------------------------------------- hypothesis

bstr = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
args = st.lists(bstr, max_size=3).map(tuple)

COMMAND_STRATEGIES = {
    m.Negotiate: st.builds(
        m.Negotiate,
        version=st.integers(0, 2**32 - 1),
        actions=st.integers(0, 2**32 - 1).map(Action),
        protocol=st.integers(0, 2**32 - 1).map(Protocol),
    ),
    m.Macro: st.builds(
        m.Macro,
        stage=st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E", b"U"]),
        macros=st.lists(st.tuples(bstr, bstr), max_size=4).map(tuple),
    ),
    m.Connect: st.one_of(
        st.builds(m.Connect, hostname=bstr),
        st.builds(
            m.Connect,
            hostname=bstr,
            family=st.sampled_from([Family.INET, Family.INET6, Family.UNIX]),
            port=st.integers(0, 65535),
            address=bstr,
        ),
    ),
    m.Helo: st.builds(m.Helo, hostname=bstr),
    m.MailFrom: st.builds(m.MailFrom, address=bstr, args=args),
    m.RcptTo: st.builds(m.RcptTo, address=bstr, args=args),
    m.Data: st.just(m.Data()),
    m.Header: st.builds(m.Header, name=bstr, value=bstr),
    m.EndOfHeaders: st.just(m.EndOfHeaders()),
    m.BodyChunk: st.builds(m.BodyChunk, data=st.binary(max_size=200)),
    m.EndOfMessage: st.builds(m.EndOfMessage, data=st.binary(max_size=20)),
    m.Abort: st.just(m.Abort()),
    m.Quit: st.just(m.Quit()),
    m.QuitNewConnection: st.just(m.QuitNewConnection()),
    m.Unknown: st.builds(m.Unknown, line=bstr),
}

RESPONSE_STRATEGIES = {
    m.NegotiateReply: st.builds(
        m.NegotiateReply,
        version=st.integers(0, 2**32 - 1),
        actions=st.integers(0, 2**32 - 1).map(Action),
        protocol=st.integers(0, 2**32 - 1).map(Protocol),
        macros=st.lists(st.tuples(st.sampled_from(list(MacroStage)), bstr), max_size=3).map(tuple),
    ),
    **{cls: st.just(cls()) for cls in (m.Continue, m.Accept, m.Reject, m.TempFail, m.Discard, m.Skip)},
    **{cls: st.just(cls()) for cls in (m.Progress, m.ConnFail, m.Shutdown)},
    m.ReplyCode: st.builds(m.ReplyCode, text=bstr),
    m.AddHeader: st.builds(m.AddHeader, name=bstr, value=bstr),
    m.InsertHeader: st.builds(m.InsertHeader, index=st.integers(0, 2**32 - 1), name=bstr, value=bstr),
    m.ChangeHeader: st.builds(m.ChangeHeader, index=st.integers(0, 2**32 - 1), name=bstr, value=bstr),
    m.AddRecipient: st.builds(m.AddRecipient, address=bstr),
    m.AddRecipientWithArgs: st.builds(m.AddRecipientWithArgs, address=bstr, args=st.none() | bstr),
    m.RemoveRecipient: st.builds(m.RemoveRecipient, address=bstr),
    m.ChangeSender: st.builds(m.ChangeSender, address=bstr, args=st.none() | bstr),
    m.ReplaceBody: st.builds(m.ReplaceBody, data=st.binary(max_size=200)),
    m.Quarantine: st.builds(m.Quarantine, reason=bstr.filter(bool)),
}


def test_strategies_cover_every_type() -> None:
    """The round-trip strategies exist for every registered message type."""
    assert set(COMMAND_STRATEGIES) == set(m.COMMANDS.values())
    assert set(RESPONSE_STRATEGIES) == set(m.RESPONSES.values())


@settings(max_examples=300)
@given(st.lists(st.one_of(*COMMAND_STRATEGIES.values()), min_size=1, max_size=8), st.integers(1, 64))
def test_command_round_trip(messages: list[m.Command], chunk: int) -> None:
    """Encoding then decoding any command stream, cut anywhere, gives the same commands."""
    stream = encode(messages)
    decoder = command_decoder()
    got: list[m.Command] = []
    for start in range(0, len(stream), chunk):
        decoder.feed(stream[start : start + chunk])
        got += decoder.messages()
    assert got == messages


@settings(max_examples=300)
@given(st.lists(st.one_of(*RESPONSE_STRATEGIES.values()), min_size=1, max_size=8))
def test_response_round_trip(messages: list[m.Reply | m.Modification]) -> None:
    """Encoding then decoding any reply stream gives the same replies."""
    decoder = response_decoder()
    decoder.feed(encode(messages))
    assert decoder.messages() == messages


@settings(max_examples=1000)
@given(st.binary(max_size=600), st.integers(1, 50))
def test_arbitrary_bytes_yield_messages_or_remote_error(data: bytes, chunk: int) -> None:
    """Random bytes either decode or raise RemoteProtocolError, and the buffer stays bounded."""
    limit = 64
    decoder: FrameDecoder[m.Command] = command_decoder(max_frame_bytes=limit)
    try:
        for start in range(0, len(data), chunk):
            decoder.feed(data[start : start + chunk])
            while decoder.next_message() is not None:
                pass
            assert decoder.buffered <= limit + 5
    except RemoteProtocolError:
        pass
