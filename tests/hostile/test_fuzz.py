"""Fuzzing the sans-IO core: random mixes of valid frames and garbage through a negotiated session.

The contract under test: whatever bytes an MTA sends, ``MilterSession`` either yields
commands (and ``MessageEnded``) or raises ``RemoteProtocolError``; nothing else escapes,
the decoder buffer stays within one frame plus one read, and a reply is asked for exactly
when one is due.
The coverage-guided twin of this test is ``fuzz/fuzz_decoder.py`` (atheris); its seed
conversations are replayed here so the target cannot rot.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from milterbridge.milter import messages as m
from milterbridge.milter.codec import response_decoder
from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL, Family, Protocol
from milterbridge.milter.context import MessageContext
from milterbridge.milter.errors import RemoteProtocolError
from milterbridge.milter.rules import FOLDABLE
from milterbridge.milter.session import NEED_DATA, MessageEnded, MilterSession, SessionLimits, State
from tests.hostile import BUDGET, budget_timeout

LIMITS = SessionLimits(max_frame_bytes=2048, max_recipients=8, max_headers=8, max_header_bytes=1024, max_macros=8)
OFFER = m.Negotiate(version=6, actions=ALL_ACTIONS, protocol=ALL_PROTOCOL)

#: NR_* bits, SKIP and the NO_* bits of events Postfix may be told to leave out.
_VARIABLE_BITS = [
    p for p in Protocol if p not in (Protocol.NONE, Protocol.MDS_256K, Protocol.MDS_1M, Protocol.HDR_LEADSPC)
]

text = st.binary(max_size=24).map(lambda b: b.replace(b"\0", b"-"))
stage = st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E", b"U", b"?"])

valid_command = st.one_of(
    st.builds(m.Macro, stage=stage, macros=st.lists(st.tuples(text, text), max_size=10).map(tuple)),
    st.builds(m.Connect, hostname=text),
    st.builds(
        m.Connect,
        hostname=text,
        family=st.sampled_from([Family.INET, Family.INET6, Family.UNIX]),
        port=st.integers(0, 65535),
        address=text,
    ),
    st.builds(m.Helo, hostname=text),
    st.builds(m.MailFrom, address=text, args=st.lists(text, max_size=3).map(tuple)),
    st.builds(m.RcptTo, address=text, args=st.lists(text, max_size=3).map(tuple)),
    st.just(m.Data()),
    st.builds(m.Header, name=text, value=st.binary(max_size=300).map(lambda b: b.replace(b"\0", b""))),
    st.just(m.EndOfHeaders()),
    st.builds(m.BodyChunk, data=st.binary(max_size=400)),
    st.builds(m.EndOfMessage, data=st.binary(max_size=8)),
    st.just(m.Abort()),
    st.just(m.Quit()),
    st.just(m.QuitNewConnection()),
    st.builds(m.Unknown, line=text),
    st.just(OFFER),
)

#: Frames that look right but are not: any code byte, any payload, odd lengths.
lying_frame = st.builds(
    lambda code, payload, delta: struct.pack(">I", max(0, len(payload) + 1 + delta)) + code + payload,
    st.binary(min_size=1, max_size=1),
    st.binary(max_size=64),
    st.sampled_from([0, 0, 0, -1, 1, 5, -5]),
)
huge_header = st.integers(LIMITS.max_frame_bytes + 2, 2**32 - 1).map(lambda n: struct.pack(">I", n) + b"B")

garbage = st.one_of(lying_frame, st.binary(min_size=1, max_size=16), huge_header)
#: Mostly valid frames (so sessions get deep into a transaction), now and then garbage.
piece = st.one_of(*[valid_command.map(lambda c: c.to_frame())] * 8, garbage)

#: A legal Postfix-like opening; each example starts with some prefix of it.
OPENING = [
    m.Macro(stage=b"C", macros=((b"j", b"mx.example"),)),
    m.Connect(hostname=b"client.example", family=Family.INET, port=4000, address=b"192.0.2.1"),
    m.Helo(hostname=b"client.example"),
    m.MailFrom(address=b"<a@example.org>"),
    m.RcptTo(address=b"<b@example.net>"),
    m.Data(),
    m.Header(name=b"Subject", value=b" hello"),
    m.EndOfHeaders(),
    m.BodyChunk(data=b"body\r\n"),
]
opening = st.integers(0, len(OPENING)).map(lambda n: b"".join(c.to_frame() for c in OPENING[:n]))

legal_everywhere = st.sampled_from(
    [m.Continue(), m.Continue(), m.TempFail(), m.Reject(), m.ReplyCode.build(451, [b"try later"], b"4.7.1")]
)


def negotiated(protocol: Protocol, *, fold: bool = False) -> MilterSession:
    """A session past OPTNEG, answering with ``protocol`` (a subset of Postfix's offer).

    With ``fold`` nobody subscribes to the foldable commands: it folds in every one it can.
    """
    session = MilterSession(LIMITS)
    if fold:
        session.set_unsubscribed(FOLDABLE)
    session.receive_data(OFFER.to_frame())
    assert session.next_event() == OFFER
    session.send(m.NegotiateReply(version=6, actions=ALL_ACTIONS, protocol=protocol))
    return session


@budget_timeout
@settings(
    max_examples=BUDGET.fuzz_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    bits=st.lists(st.sampled_from(_VARIABLE_BITS), max_size=6),
    prefix=opening,
    pieces=st.lists(piece, max_size=30),
    cut=st.integers(1, 512),
    replies=st.lists(legal_everywhere, min_size=1, max_size=8),
)
def test_session_survives_frames_and_garbage(
    bits: list[Protocol], prefix: bytes, pieces: list[bytes], cut: int, replies: list[m.Reply]
) -> None:
    """Any mix of valid frames and garbage yields commands or RemoteProtocolError, nothing else."""
    protocol = Protocol.NONE
    for bit in bits:
        protocol |= bit
    session = negotiated(protocol)
    stream = prefix + b"".join(pieces)
    answered = 0
    try:
        for start in range(0, len(stream), cut):
            session.receive_data(stream[start : start + cut])
            assert session.buffered <= LIMITS.max_frame_bytes + 5 + cut
            while session.next_event() is not NEED_DATA:
                if session.needs_reply:
                    session.send(replies[answered % len(replies)])
                    answered += 1
                assert not session.needs_reply
        open_message = session.message
        session.receive_eof()
    except RemoteProtocolError:
        pass
    else:
        assert session.state is State.CLOSED
        assert session.message is None
        if open_message is not None:
            assert session.next_event() == MessageEnded(open_message)
        assert session.next_event() is NEED_DATA
    event("commands answered: " + ("none" if not answered else "1-4" if answered < 5 else "5 or more"))


#: Commands that mostly fit after the opening, so that many examples take some in.
_IN_A_MESSAGE = [
    m.Macro(stage=b"R", macros=((b"i", b"Q1"),)),
    m.RcptTo(address=b"<c@example.net>", args=(b"NOTIFY=NEVER",)),
    m.Data(),
    m.Macro(stage=b"L", macros=((b"i", b"Q1"),)),
    m.Macro(stage=b"L", macros=((b"i", b"Q2"),)),
    m.Macro(stage=b"L", macros=()),
    m.Header(name=b"X-A", value=b" a"),
    m.Header(name=b"X-B", value=b"b"),
    m.EndOfHeaders(),
    m.MailFrom(address=b"<d@example.org>"),
    m.Abort(),
    m.EndOfMessage(),
]
_NO_REPLY_BITS = [Protocol.NR_RCPT, Protocol.NR_DATA, Protocol.NR_HEADER, Protocol.NR_EOH]


def _message(msg: MessageContext | None) -> object:
    """A message context as plain values (macros parsed)."""
    if msg is None:
        return None
    return (
        msg.number,
        msg.mail_from,
        msg.mail_args,
        list(msg.recipients),
        list(msg.headers),
        msg.header_bytes,
        msg.body_bytes,
        dict(msg.macros),
        dict(msg.over_limits),
    )


def _snapshot(session: MilterSession) -> object:
    """Everything the session knows, as plain values: state, connection, message and counts."""

    conn = session.connection
    return (
        session.state,
        (conn.hostname, conn.family, conn.port, conn.address, conn.helo, conn.message_count, dict(conn.macros)),
        _message(session.message),
        session.event_counts,
        session.commands_read,
    )


def _run(
    session: MilterSession, stream: bytes, cut: int, replies: list[m.Reply]
) -> tuple[list[str], list[object], str | None]:
    """Feed ``stream`` in ``cut``-byte pieces.

    Returns what next_event returned (names, "?" when a reply was due), the messages that
    ended (MessageEnded) or reached end-of-message (as plain values), and the error.
    """
    returned: list[str] = []
    ended: list[object] = []
    answered = 0
    try:
        for start in range(0, len(stream), cut):
            session.receive_data(stream[start : start + cut])
            while (event := session.next_event()) is not NEED_DATA:
                returned.append(type(event).__name__ + ("?" if session.needs_reply else ""))
                if isinstance(event, MessageEnded):
                    ended.append(_message(event.message))
                elif isinstance(event, m.EndOfMessage):
                    ended.append(_message(session.message))
                if session.needs_reply:
                    session.send(replies[answered % len(replies)])
                    answered += 1
    except RemoteProtocolError as exc:
        return returned, ended, str(exc)
    return returned, ended, None


@budget_timeout
@settings(
    max_examples=BUDGET.fuzz_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    bits=st.lists(st.sampled_from(_VARIABLE_BITS), max_size=6),
    no_reply=st.sets(st.sampled_from(_NO_REPLY_BITS)),
    prefix=st.integers(3, len(OPENING)).map(lambda n: b"".join(c.to_frame() for c in OPENING[:n])),
    commands=st.lists(st.one_of(valid_command, *[st.sampled_from(_IN_A_MESSAGE)] * 4), max_size=40),
    cut=st.integers(1, 512),
    replies=st.lists(legal_everywhere, min_size=1, max_size=8),
)
def test_folding_session_ends_where_a_plain_one_does(
    bits: list[Protocol],
    no_reply: set[Protocol],
    prefix: bytes,
    commands: list[m.Command],
    cut: int,
    replies: list[m.Reply],
) -> None:
    """Commands folded in by the session itself (set_unsubscribed) leave the same context, ended
    messages, counts, errors and replies."""
    protocol = Protocol.NONE
    for bit in [*bits, *no_reply]:
        protocol |= bit
    stream = prefix + b"".join(c.to_frame() for c in commands)
    plain = negotiated(protocol)
    folding = negotiated(protocol, fold=True)

    plain_returned, plain_ended, plain_error = _run(plain, stream, cut, replies)
    folding_returned, folding_ended, folding_error = _run(folding, stream, cut, replies)

    foldable = {kind.__name__ for kind in FOLDABLE}
    folded = [name for name in plain_returned if name in foldable]  # no "?": no reply was due
    assert folding_returned == [name for name in plain_returned if name not in foldable]
    assert folding_ended == plain_ended
    assert folding_error == plain_error
    assert _snapshot(folding) == _snapshot(plain)
    returned_commands = [name for name in folding_returned if name != "MessageEnded"]
    assert folding.commands_read == 1 + len(returned_commands) + len(folded)  # 1: OPTNEG
    assert sum(folding.event_counts.values()) <= folding.commands_read
    event("commands folded: " + ("none" if not folded else "1-4" if len(folded) < 5 else "5 or more"))


@budget_timeout
@settings(max_examples=BUDGET.fuzz_examples // 4, deadline=None)
@given(data=st.binary(max_size=2000), cut=st.integers(1, 300))
def test_response_decoder_survives_garbage(data: bytes, cut: int) -> None:
    """The MTA-side decoder (milterbridge send, bench) also fails only with RemoteProtocolError."""
    decoder = response_decoder(max_frame_bytes=256)
    try:
        for start in range(0, len(data), cut):
            decoder.feed(data[start : start + cut])
            while decoder.next_message() is not None:
                pass
            assert decoder.buffered <= 256 + 5 + cut
    except RemoteProtocolError:
        pass


# ------------------------------------------------------------- the atheris target


def _fuzz_target() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_decoder.py"
    spec = importlib.util.spec_from_file_location("fuzz_decoder", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = _fuzz_target()


@pytest.mark.parametrize("name", sorted(FUZZ.seeds()))
def test_fuzz_seed_is_a_clean_conversation(name: str) -> None:
    """Each seed of the atheris corpus is a legal conversation the session reads to the end."""
    data = FUZZ.seeds()[name]
    session = FUZZ.negotiated_session(int.from_bytes(data[1:5], "big"))
    assert FUZZ.drive(session, data[5:], data[0] + 1) >= 13
    FUZZ.one_input(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00\x00\x00" + struct.pack(">I", 0xFFFFFFFF) + b"B", id="huge-length"),
        pytest.param(b"\x03\xff\xff\xff\xff" + b"\x00\x00\x00\x01", id="truncated-header"),
        pytest.param(b"\x00\x00\x00\x00\x00" + m.Header(name=b"a", value=b"b").to_frame(), id="header-before-mail"),
        pytest.param(
            b"\x07\x00\x00\x00\x00"
            + m.Connect(hostname=b"client", family=Family.INET, port=25, address=b"192.0.2.1").to_frame()
            + m.Helo(hostname=b"client").to_frame()
            + m.MailFrom(address=b"<a@example.org>", args=()).to_frame()
            + m.Abort().to_frame(),
            id="message-ended-by-abort",
        ),
    ],
)
def test_fuzz_target_handles_edge_inputs(data: bytes) -> None:
    """The fuzz target itself accepts degenerate inputs without an exception."""
    FUZZ.one_input(data)
