"""The ``milterbridge`` command line: serve, check-config, send, --version."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from milterbridge import __version__

if TYPE_CHECKING:
    from milterbridge.milter.constants import MacroStage

DESCRIPTION = """\
milterbridge turns Postfix milter events into JSON webhooks and applies the
decisions the web services answer (reject, tempfail, discard, quarantine,
header/body/recipient/sender changes).
"""

EPILOG = """\
examples:
  milterbridge serve                       run the built-in demo on 127.0.0.1:8890
  milterbridge serve --demo                the demo even where MILTERBRIDGE_CONFIG is set
  milterbridge serve --config /etc/milterbridge.toml
  milterbridge check-config --config /etc/milterbridge.toml
  milterbridge send message.eml --milter inet:127.0.0.1:8890 --rcpt bob@example.net
  milterbridge send message.eml --milter inet:127.0.0.1:8890 --macro '{auth_authen}=alice' --exit-code
"""

SEND_DESCRIPTION = """\
Act as the MTA: drive a milter with one message the way Postfix does (CONNECT,
HELO, MAIL, RCPT, DATA, headers, body, end-of-message) and print its answer.
The envelope is what the options say, never taken from the message: without
--from the sender is sender@example.org, not the message's From:.
"""

SEND_EPILOG = """\
envelope addresses:
  --from and --rcpt take an address and, after it, the ESMTP arguments of the
  MAIL or RCPT command: --from 'alice@example.org SIZE=1000 BODY=8BITMIME',
  --rcpt 'bob@example.net NOTIFY=NEVER'. --from '' (or '<>') is the null sender.

macros:
  --macro NAME=VALUE sends a macro with the event Postfix sends it with by
  default: {daemon_name}, {client_addr}, j, v with CONNECT; {tls_version},
  {cipher}, {cert_subject} with HELO; {auth_authen}, {auth_type}, i with MAIL;
  {rcpt_addr} with RCPT; any other name with CONNECT. STAGE:NAME=VALUE picks
  the event (connect, helo, mail, rcpt, data, eoh, eom). A name of more than
  one character gets braces if it has none (auth_authen is {auth_authen}).
  --macro '{auth_authen}=alice' makes the sender authenticated.

exit status:
  0 when the milter answered, 2 on an error (no file, no connection, usage).
  With --exit-code: 0 for continue, accept and quarantine; 3 reject; 4 tempfail
  (a 4xx reply or shutdown); 5 discard.
