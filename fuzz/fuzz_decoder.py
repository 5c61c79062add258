"""Coverage-guided fuzz target (atheris/libFuzzer) for the milter frame decoder and session.

Each input is one MTA conversation after a valid negotiation:

* byte 0 picks how the stream is cut into ``receive_data`` calls (1-256 bytes), so
  the decoder sees frames split at every position;
* bytes 1-4 are the protocol bits of our OPTNEG answer (masked to what the MTA
  offered), so the no-reply, skip and "no event" variants of the state tables are
  all reachable;
* the rest is the byte stream from the MTA.

Every command that waits for a reply is answered with Continue. Any exception other
than ``RemoteProtocolError`` is a crash, and so is a broken invariant: the decoder
buffer must stay within one frame plus one cut, and every decoded command must
encode and decode back to itself. The same input is also fed to the MTA-side
response decoder, which has the same contract.

Run (see fuzz/README.md)::

    .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=300 -max_len=4096 CORPUS_DIR

``--make-seeds DIR`` writes a few valid conversations to start a corpus from.
``one_input`` needs no atheris, so the test suite replays the seeds through it.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: Small limits so that the fuzzer reaches the "over the limit" branches quickly.
MAX_FRAME_BYTES = 4096
_NS: Any = None


def _load() -> Any:
    """Import the code under test (done lazily so atheris can instrument it first)."""
    global _NS
    if _NS is None:
        from milterbridge.milter import messages as m
        from milterbridge.milter.codec import response_decoder
        from milterbridge.milter.constants import ALL_ACTIONS, ALL_PROTOCOL, Family, Protocol
        from milterbridge.milter.errors import RemoteProtocolError
        from milterbridge.milter.session import NEED_DATA, MessageEnded, MilterSession, SessionLimits

        _NS = SimpleNamespace(
            m=m,
            response_decoder=response_decoder,
            ALL_ACTIONS=ALL_ACTIONS,
            ALL_PROTOCOL=ALL_PROTOCOL,
            Protocol=Protocol,
            Family=Family,
            RemoteProtocolError=RemoteProtocolError,
            NEED_DATA=NEED_DATA,
            MessageEnded=MessageEnded,
            MilterSession=MilterSession,
            limits=SessionLimits(
                max_frame_bytes=MAX_FRAME_BYTES,
                max_recipients=20,
                max_headers=20,
                max_header_bytes=2048,
                max_macros=20,
            ),
        )
    return _NS


def negotiated_session(protocol_bits: int) -> Any:
    """A session that has received Postfix's offer and sent our answer."""
    ns = _load()
    m = ns.m
    offer = m.Negotiate(version=6, actions=ns.ALL_ACTIONS, protocol=ns.ALL_PROTOCOL)
    session = ns.MilterSession(ns.limits)
    session.receive_data(offer.to_frame())
    assert session.next_event() == offer
    protocol = ns.Protocol(protocol_bits) & ns.ALL_PROTOCOL
    session.send(m.NegotiateReply(version=6, actions=ns.ALL_ACTIONS, protocol=protocol))
    return session


def drive(session: Any, stream: bytes, cut: int) -> int:
    """Feed ``stream`` in pieces of ``cut`` bytes, answering with Continue; returns commands seen.

    Raises RemoteProtocolError when the stream is illegal (the expected way to fail).
    """
    ns = _load()
    m = ns.m
    seen = 0
    for start in range(0, len(stream), cut):
        session.receive_data(stream[start : start + cut])
        # The decoder never holds more than one frame plus what one read added.
        assert session.buffered <= MAX_FRAME_BYTES + 5 + cut, session.buffered
        while True:
            event = session.next_event()
            if event is ns.NEED_DATA:
                break
            if type(event) is ns.MessageEnded:
                continue  # the session's report that a message ended early: no frame of its own
            seen += 1
            again = type(event).decode_payload(event.encode_payload())
            assert again == event, (event, again)
            if session.needs_reply:
                session.send(m.Continue())
            assert not session.needs_reply
    session.receive_eof()
    return seen


def one_input(data: bytes) -> None:
    """The fuzz target: see the module docstring."""
    ns = _load()
    if len(data) < 5:
        return
    cut = data[0] + 1
    (bits,) = struct.unpack_from(">I", data, 1)
    stream = data[5:]
    with contextlib.suppress(ns.RemoteProtocolError):
        drive(negotiated_session(bits), stream, cut)
    decoder = ns.response_decoder(MAX_FRAME_BYTES)
    try:
        decoder.feed(stream)
        while decoder.next_message() is not None:
            pass
    except ns.RemoteProtocolError:
        pass


def seeds() -> dict[str, bytes]:
    """A few valid conversations (prefix bytes included) to start a corpus from."""
    ns = _load()
    m = ns.m
    conversation = [
        m.Macro(stage=b"C", macros=((b"j", b"mx.example"), (b"{daemon_name}", b"smtpd"))),
        m.Connect(hostname=b"client.example", family=ns.Family.INET, port=25, address=b"192.0.2.1"),
        m.Macro(stage=b"H", macros=()),
        m.Helo(hostname=b"client.example"),
        m.Macro(stage=b"M", macros=((b"i", b"4ABC"),)),
        m.MailFrom(address=b"<a@example.org>", args=(b"SIZE=10",)),
        m.RcptTo(address=b"<b@example.net>"),
        m.Data(),
        m.Header(name=b"Subject", value=b" hi"),
        m.Header(name=b"X-Fold", value=b" a\n\tb"),
        m.EndOfHeaders(),
        m.BodyChunk(data=b"hello\r\n"),
        m.EndOfMessage(),
        m.Abort(),
        m.Unknown(line=b"XYZZY"),
        m.Quit(),
    ]
    stream = b"".join(c.to_frame() for c in conversation)
    no_reply = 0x000FF080 | 0x400  # every NR_* bit plus SKIP
    return {
        "postfix-bytewise": b"\x00" + struct.pack(">I", 0) + stream,
        "postfix-whole": b"\xff" + struct.pack(">I", 0) + stream,
        "postfix-no-reply": b"\x07" + struct.pack(">I", no_reply) + stream,
        "quit-nc": b"\x10"
        + struct.pack(">I", 0)
        + stream[:-5]
        + m.QuitNewConnection().to_frame()
        + b"".join(c.to_frame() for c in conversation[:4]),
    }


def main(argv: list[str]) -> None:
    """Write seeds (``--make-seeds DIR``) or run libFuzzer with the remaining arguments."""
    if len(argv) == 3 and argv[1] == "--make-seeds":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (out / name).write_bytes(data)
        return
    import atheris

    with atheris.instrument_imports(include=["milterbridge"]):
        _load()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
