"""Verification of a finished run: every planned path in the output exactly once.

One manifest file at a time: its paths against the output files of its shards, with Arrow
set operations (``is_in``, ``count_distinct``), never a Python list of every path. Manifest
files have disjoint shards and paths, so checking each against its own shards' outputs, plus
no output file outside the plan, checks the whole run.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from tfa_ray import storage
from tfa_ray.scoring.contract import OUTPUT_SCHEMA, TRANSIENT
from tfa_ray.scoring.manifest import read_manifest, shards_of
from tfa_ray.scoring.plan import Plan, listed

COUNT_KEYS = ("total", "ok", "error", "transient", "anomalous")
_COLUMNS = ["path", "category", "status", "error_kind", "is_anomalous"]


def _read_outputs(run: storage.Location, files: list[str]) -> pa.Table:
    if not files:
        return OUTPUT_SCHEMA.empty_table().select(_COLUMNS)
    paths = [f"{run.path.rstrip('/')}/{f}" for f in files]
    dataset = pads.dataset(paths, filesystem=run.fs, format="parquet", schema=OUTPUT_SCHEMA)
    return dataset.to_table(columns=_COLUMNS, use_threads=False)  # one file at a time


def _add_counts(counts: dict[str, dict[str, int]], out: pa.Table) -> None:
    t = pa.table(
        {
            "category": pc.cast(out.column("category"), pa.string()),
            "status": out.column("status"),
            "transient": pc.fill_null(pc.equal(out.column("error_kind"), TRANSIENT), False),
            "anomalous": pc.fill_null(out.column("is_anomalous"), False),
        }
    )
    keys = ["category", "status", "transient", "anomalous"]
    g = t.group_by(keys, use_threads=False).aggregate([("status", "count")])
    for cat, status, transient, anomalous, n in zip(
        *(g.column(k).to_pylist() for k in [*keys, "status_count"]), strict=True
    ):
        c = counts.setdefault(cat or "(none)", dict.fromkeys(COUNT_KEYS, 0))
        c["total"] += n
        c[status] += n
        c["transient"] += n * int(transient)
        c["anomalous"] += n * int(anomalous)


def compare_paths(expected: pa.Array, got: pa.Array) -> tuple[int, int, int]:
    """(missing, unexpected, duplicated) of ``got`` against the distinct paths ``expected``."""
    distinct = pc.unique(got)
    missing = len(expected) - (pc.sum(pc.is_in(expected, value_set=distinct)).as_py() or 0)
    unexpected = len(distinct) - (pc.sum(pc.is_in(distinct, value_set=expected)).as_py() or 0)
    return missing, unexpected, len(got) - len(distinct)


def verify(plan: Plan) -> dict[str, dict[str, int]]:
    """Every planned path exactly once; per-category counts (``transient`` among the errors)."""
    written = listed(plan.run, ".parquet")
    planned: set[str] = set()  # one entry per shard, not per path
    missing = unexpected = duplicated = 0
    counts: dict[str, dict[str, int]] = {}
    for where in plan.manifests():
        manifest = read_manifest(where)
        files = [s["file"] for s in shards_of(manifest)]
        planned.update(files)
        out = _read_outputs(plan.run, [f for f in files if f in written])
        m, u, d = compare_paths(manifest.column("path").combine_chunks(), out.column("path"))
        missing, unexpected, duplicated = missing + m, unexpected + u, duplicated + d
        _add_counts(counts, out)
    stray = sorted(written - planned)
    if stray:  # outputs of no planned shard: their rows are all unexpected
        extra = _read_outputs(plan.run, stray)
        unexpected += extra.num_rows
    if missing or unexpected or duplicated:
        raise RuntimeError(
            f"output of run {plan.run_id} is incomplete or has duplicates: {missing} missing, "
            f"{unexpected} unexpected, {duplicated} duplicated"
        )
    return counts
