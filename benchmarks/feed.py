"""The CPU ceiling of a scoring node: what its CPUs can feed a GPU, with the model's forward
pass (and the GPU's own JPEG decode) replaced by stand-ins that answer at once.

    python benchmarks/feed.py                      # 2,048 5-MP JPEGs, shards 64/256/1024
    python benchmarks/feed.py --num-images 512 --shard-sizes 64
    python benchmarks/feed.py --num-images 16 --shard-sizes 4 --width 320 --height 256  # toy size

The archive: line-camera images of ``--width`` x ``--height`` (default 2448 x 2048, 5 MP), half
grey and half RGB JPEGs (quality 92, a procedural surface with sensor noise, about a megabyte
each), made once under ``--workdir`` and reused (64 distinct images, hard-linked to the rest:
the pipeline reads every file).

End to end, for each path and shard size: ``tfa_ray.scoring.score`` on local Ray with every core
(listing, plan, decode tasks, scorer actors, writer, the exactly-once check): the whole run's
images per second and wall time, and the CPU time each stage's processes spent per image (all
their threads, Ray's block conversions and object transfers included; their start-up, imports
and the model load left out, as on a long night). ``img/s per core`` = 1 / (the three stages'
CPU seconds per image): what one core of a GPU node sustains, whatever the machine's load.
Only two things are stand-ins: the model's forward pass (maps of the model's size with a fixed
blob, so masks are not empty) and, on the encoded path, the device's JPEG decode (nvjpeg's
work is the GPU's, not the CPUs').

* ``cpu decode``: decode tasks decode and resize every image; pixels travel to the scorer;
* ``encoded``: decode tasks read the file and check the JPEG header; the encoded bytes travel.

Per stage, each alone in this process on one core (median of ``--repeats``): read the file,
full decode + resize, header check, the scorer's host work for one image (parse the shard,
pixels to the device), and the writer's work per image with masks at map resolution, with heat
maps too, and with masks at the image's full resolution.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/feed.py`: the repo root on the path, for
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*`

import numpy as np
from PIL import Image

DISTINCT = 64


def make_archive(root: str, n: int, width: int, height: int) -> list[str]:
    """``n`` JPEGs under ``root/line/``: ``DISTINCT`` made, the rest hard links to them."""
    d = os.path.join(root, "line")
    if os.path.isdir(d) and len(os.listdir(d)) == n:
        return sorted(os.path.join(d, f) for f in os.listdir(d))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    from tfa_ray.synth import make_image

    made = []
    for i in range(min(n, DISTINCT)):
        rng = np.random.default_rng(i)
        base = Image.fromarray(make_image("texture", 512, rng)).resize((width, height))
        arr = np.asarray(base, dtype=np.float32) + rng.normal(0, 4, (height, width, 1))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        if i % 2 == 0:
            img = img.convert("L")  # half the line's cameras are monochrome
        path = os.path.join(d, f"{i:06d}.jpg")
        img.save(path, format="JPEG", quality=92)
        made.append(path)
    for i in range(len(made), n):
        os.link(made[i % len(made)], os.path.join(d, f"{i:06d}.jpg"))
    return sorted(os.path.join(d, f) for f in os.listdir(d))


# ------------------------------------------------------------------------- the stand-ins


class StandInModel:
    """Answers like a TFAModel, at once: maps with a fixed blob, scores from the pixels."""

    def __init__(self, model):
        import torch

        self.detector = model.detector  # for the scorer's model cache, which sizes it
        self.calibration, self.image_size = model.calibration, model.image_size
        s = self.image_size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        blob = torch.exp(-((yy - s * 0.4) ** 2 + (xx - s * 0.6) ** 2) / (2 * (s * 0.05) ** 2))
        low, high = model.calibration.map_low, model.calibration.map_high
        self.map = (low + blob * 4 * (high - low)).float()

    def predict(self, x):
        b = x.shape[0]
        return self.map.to(x.device).expand(b, -1, -1), x.mean(dim=(1, 2, 3))


def stand_in_decode(datas: list[bytes], size: int, device) -> list:
    """The device's JPEG decode, stood in: nvjpeg's work is the GPU's."""
    import torch

    return [torch.zeros((3, size, size), dtype=torch.uint8, device=device) for _ in datas]


def stand_in_scorer(log: str | None = None):
    from tfa_ray.scoring import ShardScorer

    class StandInScorer(ShardScorer):
        decode_jpegs = staticmethod(stand_in_decode)

        def load(self, category):
            name, version, model = super().load(category)
            return name, version, StandInModel(model)

        def __call__(self, batch):
            return _cpu_logged("score", log, super().__call__, batch)

    return StandInScorer


