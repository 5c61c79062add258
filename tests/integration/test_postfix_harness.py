"""The real-Postfix harness itself: delivery, the SMTP recorder, and milter_default_action.

These run without milterbridge. With the milter pointed at a closed loopback port they pin
down what each ``milter_default_action`` looks like to an SMTP client (``postfix-e2e.md`` §4),
which the bridge's own end-to-end tests build on.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest

from .postfix import PostfixInstance, make_message, median_seconds, send_smtp

pytestmark = pytest.mark.postfix

SENDER = "alice@example.org"


def _headers(raw: bytes) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_delivers_to_maildir_with_envelope_headers(postfix: PostfixInstance) -> None:
    """One message to one recipient lands in the Maildir with Return-Path, Delivered-To and X-Original-To."""
    result = postfix.send(SENDER, ["bob@example.net"], make_message(subject="first", body="line one\n.dot line\n"))

    assert [(r.step, r.code) for r in result.replies] == [
        ("greeting", 220),
        ("ehlo", 250),
        ("mail", 250),
        ("rcpt", 250),
        ("data", 354),
        ("end_of_data", 250),
        ("quit", 221),
    ]
    assert result.transaction.queue_id is not None
    [(_, raw)] = postfix.wait_for_delivery(1)
    message = _headers(raw)
    assert message["Return-Path"] == f"<{SENDER}>"
    assert message["Delivered-To"] == "bob@example.net"
    assert message["X-Original-To"] == "bob@example.net"
    assert message["Subject"] == "first"
    # The dot-stuffing round trip keeps a body line that starts with a dot.
    assert b"\n.dot line" in raw.replace(b"\r\n", b"\n")
    assert result.transaction.queue_id in message["Received"]


def test_two_recipients_give_two_files(postfix: PostfixInstance) -> None:
    """Each final recipient gets its own file, told apart by Delivered-To."""
    rcpts = ["bob@example.net", "carol@example.com"]
    result = postfix.send(SENDER, rcpts, make_message(to=rcpts))

    assert result.accepted
    assert [r.code for r in result.transaction.rcpts] == [250, 250]
    postfix.wait_for_delivery(2)
    assert postfix.wait_for_queue_idle() == []
    delivered = postfix.maildir_messages()
    assert sorted(_headers(raw)["Delivered-To"] for _, raw in delivered) == rcpts


def test_several_messages_on_one_connection(postfix: PostfixInstance) -> None:
    """Three transactions on one SMTP connection are each accepted, queued apart and delivered."""
    with postfix.smtp_session() as session:
        transactions = [
            session.send(SENDER, [f"user{i}@example.net"], make_message(subject=f"message {i}")) for i in range(3)
        ]
    result = session.result()

    assert result.accepted
    assert len(result.transactions) == 3
    assert len({t.queue_id for t in transactions}) == 3
    assert result.quit is not None
    assert result.quit.code == 221
    delivered = postfix.wait_for_delivery(3)
    assert sorted(_headers(raw)["Subject"] for _, raw in delivered) == ["message 0", "message 1", "message 2"]


def test_smtp_recorder_survives_a_refused_connection(closed_milter_port: int) -> None:
    """Connecting to a closed port is recorded as a dropped greeting, and nothing raises."""
    result = send_smtp("127.0.0.1", closed_milter_port, SENDER, ["bob@example.net"], make_message())

    assert result.greeting.dropped
    assert "ConnectionRefusedError" in result.greeting.text
    assert result.ehlo is None
    assert result.transaction.mail is None
    assert not result.accepted
    assert result.quit is None


@contextlib.contextmanager
def _scripted_smtp_server(replies: Sequence[bytes]) -> Iterator[int]:
    """A one-connection loopback server that sends each reply in turn (the first as greeting), then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            for index, reply in enumerate(replies):
                if index:
                    lines.readline()
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with listener:
        yield listener.getsockname()[1]
        thread.join(timeout=5)


def test_smtp_recorder_survives_a_421_greeting() -> None:
    """A 421 greeting followed by a hang-up is recorded, and no command is sent after it."""
    with _scripted_smtp_server([b"421 4.3.2 shutting down\r\n"]) as port:
        result = send_smtp("127.0.0.1", port, SENDER, ["bob@example.net"], make_message())

    assert (result.greeting.code, result.greeting.text) == (421, "4.3.2 shutting down")
    assert result.ehlo is None
    assert result.transaction.mail is None
    assert result.quit is None
    assert [r.step for r in result.replies] == ["greeting"]


def test_smtp_recorder_survives_a_dropped_connection() -> None:
    """A server that hangs up after RCPT leaves a recorded, dropped DATA step and no QUIT."""
    script = [b"220 hi\r\n", b"250 ok\r\n", b"250 2.1.0 ok\r\n", b"250 2.1.5 ok\r\n"]
    with _scripted_smtp_server(script) as port:
        result = send_smtp("127.0.0.1", port, SENDER, ["bob@example.net"], make_message())

    assert [(r.step, r.code) for r in result.replies] == [
        ("greeting", 220),
        ("ehlo", 250),
        ("mail", 250),
        ("rcpt", 250),
        ("data", 0),
    ]
    assert result.transaction.data is not None
    assert result.transaction.data.dropped
    assert result.transaction.end_of_data is None
    assert not result.accepted
    assert result.quit is None


