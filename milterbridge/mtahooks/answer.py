"""Answers of MTA Hooks -01, turned into the bridge's own decision document.

An answer is 204 (no body), ``{}``, or ``{"set": [...], "add": [...], "delete": [...]}``:
operations on the request's properties, applied all ``set`` first, then ``add``, then
``delete``, each list in order, each index meaning the array as the operations before it
left it. ``to_decision`` applies them to a model of what the request showed (``Before``) and
writes the result as the bridge's decision (openapi/milterbridge.yaml), which the caller then
checks with ``policy.parse.parse_decision`` like a native endpoint's answer:

- ``/action``: ``accept`` is ``continue`` (the draft's accept lets the transaction go on);
  ``reject`` is ``reject``, or ``tempfail`` with a 4xx ``/response``; ``discard`` and
  ``quarantine`` (the reason: the response's message, else ``quarantined by the scanner``)
  keep their names; ``disconnect`` is ``tempfail`` with a 421 reply, which ends the session.
- ``/response`` (``code``, ``enhancedCode``, ``message``, whole or one member): the reply of
  ``reject`` and ``disconnect``. Milter cannot give a custom reply to an accepted command, so
  with the other actions it is not sent (it becomes the decision's ``reason``).
- ``/message/headers``: ``add`` (``{name, value}``, at ``index`` or appended), ``set`` of
  ``/message/headers/N`` (same name) or ``/message/headers/N/value``, ``delete`` of
  ``/message/headers/N``; the result is written as header changes, deletes and inserts
  numbered as in the request (the bridge converts them to the MTA's numbering as for any
  endpoint). ``/message/subject``: the first Subject header, in ASCII.
- ``/envelope/from`` (``set``): ``change_from``; ``/envelope/to`` (``add``, appended): ``add_rcpt``;
  ``/envelope/to/N`` (``delete``): ``delete_rcpt``; ``set`` of ``/envelope/to/N``: both.
- ``/rawMessage`` (``set``, base64): the new message. Its headers are compared with the
  request's and the differences written as header deletes and inserts, its body as
  ``replace_body``. As the draft says, it wins over edits of ``/message``.

Anything else cannot be carried out over milter (a header renamed in place, a recipient put at
an index, an unknown path or action) and makes the whole answer invalid: ``HookAnswerError``,
and the endpoint's ``on_error`` applies, as for any invalid answer.
"""

from __future__ import annotations

import base64
import binascii
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["ACTIONS", "Before", "HookAnswerError", "to_decision"]

JSON = dict[str, Any]

#: The draft's inbound actions.
ACTIONS: Final = ("accept", "reject", "discard", "quarantine", "disconnect")
_OPERATIONS: Final = ("set", "add", "delete")
#: The members each kind of operation may have.
_MEMBERS: Final = {"set": {"path", "value"}, "add": {"path", "value", "index"}, "delete": {"path"}}
_RESPONSE_KEYS: Final = ("code", "enhancedCode", "message")
_DISCONNECT_CODE: Final = 421
_DISCONNECT_ENHANCED: Final = "4.7.0"
_DISCONNECT_TEXT: Final = "closing the connection"
_QUARANTINE_REASON: Final = "quarantined by the scanner"


class HookAnswerError(ValueError):
    """An answer that breaks the draft, or that milter cannot carry out; the message says why."""


@dataclass(frozen=True, slots=True)
class Before:
    """What the hook request showed, which the answer's operations edit."""

    #: ``message.headers`` as (name, raw value), in message order (empty before ``data``).
    headers: tuple[tuple[str, str], ...] = ()
    #: ``envelope.to``'s addresses, in order.
    rcpts: tuple[str, ...] = ()


@dataclass(slots=True)
class _Header:
    #: Its index in ``Before.headers``; None for a header the answer added.
    origin: int | None
    name: str
    value: str


@dataclass(slots=True)
class _Rcpt:
    origin: int | None
    address: str
    parameters: Mapping[str, str] = field(default_factory=dict)