def _cpu_logged(stage: str, log: str | None, fn, batch, **kwargs):
    """``fn(batch)``, noting the process's CPU time before and after and the images: all of
    the process's threads (the prefetch thread, Ray's own transfers), not only this call's."""
    t0 = time.process_time()
    out = fn(batch, **kwargs)
    if log:
        if "items" in out:  # decode and score: one JSON list of items per shard
            images = sum(len(json.loads(items)) for items in out["items"])
        else:  # write: the shard's counts
            images = sum(int(n) for n in out["rows"])
        with open(log, "a") as f:
            f.write(f"{stage} {os.getpid()} {t0} {time.process_time()} {images}\n")
    return out


def decode_logged(batch, log: str, **kwargs):
    from tfa_ray.scoring import decode_shard

    return _cpu_logged("decode", log, decode_shard, batch, **kwargs)


def write_logged(batch, log: str, **kwargs):
    from tfa_ray.scoring import write_shard

    return _cpu_logged("write", log, write_shard, batch, **kwargs)


def cpu_per_image(log: str) -> dict[str, float]:
    """CPU seconds per image of each stage: per process, its CPU time from the end of its first
    call to the end of its last, over the images of its later calls (the first call pays the
    process's one-time costs: lazy imports, the model load; a process called once counts
    whole), summed over the stage's processes."""
    calls: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for line in open(log):
        stage, pid, t0, t1, n = line.split()
        calls.setdefault((stage, pid), []).append((float(t0), float(t1), int(n)))
    out: dict[str, list[float]] = {}
    for (stage, _), cs in calls.items():
        cs.sort()
        start, later = (cs[0][1], cs[1:]) if len(cs) > 1 else (cs[0][0], cs)
        acc = out.setdefault(stage, [0.0, 0.0])
        acc[0] += later[-1][1] - start
        acc[1] += sum(n for _, _, n in later)
    return {stage: cpu / max(n, 1) for stage, (cpu, n) in out.items()}


# ------------------------------------------------------------------------- per stage


