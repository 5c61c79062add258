"""The error tree of the milter core.

::

    MilterError                      root of everything raised by milterbridge.milter
    ├── LocalProtocolError           our side misused the protocol (a bug or a bad call)
    ├── RemoteProtocolError          the peer sent something illegal; close that connection
    │   └── FrameTooLargeError       a frame declared a length above the configured limit
    └── NegotiationError             the peer's offer cannot satisfy what we require

A :class:`RemoteProtocolError` is about one connection only: the shell logs its
message and closes that connection, nothing else.
"""

from __future__ import annotations


class MilterError(Exception):
    """Root of all milter core errors."""


class LocalProtocolError(MilterError):
    """Raised when our own code asks for something the protocol forbids.

    Examples: a modification outside end-of-message, a reply when none is due,
    or a reply to an event negotiated as no-reply.
    """


class RemoteProtocolError(MilterError):
    """Raised when the peer sends bytes or commands the protocol forbids."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame header announced a payload above the limit; nothing was allocated."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.limit = limit


class NegotiationError(MilterError):
    """The MTA's option offer lacks something we cannot work without."""