class _State:
    """The request's properties as the operations change them."""

    def __init__(self, before: Before) -> None:
        self.before = before
        self.action = "accept"
        self.response: JSON | None = None
        self.headers = [_Header(i, name, value) for i, (name, value) in enumerate(before.headers)]
        self.rcpts = [_Rcpt(i, address) for i, address in enumerate(before.rcpts)]
        self.mail_from: JSON | None = None
        self.raw: bytes | None = None

    # -- operations -----------------------------------------------------------------------

    def set(self, path: list[str], value: object) -> None:
        match path:
            case ["action"]:
                if value not in ACTIONS:
                    raise HookAnswerError(f"/action: {value!r} is not one of {', '.join(ACTIONS)}")
                self.action = str(value)
            case ["response"]:
                self.response = _response(value)
            case ["response", key] if key in _RESPONSE_KEYS:
                self.response = _response({**(self.response or {}), key: value}, partial=True)
            case ["message", "headers", index]:
                header = self.headers[_index(index, len(self.headers), path)]
                name, text = _header(value, path)
                if name.lower() != header.name.lower():
                    raise HookAnswerError(
                        f"{_pointer(path)}: renaming {header.name!r} to {name!r} in place cannot be done over milter "
                        "(delete it and add the new one)"
                    )
                header.value = text
            case ["message", "headers", index, "value"]:
                self.headers[_index(index, len(self.headers), path)].value = _text(value, path)
            case ["message", "subject"]:
                self._set_subject(_text(value, path), path)
            case ["envelope", "from"]:
                self.mail_from = _envelope_address(value, path, null=True)
            case ["envelope", "to", index]:
                position = _index(index, len(self.rcpts), path)
                new = _envelope_address(value, path, null=False)
                self.rcpts[position] = _Rcpt(None, new["address"], new["parameters"])
            case ["rawMessage"]:
                if not isinstance(value, str):
                    raise HookAnswerError(f"/rawMessage: expected base64 text, got {_kind(value)}")
                try:
                    self.raw = base64.b64decode(value, validate=True)
                except binascii.Error as exc:
                    raise HookAnswerError(f"/rawMessage: not base64 ({exc})") from None
            case _:
                raise HookAnswerError(f"{_pointer(path)}: set is not supported there")

    def add(self, path: list[str], value: object, index: object) -> None:
        match path:
            case ["message", "headers"]:
                position = len(self.headers) if index is None else _index(index, len(self.headers) + 1, path)
                name, text = _header(value, path)
                self.headers.insert(position, _Header(None, name, text))
            case ["envelope", "to"]:
                if index is not None and index != len(self.rcpts):
                    raise HookAnswerError("/envelope/to: milter adds a recipient at the end, not at an index")
                new = _envelope_address(value, path, null=False)
                self.rcpts.append(_Rcpt(None, new["address"], new["parameters"]))
            case ["response"] | ["response", _]:
                self.set(path, value)
            case _:
                raise HookAnswerError(f"{_pointer(path)}: add is not supported there")

    def delete(self, path: list[str]) -> None:
        match path:
            case ["message", "headers", index]:
                del self.headers[_index(index, len(self.headers), path)]
            case ["envelope", "to", index]:
                del self.rcpts[_index(index, len(self.rcpts), path)]
            case ["response"]:
                self.response = None
            case _:
                raise HookAnswerError(f"{_pointer(path)}: delete is not supported there")

    def _set_subject(self, text: str, path: list[str]) -> None:
        if not text.isascii():
            raise HookAnswerError(f"{_pointer(path)}: only ASCII text (the bridge does not encode RFC 2047 words)")
        for header in self.headers:
            if header.name.lower() == "subject":
                header.value = " " + text
                return
        self.headers.append(_Header(None, "Subject", " " + text))

    # -- the decision -----------------------------------------------------------------------

    def decision(self) -> JSON:
        decision: JSON = {"action": "continue"}
        response = self.response or {}
        if self.action == "reject":
            code = response.get("code") or 550
            decision["action"] = "tempfail" if 400 <= code < 500 else "reject"
            if response:
                decision["reply"] = _reply(response)
        elif self.action == "disconnect":
            decision["action"] = "tempfail"
            enhanced = response.get("enhancedCode") or ""
            decision["reply"] = {
                "code": _DISCONNECT_CODE,
                # A 421 takes a 4.x.x enhanced code; a scanner's 5.x.x one is not kept.
                "enhanced": enhanced if enhanced.startswith("4.") else _DISCONNECT_ENHANCED,
                "text": response.get("message") or _DISCONNECT_TEXT,
            }
        elif self.action in ("discard", "quarantine"):
            decision["action"] = self.action
        if response.get("message"):
            decision["reason"] = response["message"]
        elif self.action == "quarantine":
            decision["reason"] = _QUARANTINE_REASON
        modifications = self._envelope_changes()
        modifications += self._raw_changes() if self.raw is not None else self._header_changes()
        if modifications:
            decision["modifications"] = modifications
        return decision

    def _envelope_changes(self) -> list[JSON]:
        changes: list[JSON] = []
        if self.mail_from is not None:
            change = {"op": "change_from", "address": self.mail_from["address"] or ""}
            changes.append(change | _args(self.mail_from["parameters"]))
        kept = {rcpt.origin for rcpt in self.rcpts}
        for origin, address in enumerate(self.before.rcpts):
            if origin not in kept:
                changes.append({"op": "delete_rcpt", "address": address})
        for rcpt in self.rcpts:
            if rcpt.origin is None:
                changes.append({"op": "add_rcpt", "address": rcpt.address} | _args(rcpt.parameters))
        return changes

    def _header_changes(self) -> list[JSON]:
        return _diff(self.before.headers, self.headers)

    def _raw_changes(self) -> list[JSON]:
        assert self.raw is not None
        head, body = _split_message(self.raw)
        new = _parse_headers(head)
        matcher = difflib.SequenceMatcher(
            a=[(n.lower(), v) for n, v in self.before.headers], b=[(n.lower(), v) for n, v in new], autojunk=False
        )
        kept = {
            j: i
            for i, j, size in matcher.get_matching_blocks()
            for i, j in zip(range(i, i + size), range(j, j + size), strict=True)
        }
        headers = [_Header(kept.get(j), name, value) for j, (name, value) in enumerate(new)]
        # The new message's first headers take the place of the old ones, below the MTA's own
        # trace headers (which the request did not show), not above them.
        top = min(kept.values(), default=len(self.before.headers))
        return [
            *_diff(self.before.headers, headers, top),
            {"op": "replace_body", "base64": base64.b64encode(body).decode("ascii")},
        ]


