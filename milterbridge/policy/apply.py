"""Turning the endpoints' modification ops into milter modifications, in the MTA's numbering.

:func:`plan_modifications` takes the ops of every endpoint (in config order)
and the headers exactly as the endpoints received them, and returns the
modifications to send at end-of-message in the fixed order of design.md §3.3:
change_from, delete_rcpt, add_rcpt, header deletes and changes (highest index
first), insert_header, add_header, replace_body. Quarantine and the final reply
are added by the caller.

What the endpoints' ops mean (the "intended result"), and how conflicts go:

* change/delete ``(name, k)`` address the k-th header named ``name``
  (case-insensitive) of the received list. The first op (endpoint listed
  first, then op order) on a header wins; a later delete of an already deleted
  header, or the same change again, is a duplicate and sent once; any other
  later op on that header is a conflict and dropped.
* A delete of a header that does not exist is dropped; a change of one that
  does not exist becomes an add (libmilter's ``smfi_chgheader`` convention,
  and what Postfix does with it), reported in :attr:`ModificationPlan.adjusted`.
* insert ``N`` puts the header right after the N-th received header (whether
  or not that one is deleted), 0 at the very top (above the MTA's own
  Received); inserts at the same place keep their listed order; an index past
  the end means the end of the received headers (before any added header).
* adds (and changes turned into adds) go at the end, in listed order.
* Only one change_from and one replace_body: the first listed wins, others are
  conflicts. Identical delete_rcpt ops are sent once.
* An op whose action the MTA did not grant is dropped (the parser normally
  refuses the whole response first).

MTA numbering (milter-protocol.md §6.1): CHGHEADER counts visible headers of
that name, and a delete shifts later ones of the same name, so deletes and
changes go highest position first with their original index (Postfix and
Sendmail alike). INSHEADER counts the entries the MTA keeps above the message's
headers (:class:`HeaderNumbering`: Postfix its hidden
Received, Sendmail one per ``H`` line of its cf), the message's headers (for
Sendmail deleted ones too) and the headers inserted before it in the same
answer, so each insert's index is the number of entries that will precede it at
the time it is applied.

Values: header values go on the wire LF-folded as the endpoint sent them, with
one space prepended unless they start with a space or a tab (we negotiate
HDR_LEADSPC, so the MTA adds nothing). Replacement bodies get CRLF line ends.
Addresses go in angle brackets; ESMTP args are joined with spaces.
"""

from __future__ import annotations

import bisect
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from milterbridge.milter.constants import Action
from milterbridge.milter.messages import (
    AddHeader,
    AddRecipient,
    AddRecipientWithArgs,
    ChangeHeader,
    ChangeSender,
    InsertHeader,
    Modification,
    RemoveRecipient,
    replace_body,
)

from .model import (
    AddHeaderOp,
    AddRcptOp,
    AnyOp,
    ChangeFromOp,
    ChangeHeaderOp,
    DeleteHeaderOp,
    DeleteRcptOp,
    InsertHeaderOp,
    ReplaceBodyOp,
    required_action,
)


class DropReason(enum.StrEnum):
    """Why a modification op was not sent (a bounded label for logs and metrics)."""

    ENDPOINT_FAILED = "endpoint_failed"  # its endpoint failed later in the message
    MESSAGE_REFUSED = "message_refused"  # the message was rejected or tempfailed
    MESSAGE_DISCARDED = "message_discarded"
    SESSION_REFUSED = "session_refused"  # the SMTP session was refused (connect/helo, or a 421)
    CONFLICT = "conflict"  # an endpoint listed earlier already changed the same thing
    DUPLICATE = "duplicate"  # the same change is already sent
    NO_SUCH_HEADER = "no_such_header"  # delete of a header the message does not have
    NOT_GRANTED = "not_granted"  # the MTA did not grant the action


@dataclass(frozen=True, slots=True, kw_only=True)
class DroppedModification:
    """An op that was not applied, with its endpoint and the reason."""

    endpoint: str
    op: AnyOp
    reason: DropReason


class AdjustReason(enum.StrEnum):
    """Why a modification op was sent other than as asked (a bounded label for logs and metrics)."""

    ADDED_INSTEAD = "added_instead"  # change_header past the last header of its name: sent as an add


