"""Session tests: command order, legal replies, no-reply flags, message scope, ended messages, counts."""

from __future__ import annotations

import pytest

from milterbridge.milter import messages as m
from milterbridge.milter.constants import Action, Event, Family, Protocol
from milterbridge.milter.context import Limit, MemoryBudget, truncated_parts
from milterbridge.milter.errors import LocalProtocolError, RemoteProtocolError
from milterbridge.milter.negotiation import Requirements, negotiate
from milterbridge.milter.rules import FOLDABLE
from milterbridge.milter.session import NEED_DATA, MessageEnded, MilterSession, SessionLimits, State

POSTFIX_OFFER = m.Negotiate(version=6, actions=Action(0x1FF), protocol=Protocol(0x1FFFFF))


def negotiated(
    requirements: Requirements | None = None,
    offer: m.Negotiate = POSTFIX_OFFER,
    *,
    limits: SessionLimits | None = None,
    unsubscribed: frozenset[type[m.Command]] = frozenset(),
) -> MilterSession:
    """A session that has answered the offer (told beforehand which commands are ``unsubscribed``)."""
    session = MilterSession(limits)
    session.set_unsubscribed(unsubscribed)
    session.receive_data(offer.to_frame())
    got = session.next_event()
    assert got == offer
    session.send(negotiate(offer, requirements or Requirements()).reply())
    return session


def feed(session: MilterSession, *commands: m.Command) -> list[m.Command | MessageEnded]:
    """Feed commands one at a time, answering each one that needs a reply with continue."""
    seen: list[m.Command | MessageEnded] = []
    for cmd in commands:
        session.receive_data(cmd.to_frame())
        while (ev := session.next_event()) is not NEED_DATA:
            seen.append(ev)  # type: ignore[arg-type]  # not NEED_DATA
            if session.needs_reply:
                session.send(m.Continue())
    return seen


CONNECT = m.Connect(hostname=b"[192.0.2.1]", family=Family.INET, port=4000, address=b"192.0.2.1")
OPENING = (m.Macro(stage=b"C", macros=((b"j", b"mx"),)), CONNECT, m.Helo(hostname=b"client"))
TRANSACTION = (
    m.Macro(stage=b"M", macros=((b"{mail_addr}", b"a@b"),)),
    m.MailFrom(address=b"<a@b>", args=(b"SIZE=10",)),
    m.Macro(stage=b"R", macros=((b"i", b"QID1"),)),
    m.RcptTo(address=b"<c@d>"),
    m.RcptTo(address=b"<e@f>"),
    m.Data(),
    m.Header(name=b"Subject", value=b" hi"),
    m.EndOfHeaders(),
    m.BodyChunk(data=b"body\r\n"),
)


def test_full_postfix_conversation() -> None:
    """A Postfix-like conversation walks the states and fills the context."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION)
    assert s.state is State.BODY
    assert s.connection.helo == b"client"
    assert s.connection.macros == {b"j": b"mx"}
    assert s.message is not None
    assert s.message.mail_from == b"<a@b>"
    assert s.message.recipients == [(b"<c@d>", ()), (b"<e@f>", ())]
    assert s.message.headers == [(b"Subject", b" hi")]
    assert s.message.queue_id == b"QID1"
    assert s.message.body_bytes == 6
    s.receive_data(m.EndOfMessage().to_frame())
    assert s.next_event() == m.EndOfMessage()
    wire = s.send_all([m.AddHeader(name=b"X", value=b" 1"), m.Accept()])
    assert wire == m.AddHeader(name=b"X", value=b" 1").to_frame() + m.Accept().to_frame()
    assert s.message is None
    assert s.state is State.CONNECTED
    assert feed(s, m.Abort()) == [m.Abort()]  # a completed message is not reported as ended


def test_abort_and_double_abort() -> None:
    """ABORT ends the open message once, reported before the ABORT; a second ABORT is a harmless no-op."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION[:4])
    msg = s.message
    assert msg is not None
    got = feed(s, m.Abort())
    assert got == [MessageEnded(msg), m.Abort()]
    assert got[0].message is msg  # type: ignore[union-attr]
    assert s.message is None
    assert s.connection.helo == b"client"
    assert feed(s, m.Abort()) == [m.Abort()]
    assert s.state is State.CONNECTED


