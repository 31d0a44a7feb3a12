"""The plan at scale, without Ray: paths sorted and sharded out of core into several manifest
files, read back unchanged by a rerun, and verification that streams one manifest at a time."""

from __future__ import annotations

import os
import random

import pyarrow.parquet as pq
import pytest

from tfa_ray import storage
from tfa_ray.scoring import ScoreConfig, read_results, run_dir_url
from tfa_ray.scoring.contract import to_table
from tfa_ray.scoring.listing import iter_prefix
from tfa_ray.scoring.manifest import ManifestConfig, read_shard_paths
from tfa_ray.scoring.plan import load_or_make_plan
from tfa_ray.scoring.verify import verify

SMALL = ManifestConfig(spill_rows=300, merge_rows=256, group_rows=200)  # many runs and files
CATS = ("bolt", "cable", "nut")


def _no_registry(category: str, alias: str):
    raise LookupError(f"no model for {category} in this test")


def _manifest(tmp_path, n: int = 2000) -> tuple[str, set[str]]:
    """A shuffled text manifest: ``n`` paths in three categories, some without a category
    (a file at the root), and every 50th path named twice."""
    rng = random.Random(0)
    paths = [f"{CATS[i % 3]}/line-{i % 7}/{i:06d}.png" for i in range(n)]
    paths += [f"loose-{i}.png" for i in range(10)]
    names = paths + paths[::50]
    rng.shuffle(names)
    (tmp_path / "night.txt").write_text("\n".join(names) + "\n")
    return str(tmp_path / "night.txt"), {f"{tmp_path}/{p}" for p in paths}


def _plan(tmp_path, inp: str, run_id: str, manifest: ManifestConfig, shard_size: int = 7):
    cfg = ScoreConfig(input=inp, output=str(tmp_path / "out"), run_id=run_id, shard_size=shard_size)
    run_dir = run_dir_url(cfg.output, run_id)
    return load_or_make_plan(cfg, run_id, storage.resolve(run_dir), _no_registry, manifest), run_dir


def _shards(plan) -> list[tuple[str, int, tuple[str, ...]]]:
    out = []
    for s in plan.shards():
        paths = read_shard_paths(storage.resolve(s["manifest"]), s["category"], s["shard"])
        assert len(paths) == s["rows"]
        out.append((s["file"], s["rows"], tuple(paths)))
    return sorted(out)


def test_plan_spans_several_manifest_files_and_a_rerun_reads_it_back(tmp_path):
    inp, expected = _manifest(tmp_path)
    plan, run_dir = _plan(tmp_path, inp, "night", SMALL)
    assert len(plan.header["manifest"]) > 3 and plan.num_paths == len(expected)
    shards = _shards(plan)
    assert len(shards) == plan.num_shards
    all_paths = [p for _, _, paths in shards for p in paths]
    assert len(all_paths) == len(set(all_paths)) and set(all_paths) == expected  # exactly once
    for file, rows, paths in shards:
        cat = file.split("/")[0].removeprefix("category=")
        if cat == "__HIVE_DEFAULT_PARTITION__":
            assert all("/loose-" in p for p in paths)
        else:
            assert all(p.startswith(f"{tmp_path}/{cat}/") for p in paths)
        assert list(paths) == sorted(paths) and rows <= 7
    per_cat = {c: n for c, n, _ in plan.header["categories"]}
    assert per_cat == {"bolt": 667, "cable": 667, "nut": 666, None: 10}
    # a shard lies in one manifest file: no file name appears in two of them
    files = [(s["file"], s["manifest"]) for s in plan.shards()]
    assert len({f for f, _ in files}) == len(files)

    before = {u: pq.read_metadata(u).num_rows for u in plan.manifest_urls()}
    (tmp_path / "night.txt").write_text("bolt/other.png\n")  # the rerun must not list again
    rerun, _ = _plan(tmp_path, inp, "night", ManifestConfig())
    assert _shards(rerun) == shards
    assert {u: pq.read_metadata(u).num_rows for u in rerun.manifest_urls()} == before


def test_shards_do_not_depend_on_how_the_sort_was_chunked(tmp_path):
    inp, _ = _manifest(tmp_path, 700)
    chunked, _ = _plan(tmp_path, inp, "chunked", SMALL, shard_size=5)
    whole, _ = _plan(tmp_path, inp, "whole", ManifestConfig(), shard_size=5)
    assert len(whole.header["manifest"]) == 1 < len(chunked.header["manifest"])
    assert _shards(chunked) == _shards(whole)