def _diff(before: Sequence[tuple[str, str]], after: Sequence[_Header], top: int = 0) -> list[JSON]:
    """Header changes, deletes and inserts that turn ``before`` into ``after``, numbered as in ``before``.

    A new header that no original one precedes goes below the first ``top`` originals (0: at
    the very top).
    """
    changes: list[JSON] = []
    ordinal: list[int] = []  # the 1-based number of each original header among those of its name
    seen: dict[str, int] = {}
    for name, _ in before:
        seen[name.lower()] = seen.get(name.lower(), 0) + 1
        ordinal.append(seen[name.lower()])
    survivors = {header.origin: header for header in after if header.origin is not None}
    for origin, (name, value) in enumerate(before):
        header = survivors.get(origin)
        if header is None:
            changes.append({"op": "delete_header", "name": name, "index": ordinal[origin]})
        elif header.value != value:
            changes.append({"op": "change_header", "name": name, "index": ordinal[origin], "value": header.value})
    after_original = top  # insert below the last original header that precedes it
    for header in after:
        if header.origin is not None:
            after_original = header.origin + 1
        else:
            changes.append({"op": "insert_header", "index": after_original, "name": header.name, "value": header.value})
    return changes


def _split_message(raw: bytes) -> tuple[bytes, bytes]:
    """The header block and the body (CRLF line ends) of an RFC 5322 message."""
    normal = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, separator, body = normal.partition(b"\r\n\r\n")
    if not separator:
        if normal.startswith(b"\r\n"):
            return b"", normal[2:]
        return normal, b""
    return head, body


def _parse_headers(head: bytes) -> list[tuple[str, str]]:
    """(name, raw value) per header field; continuation lines stay in the value, joined by ``\\n``."""
    headers: list[tuple[str, str]] = []
    for line in head.split(b"\r\n") if head else ():
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise HookAnswerError("/rawMessage: the message starts with a continuation line")
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line.decode("utf-8", "replace"))
            continue
        raw_name, colon, raw_value = line.partition(b":")
        if not colon or not raw_name or raw_name != raw_name.strip():
            raise HookAnswerError(f"/rawMessage: {line[:60]!r} is not a header field")
        headers.append((raw_name.decode("ascii", "replace"), raw_value.decode("utf-8", "replace")))
    return headers


def _reply(response: Mapping[str, Any]) -> JSON:
    reply: JSON = {"code": response.get("code") or 550, "text": response.get("message") or ""}
    if response.get("enhancedCode"):
        reply["enhanced"] = response["enhancedCode"]
    return reply


def _args(parameters: Mapping[str, str]) -> JSON:
    args = [f"{keyword}={value}" if value != "" else keyword for keyword, value in parameters.items()]
    return {"args": args} if args else {}


