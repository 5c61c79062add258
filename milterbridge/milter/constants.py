"""Milter wire constants, each with its libmilter name beside it.

Values come from sendmail's ``mfdef.h``/``mfapi.h`` and were checked against
Postfix's ``milter8.c`` (see ``milter-protocol.md`` §2-§4 in the project docs).
"""

from __future__ import annotations

import enum
from typing import Final

#: Highest protocol version we speak; we answer ``min(MILTER_VERSION, offered)``.
MILTER_VERSION: Final = 6
#: Oldest protocol version we accept from an MTA (libmilter refuses < 2 too).
MIN_MILTER_VERSION: Final = 2

#: Size of the length prefix of every frame (``MILTER_LEN_BYTES``).
LEN_BYTES: Final = 4
#: Fixed part of an OPTNEG payload: version, actions, protocol (``MILTER_OPTLEN``).
OPTNEG_FIXED_BYTES: Final = 12
#: Largest body piece per ``'B'``/``'b'`` packet (``MILTER_CHUNK_SIZE``).
#: Postfix sends body chunks of exactly this size except the last one.
CHUNK_SIZE: Final = 65535
#: Default inbound frame limit. Postfix sends headers up to
#: ``header_size_limit`` (102400) and macro packets without any cap, so we
#: accept far more than libmilter's 64 KiB (milter-protocol.md §1.4).
DEFAULT_MAX_FRAME_BYTES: Final = 1024 * 1024
#: Postfix refuses frames longer than this (``XXX_MAX_DATA`` = INT_MAX/2).
POSTFIX_MAX_FRAME_BYTES: Final = 1073741823


class Action(enum.IntFlag):
    """Actions a milter may take (``SMFIF_*``), offered by the MTA in OPTNEG."""

    NONE = 0
    ADD_HEADERS = 0x001  # SMFIF_ADDHDRS: 'h' and 'i'
    CHANGE_BODY = 0x002  # SMFIF_CHGBODY: 'b'
    ADD_RCPT = 0x004  # SMFIF_ADDRCPT: '+'
    DELETE_RCPT = 0x008  # SMFIF_DELRCPT: '-'
    CHANGE_HEADERS = 0x010  # SMFIF_CHGHDRS: 'm'
    QUARANTINE = 0x020  # SMFIF_QUARANTINE: 'q'
    CHANGE_FROM = 0x040  # SMFIF_CHGFROM: 'e' (v6)
    ADD_RCPT_PAR = 0x080  # SMFIF_ADDRCPT_PAR: '2' (v6)
    SETSYMLIST = 0x100  # SMFIF_SETSYMLIST: macro lists in the 'O' reply (v6)

    def grants(self, needed: Action) -> bool:
        """Whether every bit of ``needed`` is among these actions.

        Computed on the plain ints: enum's ``&`` builds a new flag value in Python (thousands
        of instructions), and the message path asks this several times per message.
        """
        return int(needed) & ~int(self) == 0


#: ``SMFI_V1_ACTS``: what an MTA that offers 0 actions is taken to allow.
V1_ACTIONS: Final = Action(0x0F)
#: ``SMFI_CURR_ACTS``: every defined action.
ALL_ACTIONS: Final = Action(0x1FF)