def test_abort_after_eom_is_noop() -> None:
    """Postfix's ABORT after a complete message ends nothing."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION, m.EndOfMessage())
    assert s.message is None
    assert feed(s, m.Abort()) == [m.Abort()]


def test_several_messages_reset_message_scope_only() -> None:
    """Each transaction starts clean; connection macros and HELO stay."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION, m.EndOfMessage(), m.Abort())
    feed(s, m.MailFrom(address=b"<x@y>"))
    assert s.message is not None
    assert s.message.number == 2
    assert s.message.recipients == []
    assert s.message.macros == {}
    assert s.message.queue_id is None
    assert s.connection.macros == {b"j": b"mx"}


def test_new_mail_or_helo_ends_open_message() -> None:
    """A new MAIL (or HELO) while a transaction is open ends it: MessageEnded comes first."""
    s = negotiated()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    first = s.message
    assert first is not None
    assert feed(s, m.MailFrom(address=b"<c@d>")) == [MessageEnded(first), m.MailFrom(address=b"<c@d>")]
    second = s.message
    assert second is not None
    assert second.mail_from == b"<c@d>"
    assert feed(s, m.Helo(hostname=b"again")) == [MessageEnded(second), m.Helo(hostname=b"again")]
    assert s.message is None


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(m.MailFrom(address=b"<x@y>"), id="mail"),
        pytest.param(m.Helo(hostname=b"again"), id="helo"),
        pytest.param(m.Abort(), id="abort"),
        pytest.param(m.Quit(), id="quit"),
        pytest.param(m.QuitNewConnection(), id="quit-nc"),
    ],
)
def test_message_ended_comes_before_the_command_that_ended_it(command: m.Command) -> None:
    """While MessageEnded is out no reply is due; the command comes next, then awaits its reply."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION[:4])
    msg = s.message
    assert msg is not None
    s.receive_data(command.to_frame())
    ended = s.next_event()
    assert ended == MessageEnded(msg)
    assert not s.needs_reply
    with pytest.raises(LocalProtocolError, match="no command is waiting"):
        s.send(m.Continue())
    assert s.next_event() == command
    assert s.needs_reply is (type(command) in (m.MailFrom, m.Helo))
    if s.needs_reply:
        s.send(m.Continue())
    assert s.next_event() is NEED_DATA


def test_each_ended_message_is_reported_once() -> None:
    """Reading on after MessageEnded and its command reports nothing again, not even at EOF."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION[:4])
    assert [type(e) for e in feed(s, m.Abort(), m.Abort(), m.Helo(hostname=b"h"))] == [
        MessageEnded,
        m.Abort,
        m.Abort,
        m.Helo,
    ]
    s.receive_eof()
    assert s.next_event() is NEED_DATA


def test_quit_nc_allows_new_connect() -> None:
    """After QUIT_NC a new CONNECT starts a fresh connection context."""
    s = negotiated()
    feed(s, *OPENING, m.QuitNewConnection())
    assert s.state is State.NEGOTIATED
    assert s.connection.helo is None
    feed(s, m.Connect(hostname=b"second"))
    assert s.connection.hostname == b"second"


def test_quit_closes() -> None:
    """After QUIT no more data is accepted."""
    s = negotiated()
    feed(s, *OPENING, m.Quit())
    assert s.state is State.CLOSED
    with pytest.raises(RemoteProtocolError):
        s.receive_data(m.Helo(hostname=b"x").to_frame())


@pytest.mark.parametrize(
    ("prefix", "bad"),
    [
        pytest.param((), m.RcptTo(address=b"<a@b>"), id="rcpt-before-mail"),
        pytest.param((), m.Data(), id="data-before-mail"),
        pytest.param((), m.EndOfMessage(), id="eom-before-mail"),
        pytest.param((), m.Connect(hostname=b"x"), id="second-connect"),
        pytest.param(
            (*TRANSACTION[:2], m.Data(), m.Header(name=b"a", value=b"b")),
            m.MailFrom(address=b"<x@y>"),
            id="mail-during-headers",
        ),
        pytest.param(TRANSACTION, m.Header(name=b"a", value=b"b"), id="header-after-body"),
        pytest.param(TRANSACTION[:2], POSTFIX_OFFER, id="second-optneg"),
    ],
)
def test_illegal_orders(prefix: tuple[m.Command, ...], bad: m.Command) -> None:
    """Commands out of order are a remote protocol error."""
    s = negotiated()
    feed(s, *OPENING, *prefix)
    s.receive_data(bad.to_frame())
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        s.next_event()


