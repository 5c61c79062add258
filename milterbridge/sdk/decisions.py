"""Decision builders that can only produce answers the bridge accepts.

Every builder checks its arguments at once, with the bridge's own parser
(:func:`milterbridge.policy.parse.parse_decision`), and raises ``ValueError`` naming the
broken rule; so a :class:`Decision` that exists is valid for at least one event::

    reject(550, "5.7.1", "Message refused", reason="spam score 12.3")
    continue_(modifications=[add_header("X-Scanned", "yes"), replace_body(b"...")])

Which actions are legal depends on the event (``discard`` is not legal at ``connect``, only
``continue`` and ``tempfail`` at ``unknown``); :meth:`Decision.encode` takes the event and
checks that too, as the bridge will.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from milterbridge.milter.constants import Event
from milterbridge.policy.model import ActionName, DecisionError
from milterbridge.policy.parse import parse_decision

__all__ = [
    "MAX_MODIFICATIONS",
    "Modification",
    "Reply",
    "Decision",
    "continue_",
    "accept",
    "reject",
    "tempfail",
    "discard",
    "quarantine",
    "skip",
    "add_header",
    "insert_header",
    "change_header",
    "delete_header",
    "add_rcpt",
    "delete_rcpt",
    "change_from",
    "replace_body",
]

#: The contract's limit on modifications in one response (an endpoint's
#: ``max_modifications`` may be lower).
MAX_MODIFICATIONS: Final = 1000

_Value = str | int | tuple[str, ...] | None


def _check(document: dict[str, object], event: Event, what: str) -> None:
    try:
        parse_decision(document, event, max_modifications=MAX_MODIFICATIONS)
    except DecisionError as exc:
        # The bridge's messages name the place in a response ("modifications[0].name: ...");
        # the builder's caller knows it by the builder's name instead.
        message = str(exc)
        if message.startswith("modifications[0]."):
            message = message.removeprefix("modifications[0].")
        raise ValueError(f"{what}: {message}") from None


@dataclass(frozen=True, slots=True)
class Modification:
    """One change to the message; build it with :func:`add_header` and the other op builders."""

    op: str
    #: The op's keys besides ``op``, in the contract's spelling.
    fields: tuple[tuple[str, _Value], ...]

    def to_json(self) -> dict[str, object]:
        """The modification as the contract's JSON object."""
        document: dict[str, object] = {"op": self.op}
        for key, value in self.fields:
            document[key] = list(value) if isinstance(value, tuple) else value
        return document


def _modification(op: str, **fields: _Value) -> Modification:
    mod = Modification(op, tuple((k, v) for k, v in fields.items() if v is not None))
    _check({"action": "continue", "modifications": [mod.to_json()]}, Event.EOM, op)
    return mod


@dataclass(frozen=True, slots=True)
class Reply:
    """The SMTP reply of a reject (5xx) or a tempfail (4xx)."""

    code: int
    enhanced: str | None = None
    #: One line, or several for a multi-line reply; ``None``: the MTA's default text.
    text: str | tuple[str, ...] | None = None

    def to_json(self) -> dict[str, object]:
        """The reply as the contract's JSON object."""
        document: dict[str, object] = {"code": self.code}
        if self.enhanced is not None:
            document["enhanced"] = self.enhanced
        if self.text is not None:
            document["text"] = self.text if isinstance(self.text, str) else list(self.text)
        return document


