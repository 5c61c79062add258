"""Pure decision policy: the decision model, merging, failure rules and applying."""

from __future__ import annotations