"""

#: ``send --exit-code``: exit status by outcome; any outcome not listed exits 0.
SEND_EXIT_CODES: Final = {"reject": 3, "tempfail": 4, "shutdown": 4, "conn_fail": 4, "discard": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milterbridge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"milterbridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the bridge (the built-in demo when there is no config)")
    serve.add_argument("--config", metavar="PATH", help="TOML config file (default: $MILTERBRIDGE_CONFIG)")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the listeners")
    serve.add_argument(
        "--demo", action="store_true", help="run the built-in demo, ignoring MILTERBRIDGE_CONFIG (not with --config)"
    )

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", metavar="PATH", help="TOML config file (default: $MILTERBRIDGE_CONFIG)")

    send = sub.add_parser(
        "send",
        help="act as the MTA: drive a milter with a message and print its answer",
        description=SEND_DESCRIPTION,
        epilog=SEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("message", metavar="MESSAGE.eml", help="RFC 5322 message file ('-' for stdin)")
    send.add_argument("--milter", required=True, metavar="ADDR", help="inet:host:port, inet6:[addr]:port or unix:/path")
    send.add_argument(
        "--from",
        dest="mail_from",
        default=DEFAULT_SENDER,
        metavar="'A [ARG ...]'",
        help="envelope sender and MAIL's ESMTP arguments (default: %(default)s)",
    )
    send.add_argument(
        "--rcpt",
        action="append",
        metavar="'B [ARG ...]'",
        help=f"envelope recipient and its RCPT ESMTP arguments, repeatable (default: {DEFAULT_RECIPIENT})",
    )
    send.add_argument("--helo", default="client.example.org", metavar="H", help="HELO name (default: %(default)s)")
    send.add_argument(
        "--client-addr", default="192.0.2.1", metavar="IP", help="client IPv4 or IPv6 address (default: %(default)s)"
    )
    send.add_argument("--client-name", default=None, metavar="NAME", help="client host name (default: [IP])")
    send.add_argument(
        "--daemon-name",
        default=DEFAULT_DAEMON_NAME,
        metavar="NAME",
        help="the {daemon_name} macro, e.g. a master.cf service name (default: %(default)s)",
    )
    send.add_argument(
        "--macro",
        action="append",
        default=[],
        type=_macro,
        metavar="[STAGE:]NAME=VALUE",
        help="a macro sent with its Postfix stage or STAGE, repeatable (see below)",
    )
    send.add_argument(
        "--queue-id", default="4ABC123DEF", metavar="ID", help="queue id sent as macro i (default: %(default)s)"
    )
    send.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="overall time limit in seconds (default: %(default)s)"
    )
    send.add_argument("--json", action="store_true", help="print JSON instead of text")
    send.add_argument(
        "--exit-code", action="store_true", help="exit 3 on reject, 4 on tempfail, 5 on discard (see below)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from milterbridge.app import serve

        if args.demo and args.config:
            parser.error("serve: --demo and --config exclude each other")
        return serve(args.config, workers=args.workers, demo=args.demo)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "send":
        return send(args)
    parser.print_help()
    return 2


def check_config(path: str | None) -> int:
    """Validate a config as ``serve`` would; exit 1 naming the key and reason, 0 with a summary and warnings."""
    from milterbridge.app import load_checked
    from milterbridge.config import ConfigError
    from milterbridge.serving import config_warnings, mta_summary
    from milterbridge.webhook.errors import redact_url

    path = path or os.environ.get("MILTERBRIDGE_CONFIG") or None
    if path is None:
        print("error: no config given (use --config PATH or MILTERBRIDGE_CONFIG)", file=sys.stderr)
        return 2
    try:
        config = load_checked(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: cannot use config {path}: {exc}", file=sys.stderr)
        return 1
    print("config ok")
    print(f"  listen: {', '.join(config.server.listen)}")
    print(f"  admin: {config.admin.listen}")
    for line in mta_summary(config):
        print(f"  {line}")
    for ep in config.endpoints:
        events = ", ".join(sorted(ep.events))
        line = (
            f"  endpoint {ep.name}: {redact_url(ep.url)} {ep.mode} on_error={ep.on_error} "
            f"timeout={ep.timeout}s events=[{events}]"
        )
        if ep.timeouts:
            line += " timeouts={" + ", ".join(f"{event}: {seconds}s" for event, seconds in ep.timeouts) + "}"
        if ep.max_concurrency:
            line += f" max_concurrency={ep.max_concurrency}"
        if ep.protocol != "milterbridge":
            line += f" protocol={ep.protocol}"
        if ep.when is not None:
            # Which keys decide whether it is called at all (an endpoint that never gets mail: look here).
            line += " when=[" + ", ".join(key.value for key in ep.when.keys) + "]"
        print(line)
    if all(ep.mode != "enforce" for ep in config.endpoints):
        print("  no enforcing endpoint (server.allow_no_endpoints = true): every message is accepted unchanged")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


DEFAULT_SENDER: Final = "sender@example.org"
DEFAULT_RECIPIENT: Final = "rcpt@example.net"
DEFAULT_DAEMON_NAME: Final = "mta.example.test"


def _address(text: str) -> bytes:
    text = text.strip()
    if text.startswith("<"):
        return text.encode()
    return f"<{text}>".encode()


def _address_and_args(text: str) -> tuple[bytes, tuple[bytes, ...]]:
    """``'a@x SIZE=10'`` or ``'<a@x> SIZE=10'`` as the address in angle brackets and its ESMTP arguments."""
    text = text.strip()
    if text.startswith("<") and ">" in text:
        address, _, rest = text.partition(">")
        address += ">"
    else:
        address, _, rest = text.replace("\t", " ").partition(" ")
    return _address(address) if address else b"<>", tuple(arg.encode() for arg in rest.split())


def _macro(text: str) -> tuple[MacroStage, bytes, bytes]:
    """``[STAGE:]NAME=VALUE`` as (stage, name, value); the stage is Postfix's for NAME when not given."""
    from milterbridge.client import MACRO_STAGES, postfix_macro_stage

    name, equals, value = text.partition("=")
    stage_name, _, name = name.rpartition(":")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE or STAGE:NAME=VALUE")
    if len(name) > 1 and not name.startswith("{"):
        name = "{" + name + "}"
    raw = name.encode()
    if not stage_name:
        return postfix_macro_stage(raw), raw, value.encode()
    if stage_name not in MACRO_STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {stage_name!r} (one of: {', '.join(MACRO_STAGES)})")
    return MACRO_STAGES[stage_name], raw, value.encode()


