"""milterbridge: the milter that turns mail filter events into JSON webhooks."""

from __future__ import annotations

from milterbridge import _native

__version__ = "0.1.0"

#: The build of the hot core that runs: compiled with mypyc or the Python sources (_native.py).
CORE = _native.select()
