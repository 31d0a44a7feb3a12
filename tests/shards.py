"""Decode-stage input rows for tests that drive the stages without a plan: the row a driver
sends names a shard of a manifest file, so the paths go into a one-shard manifest first."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from tfa_ray.scoring.manifest import SCHEMA


def shard_row(directory: str | os.PathLike, category: str | None, paths: list[str]) -> dict:
    """A one-shard manifest of ``paths`` (in this order) under ``directory``, and the
    decode-stage row that names it."""
    os.makedirs(directory, exist_ok=True)
    url = os.path.join(directory, f"manifest-{len(os.listdir(directory)):03d}.parquet")
    n = len(paths)
    table = pa.table({"path": paths, "category": [category] * n, "shard": [0] * n}, schema=SCHEMA)
    pq.write_table(table, url)
    return {"file": ["f"], "category": [category or ""], "manifest": [url], "shard": [0]}
