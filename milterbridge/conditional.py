"""The connection handler when some endpoint has a ``when`` condition (``policy/conditions.py``).

Only snapshots with conditions use it (``Dispatcher.__call__``): a config without ``when``
runs the plain :class:`~milterbridge.dispatch.ConnectionHandler` and pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from milterbridge.connection import HandlerResult
from milterbridge.dispatch import ConnectionHandler, Dispatcher
from milterbridge.endpoint import Endpoint
from milterbridge.milter.constants import Event
from milterbridge.milter.context import Limit, MessageContext
from milterbridge.milter.messages import (
    BodyChunk,
    Command,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    MailFrom,
    RcptTo,
)
from milterbridge.milter.session import MilterSession
from milterbridge.policy.conditions import ConditionKey

#: Commands after the last RCPT of a message: where its ``recipient_domains`` conditions are settled.
_AFTER_RCPT: frozenset[type[Command]] = frozenset({Data, EndOfHeaders, Header, BodyChunk, EndOfMessage})


class ConditionalHandler(ConnectionHandler):
    """The handler for a snapshot in which some endpoint has a ``when`` (``policy/conditions.py``).

    Before the plain handler sees a command, it works out which endpoints the command's
    connection, message or recipient excludes and tells the policy: excluded from the
    connection (``client``, ``daemon``, at CONNECT) or the message (``authenticated``,
    ``sender_domains`` at MAIL; ``recipient_domains`` when no accepted recipient matches, at
    the first command after the last RCPT or when the message ends), an endpoint is done with
    it having answered ``continue``; at RCPT an endpoint subscribed to ``rcpt`` is left out for
    a recipient its ``recipient_domains`` do not match. Each exclusion is counted, and the
    message's log line lists them (``skipped``). An endpoint excluded from the connection or
    message gets no ``close`` or ``abort`` for it either.
    """

    def __init__(self, dispatcher: Dispatcher, session: MilterSession) -> None:
        super().__init__(dispatcher, session)
        self.conditions = self.snapshot.conditions
        #: Endpoints with ``recipient_domains``, and those of them subscribed to ``rcpt``.
        self._by_recipient = {
            name: condition for name, condition in self.conditions.items() if condition.recipient_domains is not None
        }
        at_rcpt = {ep.name for ep in self.snapshot.subscribers(Event.RCPT)}
        self._by_recipient_at_rcpt = {name: c for name, c in self._by_recipient.items() if name in at_rcpt}
        #: Endpoint -> the key that excluded it: from the connection, and from the current message
        #: (the connection's included).
        self._connection_skipped: dict[str, str] = {}
        self._message_skipped: dict[str, str] = {}
        #: The current message's ``recipient_domains`` are not settled yet.
        self._recipients_open = False

    def handle(self, command: Command) -> HandlerResult:
        kind = type(command)
        if kind is Connect:
            self._check_connection()
        elif kind is MailFrom:
            self._check_message()
        elif kind is RcptTo:
            if self._by_recipient_at_rcpt:
                self._check_recipient(command.address)  # type: ignore[attr-defined]
        elif self._recipients_open and kind in _AFTER_RCPT and self.session.message is not None:
            self._settle_recipients(self.session.message)
        return super().handle(command)

    def message_ended(self, msg: MessageContext, *, mta_gave_up: bool = False) -> None:
        if self._recipients_open:
            self._settle_recipients(msg)
        super().message_ended(msg, mta_gave_up=mta_gave_up)

    def _check_connection(self) -> None:
        connection = self.session.connection
        daemon = connection.macros.get(b"{daemon_name}")
        skipped: dict[str, str] = {}
        for name, condition in self.conditions.items():
            miss = condition.connection_miss(connection.address, daemon)
            if miss is not None:
                skipped[name] = miss.value
        self._connection_skipped = skipped
        self._skip(Event.CONNECT, skipped)

    def _check_message(self) -> None:
        msg = self.session.message
        skipped = dict(self._connection_skipped)
        if msg is not None:
            auth_authen = msg.macros.get(b"{auth_authen}")
            new: dict[str, str] = {}
            for name, condition in self.conditions.items():
                if name not in skipped:
                    miss = condition.message_miss(auth_authen, msg.mail_from)
                    if miss is not None:
                        new[name] = miss.value
            self._skip(Event.MAIL, new)
            skipped.update(new)
        self._message_skipped = skipped
        self.message_log.skipped = skipped
        self._recipients_open = bool(self._by_recipient)

    def _check_recipient(self, address: bytes) -> None:
        skipped = self._message_skipped
        done = self.policy.done()
        passing = [
            name
            for name, condition in self._by_recipient_at_rcpt.items()
            if name not in skipped and name not in done and not condition.recipient_matches(address)
        ]
        self.policy.pass_recipient(passing)
        counts = self.message_log.skipped_recipients
        for name in passing:
            counts[name] = counts.get(name, 0) + 1
            self.metrics.endpoint_skipped(name, ConditionKey.RECIPIENT_DOMAINS.value)

    def _settle_recipients(self, msg: MessageContext) -> None:
        """After the last RCPT: an endpoint no accepted recipient matches is done with the message."""
        self._recipients_open = False
        self.policy.pass_recipient(())
        if Limit.MAX_RECIPIENTS in msg.over_limits or Limit.MAX_BUFFERED_BYTES in msg.over_limits:
            return  # recipients went on without being kept (on_oversize = continue): call everyone
        addresses = [address for address, _ in msg.recipients]
        skipped = self._message_skipped
        done = self.policy.done()
        new = {
            name: ConditionKey.RECIPIENT_DOMAINS.value
            for name, condition in self._by_recipient.items()
            if name not in skipped and name not in done and not condition.any_recipient_matches(addresses)
        }
        self._skip(Event.DATA, new)
        skipped.update(new)

    def _skip(self, event: Event, skipped: Mapping[str, str]) -> None:
        if skipped:
            self.policy.skip(event, skipped)
            for name, reason in skipped.items():
                self.metrics.endpoint_skipped(name, reason)

    def _notified(self, event: Event) -> Sequence[Endpoint]:
        """Subscribers, less those excluded from the connection (close) or the message (abort)."""
        skipped = self._connection_skipped if event is Event.CLOSE else self._message_skipped
        subscribers = self.snapshot.subscribers(event)
        return [ep for ep in subscribers if ep.name not in skipped] if skipped else subscribers

    def _new_session(self) -> None:
        super()._new_session()
        self._connection_skipped = {}
        self._message_skipped = {}
        self._recipients_open = False


__all__ = ["ConditionalHandler"]