def _per_second(fn, items: list, repeats: int) -> float:
    """Items per second of ``fn`` over ``items`` on one core (median of ``repeats``)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for it in items:
            fn(it)
        rates.append(len(items) / (time.perf_counter() - t))
    return statistics.median(rates)


def stage_rows(paths: list[str], model_dir: str, size: int, repeats: int, workdir: str) -> list:
    import pyarrow as pa
    import torch

    from tfa_ray import storage
    from tfa_ray.data import MAX_PIXELS
    from tfa_ray.scoring import LocalResolver
    from tfa_ray.scoring.decode import decode_array, decode_shard, jpeg_header
    from tfa_ray.scoring.manifest import write_manifest
    from tfa_ray.scoring.shard import cell
    from tfa_ray.scoring.write import write_shard

    torch.set_num_threads(1)
    sample = paths[: min(len(paths), 16)]
    datas = [storage.read_bytes(p) for p in sample]
    rows = [
        ("read the file", _per_second(storage.read_bytes, sample, repeats)),
        (
            "full decode + resize (cpu decode)",
            _per_second(lambda d: decode_array(d, size, MAX_PIXELS), datas, repeats),
        ),
        ("header check (encoded)", _per_second(lambda d: jpeg_header(d, MAX_PIXELS), datas, 3)),
    ]
    models = {"line": {"name": "tfa-line", "version": 1, "image_size": size}}
    scorer = stand_in_scorer()(LocalResolver({"line": model_dir}), device="cpu", num_threads=1)
    plan = storage.resolve(os.path.join(workdir, "stage-plan"))  # the decode stage reads a shard
    table = pa.table({"path": sample, "category": ["line"] * len(sample)})
    manifest = plan.join(write_manifest([table], plan, len(sample)).files[0]).url
    shard = {"file": ["f"], "category": ["line"], "manifest": [manifest], "shard": [0]}
    for label, gpu in (("cpu decode", False), ("encoded", True)):
        batch = decode_shard(shard, models, MAX_PIXELS, None, gpu_decode=gpu)
        n = len(sample)
        rows.append(
            (
                f"scorer host work: parse + to device ({label})",
                _per_second(lambda b: scorer._pixels(scorer._host(b, 0)), [batch], repeats) * n,
            )
        )
    scored = scorer(decode_shard(shard, models, MAX_PIXELS, None, gpu_decode=True))
    out_dir = storage.resolve(os.path.join(workdir, "stage-write"))
    for label, heat, full in (
        ("write: masks at map resolution", False, False),
        ("write: masks + heat maps at map resolution", True, False),
        ("write: masks at full resolution (--full-res-masks)", False, True),
    ):
        batch = {k: list(v) for k, v in scored.items()}
        batch["file"] = [f"part-{label[:12]}.parquet"]

        def write(b, heat=heat, full=full):
            write_shard(b, out_dir, "bench", heat, full_res=full)

        rows.append((label, _per_second(write, [batch], repeats) * len(sample)))
        assert json.loads(cell(batch, "items"))[0]["status"] == "ok"
    return rows


# ------------------------------------------------------------------------- end to end


def end_to_end(archive: str, n: int, model_dir: str, shard: int, encoded: bool, workdir: str):
    """(images/s of the whole run, wall s, CPU s per image per stage) of ``score`` on the
    archive, the stages' CPU time noted by each stage's processes."""
    from tfa_ray import scoring

    log = os.path.join(workdir, f"cpu-{shard}-{int(encoded)}.txt")
    if os.path.exists(log):
        os.remove(log)
    out = os.path.join(workdir, "out")
    shutil.rmtree(out, ignore_errors=True)
    cfg = scoring.ScoreConfig(
        input=archive,
        output=out,
        category="line",
        shard_size=shard,
        gpu_decode="on" if encoded else "off",
        run_id=f"feed-{shard}-{int(encoded)}",
    )
    stages = scoring.Stages(
        decode=functools.partial(decode_logged, log=log),
        scorer=stand_in_scorer(log),
        write=functools.partial(write_logged, log=log),
    )
    t = time.perf_counter()
    resolver = scoring.LocalResolver({"line": model_dir})
    summary = scoring.score(cfg, resolver, echo=lambda _m: None, stages=stages)
    wall = time.perf_counter() - t
    assert summary.total == n and summary.ok == n, summary  # every image, exactly once
    return n / wall, wall, cpu_per_image(log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--width", type=int, default=2448)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--shard-sizes", default="64,256,1024")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="local Ray CPUs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tfa-bench-feed"))
    args = p.parse_args()

    import ray
    import torch

    from benchmarks.scoring import make_model

    os.makedirs(args.workdir, exist_ok=True)
    t = time.perf_counter()
    root = os.path.join(args.workdir, f"archive-{args.width}x{args.height}-{args.num_images}")
    paths = make_archive(root, args.num_images, args.width, args.height)
    mb = statistics.median(os.path.getsize(p) for p in paths[:DISTINCT]) / 1e6
    print(f"archive: {len(paths)} JPEGs ({mb:.2f} MB median) in {time.perf_counter() - t:.0f}s")
    model_dir = make_model(os.path.join(args.workdir, "model-cpu-small"), "cpu-small")
    from tfa_ray.package import load_model

    size = load_model(model_dir).image_size

    print(f"\nper stage, one core, images/s (median of {args.repeats}):", flush=True)
    for label, ips in stage_rows(paths, model_dir, size, args.repeats, args.workdir):
        print(f"{label:<54} {ips:>9.1f}", flush=True)

    torch.set_num_threads(1)  # the driver does little; leave the cores to the pipeline
    ray.init(  # a cluster of its own, never one that happens to run on the machine
        address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
    )
    cores = args.num_cpus
    print(f"\nend to end on {cores} CPU core(s), forward pass stood in:")
    print(
        f"{'path':<12} {'shard':>6} {'run img/s':>10} {'wall s':>7} | CPU ms/image: "
        f"{'decode':>7} {'score':>7} {'write':>7} {'all':>7} | {'img/s per core':>14}",
        flush=True,
    )
    try:
        for encoded in (True, False):
            for shard in (int(s) for s in args.shard_sizes.split(",")):
                ips, wall, cpu = end_to_end(
                    root, len(paths), model_dir, shard, encoded, args.workdir
                )
                ms = {k: 1e3 * cpu.get(k, float("nan")) for k in ("decode", "score", "write")}
                total = sum(ms.values())
                print(
                    f"{'encoded' if encoded else 'cpu decode':<12} {shard:>6} {ips:>10.1f} "
                    f"{wall:>7.1f} | {'':13} {ms['decode']:>7.2f} {ms['score']:>7.2f} "
                    f"{ms['write']:>7.2f} {total:>7.2f} | {1e3 / total:>14.1f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    print(
        f"\n{len(paths)} JPEGs {args.width} x {args.height} (half grey, half RGB), model input "
        f"{size} px, masks at map resolution unless noted"
    )


if __name__ == "__main__":
    main()
