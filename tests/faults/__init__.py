"""Fault injection: real processes, real signals, one row per scenario (report.py)."""
