"""Fake peers for tests: real servers and clients on loopback that record what they see."""

from __future__ import annotations
