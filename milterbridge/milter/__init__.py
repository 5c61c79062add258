"""The sans-IO milter core (stdlib only): wire constants and messages, the frame codec,
negotiation, the protocol rules, the session state machine, its contexts and their limits."""

from __future__ import annotations
