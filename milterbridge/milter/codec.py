"""Frame codec: a bounded, linear-time decoder and the frame encoder.

A frame is ``uint32 length`` (code byte plus payload), one code byte, then the
payload (milter-protocol.md §1.2). :class:`FrameDecoder` keeps one
``bytearray`` and a read offset, so buffering stays linear however the stream
is cut; a frame header that announces more than ``max_frame_bytes`` is refused
before any payload is buffered for it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any, Final, Generic, TypeVar

from .constants import DEFAULT_MAX_FRAME_BYTES, LEN_BYTES
from .errors import FrameTooLargeError, RemoteProtocolError
from .messages import COMMANDS, RESPONSES, Command, Message, Modification, Reply

_U32 = struct.Struct(">I")
_HEADER_BYTES = LEN_BYTES + 1
_unpack_u32 = _U32.unpack_from
#: Compact the buffer once this many consumed bytes sit in front of it.
_COMPACT_AFTER = 64 * 1024
#: The code :meth:`FrameDecoder.next_raw` returns while no whole frame is buffered (codes are bytes).
NO_FRAME: Final = -1

M = TypeVar("M", bound=Message)


_INT_KEYED: dict[int, dict[int, type[Any]]] = {}


def _int_keyed(table: Mapping[bytes, type[M]]) -> dict[int, type[M]]:
    """The table keyed by the code's int value, built once per table (one per connection otherwise)."""
    cached = _INT_KEYED.get(id(table))
    if cached is None or len(cached) != len(table):
        cached = _INT_KEYED[id(table)] = {code[0]: cls for code, cls in table.items()}
    return cached


class FrameDecoder(Generic[M]):
    """Turns a byte stream into typed messages of one direction.

    ``feed`` bytes in, then call ``next_message`` until it returns ``None``
    (more data needed); or ``next_raw`` and, for the frames wanted as messages,
    ``decode``. Malformed input raises :class:`RemoteProtocolError`
    (or its subclass :class:`FrameTooLargeError`); after that the stream is
    unusable and the connection should be closed.
    """

    __slots__ = ("_buf", "_pos", "_table", "max_frame_bytes")

    def __init__(self, table: Mapping[bytes, type[M]], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self._table = _int_keyed(table)
        self._buf: bytes | bytearray = b""
        self._pos = 0
        #: Largest accepted payload, code byte not counted.
        self.max_frame_bytes = max_frame_bytes

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for EOF)."""
        return len(self._buf) == self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; refuses an oversized frame header at once."""
        buf = self._buf
        if self._pos == len(buf):
            # Nothing pending (the common case: whole frames per read): keep the
            # chunk as is, so payloads are sliced from it with a single copy.
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        else:
            if type(buf) is bytes:
                buf = self._buf = bytearray(buf[self._pos :])
                self._pos = 0
            buf += data
        # _check_header, inlined for the common case (once per read).
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= LEN_BYTES:
            (length,) = _unpack_u32(buf, pos)
            if length < 1 or length - 1 > self.max_frame_bytes:
                self._check_header()  # raises with the precise reason

    def _check_header(self) -> int:
        """Validate the length of the frame at the read offset; -1 if incomplete."""
        pos = self._pos
        if len(self._buf) - pos < LEN_BYTES:
            return -1
        (length,) = _U32.unpack_from(self._buf, pos)
        if length < 1:
            raise RemoteProtocolError("frame length 0 (a frame needs at least its code byte)")
        if length - 1 > self.max_frame_bytes:
            raise FrameTooLargeError(length - 1, self.max_frame_bytes)
        return int(length)

    def next_message(self) -> M | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        code, payload = self.next_raw()
        if code == NO_FRAME:
            return None
        return self.decode(code, payload)

    def decode(self, code: int, payload: bytes) -> M:
        """The typed message of one frame; raises RemoteProtocolError."""
        cls = self._table.get(code)
        if cls is None:
            raise RemoteProtocolError(f"unknown message code {bytes([code])!r}")
        return cls.decode_payload(payload)

    def next_raw(self) -> tuple[int, bytes]:
        """The next complete frame as (code byte, payload); ``(NO_FRAME, b"")`` until one is buffered.

        The frame is taken off the buffer but not decoded (see :meth:`decode`): the
        session reads macro packets and the commands it folds in from the payload itself.
        Raises RemoteProtocolError (or FrameTooLargeError) for a bad length. A pair rather
        than ``None`` for "no frame": compiled, it is returned by value, so reading a frame
        allocates nothing but its payload.
        """
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if size - pos < LEN_BYTES:
            if pos == size:  # _compact's common case: every read so far was whole frames
                if pos:
                    self._buf = b""
                    self._pos = 0
            else:
                self._compact()
            return NO_FRAME, b""
        (length,) = _unpack_u32(buf, pos)  # inlined _check_header: this runs per frame
        if length < 1 or length - 1 > self.max_frame_bytes:
            self._check_header()  # raises with the precise reason
        end = pos + LEN_BYTES + length
        if end > size:
            self._compact()
            return NO_FRAME, b""
        code = buf[pos + LEN_BYTES]
        payload = buf[pos + _HEADER_BYTES : end]
        if type(payload) is not bytes:
            payload = bytes(payload)
        self._pos = end
        return code, payload

    def clear(self) -> None:
        """Drop everything buffered (the stream ended; nothing left in it will be read)."""
        self._buf = b""
        self._pos = 0

    def _compact(self) -> None:
        """Drop consumed bytes once enough of them sit in front of the buffer."""
        pos = self._pos
        buf = self._buf
        if pos == len(buf):
            if pos:
                self._buf = b""
                self._pos = 0
        elif pos > _COMPACT_AFTER:
            self._buf = bytearray(buf[pos:])
            self._pos = 0

    def messages(self) -> list[M]:
        """Every complete message currently buffered."""
        out: list[M] = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out


def command_decoder(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameDecoder[Command]:
    """A decoder for the milter side: reads MTA commands."""
    return FrameDecoder(COMMANDS, max_frame_bytes)


def response_decoder(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameDecoder[Reply | Modification]:
    """A decoder for the MTA side: reads milter replies and modifications."""
    return FrameDecoder(RESPONSES, max_frame_bytes)


def encode(messages: Iterable[Message]) -> bytes:
    """Frames for several messages, joined for a single write."""
    return b"".join(m.to_frame() for m in messages)
