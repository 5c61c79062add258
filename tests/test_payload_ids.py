"""Ids of sessions, messages and calls: random, unique, and not shared with a forked worker."""

from __future__ import annotations

import os
import re

from milterbridge.payload import new_id


def test_ids_are_prefixed_96_bit_hex_and_unique() -> None:
    """More ids than one batch of random bytes holds: all well formed, none repeated."""
    ids = [new_id("evt") for _ in range(1000)]
    assert all(re.fullmatch(r"evt_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    """The parent holds unused random bytes when it forks; the child must draw its own."""
    new_id("ses")  # the parent now has a batch in hand
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, " ".join(new_id("msg") for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_id("msg") for _ in range(5)]
    assert len(child) == 5
    assert not set(child) & set(parent)
