"""Connection hygiene at the listener: negotiation deadline, allowed_clients, over max_connections.

Real listeners on loopback, the project's MTA-side client, and a real ``Metrics`` as the
observer so the counters are checked as the admin endpoint would export them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import tempfile

import pytest

from milterbridge import admission
from milterbridge.admission import OVERFLOW_REPLY, ServerState
from milterbridge.client import Envelope, MilterClient, MilterClientError
from milterbridge.config import ConfigError, load_config
from milterbridge.connection import ConnectionSettings
from milterbridge.metrics import REFUSAL_REASONS, TIMEOUT_STAGES, Metrics
from milterbridge.milter import messages as m
from milterbridge.milter.constants import Event, Family, Protocol
from milterbridge.milter.negotiation import NEGOTIABLE_EVENTS, Requirements
from milterbridge.milter.session import MilterSession
from milterbridge.server import MilterServer
from tests.conftest import running_server
from tests.fakes.handlers import StaticHandler

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def networks(*items: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``server.allowed_clients`` as the config loader builds it."""
    env = {"MILTERBRIDGE_SERVER__ALLOWED_CLIENTS": "[" + ", ".join(f'"{i}"' for i in items) + "]"}
    return load_config(None, env).server.allowed_clients


async def refused(address: str) -> bool:
    """True if the listener closes a new connection before answering OPTNEG."""
    client = await MilterClient.open(address)
    try:
        await client.negotiate()
    except (MilterClientError, ConnectionError):
        return True
    finally:
        await client.aclose()
    return False


async def served(address: str) -> m.Reply | None:
    """The final reply to one ordinary message on a new connection."""
    async with await MilterClient.open(address) as client:
        await client.negotiate()
        result = await client.send_message(Envelope(), MESSAGE)
        await client.quit()
    return result.final


# --------------------------------------------------------------------------
# negotiation deadline


