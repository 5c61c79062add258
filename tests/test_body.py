"""BodyBuffer: memory, spool, the shared memory budget and spool faults."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import pytest

from milterbridge.body import BodyBuffer, MessageBody, SpoolError
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


def _spool_fds(directory: Path) -> list[int]:
    """This process's open descriptors of (unlinked) files in ``directory``."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith(str(directory)):
                found.append(int(entry.name))
    return found


def test_a_short_spool_raises_instead_of_streaming_less(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading back fewer bytes than the body holds raises SpoolError (the request declared them)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    body = BodyBuffer(10, 10_000, keep=True)
    body.append(b"q" * 100)
    assert body.spooled
    (fd,) = _spool_fds(tmp_path)
    os.ftruncate(fd, 50)  # the file shrank under the buffer (someone cleaned /tmp)
    with pytest.raises(SpoolError, match="ended after"):
        b"".join(body.chunks(1000))
    body.discard()
    assert _spool_fds(tmp_path) == []


class SpoolLedger:
    """A SpoolObserver that keeps the gauge and counter the metrics keep."""

    def __init__(self) -> None:
        self.on_disk = 0
        self.files = 0

    def spooled(self, nbytes: int, *, new_file: bool = True) -> None:
        self.on_disk += nbytes
        self.files += new_file

    def unspooled(self, nbytes: int) -> None:
        self.on_disk -= nbytes


def test_spool_use_is_reported_and_given_back() -> None:
    """Bytes written to the spool (memory bytes included when it starts) are reported; discard gives them back."""
    ledger = SpoolLedger()
    body = BodyBuffer(100, 10_000, keep=True, observer=ledger)
    body.append(b"a" * 60)
    assert ledger.on_disk == 0
    body.append(b"b" * 60)
    assert (ledger.on_disk, ledger.files) == (120, 1)
    body.append(b"c" * 30)
    assert (ledger.on_disk, ledger.files) == (150, 1)
    body.discard()
    assert ledger.on_disk == 0
    body.discard()  # twice is harmless
    assert ledger.on_disk == 0


def test_going_oversize_gives_the_spool_back() -> None:
    """Past max_bytes the spool file goes, and the gauge with it."""
    ledger = SpoolLedger()
    body = BodyBuffer(10, 100, keep=True, observer=ledger)
    body.append(b"x" * 50)
    assert ledger.on_disk == 50
    body.append(b"x" * 60)
    assert body.oversize
    assert not body.spooled
    assert ledger.on_disk == 0


def test_a_failed_spool_write_leaves_no_bytes_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes written before a spool write failed are given back with the file."""
    ledger = SpoolLedger()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    body = BodyBuffer(10, 10_000, keep=True, observer=ledger)
    body.append(b"y" * 40)
    assert ledger.on_disk == 40
    (fd,) = _spool_fds(tmp_path)
    read_only = os.open(tmp_path, os.O_RDONLY)
    try:
        os.dup2(read_only, fd)  # the spool descriptor now names a read-only directory: writes fail
        body.append(b"y" * 40)
    finally:
        os.close(read_only)
    assert body.failed is not None
    assert ledger.on_disk == 0


def test_message_body_is_one_buffer_per_message() -> None:
    """MessageBody starts a buffer per message, appends to it, and frees it at the end."""
    budget = MemoryBudget(10_000)
    body = MessageBody(functools.partial(BodyBuffer, 1000, 10_000, keep=True, budget=budget))
    assert body.buffer is None
    body.append(b"first")  # a body without MAIL (negotiated away) starts a buffer
    first = body.buffer
    assert first is not None
    assert first.read(100) == b"first"
    second = body.start()
    assert second is not first
    assert budget.used == 0  # the first message's memory went back
    body.append(b"second")
    assert second.read(100) == b"second"
    assert budget.used == 6
    body.drop()
    assert body.buffer is None
    assert budget.used == 0
