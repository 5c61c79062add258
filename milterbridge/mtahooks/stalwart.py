"""Stalwart's own MTA hooks (the pre-draft format Stalwart ships), translated both ways.

Stalwart calls its hooks with its own JSON, older than the IETF draft that ``request`` and
``answer`` speak (``Request`` and ``Response`` in Stalwart's crates/smtp/src/inbound/hooks/mod.rs,
described at https://stalw.art/docs/api/mta-hooks/request and .../response). Where the code and
the docs differ, requests use the code's spellings and answers accept both.

``stalwart_request`` builds the request from the bridge's own request document, with the
helpers ``request.hook_request`` uses:

- ``context``: ``stage`` (``request.STAGES``), ``client`` (``ip``, ``port``, ``ptr``, ``helo``,
  and ``activeConnections``, which the bridge does not know and sends as 1, as Stalwart
  itself does), ``sasl`` (``login``, ``method``) and ``tls`` or null, ``server`` (``name``,
  ``port``, ``ip``, each null when the MTA did not send its macro), ``queue`` (``{"id": ...}``)
  or null, ``protocol``: ``{"version": 1}``.
- ``envelope`` (null before ``mail``): ``from`` and ``to``, each ``{address, parameters}``;
  the null reverse-path is ``""`` (Stalwart's address is never null).
- ``message`` (at ``data``, else null): ``headers`` as ``[name, value]`` pairs, each value as
  Stalwart gives it (what follows the colon, CRLF folds and the final CRLF included);
  ``serverHeaders``: ``[]``; ``contents``: the body as text (UTF-8, invalid bytes replaced;
  null when the endpoint does not get the body);
  ``size``: the whole message's octets.

``stalwart_decision`` turns Stalwart's answer (``{action, response, modifications}``) into the
bridge's decision document, which the caller then checks with ``policy.parse.parse_decision``.
It applies the answer to the model ``answer.to_decision`` uses (``answer._State``) and writes
the result the same way, so header edits come out as the same deletes, changes and inserts:

- ``action``: ``accept`` (or none) is ``continue``; ``reject`` is ``reject``, or ``tempfail``
  with a 4xx ``response.status``; ``discard`` and ``quarantine`` keep their names (the bridge's
  quarantine holds the message; Stalwart instead adds ``X-Quarantine: true``).
- ``response`` (``status``, ``enhancedStatus`` or ``enhanced_status``, ``message``,
  ``disconnect``): the reply of ``reject``; with the other actions Stalwart does not use it
  and neither does the bridge (its message becomes the decision's ``reason``). ``reject`` with
  ``disconnect: true`` is ``tempfail`` with a 421 reply, the one reply after which the MTA
  ends the session, as for the draft's ``disconnect``. Stalwart reads ``disconnect`` with
  ``discard`` too, but milter cannot end the session after accepting a message, and turning
  the discard into a 421 would get the message sent again, so there it is not carried out.
- ``modifications``, applied in order, each to the message as the ones before it left it
  (as Stalwart applies them):

  - ``changeFrom`` (``value``, ``parameters``): ``change_from`` (``""`` or ``<>``: the null
    sender); ``addRecipient``/``addRcpt``: ``add_rcpt``; ``deleteRecipient``/``deleteRcpt``:
    ``delete_rcpt`` of every recipient with that address, compared ignoring case as Stalwart
    does (it must name one: a recipient of the request, or one added before). ``parameters``
    is a map; a keyword mapped to null is sent without a value.
  - ``replaceContents`` (``value``: the new body, as text): ``replace_body`` with its UTF-8
    bytes. At most one per answer (Stalwart would join several).
  - ``addHeader``: the header appended at the end (Stalwart puts it at the top; the end is
    where milter and the bridge add headers).
  - ``changeHeader`` and ``deleteHeader`` (``index``, ``name``): ``index`` counts the headers
    called ``name`` (ignoring case) from 1, as milter numbers them. The docs only say "the
    position of the header"; Stalwart's code passes the index to its milter modification,
    and its docs' example (``deleteHeader`` 1 ``X-Mailer``) reads the same. A change to an
    empty value deletes the header, as in milter and in Stalwart.
  - ``insertHeader`` (``index``, ``name``, ``value``): ``index`` is a position in the whole
    header list, 0 the top, N after the N-th header: the docs say "a specific position in the
    list of headers", and it is milter's numbering for an inserted header. (Stalwart's code
    counts only the headers called like the new one and puts it at the top when there is none,
    so a new name always goes to the top there.)

  Header values have CRLF line ends turned into the bridge's LF and a final line end dropped,
  so a value copied from the request is the same value.

Anything else (an unknown action, type or member, a header or recipient that is not there, a
value of the wrong kind) makes the whole answer invalid: ``HookAnswerError``, naming the member
as a JSON Pointer (``/modifications/2/index``), and the endpoint's ``on_error`` applies.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

from milterbridge.milter.constants import Event
from milterbridge.mtahooks.answer import (
    Before,
    HookAnswerError,
    _Header,
    _index,
    _kind,
    _object,
    _pointer,
    _Rcpt,
    _State,
    _text,
)
from milterbridge.mtahooks.request import STAGES, _address, _auth, _client, _server, _size, _tls, _value_bytes

__all__ = ["STALWART_ACTIONS", "stalwart_decision", "stalwart_request"]

JSON = dict[str, Any]

#: Stalwart's actions (``Action`` in hooks/mod.rs).
STALWART_ACTIONS: Final = ("accept", "discard", "reject", "quarantine")
#: Each modification type's members besides ``type``: (required, optional). Stalwart's code names.
_MODIFICATIONS: Final[Mapping[str, tuple[frozenset[str], frozenset[str]]]] = {
    "changeFrom": (frozenset({"value"}), frozenset({"parameters"})),
    "addRecipient": (frozenset({"value"}), frozenset({"parameters"})),
    "deleteRecipient": (frozenset({"value"}), frozenset()),
    "replaceContents": (frozenset({"value"}), frozenset()),
    "addHeader": (frozenset({"name", "value"}), frozenset()),
    "insertHeader": (frozenset({"index", "name", "value"}), frozenset()),
    "changeHeader": (frozenset({"index", "name", "value"}), frozenset()),
    "deleteHeader": (frozenset({"index", "name"}), frozenset()),
}
#: The docs' names for types the code names otherwise.
_DOCS_NAMES: Final = {"addRcpt": "addRecipient", "deleteRcpt": "deleteRecipient"}
_ANSWER_MEMBERS: Final = ("action", "response", "modifications")
#: ``response`` members; the code reads ``enhanced_status``, the docs write ``enhancedStatus``.
_RESPONSE_MEMBERS: Final = ("status", "enhancedStatus", "enhanced_status", "message", "disconnect")
_PROTOCOL_VERSION: Final = 1
#: What Stalwart sends as ``activeConnections`` (it does not count them either).
_ACTIVE_CONNECTIONS: Final = 1


# -- the request ------------------------------------------------------------------------------


def _header_value(header: Mapping[str, Any]) -> str:
    """A header value as Stalwart sends it: the text after the colon up to and including its CRLF."""
    return (_value_bytes(header).replace(b"\n", b"\r\n") + b"\r\n").decode("utf-8", "replace")


def _contents(message: Mapping[str, Any]) -> str | None:
    body = (message.get("body") or {}).get("base64")
    return None if body is None else base64.b64decode(body).decode("utf-8", "replace")


def _envelope(message: Mapping[str, Any]) -> JSON | None:
    mail_from = message.get("mail_from")
    if mail_from is None:
        return None
    sender = _address(mail_from)
    sender["address"] = sender["address"] or ""
    return {"from": sender, "to": [_address(rcpt) for rcpt in message.get("rcpt_to") or ()]}


def stalwart_request(ours: Mapping[str, Any], event: Event) -> JSON:
    """Stalwart's hook request for ``event`` from the bridge's request document ``ours``.

    Raises KeyError for an event that has no stage (``request.STAGES``).
    """
    session: Mapping[str, Any] = ours.get("session") or {}
    message: Mapping[str, Any] = ours.get("message") or {}
    macros = {**(session.get("macros") or {}), **(message.get("macros") or {})}
    stage = STAGES[event]
    client = _client(session, macros)
    context: JSON = {
        "stage": stage,
        "client": {
            "ip": client["ip"],
            "port": client["port"],
            "ptr": client["ptr"],
            "helo": client["ehlo"],
            "activeConnections": _ACTIVE_CONNECTIONS,
        },
        "sasl": _auth(macros),
        "tls": _tls(macros),
        "server": _server(macros) or {"name": None, "ip": None, "port": None},
        "queue": {"id": message["queue_id"]} if message.get("queue_id") else None,
        "protocol": {"version": _PROTOCOL_VERSION},
    }
    return {
        "context": context,
        "envelope": _envelope(message),
        "message": (
            {
                "headers": [[header["name"], _header_value(header)] for header in message.get("headers") or ()],
                "serverHeaders": [],
                "contents": _contents(message),
                "size": _size(message),
            }
            if stage == "data"
            else None
        ),
    }


# -- the answer ------------------------------------------------------------------------------


def _response(obj: object) -> tuple[JSON | None, bool]:
    """``response`` as ``answer._State`` keeps it (``code``, ``enhancedCode``, ``message``), and ``disconnect``."""
    if obj is None:
        return None, False
    obj = _object(obj, _RESPONSE_MEMBERS, "/response")
    status = obj.get("status")
    if status is not None and not (isinstance(status, int) and not isinstance(status, bool) and 200 <= status <= 599):
        raise HookAnswerError(f"/response/status: expected an SMTP reply code, got {status!r:.40}")
    if obj.get("enhancedStatus") is not None and obj.get("enhanced_status") is not None:
        raise HookAnswerError("/response: enhancedStatus and enhanced_status are the same member; give one")
    enhanced = "enhancedStatus" if obj.get("enhancedStatus") is not None else "enhanced_status"
    response: JSON = {} if status is None else {"code": status}
    for name, member in (("enhancedCode", enhanced), ("message", "message")):
        if obj.get(member) is not None:
            response[name] = _text(obj[member], ["response", member])
    disconnect = obj.get("disconnect")
    if disconnect is not None and not isinstance(disconnect, bool):
        raise HookAnswerError(f"/response/disconnect: expected true or false, got {_kind(disconnect)}")
    return response or None, bool(disconnect)


def _modification(item: object, path: list[str]) -> str:
    """The code's name of the modification's type, after checking its members."""
    if not isinstance(item, dict) or not isinstance(item.get("type"), str):
        raise HookAnswerError(f"{_pointer(path)}: expected an object with a type, got {item!r:.60}")
    spelled: str = item["type"]
    kind = _DOCS_NAMES.get(spelled, spelled)
    if kind not in _MODIFICATIONS:
        names = ", ".join([*_MODIFICATIONS, *_DOCS_NAMES])
        raise HookAnswerError(f"{_pointer([*path, 'type'])}: unknown type {spelled!r} (expected one of {names})")
    required, optional = _MODIFICATIONS[kind]
    unknown = sorted(set(item) - required - optional - {"type"})
    if unknown:
        raise HookAnswerError(f"{_pointer(path)}: {spelled} has no member {unknown[0]!r}")
    missing = sorted(member for member in required if item.get(member) is None)
    if missing:
        raise HookAnswerError(f"{_pointer([*path, missing[0]])}: {spelled} needs {missing[0]}")
    return kind


def _value(obj: object, path: list[str]) -> str:
    """A header value in the bridge's form: LF folds, no final line end."""
    return _text(obj, path).replace("\r\n", "\n").removesuffix("\n")


