"""The replies the bridge makes up itself, and how a reply reads in the log.

Endpoints decide most replies (policy/). These are the bridge's own: a message over one of
its limits, a recipient over ``max_recipients``, a busy bridge, and the names the message log
line and ``milterbridge_messages_total`` give a reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from milterbridge.milter.context import Limit
from milterbridge.milter.messages import (
    BodyChunk,
    Command,
    Connect,
    Data,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    MailFrom,
    RcptTo,
    Reject,
    Reply,
    ReplyCode,
    TempFail,
)
from milterbridge.policy.model import OnOversize

#: What the reply to a message over a limit says went wrong, per limit.
_OVER_LIMIT_TEXT: Final[Mapping[Limit, str]] = {
    Limit.MAX_MESSAGE_BYTES: "Message size exceeds the mail filter's limit",
    Limit.MAX_HEADERS: "Too many header lines for the mail filter",
    Limit.MAX_HEADER_BYTES: "Header section too large for the mail filter",
    Limit.MAX_RECIPIENTS: "Too many recipients for the mail filter",
    Limit.MAX_MACROS: "Too many MTA macros for the mail filter",
}
_OVER_LIMIT_CODE: Final[Mapping[OnOversize, tuple[int, bytes]]] = {
    OnOversize.TEMPFAIL: (451, b"4.3.4"),
    OnOversize.REJECT: (552, b"5.3.4"),
}
#: on_oversize (tempfail or reject) -> limit -> the reply, e.g. "451 4.3.4 Too many header
#: lines for the mail filter (max_headers)".
OVER_LIMIT_REPLIES: Final[Mapping[OnOversize, Mapping[Limit, Reply]]] = {
    mode: {
        limit: ReplyCode.build(code, [f"{text} ({limit})".encode()], enhanced)
        for limit, text in _OVER_LIMIT_TEXT.items()
    }
    for mode, (code, enhanced) in _OVER_LIMIT_CODE.items()
}
#: The answer to a message refused because all connections together hold max_buffered_bytes:
#: a tempfail whatever on_oversize says (the message itself may be fine).
BUSY_REPLY: Final[Reply] = ReplyCode.build(
    451, [f"Mail filter busy, try again later ({Limit.MAX_BUFFERED_BYTES})".encode()], b"4.3.2"
)
#: A recipient over max_recipients at a RCPT the MTA waits for: RFC 5321 §4.5.3.1.10's answer,
#: so the client sends it again later in another transaction (a 5xx would bounce it).
TOO_MANY_RECIPIENTS: Final[Reply] = ReplyCode.build(
    452, [b"Too many recipients for the mail filter (max_recipients)"], b"4.5.3"
)
#: Commands answered with on_oversize when their message (or connection) is over a limit.
#: UNKNOWN is not: Postfix honours only 4xx there, and the message's next command is refused.
#: A refusal at CONNECT or HELO refuses the SMTP session; at RCPT, that recipient.
REFUSED_OVER_LIMIT: Final[frozenset[type[Command]]] = frozenset(
    {Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk, EndOfMessage}
)


def over_limit_reply(limit: Limit, on_oversize: OnOversize) -> Reply:
    """The reply to a command of a message over ``limit`` (on_oversize is tempfail or reject)."""
    if limit is Limit.MAX_BUFFERED_BYTES:
        return BUSY_REPLY
    return OVER_LIMIT_REPLIES[on_oversize][limit]


def outcome_of(reply: Reply | None, *, quarantined: bool = False) -> str:
    """A message's outcome (``milterbridge_messages_total``) from the reply that ended it."""
    if reply is None:
        return "aborted"
    if isinstance(reply, Discard):
        return "discarded"
    if isinstance(reply, Reject):
        return "rejected"
    if isinstance(reply, TempFail):
        return "tempfailed"
    if isinstance(reply, ReplyCode):
        return "tempfailed" if reply.smtp_code < 500 else "rejected"
    return "quarantined" if quarantined else "accepted"


def reply_text(reply: Reply) -> str | None:
    """The SMTP text of a reply with a code, for the log; None for the others."""
    if isinstance(reply, ReplyCode):
        return reply.text.decode("utf-8", "replace")
    return None
