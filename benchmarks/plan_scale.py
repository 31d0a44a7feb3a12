"""Planning and verification of a night with many images: time and driver peak memory.

    python benchmarks/plan_scale.py                    # 10^5, 10^6 and 10^7 paths, one table
    python benchmarks/plan_scale.py --paths 1000000    # one size

No images: a synthetic Parquet manifest of N relative paths (16 categories by the default
``{category}/**`` pattern, in a scrambled order so the plan has to sort), then, each in its own
process so ``ru_maxrss`` is that step's own peak:

* plan: ``load_or_make_plan`` (read the manifest, categories, out-of-core sort and dedup,
  shards, the ``_plan/`` manifest files, the header), with a resolver that finds no model;
* outputs faked the way a finished run leaves them: one output file per shard, one ``ok`` row
  per path (not timed);
* verify: the plan read back, ``verify`` (every path exactly once) and the per-category counts.

Goal: 10^7 paths within 1 GiB of driver memory, time linear in N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from tfa_ray.scoring.config import ScoreConfig

CATEGORIES = 16
BLOCK = 1 << 17  # paths per write = per row group of the input manifest


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_manifest(path: str, n: int) -> None:
    """N paths ``cat-XX/line-Y/<i>.png``, written a block at a time in a scrambled order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    step = 7919 if n % 7919 else 7907  # coprime to n: i -> i * step mod n is a permutation
    with pq.ParquetWriter(path, pa.schema([("path", pa.string())])) as w:
        for start in range(0, n, BLOCK):
            ids = (np.arange(start, min(n, start + BLOCK), dtype=np.int64) * step) % n
            paths = [f"cat-{i % CATEGORIES:02d}/line-{i % 5}/{i:09d}.png" for i in ids.tolist()]
            w.write_table(pa.table({"path": paths}))


def _cfg(workdir: str, shard_size: int):
    from tfa_ray.scoring import ScoreConfig

    return ScoreConfig(
        input=os.path.join(workdir, "night.parquet"),
        output=os.path.join(workdir, "out"),
        run_id="bench",
        shard_size=shard_size,
    )


def _no_registry(category: str, alias: str):
    raise LookupError("benchmark: no registry")


def step_plan(workdir: str, shard_size: int) -> dict:
    from tfa_ray import storage
    from tfa_ray.scoring import run_dir_url
    from tfa_ray.scoring.plan import load_or_make_plan

    cfg = _cfg(workdir, shard_size)
    base = _peak_mib()
    t0 = time.perf_counter()
    run = storage.resolve(run_dir_url(cfg.output, "bench"))
    plan = load_or_make_plan(cfg, "bench", run, _no_registry)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_mib": _peak_mib(),
        "base_mib": base,
        "paths": plan.num_paths,
        "shards": plan.num_shards,
        "files": len(plan.header["manifest"]),
    }


def step_fake_outputs(workdir: str, shard_size: int) -> dict:
    """One output file per shard, one ok row per path, in the output schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tfa_ray import storage
    from tfa_ray.scoring import OUTPUT_SCHEMA, run_dir_url
    from tfa_ray.scoring.contract import shard_file
    from tfa_ray.scoring.manifest import read_manifest, shard_starts
    from tfa_ray.scoring.plan import load_or_make_plan

    cfg = _cfg(workdir, shard_size)
    run_dir = run_dir_url(cfg.output, "bench")
    plan = load_or_make_plan(cfg, "bench", storage.resolve(run_dir), _no_registry)
    for manifest in plan.manifests():
        m = read_manifest(manifest)
        n = m.num_rows
        cols = {f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}
        cols["path"] = m.column("path")
        cols["category"] = m.column("category").dictionary_encode()
        cols["status"] = pa.array(["ok"] * n, pa.string())
        cols["run_id"] = pa.array(["bench"] * n, pa.string()).dictionary_encode()
        table = pa.table(cols, schema=OUTPUT_SCHEMA)
        starts = list(shard_starts(m)) + [n]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            cat, shard = m.column("category")[a].as_py(), m.column("shard")[a].as_py()
            out = os.path.join(run_dir, shard_file(cat, shard))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            pq.write_table(table.slice(a, b - a), out)
    return {}


def step_verify(workdir: str, shard_size: int) -> dict:
    from tfa_ray import storage
    from tfa_ray.scoring import run_dir_url
    from tfa_ray.scoring.plan import load_or_make_plan
    from tfa_ray.scoring.verify import verify

    cfg = _cfg(workdir, shard_size)
    run_dir = run_dir_url(cfg.output, "bench")
    base = _peak_mib()
    t0 = time.perf_counter()
    plan = load_or_make_plan(cfg, "bench", storage.resolve(run_dir), _no_registry)
    counts = verify(plan)
    seconds = time.perf_counter() - t0
    ok = sum(c["ok"] for c in counts.values())
    assert ok == plan.num_paths, (ok, plan.num_paths)
    return {"seconds": seconds, "peak_mib": _peak_mib(), "base_mib": base}


STEPS = {"plan": step_plan, "fake": step_fake_outputs, "verify": step_verify}


def _run_step(step: str, workdir: str, shard_size: int) -> dict:
    """One step in a fresh interpreter: its ``ru_maxrss`` is the step's own peak."""
    cmd = [sys.executable, __file__, "--step", step, "--workdir", workdir]
    cmd += ["--shard-size", str(shard_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(n: int, shard_size: int, root: str) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"plan-{n}-", dir=root)
    try:
        make_manifest(os.path.join(workdir, "night.parquet"), n)
        plan = _run_step("plan", workdir, shard_size)
        _run_step("fake", workdir, shard_size)
        verify = _run_step("verify", workdir, shard_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"paths": n, "plan": plan, "verify": verify}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--paths", type=int, nargs="*", default=[10**5, 10**6, 10**7])
    p.add_argument(
        "--shard-size",
        type=int,
        default=ScoreConfig.shard_size,
        help=f"paths per shard (output file; default {ScoreConfig.shard_size}, the run's default)",
    )
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        print(json.dumps(STEPS[args.step](args.workdir, args.shard_size)))
        return
    root = args.workdir or tempfile.gettempdir()
    print(f"shard size {args.shard_size}; peak = ru_maxrss of the step's own process")
    head = (
        f"{'paths':>12} {'shards':>8} {'files':>5} {'plan s':>8} {'verify s':>9} "
        f"{'s per 1M':>9} {'plan peak MiB':>14} {'verify peak MiB':>16} {'import MiB':>11}"
    )
    print(head)
    for n in args.paths:
        r = measure(n, args.shard_size, root)
        pl, ve = r["plan"], r["verify"]
        per_m = (pl["seconds"] + ve["seconds"]) / (n / 1e6)
        print(
            f"{n:>12,} {pl['shards']:>8,} {pl['files']:>5} {pl['seconds']:>8.1f} "
            f"{ve['seconds']:>9.1f} {per_m:>9.1f} {pl['peak_mib']:>14.0f} "
            f"{ve['peak_mib']:>16.0f} {max(pl['base_mib'], ve['base_mib']):>11.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
