"""MTA Hooks (draft-degennaro-mta-hooks-01): the scanner side of the IETF draft's contract, translated.

No I/O here (style.md §2): ``request`` turns the bridge's own request document into an MTA
Hooks hook request; ``answer`` turns an MTA Hooks answer (``set``/``add``/``delete``) into the
bridge's own decision document, which ``policy.parse.parse_decision`` then checks like a
native endpoint's answer. Stages are the draft's inbound ones: connect, ehlo, mail, rcpt and
data (the bridge's connect, helo, mail, rcpt and eom events).
"""

from __future__ import annotations

from milterbridge.mtahooks.answer import Before, HookAnswerError, to_decision
from milterbridge.mtahooks.request import PROPERTIES, STAGES, hook_request
from milterbridge.mtahooks.stalwart import stalwart_decision, stalwart_request

__all__ = [
    "PROPERTIES",
    "STAGES",
    "Before",
    "HookAnswerError",
    "hook_request",
    "to_decision",
    "stalwart_request",
    "stalwart_decision",
]
