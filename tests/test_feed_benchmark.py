"""benchmarks/feed.py at toy size, so the benchmark the README names cannot rot: it runs the
real pipeline with the forward pass stood in, every image exactly once, and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.services
def test_feed_benchmark_runs_at_toy_size(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "feed.py"),
            "--num-images",
            "12",
            "--shard-sizes",
            "4",
            "--width",
            "320",
            "--height",
            "256",
            "--repeats",
            "1",
            "--num-cpus",
            "2",
            "--workdir",
            str(tmp_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    for path in ("encoded", "cpu decode"):
        row = re.search(
            rf"^{path}\s+4\s+([\d.]+)\s+([\d.]+) \|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
            r"([\d.]+) \|\s+([\d.]+)$",
            table,
            re.M,
        )
        assert row, table  # every stage's CPU time was noted (no nan) and adds up
        run, wall, decode, score, write, total, per_core = (float(v) for v in row.groups())
        assert min(run, wall, decode, score, write) > 0
        assert total == pytest.approx(decode + score + write, abs=0.02)
        assert per_core == pytest.approx(1e3 / total, rel=0.01)
    for stage in ("read the file", "header check", "write: masks at map resolution"):
        assert re.search(rf"^{re.escape(stage)}.*\s([\d.]+)$", table, re.M), table