@dataclass(frozen=True, slots=True)
class Decision:
    """An endpoint's answer; build it with :func:`continue_`, :func:`reject` and the others."""

    action: ActionName
    reply: Reply | None = None
    reason: str | None = None
    modifications: tuple[Modification, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        """The decision as the contract's JSON object (optional keys left out when empty)."""
        document: dict[str, object] = {"action": str(self.action)}
        if self.reply is not None:
            document["reply"] = self.reply.to_json()
        if self.reason is not None:
            document["reason"] = self.reason
        if self.modifications:
            document["modifications"] = [m.to_json() for m in self.modifications]
        return document

    def encode(self, event: str | None = None) -> bytes:
        """The JSON response body, checked by the bridge's parser first.

        With ``event`` the check is the one the bridge makes for that event; without, the
        decision must be valid at ``eom`` (``skip``: at ``header``). Raises ``ValueError``
        when the bridge would refuse the decision.
        """
        document = self.to_json()
        if event is None:
            _check(document, _home_event(self.action), str(self.action))
        else:
            try:
                known = Event(event)
            except ValueError:
                raise ValueError(f"unknown event {event!r}") from None
            _check(document, known, f"{self.action} at {event}")
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _home_event(action: ActionName) -> Event:
    """An event where ``action`` is legal: skip only at header and body, every other action at eom."""
    return Event.HEADER if action is ActionName.SKIP else Event.EOM


def _decision(
    action: ActionName,
    reply: Reply | None,
    reason: str | None,
    modifications: Iterable[Modification],
) -> Decision:
    decision = Decision(action, reply, reason, tuple(modifications))
    _check(decision.to_json(), _home_event(action), str(action))
    return decision


def _reply(code: int | None, enhanced: str | None, text: str | Sequence[str] | None) -> Reply | None:
    if code is None:
        if enhanced is not None or text is not None:
            raise ValueError("reply: a code is needed for an enhanced code or a text")
        return None
    return Reply(code, enhanced, text if text is None or isinstance(text, str) else tuple(text))


def continue_(*, reason: str | None = None, modifications: Iterable[Modification] = ()) -> Decision:
    """Go on (legal at every decision event)."""
    return _decision(ActionName.CONTINUE, None, reason, modifications)


def accept(*, reason: str | None = None, modifications: Iterable[Modification] = ()) -> Decision:
    """This endpoint is done with the message (at connect and helo: with the connection)."""
    return _decision(ActionName.ACCEPT, None, reason, modifications)


def reject(
    code: int | None = None,
    enhanced: str | None = None,
    text: str | Sequence[str] | None = None,
    *,
    reason: str | None = None,
    modifications: Iterable[Modification] = (),
) -> Decision:
    """Refuse permanently, with a 5xx reply (``text`` one line or up to 32); no code: the MTA's default."""
    return _decision(ActionName.REJECT, _reply(code, enhanced, text), reason, modifications)


def tempfail(
    code: int | None = None,
    enhanced: str | None = None,
    text: str | Sequence[str] | None = None,
    *,
    reason: str | None = None,
    modifications: Iterable[Modification] = (),
) -> Decision:
    """Refuse temporarily, with a 4xx reply; no code: the MTA's default."""
    return _decision(ActionName.TEMPFAIL, _reply(code, enhanced, text), reason, modifications)


def discard(*, reason: str | None = None, modifications: Iterable[Modification] = ()) -> Decision:
    """Accept the message from the client and throw it away."""
    return _decision(ActionName.DISCARD, None, reason, modifications)


def quarantine(reason: str | None = None, *, modifications: Iterable[Modification] = ()) -> Decision:
    """Put the message on hold; ``reason`` is also the hold reason the MTA records."""
    return _decision(ActionName.QUARANTINE, None, reason, modifications)


def skip(*, reason: str | None = None, modifications: Iterable[Modification] = ()) -> Decision:
    """No more ``header`` (or ``body``) events of this message for this endpoint."""
    return _decision(ActionName.SKIP, None, reason, modifications)


def _header_value(value: str | bytes) -> dict[str, str]:
    """``value`` for text; ``value_b64`` for bytes that must reach the MTA exactly (docs/webhooks.md)."""
    if isinstance(value, bytes):
        return {"value_b64": base64.b64encode(value).decode("ascii")}
    return {"value": value}


def add_header(name: str, value: str | bytes) -> Modification:
    """Append a header at the end of the header block (``bytes``: sent exactly, via value_b64)."""
    return _modification("add_header", name=name, **_header_value(value))


def insert_header(index: int, name: str, value: str | bytes) -> Modification:
    """Insert a header after the ``index``-th header of the request (0: at the very top)."""
    return _modification("insert_header", index=index, name=name, **_header_value(value))


def change_header(name: str, index: int, value: str | bytes) -> Modification:
    """Replace the value of the ``index``-th (1-based) header called ``name``."""
    return _modification("change_header", name=name, index=index, **_header_value(value))


def delete_header(name: str, index: int = 1) -> Modification:
    """Remove the ``index``-th (1-based) header called ``name``."""
    return _modification("delete_header", name=name, index=index)


def add_rcpt(address: str, args: Sequence[str] | None = None) -> Modification:
    """Add an envelope recipient (an RFC 5321 mailbox without angle brackets)."""
    return _modification("add_rcpt", address=address, args=None if args is None else tuple(args))


def delete_rcpt(address: str) -> Modification:
    """Remove the recipients whose RCPT TO address is exactly ``address``."""
    return _modification("delete_rcpt", address=address)


def change_from(address: str, args: Sequence[str] | None = None) -> Modification:
    """Change the envelope sender (``""``: the null sender)."""
    return _modification("change_from", address=address, args=None if args is None else tuple(args))


def replace_body(body: bytes) -> Modification:
    """Replace the whole body with ``body`` (use CRLF line ends)."""
    return _modification("replace_body", base64=base64.b64encode(body).decode("ascii"))