@pytest.mark.asyncio
async def test_silent_connection_closed_at_negotiation_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """No OPTNEG within negotiate_timeout: closed, logged and counted; a negotiated session lives on."""
    metrics = Metrics()
    settings = ConnectionSettings(negotiate_timeout=0.3)
    async with running_server(StaticHandler, settings=settings, observer=metrics) as server:
        good = await MilterClient.open(server.bound[0])
        await good.negotiate()
        host, port = server.bound[0].removeprefix("inet:").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        # The negotiated connection is past the same deadline and still served.
        result = await good.send_message(Envelope(), MESSAGE)
        assert result.final == m.Accept()
        await good.quit()
    assert sample(metrics, "milterbridge_connection_timeouts_total", stage="negotiate") == 1
    assert sample(metrics, "milterbridge_connection_timeouts_total", stage="idle") == 0
    assert any("no option negotiation and CONNECT within 0.3 s" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_negotiated_but_silent_connection_closed_at_the_deadline() -> None:
    """A peer that negotiates (CONNECT asked for) and then sends nothing is closed at the same
    deadline: it must not hold a connection slot for idle_timeout."""
    metrics = Metrics()
    settings = ConnectionSettings(negotiate_timeout=0.3)

    def wants_connect(session: MilterSession) -> StaticHandler:
        connect = frozenset({Event.CONNECT})
        return StaticHandler(session, Requirements(events=connect, reply_events=connect))

    async with (
        running_server(wants_connect, settings=settings, observer=metrics) as server,
        await MilterClient.open(server.bound[0]) as silent,
    ):
        await silent.negotiate()
        async with asyncio.timeout(5):
            while not sample(metrics, "milterbridge_connection_timeouts_total", stage="negotiate"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        with pytest.raises((MilterClientError, ConnectionError)):
            await silent.connect(b"client", Family.INET, b"192.0.2.1", 4000, ())
    assert sample(metrics, "milterbridge_connection_timeouts_total", stage="negotiate") == 1


def test_negotiate_timeout_and_idle_timeout_defaults() -> None:
    """The defaults: 10 s to negotiate, 3600 s idle; both configurable and validated."""
    config = load_config(None, {})
    assert config.server.negotiate_timeout == ConnectionSettings().negotiate_timeout == 10.0
    assert config.server.idle_timeout == ConnectionSettings().idle_timeout == 3600.0
    env = {"MILTERBRIDGE_SERVER__NEGOTIATE_TIMEOUT": "2.5"}
    assert load_config(None, env).server.negotiate_timeout == 2.5
    with pytest.raises(ConfigError, match=r"server\.negotiate_timeout"):
        load_config(None, {"MILTERBRIDGE_SERVER__NEGOTIATE_TIMEOUT": "0"})


# --------------------------------------------------------------------------
# allowed_clients


@pytest.mark.asyncio
async def test_client_outside_allowed_networks_is_refused_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """allowed_clients = ["10.0.0.0/8"]: 127.0.0.1 is closed before any protocol, logged and counted."""
    metrics = Metrics()
    async with running_server(StaticHandler, allowed_clients=networks("10.0.0.0/8"), observer=metrics) as server:
        assert await refused(server.bound[0])
        assert await refused(server.bound[0])
        assert server.refused_connections == 2
    assert sample(metrics, "milterbridge_connections_refused_total", reason="not_allowed") == 2
    assert sample(metrics, "milterbridge_connections_refused_total", reason="max_connections") == 0
    assert sample(metrics, "milterbridge_connections_total") == 0
    lines = [r.getMessage() for r in caplog.records if "not in server.allowed_clients" in r.getMessage()]
    assert len(lines) == 1  # the second refusal inside the throttle interval is not logged
    assert "127.0.0.1" in lines[0]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("listen", "allowed", "ok"),
    [
        pytest.param("inet:127.0.0.1:0", ("127.0.0.0/8",), True, id="v4-in-network"),
        pytest.param("inet:127.0.0.1:0", ("192.0.2.1", "127.0.0.1"), True, id="v4-plain-address"),
        pytest.param("inet6:[::1]:0", ("::1",), True, id="v6-plain-address"),
        pytest.param("inet6:[::1]:0", ("127.0.0.0/8",), False, id="v6-peer-v4-list"),
        pytest.param("inet6:[::1]:0", ("2001:db8::/32", "::/127"), True, id="v6-in-network"),
    ],
)
async def test_allowed_clients_v4_and_v6(listen: str, allowed: tuple[str, ...], ok: bool) -> None:
    """A peer inside a listed network (or equal to a listed address) is served; others are refused."""
    async with running_server(StaticHandler, [listen], allowed_clients=networks(*allowed)) as server:
        if ok:
            assert await served(server.bound[0]) == m.Accept()
        else:
            assert await refused(server.bound[0])
        assert server.refused_connections == (0 if ok else 1)


@pytest.mark.asyncio
async def test_unix_socket_listener_is_not_filtered() -> None:
    """allowed_clients applies to inet listeners only: a unix-socket peer is served."""
    with tempfile.TemporaryDirectory() as tmp:
        listen = [f"unix:{tmp}/milter.sock", "inet:127.0.0.1:0"]
        async with running_server(StaticHandler, listen, allowed_clients=networks("10.0.0.0/8")) as server:
            assert await served(f"unix:{tmp}/milter.sock") == m.Accept()
            assert await refused(server.bound[1])


def test_ipv4_mapped_peer_matches_ipv4_networks() -> None:
    """A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; they match the IPv4 networks."""
    state = ServerState(allowed_clients=networks("127.0.0.0/8"))
    assert state.admit("::ffff:127.0.0.1") == admission.SERVE
    assert state.admit("::ffff:10.0.0.1") == admission.NOT_ALLOWED
    assert state.admit(None) == admission.SERVE  # a unix-socket peer


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param('["10.0.0.1/8"]', "'10.0.0.1/8' is not an address or a CIDR network", id="host-bits"),
        pytest.param('["localhost"]', "'localhost' is not an address", id="name"),
        pytest.param('["10.0.0.0/33"]', "'10.0.0.0/33'", id="prefix"),
        pytest.param('["::1", "::1/128"]', "'::1/128' is listed twice", id="twice"),
        pytest.param("[]", "needs at least one network", id="empty"),
        pytest.param("[1]", "expected an array of strings", id="not-strings"),
    ],
)
def test_allowed_clients_config_errors_name_key_and_entry(value: str, message: str) -> None:
    """A bad allowed_clients entry is refused with the key and the entry in the message."""
    with pytest.raises(ConfigError, match=r"server\.allowed_clients") as info:
        load_config(None, {"MILTERBRIDGE_SERVER__ALLOWED_CLIENTS": value})
    assert message in str(info.value)


