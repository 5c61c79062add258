"""The endpoint key ``allowed_ops``: its default, its values, and the errors that name it."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterbridge.config import ConfigError, load_config
from milterbridge.policy.model import ALL_OPS, ModOp

ENDPOINT = '[[endpoints]]\nname = "policy"\nurl = "https://hooks.example/milter"\n'


def load_ops(tmp_path: Path, line: str = "", environ: dict[str, str] | None = None) -> frozenset[ModOp]:
    """Load one endpoint with ``line`` added and return its allowed_ops."""
    path = tmp_path / "milterbridge.toml"
    path.write_text(ENDPOINT + line + "\n")
    return load_config(path, environ or {}).endpoints[0].allowed_ops


def test_default_is_every_op(tmp_path: Path) -> None:
    """Without the key, every modification op is allowed."""
    assert load_ops(tmp_path) == ALL_OPS == frozenset(ModOp)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param('allowed_ops = ["add_header"]', {ModOp.ADD_HEADER}, id="one"),
        pytest.param(
            'allowed_ops = ["add_header", "change_header", "delete_header"]',
            {ModOp.ADD_HEADER, ModOp.CHANGE_HEADER, ModOp.DELETE_HEADER},
            id="headers",
        ),
        pytest.param("allowed_ops = []", set(), id="none"),
        pytest.param(
            'allowed_ops = ["add_header", "insert_header", "change_header", "delete_header", "replace_body", '
            '"add_rcpt", "delete_rcpt", "change_from"]',
            set(ModOp),
            id="all-listed",
        ),
    ],
)
def test_values(tmp_path: Path, line: str, expected: set[ModOp]) -> None:
    """The listed op names become the endpoint's allowed_ops."""
    assert load_ops(tmp_path, line) == expected


def test_environment_override(tmp_path: Path) -> None:
    """MILTERBRIDGE_ENDPOINTS__<NAME>__ALLOWED_OPS sets it from a JSON array."""
    environ = {"MILTERBRIDGE_ENDPOINTS__POLICY__ALLOWED_OPS": '["delete_rcpt"]'}
    assert load_ops(tmp_path, environ=environ) == {ModOp.DELETE_RCPT}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param('allowed_ops = ["add_headers"]', "'add_headers' is not a modification op", id="unknown"),
        pytest.param('allowed_ops = ["ADD_HEADER"]', "'ADD_HEADER' is not a modification op", id="wrong-case"),
        pytest.param('allowed_ops = ["add_header", "add_header"]', "listed twice", id="duplicate"),
        pytest.param('allowed_ops = "add_header"', "expected an array of strings", id="string"),
        pytest.param("allowed_ops = [1]", "expected an array of strings", id="number"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    """A bad value is a config error on endpoints.<name>.allowed_ops that says what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_ops(tmp_path, line)
    assert info.value.key == "endpoints.policy.allowed_ops"
    assert message in str(info.value)
    if "not a modification op" in message:
        assert "known: add_header, insert_header" in str(info.value)
