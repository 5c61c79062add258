"""End-to-end tests against a real, private Postfix instance (marker ``postfix``)."""

from __future__ import annotations
