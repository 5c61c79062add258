"""Checks of the container image (docker/Dockerfile); the build-and-run test is opt-in."""

from __future__ import annotations
