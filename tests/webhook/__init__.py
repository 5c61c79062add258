"""Tests of milterbridge.webhook: signing, the HTTP client, the circuit breaker."""

from __future__ import annotations