def test_command_before_optneg_is_illegal() -> None:
    """Nothing but OPTNEG may open the conversation."""
    s = MilterSession()
    s.receive_data(CONNECT.to_frame())
    with pytest.raises(RemoteProtocolError):
        s.next_event()


@pytest.mark.parametrize(
    ("prefix", "reply"),
    [
        pytest.param((), m.AddHeader(name=b"X", value=b"y"), id="mod-at-helo"),
        pytest.param(TRANSACTION[:2], m.Quarantine(reason=b"r"), id="quarantine-at-mail"),
        pytest.param(TRANSACTION[:2], m.Progress(), id="progress-at-mail"),
        pytest.param((), m.Discard(), id="discard-at-helo"),
        pytest.param(TRANSACTION[:2], m.Skip(), id="skip-at-mail"),
        pytest.param((), m.ConnFail(), id="conn-fail"),
        pytest.param(TRANSACTION[:2], m.ReplyCode(text=b"250 ok"), id="replycode-2xx"),
    ],
)
def test_replies_at_wrong_stage_refused(prefix: tuple[m.Command, ...], reply: m.Reply) -> None:
    """Replies illegal for the pending command raise LocalProtocolError."""
    s = negotiated()
    feed(s, *OPENING[:2])
    s.receive_data(b"".join(c.to_frame() for c in (m.Helo(hostname=b"h"), *prefix)))
    while (ev := s.next_event()) is not NEED_DATA:
        if ev == (prefix[-1] if prefix else m.Helo(hostname=b"h")):
            break
        if s.needs_reply:
            s.send(m.Continue())
    assert s.needs_reply
    with pytest.raises(LocalProtocolError):
        s.send(reply)


def test_reply_without_pending_command_refused() -> None:
    """A reply when nothing waits for one is our bug, not the peer's."""
    s = negotiated()
    with pytest.raises(LocalProtocolError):
        s.send(m.Continue())


def test_modification_needs_negotiated_action() -> None:
    """A modification whose action bit was not negotiated is refused."""
    s = negotiated(Requirements(actions=Action.ADD_HEADERS))
    feed(s, *OPENING, *TRANSACTION)
    s.receive_data(m.EndOfMessage().to_frame())
    s.next_event()
    s.send(m.AddHeader(name=b"X", value=b"1"))
    with pytest.raises(LocalProtocolError, match="not negotiated"):
        s.send(m.RemoveRecipient(address=b"<c@d>"))


def test_replbody_must_be_one_run() -> None:
    """REPLBODY pieces interrupted by another modification are refused (Postfix rule)."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION)
    s.receive_data(m.EndOfMessage().to_frame())
    s.next_event()
    s.send(m.ReplaceBody(data=b"a"))
    s.send(m.ReplaceBody(data=b"b"))
    s.send(m.AddHeader(name=b"X", value=b"1"))
    with pytest.raises(LocalProtocolError, match="unbroken"):
        s.send(m.ReplaceBody(data=b"c"))


def test_progress_keeps_eom_pending() -> None:
    """PROGRESS at end-of-message is interim: the final reply is still due."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION)
    s.receive_data(m.EndOfMessage().to_frame())
    s.next_event()
    s.send(m.Progress())
    assert s.needs_reply
    s.send(m.Continue())
    assert not s.needs_reply


def test_no_reply_events_need_no_reply() -> None:
    """Events negotiated as no-reply are returned without a pending reply."""
    req = Requirements(reply_events=frozenset({Event.RCPT}))
    s = negotiated(req)
    s.receive_data(b"".join(c.to_frame() for c in (*OPENING, *TRANSACTION[:4])))
    kinds = []
    while (ev := s.next_event()) is not NEED_DATA:
        kinds.append((type(ev).__name__, s.needs_reply))
        if s.needs_reply:
            s.send(m.Continue())
    assert kinds == [
        ("Connect", False),
        ("Helo", False),
        ("MailFrom", False),
        ("RcptTo", True),
    ]


