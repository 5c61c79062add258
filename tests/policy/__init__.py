"""Tests of the pure decision policy."""
