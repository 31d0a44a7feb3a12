"""The plan's path manifest: Parquet files under ``<run>/_plan/``, one row per input path.

Columns ``path``, ``category`` (null: the path has no category) and ``shard`` (the shard's
index within its category; the shard's output file is ``contract.shard_file``). Paths are
sorted and deduplicated out of core (sorted runs spilled to a local temp directory, merged a
bounded batch at a time), so planning ten million paths needs the memory of a few batches.
Every shard's rows lie in one file, contiguous, in a row group of their own (statistics on
``category`` and ``shard``): a decode task reads its shard's row group and nothing else, with the
file's footer parsed once per process (:func:`read_shard_paths`). A reader takes a file, or
one shard of it, and never has to look elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tfa_ray import storage
from tfa_ray.scoring.contract import shard_file

PLAN_DIR = "_plan"
SCHEMA = pa.schema([("path", pa.string()), ("category", pa.string()), ("shard", pa.int32())])
ROW_GROUP = 8192  # rows per row group of the sorted runs spilled while planning
FOOTERS = 16  # manifest footers a process keeps parsed (a file's shards are read in order)


@dataclass
class ManifestConfig:
    # Sizes in paths; each bounds a working set of a few times its size x ~100 bytes, small
    # next to a driver that has torch and Ray imported (~0.8 GiB before any work).
    spill_rows: int = 1 << 19  # sorted in memory at once; fewer runs, fewer open readers
    merge_rows: int = 1 << 17  # of all sorted runs held at once while merging
    group_rows: int = 1 << 17  # per manifest file (cut between shards); verified at once


@dataclass
class ManifestStats:
    files: list[str] = field(default_factory=list)  # relative to the run directory
    categories: dict[str | None, dict[str, int]] = field(default_factory=dict)
    num_paths: int = 0


def _spill(tables: Iterable[pa.Table], tmp: str, rows: int) -> list[str]:
    """Sorted runs of at most ``rows`` paths each, as temp Parquet files."""
    runs: list[str] = []
    buf: list[pa.Table] = []
    n = 0

    def flush() -> None:
        t = pa.concat_tables(buf)
        t = t.take(pc.sort_indices(t, [("path", "ascending")]))
        runs.append(os.path.join(tmp, f"run-{len(runs):05d}.parquet"))
        pq.write_table(t, runs[-1], row_group_size=ROW_GROUP)  # the merge reads a group per run
        buf.clear()

    for t in tables:
        buf.append(t)
        n += t.num_rows
        if n >= rows:
            flush()
            n = 0
    if buf:
        flush()
    return runs


def _merge(runs: list[str], merge_rows: int) -> Iterator[pa.Table]:
    """The sorted runs merged, duplicates dropped (the first in run order is kept), a bounded
    chunk at a time: each step takes every buffered row up to the smallest buffered maximum."""
    per_run = max(1024, merge_rows // max(1, len(runs)))
    iters = [pq.ParquetFile(r).iter_batches(per_run, use_threads=False) for r in runs]
    bufs: list[pa.Table] = [SCHEMA.remove(2).empty_table()] * len(runs)

    def refill(i: int) -> bool:
        while bufs[i].num_rows == 0:
            b = next(iters[i], None)
            if b is None:
                return False
            bufs[i] = pa.Table.from_batches([b])
        return True

    live = [i for i in range(len(runs)) if refill(i)]
    last: str | None = None
    while live:
        bound = min(bufs[i].column("path")[-1].as_py() for i in live)
        parts = []
        for i in live:
            t = bufs[i]
            k = pc.sum(pc.less_equal(t.column("path"), bound)).as_py() or 0  # sorted: a prefix
            parts.append(t.slice(0, k))
            bufs[i] = t.slice(k)
        chunk = pa.concat_tables(parts).combine_chunks()
        chunk = chunk.take(pc.sort_indices(chunk, [("path", "ascending")]))  # stable
        paths = chunk.column("path").combine_chunks()
        prev = pa.concat_arrays([pa.array([last], pa.string()), paths.slice(0, len(paths) - 1)])
        keep = pc.fill_null(pc.not_equal(paths, prev), True)
        if len(paths):
            last = paths[-1].as_py()
        yield chunk.filter(keep)
        live = [i for i in live if refill(i)]


def _by_category(t: pa.Table) -> Iterator[tuple[str | None, np.ndarray]]:
    """(category, row indices) for each category in ``t``."""
    cats = t.column("category").combine_chunks()
    for cat in pc.unique(cats).to_pylist():
        mask = pc.is_null(cats) if cat is None else pc.fill_null(pc.equal(cats, cat), False)
        yield cat, np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def shard_starts(rows: pa.Table) -> np.ndarray:
    """Row indices where a new shard begins in rows sorted by category and shard."""
    if not rows.num_rows:
        return np.zeros(0, np.int64)
    codes = pc.dictionary_encode(rows.column("category")).combine_chunks().indices
    key = pc.fill_null(codes, -1).to_numpy().astype(np.int64) << 32
    key |= rows.column("shard").to_numpy().astype(np.int64)
    return np.flatnonzero(np.diff(key, prepend=key[0] - 1))


class _Sharder:
    """Cuts the sorted stream into shards of ``size`` paths per category; hands out a shard's
    rows only once it is complete, so no shard is split between two manifest files."""

    def __init__(self, size: int):
        self.size = size
        self.counts: dict[str | None, int] = {}
        self.held = SCHEMA.empty_table()

    def add(self, chunk: pa.Table, final: bool = False) -> pa.Table:
        shard = np.zeros(len(chunk), np.int32)
        for cat, idx in _by_category(chunk):
            start = self.counts.get(cat, 0)
            shard[idx] = (start + np.arange(len(idx))) // self.size
            self.counts[cat] = start + len(idx)
        chunk = chunk.append_column("shard", pa.array(shard, pa.int32())).cast(SCHEMA)
        rows = pa.concat_tables([self.held, chunk]).combine_chunks()
        done = np.full(len(rows), final)
        if not final:  # complete shards: those of a category below its count // size
            shards = rows.column("shard").to_numpy()
            for cat, idx in _by_category(rows):
                done[idx] = shards[idx] < self.counts[cat] // self.size
        out, self.held = rows.filter(done), rows.filter(~done)
        keys = [("category", "ascending", "at_end"), ("shard", "ascending", "at_end")]
        return out.take(pc.sort_indices(out, keys))  # stable


def _write_shards(writer: pq.ParquetWriter, rows: pa.Table, size: int) -> None:
    """Whole shards (sorted by category and shard), one row group each: a category's run of
    rows starts at a shard and its shards are full but for its last, so ``size`` rows a group
    cut from the start of each run fall on the shard boundaries."""
    codes = pc.dictionary_encode(rows.column("category")).combine_chunks().indices
    codes = pc.fill_null(codes, -1).to_numpy()
    bounds = [*(np.flatnonzero(np.diff(codes)) + 1).tolist(), rows.num_rows]
    start = 0
    for end in bounds:
        if end > start:
            writer.write_table(rows.slice(start, end - start), row_group_size=size)
        start = end


def write_manifest(
    entries: Iterable[pa.Table],
    run: storage.Location,
    shard_size: int,
    cfg: ManifestConfig | None = None,
) -> ManifestStats:
    """Sort, deduplicate and shard ``entries`` (tables of ``path``, ``category``) into the
    manifest files under ``<run>/_plan/``."""
    cfg = cfg or ManifestConfig()
    stats = ManifestStats()
    sharder = _Sharder(max(1, int(shard_size)))
    with tempfile.TemporaryDirectory(prefix="tfa-plan-") as tmp:
        runs = _spill(entries, tmp, cfg.spill_rows)
        writer: pq.ParquetWriter | None = None
        written = 0

        def emit(rows: pa.Table) -> None:
            """Write ``rows`` (whole shards), starting a new file at a shard boundary once a
            file holds ``group_rows`` paths."""
            nonlocal writer, written
            ends = np.append(shard_starts(rows)[1:], rows.num_rows)
            pos = 0
            while pos < rows.num_rows:
                fit = ends[(ends > pos) & (ends <= pos + cfg.group_rows - written)]
                if not len(fit) and written:
                    close()
                    continue
                end = int(fit[-1]) if len(fit) else int(ends[ends > pos][0])
                if writer is None:
                    stats.files.append(f"{PLAN_DIR}/part-{len(stats.files):05d}.parquet")
                    local = os.path.join(tmp, "manifest.parquet")
                    writer = pq.ParquetWriter(
                        local, SCHEMA, compression="zstd", write_statistics=["category", "shard"]
                    )
                _write_shards(writer, rows.slice(pos, end - pos), sharder.size)
                written += end - pos
                pos = end
                if written >= cfg.group_rows:
                    close()

        def close() -> None:
            nonlocal writer, written
            if writer is not None:
                writer.close()
                local = os.path.join(tmp, "manifest.parquet")  # atomic: never half a file
                run.join(stats.files[-1]).put_file(local)
                writer, written = None, 0

        for chunk in _merge(runs, cfg.merge_rows):
            emit(sharder.add(chunk))
        emit(sharder.add(SCHEMA.remove(2).empty_table(), final=True))
        close()
    for cat, n in sharder.counts.items():
        stats.categories[cat] = {"paths": n, "shards": -(-n // sharder.size)}
        stats.num_paths += n
    return stats


def shards_of(manifest: pa.Table) -> list[dict]:
    """The shards in a manifest table: file, category, shard index, rows (no paths)."""
    counts = manifest.group_by(["category", "shard"], use_threads=False).aggregate(
        [("shard", "count")]
    )
    return [
        {"file": shard_file(c, s), "category": c, "shard": s, "rows": n}
        for c, s, n in zip(*(counts.column(i).to_pylist() for i in range(3)), strict=True)
    ]


def read_shards(manifest: storage.Location) -> list[dict]:
    """The shards of one manifest file (its category and shard columns only)."""
    with manifest.open() as f:
        return shards_of(pq.read_table(f, columns=["category", "shard"]))


_footers: OrderedDict[tuple[str, int], pq.FileMetaData] = OrderedDict()


def _may_hold(group: pq.RowGroupMetaData, category: str | None, shard: int) -> bool:
    """Whether a row group's statistics admit the shard (no statistics: it may)."""
    cat, idx = group.column(1).statistics, group.column(2).statistics
    if cat is not None and cat.has_null_count and category is None and not cat.null_count:
        return False
    if cat is not None and cat.has_min_max and category is not None:
        if not cat.min <= category <= cat.max:
            return False
    return idx is None or not idx.has_min_max or idx.min <= shard <= idx.max


