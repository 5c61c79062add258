"""The sans-IO milter core: codec, messages, negotiation and session (stdlib only)."""

from __future__ import annotations