def test_milter_down_tempfail(postfix: PostfixInstance, closed_milter_port: int) -> None:
    """milter_default_action=tempfail: normal greeting, then 451 4.7.1 at MAIL for the whole session."""
    mark = postfix.log_mark()
    postfix.set_milter(f"inet:127.0.0.1:{closed_milter_port}", default_action="tempfail")
    with postfix.smtp_session() as session:
        first = session.send(SENDER, ["bob@example.net"], make_message())
        second = session.send(SENDER, ["bob@example.net"], make_message())
    result = session.result()

    assert result.greeting.code == 220
    for transaction in (first, second):
        assert transaction.mail is not None
        assert transaction.mail.code == 451
        assert transaction.mail.text.startswith("4.7.1")
        assert transaction.rcpts == ()
    postfix.wait_for_log(
        rf"connect to Milter service inet:127\.0\.0\.1:{closed_milter_port}: Connection refused", since=mark
    )
    assert postfix.queue() == []
    assert postfix.maildir_messages() == []


def test_milter_down_reject(postfix: PostfixInstance, closed_milter_port: int) -> None:
    """milter_default_action=reject: a 554 greeting, and the message is refused."""
    postfix.set_milter(f"inet:127.0.0.1:{closed_milter_port}", default_action="reject")
    result = postfix.send(SENDER, ["bob@example.net"], make_message())

    assert result.greeting.code == 554
    assert "not accepting connections" in result.greeting.text
    assert not result.accepted
    assert result.transaction.mail is not None
    assert result.transaction.mail.code >= 500
    assert postfix.queue() == []
    assert postfix.maildir_messages() == []


def test_milter_down_accept(postfix: PostfixInstance, closed_milter_port: int) -> None:
    """milter_default_action=accept: 250 throughout and the message is delivered unfiltered."""
    postfix.set_milter(f"inet:127.0.0.1:{closed_milter_port}", default_action="accept")
    result = postfix.send(SENDER, ["bob@example.net"], make_message(subject="unfiltered"))

    assert result.greeting.code == 220
    assert result.accepted
    [(_, raw)] = postfix.wait_for_delivery(1)
    assert _headers(raw)["Subject"] == "unfiltered"


def test_milter_down_quarantine(postfix: PostfixInstance, closed_milter_port: int) -> None:
    """milter_default_action=quarantine: 250 throughout, the message waits in the hold queue."""
    mark = postfix.log_mark()
    postfix.set_milter(f"inet:127.0.0.1:{closed_milter_port}", default_action="quarantine")
    result = postfix.send(SENDER, ["bob@example.net"], make_message(subject="held"))

    assert result.accepted
    [entry] = postfix.wait_for_queue(1, "hold")
    assert entry.queue_id == result.transaction.queue_id
    assert entry.sender == SENDER
    assert entry.recipients == ("bob@example.net",)
    assert "Subject: held" in postfix.postcat(entry.queue_id, headers=True)
    postfix.wait_for_log(rf"{entry.queue_id}: milter-hold: ", since=mark)
    assert postfix.maildir_messages() == []
    # Releasing the hold delivers it, which is how a test can inspect the final message.
    postfix.release_held()
    [(_, raw)] = postfix.wait_for_delivery(1)
    assert _headers(raw)["Subject"] == "held"


def test_reset_restores_defaults(postfix: PostfixInstance, closed_milter_port: int) -> None:
    """reset() drops the milter setting, queued mail and delivered mail."""
    postfix.set_milter(f"inet:127.0.0.1:{closed_milter_port}", default_action="quarantine")
    postfix.send(SENDER, ["bob@example.net"], make_message())
    postfix.set_milter(f"inet:127.0.0.1:{closed_milter_port}", default_action="accept")
    postfix.send(SENDER, ["bob@example.net"], make_message())
    postfix.wait_for_delivery(1)

    postfix.reset()

    assert postfix.get("smtpd_milters") == ""
    assert postfix.get("milter_default_action") == "tempfail"
    assert postfix.queue() == []
    assert postfix.maildir_messages() == []
    assert postfix.send(SENDER, ["bob@example.net"], make_message()).accepted


def test_version_is_reported(
    postfix: PostfixInstance, postfix_version: str, postfix_report: Callable[[str], None]
) -> None:
    """The instance reports the installed Postfix version."""
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", postfix_version)
    assert postfix.version == postfix_version
    assert postfix.version_tuple >= (2, 9)


def test_median_transaction_time_without_milter(
    postfix: PostfixInstance, postfix_report: Callable[[str], None]
) -> None:
    """Twenty single-message SMTP sessions without a milter are all accepted; the median is reported."""
    results = [postfix.send(SENDER, ["bob@example.net"], make_message(subject=f"timing {i}")) for i in range(20)]

    assert all(result.accepted for result in results)
    postfix.wait_for_delivery(20)
    assert postfix.wait_for_queue_idle() == []
    assert len(postfix.maildir_messages()) == 20
    session_ms = median_seconds(r.duration for r in results) * 1000
    transaction_ms = median_seconds(r.transaction.duration for r in results) * 1000
    postfix_report(
        f"SMTP without milter, median of 20: {session_ms:.1f} ms per session, "
        f"{transaction_ms:.1f} ms per transaction (MAIL to end of data)"
    )
