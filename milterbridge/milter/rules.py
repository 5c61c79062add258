"""The protocol's rules for the milter side, as tables (milter-protocol.md §2-§5).

* Which command may follow which (:data:`TRANSITIONS`, widened by the negotiated
  ``SMFIP_NO*`` bits in :func:`effective_transitions`). We are at least as lenient as
  libmilter (§5.11): ABORT is legal any time after CONNECT and is idempotent (Postfix sends
  it after every message, sometimes twice); a new HELO or MAIL while a transaction is open
  ends that transaction, as ABORT, QUIT and QUIT_NC do (:data:`ENDS_MESSAGE`).
* Which commands are no-reply, i.e. the MTA does not wait for an answer: MACRO, ABORT,
  QUIT and QUIT_NC always (:data:`ALWAYS_NO_REPLY`), and each event whose ``SMFIP_NR_*``
  bit was negotiated (:data:`NO_REPLY_FLAG`, :func:`no_reply_commands`). Of those, the
  session may fold :data:`FOLDABLE` ones into the context without returning them.
* Which replies may answer which command (:data:`ALLOWED_REPLIES`, checked by
  :func:`check_reply` and :func:`check_modification`): modifications, QUARANTINE and
  PROGRESS only at end-of-message, SKIP only at a body chunk and only when negotiated;
  REPLBODY pieces in one unbroken run (:func:`body_run_after`).
* Which public event each command is (:data:`EVENT_OF`).
"""

from __future__ import annotations

import enum
import functools
from typing import Final

from .constants import EVENT_FLAGS, Action, Event, Protocol
from .errors import LocalProtocolError
from .messages import (
    Abort,
    Accept,
    BodyChunk,
    Command,
    Connect,
    Continue,
    Data,
    Discard,
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
    Shutdown,
    Skip,
    TempFail,
    Unknown,
)


class State(enum.Enum):
    """Where the session is in the protocol."""

    INIT = "init"  # waiting for OPTNEG
    NEGOTIATED = "negotiated"  # waiting for CONNECT
    CONNECTED = "connected"  # connection open, no transaction
    ENVELOPE = "envelope"  # after MAIL / RCPT
    DATA = "data"  # after DATA
    HEADERS = "headers"  # after a HEADER
    EOH = "eoh"  # after end-of-headers
    BODY = "body"  # after a body chunk
    CLOSED = "closed"  # after QUIT or EOF

    # Members are singletons: identity hashing is right and skips Enum's Python-level
    # __hash__, which ran twice per command in the transition lookup.
    __hash__ = object.__hash__


_S = State
#: States in which a message (transaction) is open.
MESSAGE_STATES: Final = frozenset({_S.ENVELOPE, _S.DATA, _S.HEADERS, _S.EOH, _S.BODY})
_OPEN_STATES = frozenset({_S.CONNECTED, *MESSAGE_STATES})

#: Command class -> {state it may arrive in: state it leads to}. Content
#: commands may skip states the milter switched off (NOHDRS, NOEOH, NOBODY).
#: MACRO is not listed: it is legal in every state but INIT and CLOSED.
TRANSITIONS: Final[dict[type[Command], dict[State, State]]] = {
    Negotiate: {_S.INIT: _S.NEGOTIATED},
    Connect: {_S.NEGOTIATED: _S.CONNECTED},
    Helo: dict.fromkeys(_OPEN_STATES, _S.CONNECTED),
    MailFrom: {_S.CONNECTED: _S.ENVELOPE, _S.ENVELOPE: _S.ENVELOPE},
    RcptTo: {_S.ENVELOPE: _S.ENVELOPE},
    Data: {_S.ENVELOPE: _S.DATA},
    Header: dict.fromkeys((_S.ENVELOPE, _S.DATA, _S.HEADERS), _S.HEADERS),
    EndOfHeaders: dict.fromkeys((_S.ENVELOPE, _S.DATA, _S.HEADERS), _S.EOH),
    BodyChunk: dict.fromkeys(MESSAGE_STATES, _S.BODY),
    EndOfMessage: dict.fromkeys(MESSAGE_STATES, _S.BODY),
    Unknown: {s: s for s in (_S.NEGOTIATED, *_OPEN_STATES)},
    Abort: {**{s: s for s in (_S.NEGOTIATED,)}, **dict.fromkeys(_OPEN_STATES, _S.CONNECTED)},
    Quit: dict.fromkeys((_S.INIT, _S.NEGOTIATED, *_OPEN_STATES), _S.CLOSED),
    QuitNewConnection: dict.fromkeys(_OPEN_STATES, _S.NEGOTIATED),
}