def test_next_event_before_reply_is_local_error() -> None:
    """Reading on while a reply is due is a local misuse."""
    s = negotiated()
    s.receive_data(CONNECT.to_frame() + m.Helo(hostname=b"x").to_frame())
    s.next_event()
    with pytest.raises(LocalProtocolError):
        s.next_event()


def test_rejected_recipient_leaves_the_message() -> None:
    """A recipient we refuse is not kept in the message context."""
    s = negotiated()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    s.receive_data(m.RcptTo(address=b"<bad@d>").to_frame())
    s.next_event()
    s.send(m.ReplyCode.build(550, [b"no"], b"5.1.1"))
    feed(s, m.RcptTo(address=b"<good@d>"))
    assert s.message is not None
    assert s.message.recipients == [(b"<good@d>", ())]


def test_skipped_states_with_no_flags() -> None:
    """With CONNECT, HELO, MAIL, RCPT and headers switched off, EOM may follow OPTNEG directly."""
    s = negotiated(Requirements(events=frozenset(), reply_events=frozenset()))
    s.receive_data(m.Macro(stage=b"E", macros=((b"i", b"Q9"),)).to_frame() + m.EndOfMessage().to_frame())
    assert s.next_event() == m.EndOfMessage()
    assert s.message is not None
    assert s.message.queue_id == b"Q9"
    s.send(m.Accept())
    assert s.message is None
    assert s.state is State.CONNECTED


def test_eof_mid_message_ends_it() -> None:
    """EOF with an open message: next_event reports it once, then needs data."""
    s = negotiated()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    msg = s.message
    assert msg is not None
    s.receive_eof()
    assert s.state is State.CLOSED
    assert s.message is None
    assert s.next_event() == MessageEnded(msg)
    assert s.next_event() is NEED_DATA
    assert s.next_event() is NEED_DATA


def test_eof_without_a_message_reports_nothing() -> None:
    """EOF between messages ends none."""
    s = negotiated()
    feed(s, *OPENING)
    s.receive_eof()
    assert s.next_event() is NEED_DATA


def test_eof_mid_frame_is_remote_error() -> None:
    """EOF inside a frame is reported as a truncated frame; the message it ended is still reported."""
    s = negotiated()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    msg = s.message
    assert msg is not None
    s.receive_data(m.RcptTo(address=b"<c@d>").to_frame()[:7])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        s.receive_eof()
    assert s.next_event() == MessageEnded(msg)
    assert s.next_event() is NEED_DATA


def test_eof_drops_what_was_not_read() -> None:
    """Whole frames still buffered at EOF are not read: the open message ends, nothing follows."""
    s = negotiated()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    msg = s.message
    assert msg is not None
    s.receive_data(m.RcptTo(address=b"<c@d>").to_frame() + m.Quit().to_frame())
    with pytest.raises(RemoteProtocolError):  # bytes were left unread
        s.receive_eof()
    assert s.buffered == 0
    assert s.next_event() == MessageEnded(msg)
    assert s.next_event() is NEED_DATA


def test_eof_before_the_held_command_ends_its_message_too() -> None:
    """A MAIL that ended a message opened another: EOF before the MAIL was read reports that one."""
    s = negotiated()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    first = s.message
    assert first is not None
    s.receive_data(m.MailFrom(address=b"<c@d>").to_frame())
    assert s.next_event() == MessageEnded(first)
    second = s.message
    assert second is not None
    s.receive_eof()
    assert s.next_event() == MessageEnded(second)
    assert s.next_event() is NEED_DATA


LIMIT_CASES = [
    pytest.param(
        SessionLimits(max_recipients=2),
        [m.RcptTo(address=b"<r1>"), m.RcptTo(address=b"<r2>"), m.RcptTo(address=b"<r3>")],
        "max_recipients",
        ["recipients"],
        id="recipients",
    ),
    pytest.param(
        SessionLimits(max_headers=1),
        [m.Header(name=b"a", value=b"1"), m.Header(name=b"b", value=b"2")],
        "max_headers",
        ["headers"],
        id="headers",
    ),
    pytest.param(
        SessionLimits(max_header_bytes=10),
        [m.Header(name=b"a", value=b"1"), m.Header(name=b"b", value=b"2" * 20)],
        "max_header_bytes",
        ["headers"],
        id="header-bytes",
    ),
    pytest.param(
        SessionLimits(max_macros=2),
        [m.Macro(stage=b"R", macros=((b"a", b""), (b"b", b""), (b"c", b""))), m.RcptTo(address=b"<r>")],
        "max_macros",
        ["macros"],
        id="macros",
    ),
    pytest.param(
        SessionLimits(max_message_bytes=5),
        [m.Data(), m.EndOfHeaders(), m.BodyChunk(data=b"123"), m.BodyChunk(data=b"456")],
        "max_message_bytes",
        ["body"],
        id="message-bytes",
    ),
]


