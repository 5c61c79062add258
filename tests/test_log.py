"""JSON logging: one parseable object per line, fields merged, secrets redacted."""

from __future__ import annotations

import datetime
import enum
import io
import logging

import orjson
import pytest

from milterbridge.log import REDACTED, configure_logging, redact_fields, redact_urls


class Colour(enum.StrEnum):
    RED = "red"


@pytest.fixture
def stream():
    """A buffer as the log stream; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("aiohttp.access").level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def lines(buffer: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


def test_line_has_fixed_keys_and_fields(stream):
    """Each record is one JSON object with ts, level, logger, msg and the fields at top level."""
    configure_logging("info", stream)
    fields = {"session": "s1", "queue_id": "4Vb1xk", "outcome": "accepted", "endpoints": [{"name": "p", "ms": 3}]}
    logging.getLogger("milterbridge.dispatch").info("message %s", "done", extra={"fields": fields})
    (line,) = lines(stream)
    assert line["level"] == "info"
    assert line["logger"] == "milterbridge.dispatch"
    assert line["msg"] == "message done"
    assert line["queue_id"] == "4Vb1xk"
    assert line["endpoints"] == [{"name": "p", "ms": 3}]
    ts = datetime.datetime.fromisoformat(line["ts"])
    assert line["ts"].endswith("Z")
    assert ts.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - ts).total_seconds()) < 60


def test_level_filters_records(stream):
    """Records below the configured level are dropped."""
    configure_logging("warning", stream)
    logger = logging.getLogger("milterbridge.test")
    logger.info("quiet")
    logger.warning("loud")
    assert [line["msg"] for line in lines(stream)] == ["loud"]
    assert lines(stream)[0]["level"] == "warning"


def test_unknown_level_is_refused(stream):
    """A level name outside LEVELS raises ValueError naming it."""
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose", stream)


def test_exception_is_recorded(stream):
    """logger.exception adds exc with type, message and traceback."""
    configure_logging("info", stream)
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("milterbridge.test").exception("lookup failed")
    (line,) = lines(stream)
    assert line["msg"] == "lookup failed"
    assert line["level"] == "error"
    assert line["exc"]["type"] == "KeyError"
    assert line["exc"]["message"] == "'missing'"
    assert "Traceback" in line["exc"]["traceback"]
    assert "test_exception_is_recorded" in line["exc"]["traceback"]


def test_odd_values_become_strings(stream):
    """Bytes decode with replacement; other unknown types use str(); non-str keys are allowed."""
    configure_logging("info", stream)

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    fields = {"raw": b"caf\xc3\xa9 \xff", "obj": Opaque(), "colour": Colour.RED, "tags": {"a"}, "by_code": {550: "x"}}
    logging.getLogger("t").info("odd", extra={"fields": fields})
    (line,) = lines(stream)
    assert line["raw"] == "café \ufffd"
    assert line["obj"] == "opaque!"
    assert line["colour"] == "red"
    assert line["tags"] == ["a"]
    assert line["by_code"] == {"550": "x"}


def test_unencodable_fields_do_not_lose_the_line(stream):
    """An integer too big for JSON drops the fields but keeps the message and says why."""
    configure_logging("info", stream)
    logging.getLogger("t").info("big", extra={"fields": {"n": 2**70}})
    (line,) = lines(stream)
    assert line["msg"] == "big"
    assert "n" not in line
    assert "log_error" in line


def test_fields_cannot_shadow_fixed_keys(stream):
    """A field named like a fixed key is written with a trailing underscore."""
    configure_logging("info", stream)
    logging.getLogger("real").info("text", extra={"fields": {"msg": "fake", "logger": "fake"}})
    (line,) = lines(stream)
    assert line["msg"] == "text"
    assert line["logger"] == "real"
    assert line["msg_"] == "fake"
    assert line["logger_"] == "fake"


def test_sensitive_fields_are_redacted(stream):
    """Values under secret/password/authorization/token-like keys never reach the output."""
    configure_logging("info", stream)
    fields = {
        "endpoint": "policy",
        "webhook_secret": "whsec_abc",
        "headers": {"Authorization": "Bearer xyz", "X-Other": "fine"},
        "endpoints": [{"name": "p", "api_token": "t0k"}],
        "Password": "hunter2",
    }
    logging.getLogger("t").info("cfg", extra={"fields": fields})
    text = stream.getvalue()
    for secret in ("whsec_abc", "Bearer xyz", "t0k", "hunter2"):
        assert secret not in text
    (line,) = lines(stream)
    assert line["webhook_secret"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "X-Other": "fine"}
    assert line["endpoints"] == [{"name": "p", "api_token": REDACTED}]
    assert line["endpoint"] == "policy"
    # The caller's dict is not modified.
    assert fields["webhook_secret"] == "whsec_abc"


def test_redact_fields_stops_at_depth():
    """Deeply nested values are cut rather than recursed without bound."""
    nested: dict = {"token": "x"}
    for _ in range(100):
        nested = {"n": nested}
    redacted = redact_fields(nested)
    assert "x" not in str(redacted)
    assert "<too deep>" in str(redacted)


def test_reconfigure_replaces_the_handler(stream):
    """Configuring twice leaves one JSON handler: each record is written once, to the new stream."""
    first = configure_logging("info", stream)
    second_stream = io.StringIO()
    second = configure_logging("debug", second_stream)
    root = logging.getLogger()
    assert first not in root.handlers
    assert sum(type(h) is type(second) for h in root.handlers) == 1
    logging.getLogger("t").debug("once")
    assert stream.getvalue() == ""
    assert [line["msg"] for line in lines(second_stream)] == ["once"]


def test_other_handlers_are_kept(stream):
    """Handlers installed by others survive a reconfigure."""
    other = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(other)
    try:
        configure_logging("info", stream)
        configure_logging("info", stream)
        assert other in root.handlers
    finally:
        root.removeHandler(other)


def test_urls_lose_user_info_and_query_in_every_part_of_a_line(stream):
    """A URL with user:password@ and ?token= is redacted in msg, string fields and exceptions."""
    configure_logging("info", stream)
    url = "https://ops:hunter2@hooks.example:8443/milter?token=t0ken-31337&x=1"
    try:
        raise ValueError(f"cannot reach {url}")
    except ValueError:
        logging.getLogger("t").exception("call to %s failed", url, extra={"fields": {"target": url, "n": [url]}})
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "t0ken-31337" not in text
    (line,) = lines(stream)
    shown = f"https://{REDACTED}@hooks.example:8443/milter?{REDACTED}"
    assert line["msg"] == f"call to {shown} failed"
    assert line["target"] == shown
    assert line["n"] == [shown]
    assert shown in line["exc"]["message"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no url here", "no url here"),
        ("see https://hooks.example/p", "see https://hooks.example/p"),
        ("'http://[::1]:9/hook?k=v' refused", f"'http://[::1]:9/hook?{REDACTED}' refused"),
        ("u http://a:b@c@host/x#frag", f"u http://{REDACTED}@host/x#frag"),
        ("ftp://user@files.example/a?b", f"ftp://{REDACTED}@files.example/a?{REDACTED}"),
    ],
)
def test_redact_urls(text, expected):
    """Only user info and query change; scheme, host, port, path and the text around stay."""
    assert redact_urls(text) == expected
