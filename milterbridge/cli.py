"""The ``milterbridge`` command line: serve, check-config, send, --version."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from milterbridge import __version__

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
"""


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

    send = sub.add_parser("send", help="act as the MTA: drive a milter with a message and print its answer")
    send.add_argument("message", metavar="MESSAGE.eml", help="RFC 5322 message file ('-' for stdin)")
    send.add_argument("--milter", required=True, metavar="ADDR", help="inet:host:port, inet6:[addr]:port or unix:/path")
    send.add_argument("--from", dest="mail_from", default="sender@example.org", metavar="A", help="envelope sender")
    send.add_argument("--rcpt", action="append", metavar="B", help="envelope recipient (repeatable)")
    send.add_argument("--helo", default="client.example.org", metavar="H", help="HELO name")
    send.add_argument("--client-addr", default="192.0.2.1", metavar="IP", help="client IP address")
    send.add_argument("--client-name", default=None, metavar="NAME", help="client host name (default: [IP])")
    send.add_argument("--queue-id", default="4ABC123DEF", metavar="ID", help="queue id sent as macro i")
    send.add_argument("--timeout", type=float, default=60.0, metavar="S", help="overall time limit in seconds")
    send.add_argument("--json", action="store_true", help="print JSON instead of text")
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
    from milterbridge.config import ConfigError, config_warnings
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
    for ep in config.endpoints:
        events = ", ".join(sorted(ep.events))
        print(
            f"  endpoint {ep.name}: {redact_url(ep.url)} {ep.mode} on_error={ep.on_error} "
            f"timeout={ep.timeout}s events=[{events}]"
        )
    if all(ep.mode != "enforce" for ep in config.endpoints):
        print("  no enforcing endpoint (server.allow_no_endpoints = true): every message is accepted unchanged")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _address(text: str) -> bytes:
    text = text.strip()
    if text.startswith("<"):
        return text.encode()
    return f"<{text}>".encode()


def send(args: argparse.Namespace) -> int:
    """``milterbridge send``: one message through a milter, report printed."""
    import orjson

    from milterbridge.client import Envelope, MilterClient, MilterClientError
    from milterbridge.describe import result_json, result_text
    from milterbridge.milter.constants import Family

    try:
        message = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return 2
    rcpts = [_address(r) for r in (args.rcpt or ["rcpt@example.net"])]
    family = Family.INET6 if ":" in args.client_addr else Family.INET
    envelope = Envelope(
        mail_from=_address(args.mail_from) if args.mail_from else b"<>",
        recipients=tuple(rcpts),
        helo=args.helo.encode(),
        client_name=(args.client_name or f"[{args.client_addr}]").encode(),
        client_address=args.client_addr.encode(),
        family=family,
        queue_id=args.queue_id.encode(),
    )

    async def run() -> object:
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
        sys.stdout.buffer.write(orjson.dumps(result_json(result), option=orjson.OPT_INDENT_2) + b"\n")  # type: ignore[arg-type]
    else:
        print(result_text(result, rcpts))  # type: ignore[arg-type]
    return 0
