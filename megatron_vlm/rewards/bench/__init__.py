"""Benchmarks of the reward service (scripts that print figures, not tests)."""
