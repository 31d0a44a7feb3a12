"""Reproducible accuracy and speed measurements, each printing one table.

Run one from the repository root as ``python benchmarks/<name>.py`` (or ``python -m
benchmarks.<name>``); a benchmark imports its siblings one way, as ``benchmarks.<name>``
(a script run by path puts the repository root on ``sys.path`` first for that).
"""