def read_shard_paths(manifest: storage.Location, category: str | None, shard: int) -> list[str]:
    """One shard's paths, read from its manifest file: its own row group only, found by the
    row groups' statistics in the footer, which is parsed once per file and process (keyed by
    the file's size too, so a manifest rewritten by a re-planned run is parsed again)."""
    with manifest.open() as f:
        key = (manifest.url, int(getattr(f, "size", None) or manifest.fs.size(manifest.path)))
        pf = pq.ParquetFile(f, metadata=_footers.get(key))
        _footers[key] = meta = pf.metadata
        _footers.move_to_end(key)
        while len(_footers) > FOOTERS:
            _footers.popitem(last=False)
        groups = [
            i for i in range(meta.num_row_groups) if _may_hold(meta.row_group(i), category, shard)
        ]
        rows = pf.read_row_groups(groups, columns=["path", "category", "shard"])
    cat = rows.column("category")
    keep = pc.and_(
        pc.is_null(cat) if category is None else pc.fill_null(pc.equal(cat, category), False),
        pc.equal(rows.column("shard"), int(shard)),
    )
    return rows.filter(keep).column("path").to_pylist()


def read_manifest(manifest: storage.Location) -> pa.Table:
    """A whole manifest file (bounded: ``ManifestConfig.group_rows`` paths plus one emission)."""
    with manifest.open() as f:
        return pq.read_table(f)
