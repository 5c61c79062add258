"""Write milterbridge filters in Python: typed requests, valid decisions, verified calls.

A filter is an HTTP service the bridge POSTs each event to (``openapi/milterbridge.yaml``).
This package covers the filter's side of that contract:

* :mod:`.requests`: :func:`parse_request` turns a request body into a typed, frozen
  :class:`Request` per event (``EomRequest``, ``RcptRequest``, ...);
* :mod:`.decisions`: builders (:func:`reject`, :func:`add_header`, ...) that check their
  arguments with the bridge's own parser, so they only produce answers the bridge accepts;
* :mod:`.verify`: :class:`Verifier`, Standard Webhooks signatures with key rotation, a
  timestamp tolerance and replay refusal;
* :mod:`.app`: :class:`Filter` (``handle(body, headers) -> (status, body)`` for any server)
  and :func:`make_app` (an aiohttp application).

A whole filter::

    from aiohttp import web
    from milterbridge import sdk

    def check(request: sdk.Request) -> sdk.Decision:
        if isinstance(request, sdk.EomRequest) and request.message.header("X-Spam-Flag"):
            return sdk.reject(550, "5.7.1", "Looks like spam", reason="X-Spam-Flag set")
        return sdk.continue_()

    web.run_app(sdk.make_app(check, secrets=["whsec_..."]), port=8080)
"""

from __future__ import annotations

from .app import DEFAULT_MAX_REQUEST_BYTES, Filter, Handler, make_app
from .decisions import (
    MAX_MODIFICATIONS,
    Decision,
    Modification,
    Reply,
    accept,
    add_header,
    add_rcpt,
    change_from,
    change_header,
    continue_,
    delete_header,
    delete_rcpt,
    discard,
    insert_header,
    quarantine,
    reject,
    replace_body,
    skip,
    tempfail,
)
from .requests import (
    REQUEST_TYPES,
    AbortRequest,
    Address,
    Body,
    BodyChunk,
    BodyRequest,
    Client,
    CloseRequest,
    ConnectRequest,
    DataRequest,
    EmptyData,
    EohRequest,
    EomRequest,
    Header,
    HeaderRequest,
    HeloData,
    HeloRequest,
    MailRequest,
    Message,
    RcptRequest,
    Request,
    RequestError,
    Session,
    UnknownData,
    UnknownRequest,
    parse_request,
)
from .verify import DEFAULT_MAX_IDS, DEFAULT_TOLERANCE, SignatureError, Verifier

__all__ = [
    "DEFAULT_MAX_IDS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_TOLERANCE",
    "MAX_MODIFICATIONS",
    "REQUEST_TYPES",
    "AbortRequest",
    "Address",
    "Body",
    "BodyChunk",
    "BodyRequest",
    "Client",
    "CloseRequest",
    "ConnectRequest",
    "DataRequest",
    "Decision",
    "EmptyData",
    "EohRequest",
    "EomRequest",
    "Filter",
    "Handler",
    "Header",
    "HeaderRequest",
    "HeloData",
    "HeloRequest",
    "MailRequest",
    "Message",
    "Modification",
    "RcptRequest",
    "Reply",
    "Request",
    "RequestError",
    "Session",
    "SignatureError",
    "UnknownData",
    "UnknownRequest",
    "Verifier",
    "accept",
    "add_header",
    "add_rcpt",
    "change_from",
    "change_header",
    "continue_",
    "delete_header",
    "delete_rcpt",
    "discard",
    "insert_header",
    "make_app",
    "parse_request",
    "quarantine",
    "reject",
    "replace_body",
    "skip",
    "tempfail",
]
