"""Hook requests of MTA Hooks -01, built from the bridge's own request document.

The bridge builds one request document per event (``payload.PayloadBuilder.request``, the
contract of openapi/milterbridge.yaml). For an MTA Hooks endpoint ``hook_request`` reshapes it:

- ``stage``: ``STAGES`` of the event; ``action``: ``accept`` (what happens if nobody objects);
  ``timestamp``: the request's; ``protocol``: ``{"version": "1.0"}``.
- ``envelope``: ``from`` (``address`` null for the null reverse-path) and ``to``, each with
  its ESMTP ``parameters`` as a map (a keyword without a value maps to ``""``).
- ``client``: ``ip``, ``port``, ``ehlo``, ``ptr`` (the ``{client_ptr}`` macro, else the
  client name the MTA resolved, null when it did not).
- ``queue``: ``{"id": ...}`` once the MTA named the queue file, else null.
- ``tls``, ``auth`` and ``server``: from the macros the MTA sends (``{tls_version}``,
  ``{cipher}``, ``{cipher_bits}``, ``{cert_issuer}``, ``{cert_subject}``; ``{auth_authen}``,
  ``{auth_type}``; ``j``, ``{daemon_addr}``, ``{daemon_port}``), null without them.
- ``message`` (at ``data``): a JMAP Email with ``headers`` (``{name, value}`` in message order,
  each value in RFC 8621's raw form: what follows the colon) and ``size`` (the whole message's
  octets); null before.
- ``rawMessage`` (at ``data``, when the body was sent): the message as base64.

Only the ``properties`` negotiated for the endpoint are kept.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Mapping
from typing import Any, Final

from milterbridge.milter.constants import Event

__all__ = ["PROPERTIES", "STAGES", "hook_request", "parameters"]

JSON = dict[str, Any]

#: The bridge's events an MTA Hooks endpoint can be called at, and the draft's stage for each.
STAGES: Final[Mapping[Event, str]] = {
    Event.CONNECT: "connect",
    Event.HELO: "ehlo",
    Event.MAIL: "mail",
    Event.RCPT: "rcpt",
    Event.EOM: "data",
}
#: The request properties the bridge can send (the draft's JSON Pointers).
PROPERTIES: Final = (
    "/stage",
    "/action",
    "/timestamp",
    "/protocol",
    "/envelope",
    "/client",
    "/queue",
    "/tls",
    "/auth",
    "/server",
    "/message",
    "/rawMessage",
)
_PROTOCOL: Final = {"version": "1.0"}


def parameters(args: Collection[str]) -> dict[str, str]:
    """ESMTP parameters (``SIZE=1834``, ``SMTPUTF8``) as the draft's map (keyword without a value: ``""``)."""
    result: dict[str, str] = {}
    for arg in args:
        keyword, _, value = arg.partition("=")
        result[keyword] = value
    return result


def _address(obj: Mapping[str, Any]) -> JSON:
    address = obj.get("address") or None
    return {"address": address, "parameters": parameters(obj.get("args") or ())}


def _integer(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _client(session: Mapping[str, Any], macros: Mapping[str, str]) -> JSON:
    client = session.get("client") or {}
    name = client.get("name")
    ptr = macros.get("{client_ptr}") or (name if name and name != "unknown" else None)
    return {"ip": client.get("address"), "port": client.get("port"), "ehlo": session.get("helo"), "ptr": ptr}


def _tls(macros: Mapping[str, str]) -> JSON | None:
    version = macros.get("{tls_version}")
    if version is None:
        return None
    return {
        "version": version,
        "cipher": macros.get("{cipher}"),
        "cipherBits": _integer(macros.get("{cipher_bits}")),
        "certIssuer": macros.get("{cert_issuer}"),
        "certSubject": macros.get("{cert_subject}"),
    }


def _auth(macros: Mapping[str, str]) -> JSON | None:
    login = macros.get("{auth_authen}")
    return None if login is None else {"login": login, "method": macros.get("{auth_type}")}


def _server(macros: Mapping[str, str]) -> JSON | None:
    name, ip, port = macros.get("j"), macros.get("{daemon_addr}"), _integer(macros.get("{daemon_port}"))
    if name is None and ip is None and port is None:
        return None
    return {"name": name, "ip": ip, "port": port}


def _head(message: Mapping[str, Any]) -> bytes:
    """The header block as the message carries it, CRLF line ends, with the empty line after it."""
    lines = (
        header["name"].encode() + b":" + _value_bytes(header).replace(b"\n", b"\r\n") + b"\r\n"
        for header in message.get("headers") or ()
    )
    return b"".join(lines) + b"\r\n"


def _raw_message(message: Mapping[str, Any]) -> str | None:
    body = (message.get("body") or {}).get("base64")
    if body is None:
        return None
    return base64.b64encode(_head(message) + base64.b64decode(body)).decode("ascii")


def _size(message: Mapping[str, Any]) -> int | None:
    """RFC 8621's size: the octets of the whole message, headers included."""
    body_size = (message.get("body") or {}).get("size")
    return None if body_size is None else len(_head(message)) + int(body_size)


def _value_bytes(header: Mapping[str, Any]) -> bytes:
    exact = header.get("value_b64")
    return base64.b64decode(exact) if exact is not None else str(header["value"]).encode()


def hook_request(ours: Mapping[str, Any], event: Event, properties: Collection[str] | None = None) -> JSON:
    """The MTA Hooks request for ``event`` from the bridge's request document ``ours``.

    ``properties``: the negotiated ones (JSON Pointers such as ``/envelope``); None for all.
    Raises KeyError for an event that has no stage (``STAGES``).
    """
    stage = STAGES[event]
    session: Mapping[str, Any] = ours.get("session") or {}
    message: Mapping[str, Any] = ours.get("message") or {}
    macros: dict[str, str] = {**(session.get("macros") or {}), **(message.get("macros") or {})}
    envelope = None
    if message.get("mail_from") is not None:
        envelope = {
            "from": _address(message["mail_from"]),
            "to": [_address(rcpt) for rcpt in message.get("rcpt_to") or ()],
        }
    at_data = stage == "data"
    full: JSON = {
        "stage": stage,
        "action": "accept",
        "timestamp": ours.get("timestamp"),
        "protocol": dict(_PROTOCOL),
        "envelope": envelope,
        "client": _client(session, macros),
        "queue": {"id": message["queue_id"]} if message.get("queue_id") else None,
        "tls": _tls(macros),
        "auth": _auth(macros),
        "server": _server(macros),
        "message": (
            {
                "headers": [{"name": h["name"], "value": h["value"]} for h in message.get("headers") or ()],
                "size": _size(message),
            }
            if at_data
            else None
        ),
        "rawMessage": _raw_message(message) if at_data else None,
    }
    if properties is None:
        return full
    wanted = {pointer.removeprefix("/").split("/", 1)[0] for pointer in properties}
    return {key: value for key, value in full.items() if key in wanted}