#: Commands that end the open message without its end-of-message (it is reported as ended).
ENDS_MESSAGE: Final[frozenset[type[Command]]] = frozenset({Helo, MailFrom, Abort, Quit, QuitNewConnection})

#: Command class -> the public event name.
EVENT_OF: Final[dict[type[Command], Event]] = {
    Connect: Event.CONNECT,
    Helo: Event.HELO,
    MailFrom: Event.MAIL,
    RcptTo: Event.RCPT,
    Data: Event.DATA,
    Header: Event.HEADER,
    EndOfHeaders: Event.EOH,
    BodyChunk: Event.BODY,
    EndOfMessage: Event.EOM,
    Unknown: Event.UNKNOWN,
    Abort: Event.ABORT,
    Quit: Event.CLOSE,
}

#: Command class -> the bit that makes it no-reply when negotiated (``SMFIP_NR_*``).
NO_REPLY_FLAG: Final[dict[type[Command], Protocol]] = {
    Connect: Protocol.NR_CONNECT,
    Helo: Protocol.NR_HELO,
    MailFrom: Protocol.NR_MAIL,
    RcptTo: Protocol.NR_RCPT,
    Data: Protocol.NR_DATA,
    Header: Protocol.NR_HEADER,
    EndOfHeaders: Protocol.NR_EOH,
    BodyChunk: Protocol.NR_BODY,
    Unknown: Protocol.NR_UNKNOWN,
}

#: Forward commands a milter can switch off; when one is off, the states it
#: would lead to are also reachable without it (libmilter skips them too).
SKIP_FLAG: Final[dict[type[Command], Protocol]] = {
    Connect: Protocol.NO_CONNECT,
    MailFrom: Protocol.NO_MAIL,
    RcptTo: Protocol.NO_RCPT,
    Data: Protocol.NO_DATA,
    Header: Protocol.NO_HEADERS,
    EndOfHeaders: Protocol.NO_EOH,
    BodyChunk: Protocol.NO_BODY,
}


@functools.lru_cache(maxsize=64)
def effective_transitions(protocol: Protocol, version: int) -> dict[type[Command], dict[State, State]]:
    """:data:`TRANSITIONS` widened by the commands negotiated away or absent at ``version``.

    With NOCONNECT, HELO may follow OPTNEG; with NOMAIL and NORCPT, header
    events may come straight after HELO, and so on. DATA exists from version 4.
    """
    disabled = [cmd for cmd, bit in SKIP_FLAG.items() if protocol & bit]
    for cmd in SKIP_FLAG:
        _, _, since = EVENT_FLAGS[EVENT_OF[cmd]]
        if version < since and cmd not in disabled:
            disabled.append(cmd)
    if not disabled:
        return TRANSITIONS

    def reachable(state: State) -> list[State]:
        seen = [state]
        for current in seen:
            for cmd in disabled:
                nxt = TRANSITIONS[cmd].get(current)
                if nxt is not None and nxt not in seen:
                    seen.append(nxt)
        return seen

    table: dict[type[Command], dict[State, State]] = {}
    for cmd, trans in TRANSITIONS.items():
        widened = dict(trans)
        for state in State:
            if state in widened or state in (State.INIT, State.CLOSED):
                continue
            for via in reachable(state)[1:]:
                if via in trans:
                    widened[state] = trans[via]
                    break
        table[cmd] = widened
    return table


#: Commands that are no-reply whatever was negotiated.
ALWAYS_NO_REPLY: Final[frozenset[type[Command]]] = frozenset({Macro, Abort, Quit, QuitNewConnection})

#: No-reply commands the session can fold into the context itself instead of returning them
#: (when no endpoint subscribes to them): they only add to the message context, and nothing
#: else about the connection depends on them.
FOLDABLE: Final[frozenset[type[Command]]] = frozenset({RcptTo, Data, Header, EndOfHeaders})