def test_a_shard_is_one_row_group_and_its_reader_reads_only_that(tmp_path, monkeypatch):
    inp, _ = _manifest(tmp_path, 700)
    plan, _ = _plan(tmp_path, inp, "groups", SMALL, shard_size=5)
    groups = 0
    for url in plan.manifest_urls():
        t = pq.ParquetFile(url)
        for i in range(t.metadata.num_row_groups):
            g = t.read_row_group(i)
            cats, shards = g.column("category").to_pylist(), g.column("shard").to_pylist()
            keys = set(zip(cats, shards, strict=True))
            assert len(keys) == 1, (url, i, keys)  # exactly one shard in the group
            groups += 1
    assert groups == plan.num_shards

    read: list[list[int]] = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_groups",
        lambda self, row_groups, **kw: (
            read.append(list(row_groups)) or original(self, row_groups, **kw)
        ),
    )
    shards = list(plan.shards())
    for s in shards:
        paths = read_shard_paths(storage.resolve(s["manifest"]), s["category"], s["shard"])
        assert len(paths) == s["rows"]
    assert all(len(groups) == 1 for groups in read) and len(read) == len(shards)


def _fake_outputs(plan, run_dir: str, drop: str | None = None, twice: str | None = None) -> None:
    """Output files the way a finished run leaves them: one ok row per planned path."""
    for s in plan.shards():
        paths = read_shard_paths(storage.resolve(s["manifest"]), s["category"], s["shard"])
        paths = [p for p in paths if p != drop] + [p for p in paths if p == twice]
        n = len(paths)
        table = to_table({"path": paths, "category": [s["category"]] * n, "status": ["ok"] * n})
        os.makedirs(os.path.dirname(f"{run_dir}/{s['file']}"), exist_ok=True)
        pq.write_table(table, f"{run_dir}/{s['file']}")


def test_verify_streams_and_catches_a_missing_and_a_duplicated_path(tmp_path, monkeypatch):
    import tfa_ray.scoring.verify as v

    inp, expected = _manifest(tmp_path)
    plan, run_dir = _plan(tmp_path, inp, "night", SMALL)
    _fake_outputs(plan, run_dir)
    seen: list[int] = []
    read = v._read_outputs
    monkeypatch.setattr(v, "_read_outputs", lambda *a: seen.append(len(t := read(*a))) or t)
    counts = verify(plan)
    assert {c: n["ok"] for c, n in counts.items()} == {
        "bolt": 667,
        "cable": 667,
        "nut": 666,
        "(none)": 10,
    }
    # one manifest file's outputs at a time, never the whole run's paths
    assert sum(seen) == len(expected) and max(seen) < 300
    assert read_results(run_dir, columns=["path"]).num_rows == len(expected)  # _plan/ unread

    victim = sorted(expected)[123]
    _fake_outputs(plan, run_dir, drop=victim)
    with pytest.raises(RuntimeError, match="1 missing, 0 unexpected, 0 duplicated"):
        verify(plan)
    _fake_outputs(plan, run_dir, twice=victim)
    with pytest.raises(RuntimeError, match="0 missing, 0 unexpected, 1 duplicated"):
        verify(plan)
    # a path in the output of a shard it was not planned for, and a file of no planned shard
    _fake_outputs(plan, run_dir)
    pq.write_table(
        to_table({"path": [victim], "category": ["bolt"], "status": ["ok"]}),
        f"{run_dir}/category=bolt/part-99999.parquet",
    )
    with pytest.raises(RuntimeError, match="0 missing, 1 unexpected"):
        verify(plan)


def test_prefix_listing_in_parallel_batches(tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    want = set()
    for d in range(5):
        for i in range(30):
            mem.pipe_file(f"/night/d{d}/sub/{i}.png", b"x")
            want.add(f"memory:///night/d{d}/sub/{i}.png")
    mem.pipe_file("/night/top.jpg", b"x")
    mem.pipe_file("/night/.hidden/a.png", b"x")
    mem.pipe_file("/night/d0/notes.txt", b"x")
    want.add("memory:///night/top.jpg")
    batches = list(iter_prefix(storage.resolve("memory:///night"), threads=2))
    assert {p for b in batches for p in b} == want
    assert sum(len(b) for b in batches) == len(want)
    local = tmp_path / "in" / "bolt"
    local.mkdir(parents=True)
    for i in range(3):
        (local / f"{i}.png").write_bytes(b"x")
    (local / ".x.png").write_bytes(b"x")
    assert sorted(p for b in iter_prefix(storage.resolve(str(tmp_path / "in"))) for p in b) == [
        f"{local}/{i}.png" for i in range(3)
    ]