class Protocol(enum.IntFlag):
    """Protocol feature bits (``SMFIP_*``) exchanged in OPTNEG."""

    NONE = 0
    NO_CONNECT = 0x00000001  # SMFIP_NOCONNECT
    NO_HELO = 0x00000002  # SMFIP_NOHELO
    NO_MAIL = 0x00000004  # SMFIP_NOMAIL
    NO_RCPT = 0x00000008  # SMFIP_NORCPT
    NO_BODY = 0x00000010  # SMFIP_NOBODY
    NO_HEADERS = 0x00000020  # SMFIP_NOHDRS
    NO_EOH = 0x00000040  # SMFIP_NOEOH
    NR_HEADER = 0x00000080  # SMFIP_NR_HDR (alias SMFIP_NOHREPL)
    NO_UNKNOWN = 0x00000100  # SMFIP_NOUNKNOWN
    NO_DATA = 0x00000200  # SMFIP_NODATA
    SKIP = 0x00000400  # SMFIP_SKIP: the MTA understands 's'
    RCPT_REJ = 0x00000800  # SMFIP_RCPT_REJ: also send rejected recipients
    NR_CONNECT = 0x00001000  # SMFIP_NR_CONN
    NR_HELO = 0x00002000  # SMFIP_NR_HELO
    NR_MAIL = 0x00004000  # SMFIP_NR_MAIL
    NR_RCPT = 0x00008000  # SMFIP_NR_RCPT
    NR_DATA = 0x00010000  # SMFIP_NR_DATA
    NR_UNKNOWN = 0x00020000  # SMFIP_NR_UNKN
    NR_EOH = 0x00040000  # SMFIP_NR_EOH
    NR_BODY = 0x00080000  # SMFIP_NR_BODY
    HDR_LEADSPC = 0x00100000  # SMFIP_HDR_LEADSPC: header values keep leading space
    MDS_256K = 0x10000000  # SMFIP_MDS_256K (sendmail build option only)
    MDS_1M = 0x20000000  # SMFIP_MDS_1M (sendmail build option only)


#: ``SMFI_V1_PROT``: what an MTA that offers 0 protocol bits is taken to allow.
V1_PROTOCOL: Final = Protocol(0x3F)
#: ``SMFI_CURR_PROT``: every defined bit, what Postfix offers at version 6.
ALL_PROTOCOL: Final = Protocol(0x001FFFFF)
#: ``SMFI_INTERNAL`` bits, never echoed back to the MTA.
INTERNAL_PROTOCOL: Final = Protocol(0x70000000)


class MacroStage(enum.IntEnum):
    """Stage ids of macro lists in the OPTNEG reply (``SMFIM_*``).

    The numbers are fixed for compatibility and are not in protocol order.
    """

    CONNECT = 0  # SMFIM_CONNECT, applies to 'C'
    HELO = 1  # SMFIM_HELO, 'H'
    ENVFROM = 2  # SMFIM_ENVFROM, 'M'
    ENVRCPT = 3  # SMFIM_ENVRCPT, 'R'
    DATA = 4  # SMFIM_DATA, 'T'
    EOM = 5  # SMFIM_EOM, 'E' (Postfix also 'B')
    EOH = 6  # SMFIM_EOH, 'N' (Postfix also 'L')


class Family(enum.Enum):
    """Address family byte of the CONNECT command."""

    UNKNOWN = b"U"  # SMFIA_UNKNOWN: no port or address follows
    UNIX = b"L"  # SMFIA_UNIX
    INET = b"4"  # SMFIA_INET
    INET6 = b"6"  # SMFIA_INET6


class Event(enum.StrEnum):
    """Public event names (fixed by the webhook contract, design.md §3.1)."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOM = "eom"
    UNKNOWN = "unknown"
    ABORT = "abort"
    CLOSE = "close"

    # Hash like the plain string (consistent with str equality) in C, instead of
    # Enum's Python-level __hash__: events key several hot dictionaries.
    __hash__ = str.__hash__


#: Events a milter can switch off (skip flag) or negotiate as no-reply (no-reply flag),
#: with the oldest protocol version that sends them. ``eom`` has neither flag.
EVENT_FLAGS: Final[dict[Event, tuple[Protocol, Protocol, int]]] = {
    Event.CONNECT: (Protocol.NO_CONNECT, Protocol.NR_CONNECT, 2),
    Event.HELO: (Protocol.NO_HELO, Protocol.NR_HELO, 2),
    Event.MAIL: (Protocol.NO_MAIL, Protocol.NR_MAIL, 2),
    Event.RCPT: (Protocol.NO_RCPT, Protocol.NR_RCPT, 2),
    Event.DATA: (Protocol.NO_DATA, Protocol.NR_DATA, 4),
    Event.HEADER: (Protocol.NO_HEADERS, Protocol.NR_HEADER, 2),
    Event.EOH: (Protocol.NO_EOH, Protocol.NR_EOH, 2),
    Event.BODY: (Protocol.NO_BODY, Protocol.NR_BODY, 2),
    Event.UNKNOWN: (Protocol.NO_UNKNOWN, Protocol.NR_UNKNOWN, 3),
}
