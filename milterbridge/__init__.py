"""milterbridge: the milter that turns mail filter events into JSON webhooks."""

from __future__ import annotations

__version__ = "0.1.0"