def _mailbox(obj: object, path: list[str], *, null: bool = False) -> str:
    """An address without its angle brackets (``""`` only where ``null``: the null sender)."""
    address = _text(obj, path).strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address and not null:
        raise HookAnswerError(f"{_pointer(path)}: a recipient needs an address")
    return address


def _parameters(obj: object, path: list[str]) -> dict[str, str]:
    """ESMTP parameters as ``answer._State`` keeps them (a keyword without a value: ``""``)."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise HookAnswerError(f"{_pointer(path)}: expected a map, got {_kind(obj)}")
    result: dict[str, str] = {}
    for keyword, value in obj.items():
        if value is None:
            result[keyword] = ""
        elif isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            result[keyword] = str(value)  # the docs' example has a number: "size": 54321
        else:
            raise HookAnswerError(f"{_pointer([*path, keyword])}: expected text or null, got {_kind(value)}")
    return result


def _nth(headers: list[_Header], name: str, index: object, path: list[str]) -> int:
    """The list position of the ``index``-th header called ``name`` (from 1, ignoring case)."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 1:
        raise HookAnswerError(f"{_pointer(path)}: expected a number from 1 (the n-th {name} header), got {index!r:.40}")
    same = [position for position, header in enumerate(headers) if header.name.lower() == name.lower()]
    if index > len(same):
        raise HookAnswerError(f"{_pointer(path)}: there is no {name} header number {index} (there are {len(same)})")
    return same[index - 1]