# --------------------------------------------------------------------------
# over max_connections


@pytest.mark.asyncio
async def test_over_max_connections_session_is_tempfailed_not_hung_up(caplog: pytest.LogCaptureFixture) -> None:
    """Over max_connections the MTA is negotiated with and gets 451 4.3.2 at CONNECT, logged and counted."""
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    async with running_server(StaticHandler, max_connections=1, observer=metrics) as server:
        holder = await MilterClient.open(server.bound[0])
        await holder.negotiate()
        await holder.open_session(Envelope())
        extra = await MilterClient.open(server.bound[0])
        reply = await extra.negotiate()
        # Only CONNECT is asked for: every other event is switched off, no action requested.
        assert not reply.protocol & Protocol.NO_CONNECT
        off = Protocol.NO_HELO | Protocol.NO_MAIL | Protocol.NO_RCPT | Protocol.NO_HEADERS | Protocol.NO_BODY
        assert reply.protocol & off == off
        assert reply.actions == 0
        result = await extra.send_message(Envelope(), MESSAGE)
        assert result.stopped_at == "connect"
        assert result.connect == OVERFLOW_REPLY
        assert result.connect.text == b"451 4.3.2 too many connections to the filter, try again later"
        await extra.aclose()
        # The session within the limit is untouched.
        result = await holder.send_transaction(Envelope(), MESSAGE)
        assert result.final == m.Accept()
        await holder.quit()
        assert server.refused_connections == 0
    assert sample(metrics, "milterbridge_connections_over_limit_total") == 1
    assert sample(metrics, "milterbridge_connections_total") == 2
    assert sample(metrics, "milterbridge_connections_refused_total", reason="max_connections") == 0
    assert any("over server.max_connections (1)" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_over_limit_session_that_goes_on_gets_tempfail_at_end_of_message() -> None:
    """An MTA that ignores the CONNECT tempfail gets the same 451 at end-of-message, never an accept."""
    async with running_server(StaticHandler, max_connections=1) as server:
        holder = await MilterClient.open(server.bound[0])
        await holder.negotiate()
        extra = await MilterClient.open(server.bound[0])
        await extra.negotiate()
        assert await extra.connect(b"client.example") == OVERFLOW_REPLY
        for _ in range(2):  # every message of the session
            result = await extra.send_transaction(Envelope(), MESSAGE)
            assert result.mail is None  # MAIL is not asked for
            assert result.final == OVERFLOW_REPLY
        await extra.quit()
        await holder.quit()


@pytest.mark.asyncio
async def test_over_limit_connections_have_their_own_cap() -> None:
    """Past max_connections plus the over-limit cap, connections are closed at once and counted."""
    metrics = Metrics()
    async with running_server(StaticHandler, max_connections=1, max_overflow=2, observer=metrics) as server:
        holder = await MilterClient.open(server.bound[0])
        await holder.negotiate()
        waiting = [await MilterClient.open(server.bound[0]) for _ in range(2)]
        for client in waiting:
            await client.negotiate()
        assert await refused(server.bound[0])
        assert server.state.overflow == 2
        # An over-limit session ends as Postfix ends it after the tempfail: its slot is free again.
        assert await waiting[0].connect(b"client.example") == OVERFLOW_REPLY
        await waiting[0].aclose()
        for _ in range(100):
            if server.state.overflow == 1:
                break
            await asyncio.sleep(0.01)
        again = await MilterClient.open(server.bound[0])
        await again.negotiate()
        assert await again.connect(b"client.example") == OVERFLOW_REPLY
        await again.aclose()
        await waiting[1].aclose()
        # The holder leaves: the next connection is served normally again.
        await holder.quit()
        for _ in range(100):
            if not server.state.connections:
                break
            await asyncio.sleep(0.01)
        assert await served(server.bound[0]) == m.Accept()
    assert sample(metrics, "milterbridge_connections_refused_total", reason="max_connections") == 1
    assert sample(metrics, "milterbridge_connections_over_limit_total") == 3


def test_metric_label_values_match_the_listener() -> None:
    """The bounded label values exported by Metrics are the ones the listener uses."""
    assert set(REFUSAL_REASONS) == set(admission.REFUSAL_REASONS)
    assert set(TIMEOUT_STAGES) == set(admission.TIMEOUT_STAGES)
    assert admission.default_max_overflow(1) == 10
    assert admission.default_max_overflow(1000) == 100


# --------------------------------------------------------------------------
# event counts


async def _closed(server: MilterServer) -> None:
    """Wait until every connection of ``server`` has ended."""
    async with asyncio.timeout(5):
        await server.state.idle.wait()


@pytest.mark.asyncio
async def test_event_counts_sum_live_and_closed_sessions() -> None:
    """ServerState.event_counts: per event, the commands every session read (folded ones too),
    unchanged once the connections have closed."""
    not_answered = frozenset({Event.HEADER, Event.EOH})

    def folds_headers(session: MilterSession) -> StaticHandler:
        session.set_unsubscribed({m.Header, m.EndOfHeaders})  # folded in by the session, never handed over
        return StaticHandler(session, Requirements(reply_events=NEGOTIABLE_EVENTS - not_answered))

    messages = 3
    async with running_server(folds_headers) as server:
        first = await MilterClient.open(server.bound[0])
        await first.negotiate()
        await first.open_session(Envelope())
        for _ in range(messages):  # two headers and one body chunk each, then ABORT
            assert (await first.send_transaction(Envelope(), MESSAGE)).final == m.Accept()
        second = await MilterClient.open(server.bound[0])
        await second.negotiate()
        await second.open_session(Envelope())
        assert await first.helo(b"again.example.org") == m.Continue()  # answered: the last ABORT was read
        expected = {
            Event.CONNECT: 2,
            Event.HELO: 3,
            Event.MAIL: messages,
            Event.RCPT: messages,
            Event.DATA: messages,
            Event.HEADER: 2 * messages,
            Event.EOH: messages,
            Event.BODY: messages,
            Event.EOM: messages,
            Event.ABORT: messages,
        }
        assert server.state.event_counts() == expected
        await first.quit()
        await second.quit()
        await _closed(server)
        expected[Event.CLOSE] = 2
        assert server.state.event_counts() == expected
    assert server.state.event_counts() == expected


@pytest.mark.asyncio
async def test_event_counts_leave_out_over_limit_sessions() -> None:
    """A session refused over max_connections is counted as an overflow, not in the event counts."""
    async with running_server(StaticHandler, max_connections=1) as server:
        holder = await MilterClient.open(server.bound[0])
        await holder.negotiate()  # asks for end-of-message only: its CONNECT is never sent
        await holder.open_session(Envelope())
        extra = await MilterClient.open(server.bound[0])
        await extra.negotiate()
        assert await extra.connect(b"client.example") == OVERFLOW_REPLY
        assert server.state.event_counts() == {}
        await holder.send_transaction(Envelope(), b"Subject: x\r\n\r\nbody\r\n")
        served = server.state.event_counts()
        assert served[Event.EOM] == 1  # the served session is counted
        assert Event.CONNECT not in served  # the refused one's CONNECT is not
        await extra.aclose()
        await holder.aclose()
        await _closed(server)
        final = server.state.event_counts()
        assert final[Event.EOM] == 1
        assert Event.CONNECT not in final