@pytest.mark.parametrize(("limits", "commands", "limit", "parts"), LIMIT_CASES)
def test_limits_mark_the_message_and_keep_the_connection(
    limits: SessionLimits, commands: list[m.Command], limit: str, parts: list[str]
) -> None:
    """Going over a limit keeps nothing more, marks the message and raises nothing: the next
    command still parses, and a new message starts unmarked."""
    s = negotiated(limits=limits)
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    feed(s, *commands)
    assert s.message is not None
    assert s.over_limit() is Limit(limit)
    assert truncated_parts(s.message, s.connection) == parts
    assert len(s.message.recipients) <= limits.max_recipients
    assert len(s.message.headers) <= limits.max_headers
    assert s.message.header_bytes <= limits.max_header_bytes
    assert len(s.message.macros) <= limits.max_macros
    feed(s, m.EndOfMessage())
    feed(s, m.MailFrom(address=b"<next@b>"))
    assert s.over_limit() is None


def test_headers_kept_are_a_prefix() -> None:
    """After the first header over a limit no later header is kept, even one that would fit,
    so the kept headers' indexes are those of the message."""
    s = negotiated(limits=SessionLimits(max_header_bytes=10))
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    feed(s, m.Header(name=b"a", value=b"1"), m.Header(name=b"b", value=b"2" * 20), m.Header(name=b"c", value=b"3"))
    assert s.message is not None
    assert s.message.headers == [(b"a", b"1")]
    assert s.message.over_limits == {"max_header_bytes": 2}


def test_a_recipient_refused_over_the_limit_is_not_missing() -> None:
    """A recipient over max_recipients that is refused at RCPT leaves the mark again, and the
    refusal does not drop a recipient that was kept."""
    s = negotiated(Requirements(reply_events=frozenset({Event.RCPT})), limits=SessionLimits(max_recipients=1))
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"), m.RcptTo(address=b"<r1>"))
    s.receive_data(m.RcptTo(address=b"<r2>").to_frame())
    assert isinstance(s.next_event(), m.RcptTo)
    assert s.over_limit() == "max_recipients"
    s.send(m.TempFail())
    assert s.message is not None
    assert s.message.recipients == [(b"<r1>", ())]
    assert s.over_limit() is None


def test_connection_macros_over_the_limit_mark_every_message() -> None:
    """Connection-stage macros over max_macros mark the connection, so each message is marked."""
    s = negotiated(limits=SessionLimits(max_macros=1))
    feed(s, m.Macro(stage=b"C", macros=((b"j", b"mx"), (b"_", b"client"))), CONNECT, m.Helo(hostname=b"h"))
    for n in range(2):
        feed(s, m.MailFrom(address=b"<a@b>"))
        assert s.over_limit() == "max_macros", n
        assert s.message is not None
        assert truncated_parts(s.message, s.connection) == ["macros"]
        s.receive_data(m.Abort().to_frame())
        s.next_event()


# ------------------------------------------------------------------ folded commands

UNSUBSCRIBED = frozenset({m.MailFrom, m.RcptTo, m.Data, m.Header, m.EndOfHeaders})


def folding_session(reply_events: frozenset[Event] = frozenset()) -> MilterSession:
    """A session told that nobody subscribes to MAIL, RCPT, DATA, headers and EOH, every event no-reply."""
    return negotiated(Requirements(reply_events=reply_events), unsubscribed=UNSUBSCRIBED)


def drain(session: MilterSession) -> list[str]:
    """Names of what next_event returns, answering the commands that need it with continue."""
    seen = []
    while (ev := session.next_event()) is not NEED_DATA:
        seen.append(type(ev).__name__)
        if session.needs_reply:
            session.send(m.Continue())
    return seen