@functools.lru_cache(maxsize=64)
def no_reply_commands(protocol: Protocol) -> frozenset[type[Command]]:
    """The no-reply commands under ``protocol``: :data:`ALWAYS_NO_REPLY` and the ``SMFIP_NR_*`` events."""
    return ALWAYS_NO_REPLY | {kind for kind, bit in NO_REPLY_FLAG.items() if protocol & bit}


_DECISIONS: Final[frozenset[type[Reply]]] = frozenset({Continue, Accept, Reject, TempFail, ReplyCode, Shutdown})

#: Command class -> replies that may answer it. Modifications, PROGRESS and
#: QUARANTINE are legal only at end-of-message (Postfix treats them as a
#: protocol error elsewhere; the sendmail MTA refuses PROGRESS elsewhere).
#: DISCARD is not allowed at CONNECT/HELO; at UNKNOWN neither ACCEPT nor
#: DISCARD (they can crash Postfix's smtpd, §9 item 22).
ALLOWED_REPLIES: Final[dict[type[Command], frozenset[type[Reply]]]] = {
    Negotiate: frozenset({NegotiateReply}),
    Connect: _DECISIONS,
    Helo: _DECISIONS,
    MailFrom: _DECISIONS | {Discard},
    RcptTo: _DECISIONS | {Discard},
    Data: _DECISIONS | {Discard},
    Header: _DECISIONS | {Discard},
    EndOfHeaders: _DECISIONS | {Discard},
    BodyChunk: _DECISIONS | {Discard, Skip},
    EndOfMessage: _DECISIONS | {Discard, Progress},
    Unknown: frozenset({Continue, Reject, TempFail, ReplyCode, Shutdown}),
}

#: Replies that answer a command without ending the MTA's wait.
INTERIM_REPLIES: Final = frozenset({Progress})

#: Replies that refuse what they answer: a refused recipient is not part of the message (design §3.2).
REFUSALS: Final[frozenset[type[Reply]]] = frozenset({Reject, TempFail, ReplyCode})

#: The SMTP codes a ``'y'`` reply may carry: a refusal, temporary or permanent (§7.3).
REPLY_CODE_RANGE: Final = range(400, 600)


def check_reply(pending: type[Command], reply: Reply, protocol: Protocol) -> None:
    """Raise LocalProtocolError unless ``reply`` may answer a ``pending`` command.

    ``protocol`` is what was negotiated: SKIP needs ``SMFIP_SKIP``.
    """
    kind = type(reply)
    if kind not in ALLOWED_REPLIES[pending]:
        raise LocalProtocolError(f"{kind.__name__} is not a legal answer to {pending.__name__}")
    if kind is Skip and not protocol & Protocol.SKIP:
        raise LocalProtocolError("SKIP was not negotiated")
    if kind is ReplyCode and reply.smtp_code not in REPLY_CODE_RANGE:  # type: ignore[attr-defined]
        raise LocalProtocolError(f"reply code must be 4xx or 5xx: {reply.text[:20]!r}")  # type: ignore[attr-defined]


class BodyRun(enum.Enum):
    """Where the REPLBODY pieces of one end-of-message answer are.

    Postfix refuses pieces interleaved with other requests (milter-protocol.md §8.7).
    """

    NONE = "none"  # no piece sent yet
    RUNNING = "running"  # the last modification sent was a piece
    ENDED = "ended"  # pieces were sent, then something else: no more may follow


def body_run_after(run: BodyRun, is_body: bool) -> BodyRun:
    """The run after sending a REPLBODY piece (``is_body``) or any other reply or modification.

    Raises LocalProtocolError for a piece after the run ended.
    """
    if is_body:
        if run is BodyRun.ENDED:
            raise LocalProtocolError("REPLBODY pieces must be sent in one unbroken run")
        return BodyRun.RUNNING
    if run is BodyRun.RUNNING:
        return BodyRun.ENDED
    return run


def check_modification(pending: type[Command], modification: Modification, actions: Action) -> None:
    """Raise LocalProtocolError unless ``modification`` may be sent while ``pending`` waits.

    Modifications are legal only at end-of-message, and each needs its negotiated action bit
    (``actions``).
    """
    if pending is not EndOfMessage:
        raise LocalProtocolError(f"{type(modification).__name__} is legal only at end-of-message")
    if not actions.grants(modification.action):
        raise LocalProtocolError(f"{type(modification).__name__} needs action {modification.action!r}, not negotiated")
