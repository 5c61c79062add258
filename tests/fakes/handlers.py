"""Connection handlers with a fixed policy, for tests that need a listener but no webhooks."""

from __future__ import annotations

from milterbridge.connection import HandlerResult
from milterbridge.milter.context import MessageContext
from milterbridge.milter.messages import Accept, Command, Continue, EndOfMessage, Negotiate, NegotiateReply
from milterbridge.milter.negotiation import Requirements, negotiate
from milterbridge.milter.session import MilterSession


class StaticHandler:
    """A fixed policy: continue at every event, accept at end-of-message.

    By default it asks the MTA for no event but end-of-message, so every answer is a
    single round trip; pass ``requirements`` to be sent more.
    """

    def __init__(self, session: MilterSession, requirements: Requirements | None = None) -> None:
        self.session = session
        self.requirements = requirements or Requirements(events=frozenset(), reply_events=frozenset())

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        return negotiate(offer, self.requirements).reply()

    def handle(self, command: Command) -> HandlerResult:
        if not self.session.needs_reply:
            return None
        if type(command) is EndOfMessage:
            return (Accept(),)
        return (Continue(),)

    def message_ended(self, message: MessageContext, *, mta_gave_up: bool = False) -> None:
        return None

    def connection_lost(self) -> None:
        return None