def _apply(state: _State, kind: str, item: Mapping[str, object], path: list[str]) -> None:
    """Carry out one modification other than ``replaceContents`` on ``state``."""
    value_path = [*path, "value"]
    parameters = _parameters(item.get("parameters"), [*path, "parameters"])
    match kind:
        case "changeFrom":
            state.mail_from = {"address": _mailbox(item["value"], value_path, null=True), "parameters": parameters}
        case "addRecipient":
            state.rcpts.append(_Rcpt(None, _mailbox(item["value"], value_path), parameters))
        case "deleteRecipient":
            address = _mailbox(item["value"], value_path)
            kept = [rcpt for rcpt in state.rcpts if rcpt.address.lower() != address.lower()]
            if len(kept) == len(state.rcpts):
                raise HookAnswerError(f"{_pointer(value_path)}: {address!r} is not a recipient of the message")
            state.rcpts = kept
        case "addHeader":
            name = _text(item["name"], [*path, "name"])
            state.headers.append(_Header(None, name, _value(item["value"], value_path)))
        case "insertHeader":
            position = _index(item["index"], len(state.headers) + 1, [*path, "index"])
            name = _text(item["name"], [*path, "name"])
            state.headers.insert(position, _Header(None, name, _value(item["value"], value_path)))
        case "changeHeader" | "deleteHeader":
            name = _text(item["name"], [*path, "name"])
            position = _nth(state.headers, name, item["index"], [*path, "index"])
            value = "" if kind == "deleteHeader" else _value(item["value"], value_path)
            if value:
                state.headers[position].value = value
            else:
                del state.headers[position]
        case _:  # pragma: no cover - _modification admits only the types above
            raise AssertionError(kind)


