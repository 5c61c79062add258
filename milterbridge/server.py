"""The milter listener: binds every configured address and owns the connections.

Addresses: ``inet:host:port``, ``inet:port@host``, ``inet:[v6]:port``,
``inet6:[v6]:port`` and ``unix:/path``. A unix socket is created with the
configured mode (0660 by default) under a matching umask, so it is never
briefly wider; a stale socket file (nothing listening) is replaced, a live
one is never stolen.

Admission is decided per accepted socket (:mod:`milterbridge.admission`):
inet peers outside ``allowed_clients`` are closed at once; over
``max_connections`` the connection is still negotiated and its session
tempfailed (``OverflowHandler``) up to ``max_overflow`` more; only past that is
it closed. Unix-socket peers are never filtered by address. ``state``
(:class:`~milterbridge.admission.ServerState`) holds the live connections and
the commands their sessions read (``state.event_counts()``).

Lifecycle (uvicorn's shape): construct, ``start()`` binds, ``shutdown()``
stops accepting, lets busy connections reach a message boundary until the
drain deadline, then aborts what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Mapping, Sequence

from milterbridge.admission import ConnectionObserver, Network, ServerState
from milterbridge.connection import ConnectionSettings, HandlerFactory, MilterConnection
from milterbridge.milter.address import parse_listen_address

log = logging.getLogger("milterbridge.server")

#: listen() backlog: Postfix opens bursts of short connections (one per SMTP session).
BACKLOG = 1024


class MilterServer:
    """Accepts milter connections on several addresses."""

    def __init__(
        self,
        listen: Sequence[str],
        factory: HandlerFactory,
        settings: ConnectionSettings | None = None,
        *,
        max_connections: int = 1000,
        max_overflow: int | None = None,
        allowed_clients: Sequence[Network] = (),
        socket_mode: int = 0o660,
        reuse_port: bool = False,
        observer: ConnectionObserver | None = None,
        prebound: Mapping[str, socket.socket] | None = None,
    ) -> None:
        self.addresses = [parse_listen_address(a) for a in listen]
        self.factory = factory
        self.settings = settings or ConnectionSettings()
        self.max_connections = max_connections
        self.socket_mode = socket_mode
        self.reuse_port = reuse_port
        #: Unix sockets bound by a parent process (workers share them); not unlinked here.
        self.prebound = dict(prebound or {})
        self.state = ServerState(
            observer, max_connections=max_connections, max_overflow=max_overflow, allowed_clients=allowed_clients
        )
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []

    # --------------------------------------------------------------- start

    async def start(self) -> None:
        """Bind every address; raises OSError naming the address on failure."""
        loop = asyncio.get_running_loop()
        try:
            for address in self.addresses:
                if address.path is not None and address.path in self.prebound:
                    sock = self.prebound[address.path]
                    server = await loop.create_unix_server(self._protocol, sock=sock, backlog=BACKLOG)
                elif address.path is not None:
                    sock = bind_unix(address.path, self.socket_mode)
                    self._unix_paths.append(address.path)
                    server = await loop.create_unix_server(self._protocol, sock=sock, backlog=BACKLOG)
                else:
                    server = await loop.create_server(
                        self._protocol,
                        address.host,
                        address.port or 0,
                        backlog=BACKLOG,
                        reuse_address=True,
                        reuse_port=self.reuse_port or None,
                    )
                self._servers.append(server)
                log.info("listening on %s", address)
        except OSError as exc:
            await self._close_servers()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from exc

    def _protocol(self) -> asyncio.Protocol:
        # Admission needs the peer address, so the connection decides in connection_made.
        return MilterConnection(self.state, self.factory, self.settings)

    @property
    def refused_connections(self) -> int:
        """Connections closed at accept (address not allowed, or over both connection caps)."""
        return self.state.refused

    @property
    def bound(self) -> list[str]:
        """The bound addresses as milter address strings (with real ports for port 0)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if sock.family == socket.AF_UNIX:
                    out.append(f"unix:{name}")
                elif sock.family == socket.AF_INET6:
                    out.append(f"inet6:[{name[0]}]:{name[1]}")
                else:
                    out.append(f"inet:{name[0]}:{name[1]}")
        return out

    @property
    def is_serving(self) -> bool:
        return bool(self._servers) and all(s.is_serving() for s in self._servers)

    # ------------------------------------------------------------ shutdown

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; finish in-flight messages up to ``timeout``; then close the rest."""
        self.state.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.state.connections):
            conn.shutdown()
        if self.state.connections:
            try:
                async with asyncio.timeout(timeout):
                    await self.state.idle.wait()
            except TimeoutError:
                left = len(self.state.connections)
                log.warning("drain deadline of %.1f s passed; closing %d connections", timeout, left)
                for conn in list(self.state.connections):
                    conn.abort()
                await asyncio.sleep(0)
        await self._close_servers()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()


def bind_unix(path: str, mode: int) -> socket.socket:
    """A bound unix socket at ``path`` with ``mode``; replaces only a stale socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(17, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody is listening
        else:
            raise OSError(98, f"another process is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.setblocking(False)
    return sock
