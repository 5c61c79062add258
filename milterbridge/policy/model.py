"""The decision vocabulary shared by config, the webhook layer and the policy.

The enum values are the fixed public strings of the webhook contract
(design.md §3.3-3.5).
"""

from __future__ import annotations

import enum


class ActionName(enum.StrEnum):
    """What an endpoint decided (the ``action`` key of a response)."""

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    SKIP = "skip"
    QUARANTINE = "quarantine"


class OnError(enum.StrEnum):
    """An endpoint's failure policy (config key ``on_error``)."""

    TEMPFAIL = "tempfail"
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"


class Mode(enum.StrEnum):
    """Whether an endpoint's decisions are applied (``enforce``) or only logged (``observe``)."""

    ENFORCE = "enforce"
    OBSERVE = "observe"


class OnOversize(enum.StrEnum):
    """What happens to a message over ``max_message_bytes``."""

    TEMPFAIL = "tempfail"
    REJECT = "reject"
    CONTINUE = "continue"


class ModOp(enum.StrEnum):
    """Modification operations (the ``op`` key)."""

    ADD_HEADER = "add_header"
    INSERT_HEADER = "insert_header"
    CHANGE_HEADER = "change_header"
    DELETE_HEADER = "delete_header"
    REPLACE_BODY = "replace_body"
    ADD_RCPT = "add_rcpt"
    DELETE_RCPT = "delete_rcpt"
    CHANGE_FROM = "change_from"
