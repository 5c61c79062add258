"""The socket option a milter connection sets itself: TCP_QUICKACK on an accepted inet socket.

Kept apart from ``connection.py``, which is compiled with mypyc: a compiled module cannot
define a subclass of ``socket.socket`` (a class with ``__slots__``).
"""

from __future__ import annotations

import socket

#: Linux's TCP_QUICKACK; None elsewhere (the connection then sets nothing).
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class BorrowedSocket(socket.socket):
    """A socket object on a descriptor someone else owns: it never closes it, not even when
    collected (a plain socket object would close the descriptor, by then maybe reused)."""

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


def quickack_socket(sock: socket.socket | None) -> socket.socket | None:
    """A borrowed socket object on an accepted inet socket, for TCP_QUICKACK (None where Linux's option is missing).

    Our back-to-back packets must not wait for an ACK: the event loop (asyncio and uvloop alike)
    sets TCP_NODELAY on every TCP socket it accepts. Postfix's packets must not wait for our
    delayed ACK (postfix-e2e.md pitfall 7). Linux delays ACKs ("pingpong" mode) only after we
    have sent data; TCP_QUICKACK leaves that mode, and until our next write every read of a
    small pushed segment ACKs it at once. So the connection sets it on the first read after
    each of its writes, not on every read.

    uvloop's socket stand-in builds a socket object (and calls getsockname) for each
    setsockopt, so the connection keeps one socket object on the descriptor, borrowed: the
    transport closes the descriptor.
    """
    if TCP_QUICKACK is None or sock is None:
        return None
    return BorrowedSocket(sock.family, socket.SOCK_STREAM, 0, fileno=sock.fileno())
