"""Readable and JSON forms of milter replies, for ``milterbridge send`` and logs."""

from __future__ import annotations

from typing import Any

from milterbridge.client import TransactionResult
from milterbridge.milter import messages as m

DECISION_NAMES: dict[type[m.Reply], str] = {
    m.Continue: "continue",
    m.Accept: "accept",
    m.Reject: "reject",
    m.TempFail: "tempfail",
    m.Discard: "discard",
    m.Skip: "skip",
    m.Shutdown: "shutdown",
    m.ConnFail: "conn_fail",
}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def reply_json(reply: m.Reply | None) -> dict[str, Any] | None:
    """``{"action": ..., "reply": "550 5.7.1 ..."}`` for a final reply (None stays None)."""
    if reply is None:
        return None
    if isinstance(reply, m.ReplyCode):
        code = reply.smtp_code
        action = "tempfail" if 400 <= code < 500 else "reject"
        return {"action": action, "reply": _text(reply.text).split("\r\n")}
    return {"action": DECISION_NAMES.get(type(reply), type(reply).__name__.lower())}


def _quarantine(result: TransactionResult) -> m.Quarantine | None:
    """The quarantine request of a message the milter let through, if it sent one."""
    if result.stopped_by is not None or result.eom is None:
        return None
    if not isinstance(result.eom.reply, m.Continue | m.Accept):
        return None
    for mod in result.eom.modifications:
        if isinstance(mod, m.Quarantine):
            return mod
    return None


def decision_json(result: TransactionResult) -> dict[str, Any] | None:
    """The message's outcome: the decisive reply, or ``{"action": "quarantine", "reason": ...}``
    for a message let through with a quarantine request (Postfix holds it)."""
    quarantine = _quarantine(result)
    if quarantine is not None:
        return {"action": "quarantine", "reason": _text(quarantine.reason)}
    return reply_json(result.final)


def outcome(result: TransactionResult) -> str:
    """The action of :func:`decision_json` ("continue", "reject", "quarantine", ...), "none" without one."""
    decision = decision_json(result)
    return decision["action"] if decision else "none"


def modification_json(mod: m.Modification) -> dict[str, Any]:
    """One modification as the wire carried it."""
    match mod:
        case m.AddHeader(name=name, value=value):
            return {"op": "add_header", "name": _text(name), "value": _text(value)}
        case m.InsertHeader(index=index, name=name, value=value):
            return {"op": "insert_header", "index": index, "name": _text(name), "value": _text(value)}
        case m.ChangeHeader(index=index, name=name, value=value):
            op = "delete_header" if not value else "change_header"
            return {"op": op, "index": index, "name": _text(name), "value": _text(value)}
        case m.AddRecipient(address=address):
            return {"op": "add_rcpt", "address": _text(address)}
        case m.AddRecipientWithArgs(address=address, args=args):
            return {"op": "add_rcpt", "address": _text(address), "args": _text(args or b"")}
        case m.RemoveRecipient(address=address):
            return {"op": "delete_rcpt", "address": _text(address)}
        case m.ChangeSender(address=address, args=args):
            return {"op": "change_from", "address": _text(address), "args": _text(args or b"")}
        case m.ReplaceBody(data=data):
            return {"op": "replace_body_chunk", "bytes": len(data)}
        case m.Quarantine(reason=reason):
            return {"op": "quarantine", "reason": _text(reason)}
    return {"op": type(mod).__name__}


def result_json(result: TransactionResult) -> dict[str, Any]:
    """The whole transaction as a JSON-able dict."""
    mods = list(result.eom.modifications) if result.eom else []
    body = b"".join(x.data for x in mods if isinstance(x, m.ReplaceBody))
    out: dict[str, Any] = {
        "decision": decision_json(result),
        "stopped_at": result.stopped_at or ("eom" if result.eom else None),
        "stages": {
            "connect": reply_json(result.connect),
            "helo": reply_json(result.helo),
            "mail": reply_json(result.mail),
            "rcpt": [reply_json(r) for r in result.rcpt],
            "data": reply_json(result.data),
            "eoh": reply_json(result.eoh),
        },
        "modifications": [modification_json(x) for x in mods if not isinstance(x, m.ReplaceBody)],
        "progress": result.eom.progress if result.eom else 0,
    }
    if any(isinstance(x, m.ReplaceBody) for x in mods):
        out["replaced_body"] = _text(body)
    return out


def result_text(result: TransactionResult, recipients: list[bytes]) -> str:
    """A readable report of the transaction."""
    lines = []

    def stage(name: str, reply: m.Reply | None) -> None:
        if reply is None:
            return
        info = reply_json(reply) or {}
        extra = f"  {' / '.join(info['reply'])}" if "reply" in info else ""
        lines.append(f"{name:<12} {info.get('action')}{extra}")

    stage("connect", result.connect)
    stage("helo", result.helo)
    stage("mail", result.mail)
    for rcpt, reply in zip(recipients, result.rcpt, strict=False):
        stage(f"rcpt {_text(rcpt)}", reply)
    stage("data", result.data)
    stage("eoh", result.eoh)
    if result.eom is not None:
        stage("eom", result.eom.reply)
        for mod in result.eom.modifications:
            info = modification_json(mod)
            op = info.pop("op")
            lines.append(f"  {op}: " + ", ".join(f"{k}={v!r}" for k, v in info.items()))
        if result.eom.progress:
            lines.append(f"  ({result.eom.progress} progress keep-alives)")
    final = decision_json(result) or {"action": "none"}
    where = result.stopped_at or "eom"
    lines.append(f"decision: {final['action']} (at {where})")
    if "reply" in final:
        lines.extend(f"  {line}" for line in final["reply"])
    if "reason" in final:
        lines.append(f"  reason: {final['reason']}")
    return "\n".join(lines)
