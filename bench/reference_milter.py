"""Our minimal accept-all milter, written with the project's core: the benchmark's floor.

It is milterbridge without webhooks: the same listener (``MilterServer``), the
same connection loop and sans-IO session, and a handler that asks the MTA for
exactly the events it is told to, answers continue to each, and at
end-of-message adds the bench header and accepts. The gap between it and the
bridge is the cost of the webhooks (HTTP, JSON, policy); the gap between it
and pymilter is the cost of our protocol layer against libmilter's C.

    python -m bench.reference_milter --listen inet:127.0.0.1:9901 --events eom
    python -m bench.reference_milter --listen inet:127.0.0.1:9901 --events all
    python -m bench.reference_milter --listen inet:127.0.0.1:9901 --events eom --no-reply connect,helo,mail,rcpt,header

``--no-reply`` asks for more events without answering them (negotiated no-reply), as the bridge
does for the events its end-of-message payload is built from: the MTA then sends what it
sends the bridge, and the milter only takes it in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence

from bench import eventloop
from bench.profiles import ALL_EVENTS, BENCH_HEADER_NAME, BENCH_HEADER_VALUE
from milterbridge.connection import HandlerResult
from milterbridge.milter.constants import Event
from milterbridge.milter.context import MessageContext
from milterbridge.milter.messages import Accept, AddHeader, Command, Continue, EndOfMessage, Negotiate, NegotiateReply
from milterbridge.milter.negotiation import NEGOTIABLE_EVENTS, Requirements, negotiate
from milterbridge.milter.session import MilterSession
from milterbridge.server import MilterServer

# Built once: every reply is the same immutable object.
_CONTINUE = (Continue(),)
# HDR_LEADSPC is negotiated, so the value carries its own leading space.
_EOM = (AddHeader(name=BENCH_HEADER_NAME.encode(), value=b" " + BENCH_HEADER_VALUE.encode()), Accept())


def requirements_for(events: Sequence[str], no_reply: Sequence[str] = ()) -> Requirements:
    """Ask for ``events`` (``eom`` always comes) and answer every one; ``no_reply`` ones too, unanswered."""
    wanted = frozenset(Event(e) for e in events) & NEGOTIABLE_EVENTS
    unanswered = frozenset(Event(e) for e in no_reply) & NEGOTIABLE_EVENTS
    return Requirements(events=wanted | unanswered, reply_events=wanted)


class BenchHandler:
    """Continue at every event it asked for; the bench header and accept at end-of-message."""

    def __init__(self, session: MilterSession, requirements: Requirements) -> None:
        self.session = session
        self.requirements = requirements

    def negotiate(self, offer: Negotiate) -> NegotiateReply:
        return negotiate(offer, self.requirements).reply()

    def handle(self, command: Command) -> HandlerResult:
        if not self.session.needs_reply:
            return None
        if type(command) is EndOfMessage:
            return _EOM
        return _CONTINUE

    def message_ended(self, message: MessageContext, *, mta_gave_up: bool = False) -> None:
        return None

    def connection_lost(self) -> None:
        return None


def build_server(
    listen: Sequence[str], events: Sequence[str], *, no_reply: Sequence[str] = (), max_connections: int = 10000
) -> MilterServer:
    """A MilterServer (not started) running :class:`BenchHandler` for ``events`` (and ``no_reply``)."""
    requirements = requirements_for(events, no_reply)
    return MilterServer(listen, lambda session: BenchHandler(session, requirements), max_connections=max_connections)


@contextlib.asynccontextmanager
async def running(listen: Sequence[str], events: Sequence[str]) -> AsyncIterator[MilterServer]:
    """A started reference milter inside the current loop (the smoke test uses this)."""
    server = build_server(listen, events)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(timeout=2.0)


def parse_events(text: str) -> tuple[str, ...]:
    """``all`` or a comma-separated list of event names."""
    if text == "all":
        return ALL_EVENTS
    events = tuple(e.strip() for e in text.split(",") if e.strip())
    unknown = set(events) - set(ALL_EVENTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown events: {', '.join(sorted(unknown))}")
    return events


async def serve(listen: Sequence[str], events: Sequence[str], no_reply: Sequence[str] = ()) -> None:
    """Run until SIGTERM or SIGINT, then drain briefly."""
    server = build_server(listen, events, no_reply=no_reply)
    await server.start()
    print("ready", " ".join(server.bound), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.shutdown(timeout=2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_milter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", action="append", required=True, help="milter address (repeatable)")
    parser.add_argument("--events", type=parse_events, default=("eom",), help="'all' or e.g. connect,helo,eom")
    parser.add_argument(
        "--no-reply", type=parse_events, default=(), help="events also asked for but not answered (no-reply)"
    )
    args = parser.parse_args(argv)
    eventloop.run(serve(args.listen, args.events, args.no_reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
