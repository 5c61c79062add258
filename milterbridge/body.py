"""Message body storage with bounded memory.

Bodies are kept only when some endpoint wants them (``include_body``): in
memory up to ``body_memory_bytes``, then in an anonymous temporary file. Past
``max_message_bytes`` nothing more is stored and the message is flagged
oversize; what happens then is ``server.on_oversize``.

The spool files are visible in metrics: a buffer tells its :class:`SpoolObserver` what it
writes to disk and, when it is discarded, what it gave back.

A spool file that cannot be written (ENOSPC, a read-only ``/tmp``) or read back is the
bridge's fault, never the endpoint's: ``append`` records it in :attr:`BodyBuffer.failed` and
keeps nothing more, and ``chunks`` raises :class:`SpoolError`; either way the dispatcher
tempfails the message (design.md §3.7).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Protocol

from milterbridge.milter.context import MemoryBudget


class SpoolError(OSError):
    """The spooled body could not be read back whole (the bridge's fault, not the endpoint's)."""


class SpoolObserver(Protocol):
    """Where spool use is counted (milterbridge.metrics.Metrics satisfies it)."""

    def spooled(self, nbytes: int, *, new_file: bool = True) -> None:
        """``nbytes`` were written to a spool file; ``new_file`` for the first write of a file."""

    def unspooled(self, nbytes: int) -> None:
        """A spool file holding ``nbytes`` was removed."""


class BodyBuffer:
    """The body of one message, spooled to disk beyond a threshold."""

    def __init__(
        self,
        memory_bytes: int,
        max_bytes: int,
        *,
        keep: bool,
        budget: MemoryBudget | None = None,
        observer: SpoolObserver | None = None,
    ) -> None:
        self.memory_bytes = memory_bytes
        #: Shared with every connection of the process: memory bytes are taken from it, and a
        #: piece that does not fit goes to the spool file instead.
        self.budget = budget
        self.max_bytes = max_bytes
        self.keep = keep
        #: Bytes seen (stored or not).
        self.size = 0
        self.oversize = False
        #: Why the body could not be kept (a spool write failed), or None.
        self.failed: str | None = None
        self.observer = observer
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        #: Bytes written to the spool file (reported to the observer as given back on discard).
        self._spooled_bytes = 0

    @property
    def spooled(self) -> bool:
        """True once the body went to a temporary file."""
        return self._file is not None

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            self.oversize = True
            self.discard()
            return
        if not self.keep:
            return
        if (
            self._file is None
            and len(self._memory) + len(data) <= self.memory_bytes
            and (self.budget is None or self.budget.take(len(data)))
        ):
            self._memory += data
            return
        new_file = self._file is None
        written = len(data) + (len(self._memory) if new_file else 0)  # a new file gets the memory bytes too
        try:
            if new_file:
                # Unbuffered, so that a full disk shows here and not at a later flush or close.
                self._file = tempfile.TemporaryFile(prefix="milterbridge-body-", buffering=0)  # noqa: SIM115 - owned by this object
                self._write_all(self._memory)
                self._free_memory()
            self._write_all(data)
        except OSError as exc:
            self.failed = f"cannot spool the message body: {exc.strerror or exc}"
            self.discard()
            return
        self._spooled_bytes += written
        if self.observer is not None:
            self.observer.spooled(written, new_file=new_file)

    def _write_all(self, data: bytes | bytearray) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written or 0 :]

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the start of the body; raises SpoolError when the spool fails."""
        if self._file is None:
            return bytes(self._memory[:limit])
        return b"".join(self.chunks(limit))

    def chunks(self, limit: int, size: int = 3 * 16384) -> Iterator[bytes]:
        """The first ``limit`` bytes in pieces of ``size`` (a multiple of 3 keeps base64 joinable).

        Reads are positional (``pread``), so several readers may interleave, in the event
        loop and in a worker thread alike.
        """
        offset = 0
        end = min(limit, self.size)
        while offset < end:
            n = min(size, end - offset)
            try:
                if self._file is None:
                    piece = bytes(self._memory[offset : offset + n])
                else:
                    piece = os.pread(self._file.fileno(), n, offset)
            except (OSError, ValueError) as exc:  # ValueError: the file was closed meanwhile
                raise SpoolError(f"cannot read the spooled message body: {exc}") from None
            if not piece:
                # The request declared ``end`` bytes: a short stream would leave the endpoint
                # waiting for the rest until the call's timeout.
                raise SpoolError(f"the message body ended after {offset} of {end} bytes")
            offset += len(piece)
            yield piece

    def _free_memory(self) -> None:
        if self.budget is not None:
            self.budget.give(len(self._memory))
        self._memory = bytearray()

    def discard(self) -> None:
        """Free the memory and the temporary file (never raises: it runs on every end path)."""
        self.keep = False
        self._free_memory()
        spool, self._file = self._file, None
        if spool is not None:
            with contextlib.suppress(OSError):
                spool.close()
        if self._spooled_bytes:
            if self.observer is not None:
                self.observer.unspooled(self._spooled_bytes)
            self._spooled_bytes = 0


class MessageBody:
    """The body of a connection's current message: a new :class:`BodyBuffer` per message,
    freed (memory, budget and spool file) as soon as the message ends.

    ``new_buffer`` makes the buffer of a new message (the connection's limits, budget and
    spool observer bound in).
    """

    __slots__ = ("buffer", "new_buffer")

    def __init__(self, new_buffer: Callable[[], BodyBuffer]) -> None:
        self.new_buffer = new_buffer
        #: The current message's buffer; None between messages.
        self.buffer: BodyBuffer | None = None

    def start(self) -> BodyBuffer:
        """A new message: drop what is left of the last one."""
        self.drop()
        self.buffer = self.new_buffer()
        return self.buffer

    def append(self, data: bytes) -> None:
        """Count (and when kept, store) a piece of the current message's body."""
        buffer = self.buffer if self.buffer is not None else self.start()
        buffer.append(data)

    def drop(self) -> None:
        """The message ended: free its body (never raises)."""
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            buffer.discard()
