"""Strict validation of an endpoint's JSON response into a :class:`Decision`.

:func:`parse_decision` takes what the JSON decoder produced (``None`` for a
204 or an empty body) and either returns a :class:`Decision` or raises
:class:`DecisionError` naming the rule that was broken and where
(``modifications[3].name: ...``). An invalid response counts as an endpoint
failure: nothing from it is applied (design.md §3.3).

Rules, beyond the per-event action table (:data:`LEGAL_ACTIONS`):

* Unknown keys are refused at every level; an optional key may be ``null``,
  which means absent. Booleans are never accepted where a number is expected.
* ``reply`` only with reject (5xx) and tempfail (4xx); ``code`` is required;
  ``enhanced`` is ``c.d.d`` with 1-3 digits per part after the class digit,
  which must equal the code's first digit; ``text`` is a string or a list of
  1-32 non-empty lines, each at most 512 bytes of UTF-8 without CR, LF or
  NUL. The whole wire line (code, enhanced code, text with ``%`` doubled)
  must also fit in 512 bytes. Without text Postfix's default text for the
  class is sent.
* ``reason``: at most :data:`MAX_REASON_CHARS` characters, no CR, LF or NUL
  (it is the quarantine text on the wire).
* No modifications at ``unknown``; at most ``max_modifications`` elsewhere.
* Only the ops in ``allowed_ops`` (the endpoint's setting; default all);
  any other op makes the whole response invalid.
* Header names: 1-:data:`MAX_HEADER_NAME_BYTES` printable ASCII bytes
  (0x21-0x7E) without ``:`` (RFC 5322 §2.2 ftext). Header values: at most
  :data:`MAX_HEADER_VALUE_BYTES` of UTF-8, no control character (C0, DEL, C1)
  but HTAB, and LF only to fold: each LF starts a line of a space or a tab
  then at least one character that is not (RFC 5322 §3.2.2: no fold line
  made only of whitespace, which a parser could take for the end of the
  header block). The first line may be empty: a value may start with a fold.
* ``value_b64`` instead of ``value`` (exactly one of the two) gives a header
  value as exact bytes, base64 as for ``replace_body``: the same rules on the
  decoded bytes, with 0x80-0xFF allowed (any charset), and sent as they are.
* Indexes: integers, at least 1 for change/delete and 0 for insert, at most
  :data:`MAX_HEADER_INDEX`.
* ``replace_body.base64``: standard alphabet with padding, canonical (it
  re-encodes to the same text); no whitespace or line breaks.
* Addresses: an RFC 5321 ``Mailbox`` without angle brackets (the bridge
  adds them), UTF-8 allowed as in RFC 6531; see :func:`.mailbox.mailbox_problem`.
  ``""`` is the null sender, allowed only in ``change_from`` (``<>`` on the
  wire: Postfix sets the null sender, and ignores a null recipient).
* ESMTP ``args``: a list of at most :data:`MAX_ARGS` non-empty strings of at
  most :data:`MAX_ARG_BYTES` bytes, without whitespace or control characters
  (they are joined with spaces on the wire).
* An op, or a quarantine, that needs an action the MTA did not grant (when
  ``allowed_actions`` is given) makes the whole response invalid.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Final

from milterbridge.milter.constants import Action, Event

from .mailbox import mailbox_problem
from .model import (
    ALL_OPS,
    CONTINUE,
    LEGAL_ACTIONS,
    NOTIFICATION_EVENTS,
    REJECT_CODES,
    TEMPFAIL_CODES,
    ActionName,
    AddHeaderOp,
    AddRcptOp,
    AnyOp,
    ChangeFromOp,
    ChangeHeaderOp,
    Decision,
    DecisionError,
    DeleteHeaderOp,
    DeleteRcptOp,
    InsertHeaderOp,
    ModOp,
    PolicyUsageError,
    ReplaceBodyOp,
    SmtpReply,
    required_action,
)

MAX_REASON_CHARS: Final = 1000
MAX_REPLY_LINES: Final = 32
#: RFC 5321's reply-line limit, also the portable bound (milter-protocol.md §7.3).
MAX_REPLY_LINE_BYTES: Final = 512
MAX_HEADER_NAME_BYTES: Final = 256
#: Below Postfix's ``header_size_limit`` (102400), which would cut the header silently.
MAX_HEADER_VALUE_BYTES: Final = 65536
MAX_HEADER_INDEX: Final = 1_000_000
MAX_ARGS: Final = 16
MAX_ARG_BYTES: Final = 1024

_PLAIN_CONTINUE: Final = {"action": "continue"}
_TOP_KEYS: Final = frozenset({"action", "reply", "reason", "modifications"})
_REPLY_KEYS: Final = frozenset({"code", "enhanced", "text"})
_ENHANCED: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_HEADER_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_ARG_BAD: Final = re.compile(r"[\x00-\x20\x7f]")
#: A header value: lines of text without control characters but HTAB; every
#: line after an LF is a fold, whitespace then something that is not.
_VALUE_TEXT: Final = r"[^\x00-\x08\x0a-\x1f\x7f-\x9f]"
_HEADER_VALUE: Final = re.compile(rf"{_VALUE_TEXT}*(?:\n[ \t]+[^\x00-\x20\x7f-\x9f]{_VALUE_TEXT}*)*")
_VALUE_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
#: The same rules for the bytes of ``value_b64``, where 0x80-0xFF are any charset's text.
_HEADER_BYTES: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*(?:\n[ \t]+[^\x00-\x20\x7f][^\x00-\x08\x0a-\x1f\x7f]*)*")
_BYTES_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

#: Value -> member: a dict lookup instead of the enum's call-by-value, which runs per response.
_ACTION_NAMES: Final[dict[str, ActionName]] = {member.value: member for member in ActionName}
_MOD_OPS: Final[dict[str, ModOp]] = {member.value: member for member in ModOp}


def parse_decision(
    obj: object,
    event: Event,
    *,
    max_modifications: int,
    allowed_actions: Action | None = None,
    allowed_ops: Collection[ModOp] = ALL_OPS,
) -> Decision:
    """Validate a JSON-decoded response to ``event``; ``None`` (204, empty body) is continue.

    At ``abort`` and ``close`` the response is ignored and nothing is parsed.
    ``allowed_actions`` is what the MTA granted at negotiation; when given, an
    op or a quarantine needing an action outside it makes the response invalid.
    ``allowed_ops`` is the endpoint's setting: any other op makes the response
    invalid. Raises :class:`DecisionError`.
    """
    if event in NOTIFICATION_EVENTS:
        return CONTINUE
    legal = LEGAL_ACTIONS.get(event)
    if legal is None:
        raise PolicyUsageError(f"{event} is not a decision event")
    if obj is None or obj == _PLAIN_CONTINUE:
        return CONTINUE  # the most common answer, {"action": "continue"}: legal at every event
    top = _object(obj, "response", _TOP_KEYS, required=("action",))
    raw_action = _string(top["action"], "action")
    action = _ACTION_NAMES.get(raw_action)
    if action is None:
        raise DecisionError(f"action: unknown action {raw_action!r}{_did_you_mean(raw_action, _ACTION_NAMES)}")
    if action not in legal:
        raise DecisionError(f"action: {action} is not allowed at {event}")
    if (
        action is ActionName.QUARANTINE
        and allowed_actions is not None
        and not allowed_actions.grants(Action.QUARANTINE)
    ):
        raise DecisionError("action: quarantine was not granted by the MTA")
    reply = _reply(top.get("reply"), action, event)
    reason = _reason(top.get("reason"))
    modifications = _modifications(top.get("modifications"), event, max_modifications, allowed_actions, allowed_ops)
    return Decision(action=action, reply=reply, reason=reason, modifications=modifications)


# --------------------------------------------------------------------------
# JSON shape helpers


def _object(obj: object, where: str, allowed: frozenset[str], required: tuple[str, ...] = ()) -> Mapping[str, object]:
    if not isinstance(obj, dict):
        raise DecisionError(f"{where}: expected an object, got {_kind(obj)}")
    if not obj.keys() <= allowed:
        unknown = sorted(str(k) for k in obj if k not in allowed)
        raise DecisionError(f"{where}: unknown key {unknown[0]!r}")
    for key in required:
        if obj.get(key) is None:
            raise DecisionError(f"{where}: {key!r} is required")
    return obj


def _kind(obj: object) -> str:
    if obj is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(obj), type(obj).__name__
    )


def _string(obj: object, where: str) -> str:
    if not isinstance(obj, str):
        raise DecisionError(f"{where}: expected a string, got {_kind(obj)}")
    return obj


def _integer(obj: object, where: str, low: int, high: int) -> int:
    # bool is an int subclass in Python, never in JSON.
    if not isinstance(obj, int) or isinstance(obj, bool):
        raise DecisionError(f"{where}: expected an integer, got {_kind(obj)}")
    if not low <= obj <= high:
        raise DecisionError(f"{where}: must be between {low} and {high}, got {obj}")
    return obj


def _did_you_mean(word: str, known: Collection[str]) -> str:
    """A hint naming the closest known word (case ignored), as config errors give, or ``""``."""
    by_lower = {name.lower(): name for name in known}
    close = difflib.get_close_matches(word.lower(), by_lower, n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _utf8_len(text: str, where: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        # Lone surrogates from a lenient JSON decoder cannot go on the wire.
        raise DecisionError(f"{where}: not valid Unicode text") from None


# --------------------------------------------------------------------------
# reply and reason


def _reply(obj: object, action: ActionName, event: Event) -> SmtpReply | None:
    if obj is None:
        return None
    if action not in (ActionName.REJECT, ActionName.TEMPFAIL):
        raise DecisionError(f"reply: allowed only with reject or tempfail, not {action}")
    raw = _object(obj, "reply", _REPLY_KEYS, required=("code",))
    codes = REJECT_CODES if action is ActionName.REJECT else TEMPFAIL_CODES
    code = _integer(raw["code"], "reply.code", codes[0], codes[-1])
    enhanced_raw = raw.get("enhanced")
    enhanced = None
    if enhanced_raw is not None:
        enhanced = _string(enhanced_raw, "reply.enhanced")
        if not _ENHANCED.fullmatch(enhanced):
            raise DecisionError(f"reply.enhanced: expected the form 5.7.1, got {enhanced!r}")
        if enhanced[0] != str(code)[0]:
            raise DecisionError(f"reply.enhanced: class {enhanced[0]} does not match code {code}")
    lines = _reply_lines(raw.get("text"))
    try:
        return SmtpReply(code=code, enhanced=enhanced, lines=lines)
    except ValueError as exc:
        # The per-line checks passed, so only the composed line can be too long.
        raise DecisionError(f"reply.text: {exc} (code, enhanced code and doubled % included)") from None


def _reply_lines(obj: object) -> tuple[str, ...]:
    if obj is None:
        return ()
    if isinstance(obj, str):
        items: list[object] = [obj]
        where = "reply.text"
    elif isinstance(obj, list):
        if not 1 <= len(obj) <= MAX_REPLY_LINES:
            raise DecisionError(f"reply.text: 1 to {MAX_REPLY_LINES} lines, got {len(obj)}")
        items = obj
        where = "reply.text[{}]"
    else:
        raise DecisionError(f"reply.text: expected a string or an array, got {_kind(obj)}")
    lines = []
    for n, item in enumerate(items):
        here = where.format(n)
        line = _string(item, here)
        if not line:
            # An empty line would put a bare code on the wire ("550"), which
            # Postfix calls malformed; the contract says "not empty".
            raise DecisionError(f"{here}: must not be empty")
        if any(c in line for c in "\r\n\0"):
            raise DecisionError(f"{here}: must not contain CR, LF or NUL")
        if _utf8_len(line, here) > MAX_REPLY_LINE_BYTES:
            raise DecisionError(f"{here}: longer than {MAX_REPLY_LINE_BYTES} bytes")
        lines.append(line)
    return tuple(lines)


def _reason(obj: object) -> str | None:
    if obj is None:
        return None
    reason = _string(obj, "reason")
    if len(reason) > MAX_REASON_CHARS:
        raise DecisionError(f"reason: longer than {MAX_REASON_CHARS} characters")
    if any(c in reason for c in "\r\n\0"):
        raise DecisionError("reason: must not contain CR, LF or NUL")
    _utf8_len(reason, "reason")
    return reason


# --------------------------------------------------------------------------
# modifications


def _modifications(
    obj: object,
    event: Event,
    max_modifications: int,
    allowed_actions: Action | None,
    allowed_ops: Collection[ModOp],
) -> tuple[AnyOp, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise DecisionError(f"modifications: expected an array, got {_kind(obj)}")
    if obj and event is Event.UNKNOWN:
        raise DecisionError("modifications: not allowed at unknown")
    if len(obj) > max_modifications:
        raise DecisionError(f"modifications: at most {max_modifications}, got {len(obj)}")
    ops: list[AnyOp] = []
    for n, item in enumerate(obj):
        where = f"modifications[{n}]"
        op = _modification(item, where, allowed_ops)
        if allowed_actions is not None and not allowed_actions.grants(required_action(op)):
            raise DecisionError(f"{where}: {op.op} needs an action the MTA did not grant ({required_action(op)!r})")
        ops.append(op)
    return tuple(ops)


def _modification(obj: object, where: str, allowed_ops: Collection[ModOp]) -> AnyOp:
    if not isinstance(obj, dict):
        raise DecisionError(f"{where}: expected an object, got {_kind(obj)}")
    raw_op = _string(obj.get("op"), f"{where}.op")
    op = _MOD_OPS.get(raw_op)
    if op is None:
        raise DecisionError(f"{where}.op: unknown op {raw_op!r}{_did_you_mean(raw_op, _MOD_OPS)}")
    if op not in allowed_ops:
        raise DecisionError(f"{where}.op: {op} is not in this endpoint's allowed_ops")
    keys, required, build = _OPS[op]
    raw = _object(obj, where, keys | {"op"}, required)
    return build(raw, where)


def _header_name(raw: Mapping[str, object], where: str) -> str:
    name = _string(raw["name"], f"{where}.name")
    if len(name) > MAX_HEADER_NAME_BYTES:
        raise DecisionError(f"{where}.name: longer than {MAX_HEADER_NAME_BYTES} bytes")
    if not _HEADER_NAME.fullmatch(name):
        raise DecisionError(f"{where}.name: {name!r} must be printable ASCII without ':' or spaces")
    return name


def _header_value(raw: Mapping[str, object], where: str) -> str | bytes:
    """The ``value`` text, or the exact bytes of ``value_b64``: exactly one of the two is given."""
    text, encoded = raw.get("value"), raw.get("value_b64")
    if text is None and encoded is None:
        raise DecisionError(f"{where}: 'value' is required (or 'value_b64')")
    if text is not None and encoded is not None:
        raise DecisionError(f"{where}: give 'value' or 'value_b64', not both")
    if encoded is not None:
        return _header_bytes(encoded, f"{where}.value_b64")
    here = f"{where}.value"
    value = _string(text, here)
    if _utf8_len(value, here) > MAX_HEADER_VALUE_BYTES:
        raise DecisionError(f"{here}: longer than {MAX_HEADER_VALUE_BYTES} bytes")
    if not _HEADER_VALUE.fullmatch(value):
        raise DecisionError(f"{here}: {_value_problem(value)}")
    return value


def _header_bytes(obj: object, where: str) -> bytes:
    value = _base64(obj, where)
    if len(value) > MAX_HEADER_VALUE_BYTES:
        raise DecisionError(f"{where}: longer than {MAX_HEADER_VALUE_BYTES} bytes")
    if not _HEADER_BYTES.fullmatch(value):
        # Latin-1 maps each byte to one character, so the text rules' messages apply as they are.
        problem = _value_problem(value.decode("latin-1"), _BYTES_CONTROL, control_name="control byte 0x{:02X}")
        raise DecisionError(f"{where}: {problem}")
    return value


def _value_problem(
    value: str, control_chars: re.Pattern[str] = _VALUE_CONTROL, control_name: str = "control character U+{:04X}"
) -> str:
    """Why a header value failed :data:`_HEADER_VALUE` (or :data:`_HEADER_BYTES`), for the error message."""
    lines = value.split("\n")
    for line in lines:
        control = control_chars.search(line)
        if control:
            return f"{control_name.format(ord(control.group()))} (only HTAB, and LF to fold, are allowed)"
    for line in lines[1:]:
        if line[:1] not in (" ", "\t"):
            return "LF is allowed only to fold: followed by a space or a tab"
    return "a fold line must not be only whitespace"


def _address(raw: Mapping[str, object], where: str, *, null_ok: bool = False) -> str:
    here = f"{where}.address"
    address = _string(raw["address"], here)
    if not address:
        if null_ok:
            return address  # the null sender, <> on the wire
        raise DecisionError(f'{here}: must not be empty (the null sender "" is only for change_from)')
    problem = mailbox_problem(address)
    if problem:
        raise DecisionError(f"{here}: {problem}")
    return address


def _args(raw: Mapping[str, object], where: str) -> tuple[str, ...]:
    obj = raw.get("args")
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise DecisionError(f"{where}.args: expected an array, got {_kind(obj)}")
    if len(obj) > MAX_ARGS:
        raise DecisionError(f"{where}.args: at most {MAX_ARGS} arguments, got {len(obj)}")
    args = []
    for n, item in enumerate(obj):
        here = f"{where}.args[{n}]"
        arg = _string(item, here)
        if not arg or _ARG_BAD.search(arg) or arg != "".join(arg.split()):
            raise DecisionError(f"{here}: must be non-empty, without whitespace or control characters")
        if _utf8_len(arg, here) > MAX_ARG_BYTES:
            raise DecisionError(f"{here}: longer than {MAX_ARG_BYTES} bytes")
        args.append(arg)
    return tuple(args)


def _body(raw: Mapping[str, object], where: str) -> bytes:
    return _base64(raw["base64"], f"{where}.base64")


def _base64(obj: object, here: str) -> bytes:
    text = _string(obj, here)
    try:
        data = text.encode("ascii")
        body = base64.b64decode(data, validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise DecisionError(f"{here}: not valid base64") from None
    # validate=True still accepts non-zero padding bits; refusing them keeps
    # one body to one text, so two endpoints cannot disagree on a "same" body.
    if base64.b64encode(body) != data:
        raise DecisionError(f"{here}: not canonical base64")
    return body


def _add_header(raw: Mapping[str, object], where: str) -> AnyOp:
    return AddHeaderOp(name=_header_name(raw, where), value=_header_value(raw, where))


def _insert_header(raw: Mapping[str, object], where: str) -> AnyOp:
    index = _integer(raw["index"], f"{where}.index", 0, MAX_HEADER_INDEX)
    return InsertHeaderOp(index=index, name=_header_name(raw, where), value=_header_value(raw, where))


def _change_header(raw: Mapping[str, object], where: str) -> AnyOp:
    index = _integer(raw["index"], f"{where}.index", 1, MAX_HEADER_INDEX)
    return ChangeHeaderOp(name=_header_name(raw, where), index=index, value=_header_value(raw, where))


def _delete_header(raw: Mapping[str, object], where: str) -> AnyOp:
    index = _integer(raw["index"], f"{where}.index", 1, MAX_HEADER_INDEX)
    return DeleteHeaderOp(name=_header_name(raw, where), index=index)


def _replace_body(raw: Mapping[str, object], where: str) -> AnyOp:
    return ReplaceBodyOp(body=_body(raw, where))


def _add_rcpt(raw: Mapping[str, object], where: str) -> AnyOp:
    return AddRcptOp(address=_address(raw, where), args=_args(raw, where))


def _delete_rcpt(raw: Mapping[str, object], where: str) -> AnyOp:
    return DeleteRcptOp(address=_address(raw, where))


def _change_from(raw: Mapping[str, object], where: str) -> AnyOp:
    return ChangeFromOp(address=_address(raw, where, null_ok=True), args=_args(raw, where))


_Builder = Callable[[Mapping[str, object], str], AnyOp]

#: op -> (allowed keys besides "op", required keys, builder).
_OPS: Final[Mapping[ModOp, tuple[frozenset[str], tuple[str, ...], _Builder]]] = {
    ModOp.ADD_HEADER: (frozenset({"name", "value", "value_b64"}), ("name",), _add_header),
    ModOp.INSERT_HEADER: (frozenset({"index", "name", "value", "value_b64"}), ("index", "name"), _insert_header),
    ModOp.CHANGE_HEADER: (frozenset({"index", "name", "value", "value_b64"}), ("index", "name"), _change_header),
    ModOp.DELETE_HEADER: (frozenset({"index", "name"}), ("index", "name"), _delete_header),
    ModOp.REPLACE_BODY: (frozenset({"base64"}), ("base64",), _replace_body),
    ModOp.ADD_RCPT: (frozenset({"address", "args"}), ("address",), _add_rcpt),
    ModOp.DELETE_RCPT: (frozenset({"address"}), ("address",), _delete_rcpt),
    ModOp.CHANGE_FROM: (frozenset({"address", "args"}), ("address",), _change_from),
}