def stalwart_decision(answer: object, before: Before) -> JSON | None:
    """The bridge's decision document for Stalwart's hook ``answer`` (decoded JSON; None for no body).

    No answer and ``{}`` give None: continue, nothing changed. ``HookAnswerError`` says what
    makes any other answer invalid or impossible over milter.
    """
    if answer in (None, {}):
        return None
    answer = _object(answer, _ANSWER_MEMBERS, "answer")
    action = answer.get("action")
    action = "accept" if action is None else action
    if action not in STALWART_ACTIONS:
        raise HookAnswerError(f"/action: {action!r:.40} is not one of {', '.join(STALWART_ACTIONS)}")
    state = _State(before)
    state.response, disconnect = _response(answer.get("response"))
    state.action = "disconnect" if action == "reject" and disconnect else str(action)
    modifications = answer.get("modifications")
    if modifications is None:
        modifications = []
    if not isinstance(modifications, list):
        raise HookAnswerError(f"/modifications: expected an array, got {_kind(modifications)}")
    body: bytes | None = None
    for number, item in enumerate(modifications):
        path = ["modifications", str(number)]
        kind = _modification(item, path)
        if kind != "replaceContents":
            _apply(state, kind, item, path)
        elif body is not None:
            raise HookAnswerError(f"{_pointer(path)}: only one replaceContents per answer")
        else:
            body = _text(item["value"], [*path, "value"]).encode("utf-8")
    decision = state.decision()
    if body is not None:
        replace = {"op": "replace_body", "base64": base64.b64encode(body).decode("ascii")}
        decision["modifications"] = [*decision.get("modifications", ()), replace]
    return decision