def test_unsubscribed_no_reply_commands_are_folded_without_being_returned() -> None:
    """Recipients, DATA, headers and EOH land in the context and the counts, not in next_event."""
    s = folding_session()
    eoh_macros = m.Macro(stage=b"L", macros=((b"i", b"QID1"),))
    header = m.Header(name=b"Subject", value=b" hi")
    s.receive_data(
        b"".join(c.to_frame() for c in (*OPENING, *TRANSACTION[:6], eoh_macros, header, eoh_macros, header))
        + m.EndOfHeaders().to_frame()
    )
    # MAIL is unsubscribed too, but only the commands in FOLDABLE are folded.
    assert drain(s) == ["Connect", "Helo", "MailFrom"]
    msg = s.message
    assert msg is not None
    assert msg.recipients == [(b"<c@d>", ()), (b"<e@f>", ())]
    assert msg.headers == [(b"Subject", b" hi"), (b"Subject", b" hi")]
    assert msg.queue_id == b"QID1"
    s.receive_data(m.EndOfMessage().to_frame())
    assert drain(s) == ["EndOfMessage"]
    assert s.event_counts == {
        Event.CONNECT: 1,
        Event.HELO: 1,
        Event.MAIL: 1,
        Event.RCPT: 2,
        Event.DATA: 1,
        Event.HEADER: 2,
        Event.EOH: 1,
        Event.EOM: 1,
    }
    assert s.commands_read == 11  # OPTNEG and the ten above; macro packets are not counted


def test_unsubscribed_commands_that_need_a_reply_are_returned() -> None:
    """An unsubscribed command the MTA waits for is returned as usual; the no-reply ones are still folded."""
    s = folding_session(reply_events=frozenset({Event.RCPT}))
    s.receive_data(b"".join(c.to_frame() for c in (*OPENING, *TRANSACTION[:7])))
    assert drain(s) == ["Connect", "Helo", "MailFrom", "RcptTo", "RcptTo"]
    assert s.event_counts == {
        Event.CONNECT: 1,
        Event.HELO: 1,
        Event.MAIL: 1,
        Event.RCPT: 2,
        Event.DATA: 1,
        Event.HEADER: 1,
    }
    assert s.message is not None
    assert s.message.headers == [(b"Subject", b" hi")]


def test_nothing_is_folded_before_negotiation() -> None:
    """Whether a command is no-reply is known only after negotiation: until then nothing is folded."""
    s = MilterSession()
    s.set_unsubscribed(FOLDABLE)
    s.receive_data(m.Header(name=b"a", value=b"b").to_frame())
    with pytest.raises(RemoteProtocolError, match="not allowed in state init"):
        s.next_event()


def test_event_counts_cover_every_command_with_an_event() -> None:
    """Returned commands are counted under their event (close for QUIT), OPTNEG and QUIT_NC only in commands_read."""
    s = negotiated()
    feed(s, *OPENING, *TRANSACTION[:4], m.Unknown(line=b"XYZZY"), m.Abort(), m.QuitNewConnection(), CONNECT, m.Quit())
    assert s.event_counts == {
        Event.CONNECT: 2,
        Event.HELO: 1,
        Event.MAIL: 1,
        Event.RCPT: 1,
        Event.UNKNOWN: 1,
        Event.ABORT: 1,
        Event.CLOSE: 1,
    }
    assert s.commands_read == 10  # OPTNEG and the nine commands; macro packets are not counted


@pytest.mark.parametrize(
    ("prefix", "bad", "match"),
    [
        pytest.param((), m.RcptTo(address=b"<r>"), "not allowed in state connected", id="rcpt-before-mail"),
        pytest.param((m.MailFrom(address=b"<a@b>"),), m.Header(name=b"a", value=b"b"), None, id="ok-control"),
    ],
)
def test_folded_commands_are_checked_like_returned_ones(
    prefix: tuple[m.Command, ...], bad: m.Command, match: str | None
) -> None:
    """Order rules hold for folded commands; a legal one passes (the control case)."""
    s = folding_session()
    s.receive_data(b"".join(c.to_frame() for c in (*OPENING, *prefix)))
    drain(s)
    read = s.commands_read
    s.receive_data(bad.to_frame())
    if match is None:
        assert drain(s) == []
        assert s.commands_read == read + 1
    else:
        with pytest.raises(RemoteProtocolError, match=match):
            drain(s)