def _response(value: object, *, partial: bool = False) -> JSON:
    value = _object(value, _RESPONSE_KEYS, "/response")
    code = value.get("code")
    if not (isinstance(code, int) and not isinstance(code, bool) and 200 <= code <= 599) and not (
        partial and code is None
    ):
        raise HookAnswerError(f"/response/code: expected an SMTP reply code, got {code!r}")
    for key in ("enhancedCode", "message"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise HookAnswerError(f"/response/{key}: expected text, got {_kind(value[key])}")
    return dict(value)


def _header(value: object, path: list[str]) -> tuple[str, str]:
    if not isinstance(value, dict) or set(value) != {"name", "value"}:
        raise HookAnswerError(f"{_pointer(path)}: expected {{name, value}}, got {value!r:.60}")
    return _text(value["name"], path), _text(value["value"], path)


def _envelope_address(value: object, path: list[str], *, null: bool) -> JSON:
    if not isinstance(value, dict) or not set(value) <= {"address", "parameters"} or "address" not in value:
        raise HookAnswerError(f"{_pointer(path)}: expected {{address, parameters}}, got {value!r:.60}")
    address = value["address"]
    if address is None and not null:
        raise HookAnswerError(f"{_pointer(path)}: a recipient needs an address")
    if address is not None and not isinstance(address, str):
        raise HookAnswerError(f"{_pointer(path)}: address: expected text, got {_kind(address)}")
    parameters = value.get("parameters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
        raise HookAnswerError(f"{_pointer(path)}: parameters: expected a map of text")
    return {"address": address, "parameters": parameters}


def _text(value: object, path: list[str]) -> str:
    if not isinstance(value, str):
        raise HookAnswerError(f"{_pointer(path)}: expected text, got {_kind(value)}")
    return value


def _index(token: object, size: int, path: list[str]) -> int:
    """``token`` (a pointer token or an operation's index) as an index below ``size``."""
    if isinstance(token, int) and not isinstance(token, bool):
        number = token
    elif isinstance(token, str) and token.isdigit() and (token == "0" or not token.startswith("0")):
        number = int(token)
    else:
        raise HookAnswerError(f"{_pointer(path)}: {token!r} is not an index")
    if not 0 <= number < size:
        raise HookAnswerError(f"{_pointer(path)}: index {number} is out of range (there are {size})")
    return number


def _parse_pointer(path: object) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise HookAnswerError(f"path: expected a JSON Pointer such as /action, got {path!r:.60}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _pointer(path: list[str]) -> str:
    return "/" + "/".join(token.replace("~", "~0").replace("/", "~1") for token in path)


def _object(value: object, members: Sequence[str], where: str) -> dict[str, Any]:
    """``value`` when it is an object with no member but ``members``; else HookAnswerError naming ``where``."""
    if not isinstance(value, dict):
        raise HookAnswerError(f"{where}: expected an object, got {_kind(value)}")
    unknown = sorted(set(value) - set(members))
    if unknown:
        raise HookAnswerError(f"{where}: unknown member {unknown[0]!r} (expected {', '.join(members)})")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def to_decision(answer: object, before: Before) -> JSON | None:
    """The bridge's decision document for an MTA Hooks ``answer`` (decoded JSON; None for 204).

    None means continue (no change). Raises ``HookAnswerError`` for an answer that is not
    valid or cannot be carried out over milter.
    """
    if answer is None or answer == {}:
        return None
    answer = _object(answer, _OPERATIONS, "answer")
    state = _State(before)
    for kind in _OPERATIONS:
        operations = answer.get(kind) or []
        if not isinstance(operations, list):
            raise HookAnswerError(f"{kind}: expected an array, got {_kind(operations)}")
        for operation in operations:
            allowed = (
                {"path", "value", "index"} if kind == "add" else ({"path", "value"} if kind == "set" else {"path"})
            )
            if not isinstance(operation, dict) or not set(operation) <= allowed or "path" not in operation:
                raise HookAnswerError(f"{kind}: {operation!r:.80} is not a {kind} operation")
            if kind != "delete" and "value" not in operation:
                raise HookAnswerError(f"{kind}: {operation['path']!r} has no value")
            path = _parse_pointer(operation["path"])
            if kind == "set":
                state.set(path, operation["value"])
            elif kind == "add":
                state.add(path, operation["value"], operation.get("index"))
            else:
                state.delete(path)
    return state.decision()