def _client_address(text: str) -> tuple[str, bool]:
    """The address as Postfix's CONNECT carries it (no brackets, no ``IPv6:``), and whether it is IPv6."""
    text = text.strip().removeprefix("[").removesuffix("]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    ip = ipaddress.ip_address(text)  # ValueError for anything else
    return str(ip), ip.version == 6


def send(args: argparse.Namespace) -> int:
    """``milterbridge send``: one message through a milter, report printed."""
    import orjson

    from milterbridge.client import Envelope, MilterClient, MilterClientError, TransactionResult
    from milterbridge.describe import outcome, result_json, result_text
    from milterbridge.milter.constants import Family

    try:
        message = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        client_addr, ipv6 = _client_address(args.client_addr)
    except ValueError:
        print(f"error: --client-addr {args.client_addr!r} is not an IPv4 or IPv6 address", file=sys.stderr)
        return 2
    mail_from, mail_args = _address_and_args(args.mail_from)
    rcpts = [_address_and_args(r) for r in (args.rcpt or [DEFAULT_RECIPIENT])]
    client_name = args.client_name or f"[{client_addr}]"
    # Postfix's {client_addr} carries the IPv6: prefix its CONNECT leaves out (milter-protocol.md §9).
    macro_addr = f"IPv6:{client_addr}" if ipv6 else client_addr
    envelope = Envelope(
        mail_from=mail_from,
        mail_args=mail_args,
        recipients=tuple(address for address, _ in rcpts),
        rcpt_args=tuple(rcpt_args for _, rcpt_args in rcpts),
        helo=args.helo.encode(),
        client_name=client_name.encode(),
        client_address=client_addr.encode(),
        family=Family.INET6 if ipv6 else Family.INET,
        queue_id=args.queue_id.encode(),
        connect_macros=(
            (b"j", DEFAULT_DAEMON_NAME.encode()),
            (b"{daemon_name}", args.daemon_name.encode()),
            (b"v", b"Postfix 3.7"),
            (b"{client_addr}", macro_addr.encode()),
            (b"{client_name}", client_name.encode()),
        ),
        macros=tuple(args.macro),
    )

    async def run() -> TransactionResult:
        async with asyncio.timeout(args.timeout):
            client = await MilterClient.open(args.milter)
            try:
                await client.negotiate()
                result = await client.send_message(envelope, message)
                await client.quit()
                return result
            finally:
                await client.aclose()

    try:
        result = asyncio.run(run())
    except (MilterClientError, OSError, ValueError) as exc:
        print(f"error: {args.milter}: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"error: {args.milter}: no answer within {args.timeout} s", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result_json(result), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(result_text(result, list(envelope.recipients)))
    return SEND_EXIT_CODES.get(outcome(result), 0) if args.exit_code else 0