@pytest.mark.parametrize(
    ("code", "payload", "match"),
    [
        pytest.param(b"L", b"only-a-name\0", "expected 2 strings", id="header-one-string"),
        pytest.param(b"L", b"name\0value", "NUL terminator", id="header-unterminated"),
        pytest.param(b"R", b"", "missing address", id="rcpt-empty"),
        pytest.param(b"N", b"x", "empty payload", id="eoh-with-payload"),
        pytest.param(b"T", b"x", "empty payload", id="data-with-payload"),
    ],
)
def test_malformed_folded_commands_are_remote_errors(code: bytes, payload: bytes, match: str) -> None:
    """A bad payload is refused exactly as when the command is decoded into a message."""
    s = folding_session()
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    s.receive_data(len(payload + code).to_bytes(4, "big") + code + payload)
    with pytest.raises(RemoteProtocolError, match=match):
        s.next_event()


def test_folded_commands_respect_the_limits() -> None:
    """Header and recipient limits hold for folded commands."""
    s = negotiated(
        Requirements(reply_events=frozenset()), limits=SessionLimits(max_headers=1), unsubscribed=UNSUBSCRIBED
    )
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"), m.Header(name=b"a", value=b"b"))
    s.receive_data(m.Header(name=b"c", value=b"d").to_frame())
    assert s.next_event() is NEED_DATA
    assert s.message is not None
    assert s.message.headers == [(b"a", b"b")]
    assert s.over_limit() == "max_headers"


def test_repeated_macro_packets_fold_in_order() -> None:
    """Skipping a packet equal to the previous one keeps "later packets win" exact."""
    s = folding_session()
    first = m.Macro(stage=b"L", macros=((b"i", b"ONE"),))
    second = m.Macro(stage=b"L", macros=((b"i", b"TWO"),))
    header = m.Header(name=b"a", value=b"b")
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"), first, header, first, header, second, header, first, header)
    assert s.message is not None
    assert s.message.queue_id == b"ONE"
    feed(s, m.Macro(stage=b"N", macros=()), m.EndOfHeaders())
    assert s.message.queue_id == b"ONE"


def test_macro_packets_fold_in_arrival_order_across_stages() -> None:
    """A packet repeated after another stage's packet still wins over it."""
    s = folding_session()
    header = m.Header(name=b"a", value=b"b")
    by_l = m.Macro(stage=b"L", macros=((b"x", b"from L"),))
    by_n = m.Macro(stage=b"N", macros=((b"x", b"from N"),))
    feed(s, *OPENING, m.MailFrom(address=b"<a@b>"), by_l, header, by_n, by_l, header)
    assert s.message is not None
    assert s.message.macros[b"x"] == b"from L"


def test_sessions_share_the_memory_budget() -> None:
    """Header bytes are taken from the shared budget and given back when the message ends; a
    header that does not fit marks the message, and a new message is marked while it is low."""
    budget = MemoryBudget(2400)  # each header costs its bytes plus ITEM_OVERHEAD_BYTES (256)
    first = MilterSession(budget=budget)
    second = MilterSession(budget=budget)
    for s in (first, second):
        s.receive_data(POSTFIX_OFFER.to_frame())
        s.next_event()
        s.send(negotiate(POSTFIX_OFFER, Requirements()).reply())
        feed(s, *OPENING, m.MailFrom(address=b"<a@b>"))
    feed(first, m.Header(name=b"a", value=b"1" * 999))
    assert budget.used == 1256
    feed(second, m.Header(name=b"b", value=b"2" * 999))  # 1144 left: does not fit
    assert second.over_limit() == "max_buffered_bytes"
    assert second.message is not None
    assert second.message.headers == []
    feed(first, m.Header(name=b"c", value=b"3" * 799))
    assert budget.low
    feed(second, m.Abort(), m.MailFrom(address=b"<next@b>"))
    assert second.over_limit() == "max_buffered_bytes"  # new message while the budget is low
    feed(first, m.EndOfMessage())
    assert budget.used == 0
    feed(second, m.Abort(), m.MailFrom(address=b"<again@b>"))
    assert second.over_limit() is None
