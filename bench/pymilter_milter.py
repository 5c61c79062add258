"""The accept-all reference milter on libmilter, through pymilter (install: bench/install-pymilter).

It does what ``bench.reference_milter`` does (ask for the given events,
continue at each, add the bench header and accept at end-of-message) with
Sendmail's C library and pymilter's thread-per-connection model, the usual
way to write a milter in Python.

TCP_NODELAY: libmilter writes a modification and the final reply as separate
small packets, so with Nagle on, the second waits for the MTA's delayed ACK
(about 40 ms per message on Linux). libmilter never sets the option, so we
set it on its listening socket, which accepted sockets inherit on Linux; this
gives the reference its best showing rather than a handicap.

    python -m bench.pymilter_milter --port 9902 --events eom
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Sequence

from bench.profiles import ALL_EVENTS, BENCH_HEADER_NAME, BENCH_HEADER_VALUE

# pymilter's callback method name for each of our event names.
_CALLBACKS = {
    "connect": "connect",
    "helo": "hello",
    "mail": "envfrom",
    "rcpt": "envrcpt",
    "data": "data",
    "header": "header",
    "eoh": "eoh",
    "body": "body",
}


def make_milter_class(events: Sequence[str]) -> type:
    """A Milter.Base subclass that implements (and so negotiates) exactly ``events``.

    pymilter marks every callback of Milter.Base ``@nocallback``; a subclass
    that defines one gets that event from the MTA, with a reply.
    """
    import Milter

    def proceed(self: object, *args: object) -> int:
        return int(Milter.CONTINUE)

    def eom(self: Milter.Base) -> int:
        self.addheader(BENCH_HEADER_NAME, BENCH_HEADER_VALUE)
        return int(Milter.ACCEPT)

    namespace: dict[str, Callable[..., int]] = {"eom": eom}
    for event in events:
        if event in _CALLBACKS:
            namespace[_CALLBACKS[event]] = proceed
    return type("BenchPyMilter", (Milter.Base,), namespace)


def set_nodelay_on_listeners() -> int:
    """Set TCP_NODELAY on every listening TCP socket of this process; returns how many."""
    done = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # not a socket (or already closed)
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                continue
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done += 1
    return done


def serve(port: int, events: Sequence[str], host: str = "127.0.0.1", nodelay: bool = True) -> None:
    """Run libmilter's main loop (returns on SIGTERM/SIGINT, which libmilter handles)."""
    import Milter
    import milter

    Milter.factory = make_milter_class(events)
    milter.setbacklog(1024)
    original_main = milter.main

    def main_with_nodelay() -> None:
        # Milter.runmilter opens the listening socket, then calls main():
        # between the two is the one moment the socket exists and is idle.
        if nodelay and not set_nodelay_on_listeners():
            print("warning: no listening socket found for TCP_NODELAY", file=sys.stderr, flush=True)
        print(f"ready inet:{host}:{port}", flush=True)
        original_main()

    milter.main = main_with_nodelay
    try:
        Milter.runmilter("milterbridge-bench", f"inet:{port}@{host}", timeout=600)
    finally:
        milter.main = original_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pymilter_milter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", default="eom", help="'all' or e.g. connect,helo,eom")
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle on (to see libmilter's stall)")
    args = parser.parse_args(argv)
    events = ALL_EVENTS if args.events == "all" else tuple(e for e in args.events.split(",") if e)
    serve(args.port, events, args.host, nodelay=not args.no_nodelay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
