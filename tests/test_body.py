"""BodyBuffer: memory, spool, the shared memory budget and spool faults."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from milterbridge.body import BodyBuffer, SpoolError
from milterbridge.milter.context import MemoryBudget


def test_a_piece_over_the_shared_budget_goes_to_the_spool_file() -> None:
    """Memory bytes come from the budget; a piece that does not fit is spooled, and the memory
    given back; discarding gives back the rest."""
    budget = MemoryBudget(1000)
    first = BodyBuffer(4096, 10_000, keep=True, budget=budget)
    second = BodyBuffer(4096, 10_000, keep=True, budget=budget)
    first.append(b"a" * 800)
    assert budget.used == 800
    second.append(b"b" * 300)  # does not fit next to the first: spooled
    assert second.spooled
    assert budget.used == 800
    assert second.read(1000) == b"b" * 300
    first.discard()
    assert budget.used == 0
    second.discard()
    assert budget.used == 0


def test_spooling_gives_back_the_memory_it_held() -> None:
    """Moving to the spool file returns the in-memory bytes to the budget."""
    budget = MemoryBudget(10_000)
    body = BodyBuffer(100, 10_000, keep=True, budget=budget)
    body.append(b"x" * 60)
    assert budget.used == 60
    body.append(b"y" * 60)
    assert body.spooled
    assert budget.used == 0
    assert b"".join(body.chunks(1000)) == b"x" * 60 + b"y" * 60
    body.discard()


def test_a_spool_write_failure_is_recorded_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool file that cannot be created marks the body failed and keeps nothing more."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    body = BodyBuffer(10, 10_000, keep=True)
    body.append(b"z" * 100)
    assert body.failed is not None
    assert "cannot spool" in body.failed
    body.append(b"z" * 100)  # later pieces are counted, not kept
    assert body.size == 200


def test_a_short_spool_raises_instead_of_streaming_less() -> None:
    """Reading back fewer bytes than the body holds raises SpoolError (the request declared them)."""
    body = BodyBuffer(10, 10_000, keep=True)
    body.append(b"q" * 100)
    assert body._file is not None
    body._file.truncate(50)
    with pytest.raises(SpoolError, match="ended after"):
        b"".join(body.chunks(1000))
    body.discard()
