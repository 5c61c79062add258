"""Operations tests: the real ``milterbridge`` command run as processes (design.md §5-§6)."""

from __future__ import annotations