@dataclass(frozen=True, slots=True, kw_only=True)
class AdjustedModification:
    """An op that went on the wire other than as asked: its endpoint, the reason, and a note for the log."""

    endpoint: str
    op: AnyOp
    reason: AdjustReason
    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AppliedModification:
    """An op that went on the wire (``converted`` when a change became an add)."""

    endpoint: str
    op: AnyOp
    converted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ModificationPlan:
    """The modifications to send, in order, with what was applied, dropped and adjusted.

    An adjusted op is also in ``applied`` (it went on the wire, in another form).
    """

    messages: tuple[Modification, ...] = ()
    applied: tuple[AppliedModification, ...] = ()
    dropped: tuple[DroppedModification, ...] = ()
    adjusted: tuple[AdjustedModification, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderNumbering:
    """How an MTA numbers header positions in INSHEADER (milter/mta.py tells the MTAs apart).

    ``above``: entries the MTA counts above the message's first header; an insert after the
    message's N-th header is sent as ``above + N`` (plus earlier inserts). ``counts_deleted``:
    whether a header deleted by the same answer still counts.
    """

    above: int
    counts_deleted: bool

    def __post_init__(self) -> None:
        if self.above < 0:
            raise ValueError("above must not be negative")


#: Postfix counts its own Received header, not deleted headers.
POSTFIX_NUMBERING: Final = HeaderNumbering(above=1, counts_deleted=False)


def sendmail_numbering(cf_header_lines: int) -> HeaderNumbering:
    """Sendmail's numbering with a ``.cf`` of ``cf_header_lines`` ``H`` lines (9 in a stock cf).

    Sendmail's header list starts with one entry per ``H`` line; it inserts after the entry at
    the wire index, counting from 0, so the message's N-th header is entry
    ``cf_header_lines - 1 + N``; a deleted header keeps its entry.
    """
    if cf_header_lines < 1:
        raise ValueError("a sendmail.cf has at least one H line (Received)")
    return HeaderNumbering(above=cf_header_lines - 1, counts_deleted=True)


_LONE_LF: Final = re.compile(rb"(?<!\r)\n")


def wire_value(value: str | bytes) -> bytes:
    """A header value as sent with HDR_LEADSPC: one leading space unless it has one.

    Text goes as UTF-8; bytes (from ``value_b64``) go as they are.
    """
    data = value.encode() if isinstance(value, str) else value
    return data if data[:1] in (b" ", b"\t") else b" " + data


def crlf_body(body: bytes) -> bytes:
    """Bare LF to CRLF (Postfix strips one CR before LF; sendmail needs it)."""
    return _LONE_LF.sub(b"\r\n", body)


def _bracket(address: str) -> bytes:
    return b"<" + address.encode() + b">"


def _args(args: tuple[str, ...]) -> bytes:
    return " ".join(args).encode()


@dataclass(slots=True)
class _Builder:
    """Accumulates one plan; the public entry point is :func:`plan_modifications`."""

    headers: Sequence[tuple[bytes, bytes]]
    actions: Action
    numbering: HeaderNumbering
    applied: list[AppliedModification] = field(default_factory=list)
    dropped: list[DroppedModification] = field(default_factory=list)
    adjusted: list[AdjustedModification] = field(default_factory=list)
    sender: list[Modification] = field(default_factory=list)
    removals: list[Modification] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)
    additions: list[Modification] = field(default_factory=list)
    #: header position (0-based in ``headers``) -> (endpoint, op) of the first edit
    edits: dict[int, tuple[str, ChangeHeaderOp | DeleteHeaderOp]] = field(default_factory=dict)
    inserts: list[tuple[int, str, InsertHeaderOp]] = field(default_factory=list)
    appends: list[tuple[str, AddHeaderOp | ChangeHeaderOp]] = field(default_factory=list)
    body: tuple[str, ReplaceBodyOp] | None = None
    #: lower-cased name -> positions of the headers of that name; built on the first edit
    _positions: dict[bytes, list[int]] | None = None

    @property
    def positions(self) -> dict[bytes, list[int]]:
        if self._positions is None:
            self._positions = {}
            for pos, (name, _value) in enumerate(self.headers):
                self._positions.setdefault(name.lower(), []).append(pos)
        return self._positions

    def drop(self, endpoint: str, op: AnyOp, reason: DropReason) -> None:
        self.dropped.append(DroppedModification(endpoint=endpoint, op=op, reason=reason))

    def take(self, endpoint: str, op: AnyOp) -> None:
        if not self.actions.grants(required_action(op)):
            self.drop(endpoint, op, DropReason.NOT_GRANTED)
            return
        match op:
            case ChangeFromOp():
                if self.sender:
                    self.drop(endpoint, op, DropReason.CONFLICT)
                    return
                args = _args(op.args) if op.args else None
                self.sender.append(ChangeSender(address=_bracket(op.address), args=args))
            case DeleteRcptOp():
                if op.address in self.removed:
                    self.drop(endpoint, op, DropReason.DUPLICATE)
                    return
                self.removed.add(op.address)
                self.removals.append(RemoveRecipient(address=_bracket(op.address)))
            case AddRcptOp():
                if op.args:
                    self.additions.append(AddRecipientWithArgs(address=_bracket(op.address), args=_args(op.args)))
                else:
                    self.additions.append(AddRecipient(address=_bracket(op.address)))
            case ChangeHeaderOp() | DeleteHeaderOp():
                self._edit(endpoint, op)
                return  # recorded as applied when the plan is built
            case InsertHeaderOp():
                self.inserts.append((min(op.index, len(self.headers)), endpoint, op))
                return
            case AddHeaderOp():
                self.appends.append((endpoint, op))
                return
            case ReplaceBodyOp():
                if self.body is not None:
                    self.drop(endpoint, op, DropReason.CONFLICT)
                    return
                self.body = (endpoint, op)
                return
        self.applied.append(AppliedModification(endpoint=endpoint, op=op))

    def _edit(self, endpoint: str, op: ChangeHeaderOp | DeleteHeaderOp) -> None:
        same_name = self.positions.get(op.name.encode("ascii").lower(), [])
        if op.index > len(same_name):
            if isinstance(op, DeleteHeaderOp):
                self.drop(endpoint, op, DropReason.NO_SUCH_HEADER)
            elif not self.actions.grants(Action.ADD_HEADERS):
                # Becoming an add needs ADDHDRS too (the session refuses it otherwise).
                self.drop(endpoint, op, DropReason.NOT_GRANTED)
            else:
                self.appends.append((endpoint, op))
            return
        pos = same_name[op.index - 1]
        first = self.edits.get(pos)
        if first is None:
            self.edits[pos] = (endpoint, op)
            return
        earlier = first[1]
        same = (isinstance(op, DeleteHeaderOp) and isinstance(earlier, DeleteHeaderOp)) or (
            isinstance(op, ChangeHeaderOp) and op == earlier
        )
        self.drop(endpoint, op, DropReason.DUPLICATE if same else DropReason.CONFLICT)

    def build(self) -> ModificationPlan:
        header_mods: list[Modification] = []
        deleted: list[int] = []  # 1-based positions of deleted received headers, sorted
        for pos in sorted(self.edits, reverse=True):
            endpoint, op = self.edits[pos]
            # Highest position first: a delete shifts only later headers of the
            # same name, which are already done, so the original index holds.
            if isinstance(op, DeleteHeaderOp):
                header_mods.append(ChangeHeader(index=op.index, name=op.name.encode(), value=b""))
                deleted.append(pos + 1)
            else:
                header_mods.append(ChangeHeader(index=op.index, name=op.name.encode(), value=wire_value(op.value)))
            self.applied.append(AppliedModification(endpoint=endpoint, op=op))
        deleted.sort()
        done_gaps: list[int] = []  # gaps of inserts already planned, sorted
        for gap, endpoint, ins in self.inserts:
            before = bisect.bisect_right(done_gaps, gap)  # inserts at or above this gap
            if gap > 0:
                counted = gap if self.numbering.counts_deleted else gap - bisect.bisect_right(deleted, gap)
                before += self.numbering.above + counted
            header_mods.append(InsertHeader(index=before, name=ins.name.encode(), value=wire_value(ins.value)))
            bisect.insort(done_gaps, gap)
            self.applied.append(AppliedModification(endpoint=endpoint, op=ins))
        for endpoint, add in self.appends:
            header_mods.append(AddHeader(name=add.name.encode(), value=wire_value(add.value)))
            converted = isinstance(add, ChangeHeaderOp)
            self.applied.append(AppliedModification(endpoint=endpoint, op=add, converted=converted))
            if converted:
                note = f"change_header past the last {add.name}: added instead"
                self.adjusted.append(
                    AdjustedModification(endpoint=endpoint, op=add, reason=AdjustReason.ADDED_INSTEAD, note=note)
                )
        body: list[Modification] = []
        if self.body is not None:
            endpoint, replacement = self.body
            body.extend(replace_body(crlf_body(replacement.body)))
            self.applied.append(AppliedModification(endpoint=endpoint, op=replacement))
        messages = (*self.sender, *self.removals, *self.additions, *header_mods, *body)
        return ModificationPlan(
            messages=messages, applied=tuple(self.applied), dropped=tuple(self.dropped), adjusted=tuple(self.adjusted)
        )


def plan_modifications(
    ops: Sequence[tuple[str, Sequence[AnyOp]]],
    headers: Sequence[tuple[bytes, bytes]],
    *,
    actions: Action,
    numbering: HeaderNumbering = POSTFIX_NUMBERING,
) -> ModificationPlan:
    """Plan the end-of-message modifications.

    ``ops`` holds ``(endpoint name, ops)`` in config order; ``headers`` the
    ``(name, value)`` pairs as the endpoints received them; ``actions`` the
    action bits the MTA granted; ``numbering`` how the MTA counts positions for
    INSHEADER (Postfix's by default).
    """
    builder = _Builder(headers=headers, actions=actions, numbering=numbering)
    for endpoint, endpoint_ops in ops:
        for op in endpoint_ops:
            builder.take(endpoint, op)
    return builder.build()
