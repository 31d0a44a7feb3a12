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
images per second, and the steady rate: (N - n) / (t_N - t_n) from a run of all N images and
one of a single shard's n, which share the fixed start and finish (actor start, model load,
plan, verification), so the rate of a long night; divided by the cores Ray had: ``per core``,
what one core of a GPU node sustains. Only two things are stand-ins:
the model's forward pass (maps of the model's size with a fixed blob, so masks are not empty) and,
on the encoded path, the device's JPEG decode (nvjpeg's work is the GPU's, not the CPUs').

* ``cpu decode``: decode tasks decode and resize every image; pixels travel to the scorer;
* ``encoded``: decode tasks read the file and check the JPEG header; the encoded bytes travel.

Per stage, each alone in this process on one core (median of ``--repeats``): read the file,
full decode + resize, header check, the scorer's host work for one image (parse the shard,
pixels to the device), and the writer's work per image with masks at map resolution, with heat
maps too, and with masks at the image's full resolution.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

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


def stand_in_scorer():
    from tfa_ray.scoring import ShardScorer

    class StandInScorer(ShardScorer):
        decode_jpegs = staticmethod(stand_in_decode)

        def load(self, category):
            name, version, model = super().load(category)
            return name, version, StandInModel(model)

    return StandInScorer


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
    import torch

    from tfa_ray import storage
    from tfa_ray.data import MAX_PIXELS
    from tfa_ray.scoring import LocalResolver
    from tfa_ray.scoring.decode import decode_array, decode_shard, jpeg_header
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
    shard = {"file": ["f"], "category": ["line"], "paths": [json.dumps(sample)]}
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
    out_dir = os.path.join(workdir, "stage-write")
    for label, heat, full in (
        ("write: masks at map resolution", False, False),
        ("write: masks + heat maps at map resolution", True, False),
        ("write: masks at full resolution (--full-res-masks)", False, True),
    ):
        batch = {k: list(v) for k, v in scored.items()}
        batch["file"] = [f"part-{label[:12]}.parquet"]

        def write(b, heat=heat, full=full):
            write_shard(b, out_dir, "bench", heat, None, full_res=full)

        rows.append((label, _per_second(write, [batch], repeats) * len(sample)))
        assert json.loads(cell(batch, "items"))[0]["status"] == "ok"
    return rows


# ------------------------------------------------------------------------- end to end


def end_to_end(
    root: str, paths: list[str], model_dir: str, shard: int, encoded: bool, workdir: str
):
    """(run images/s, steady images/s, wall s): ``score`` on all of ``paths``, and on one shard's
    worth of them (same fixed costs: actor start, model load, plan, verification); the steady
    rate is the difference of the two, the rate of a long night."""
    from tfa_ray import scoring

    def run(n: int) -> float:
        src = os.path.join(workdir, f"input-{os.path.basename(root)}-{n}")
        if not os.path.isdir(src):  # the first n images, linked, as an input prefix
            os.makedirs(os.path.join(src, "line"))
            for p in paths[:n]:
                os.link(p, os.path.join(src, "line", os.path.basename(p)))
        out = os.path.join(workdir, "out")
        shutil.rmtree(out, ignore_errors=True)
        cfg = scoring.ScoreConfig(
            input=src,
            output=out,
            category="line",
            shard_size=shard,
            gpu_decode="on" if encoded else "off",
            run_id=f"feed-{n}-{shard}-{int(encoded)}",
        )
        stages = scoring.Stages(scorer=stand_in_scorer())
        resolver = scoring.LocalResolver({"line": model_dir})
        t = time.perf_counter()
        summary = scoring.score(cfg, resolver, echo=lambda _m: None, stages=stages)
        wall = time.perf_counter() - t
        assert summary.total == n and summary.ok == n, summary  # every image, exactly once
        return wall

    n = len(paths)
    one, wall = run(min(shard, n // 2)), run(n)
    return n / wall, (n - min(shard, n // 2)) / max(wall - one, 1e-9), wall


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

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scoring import make_model  # the benchmark package of benchmarks/scoring.py

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
        f"{'path':<12} {'shard':>6} {'run img/s':>10} {'steady img/s':>13} {'per core':>9} "
        f"{'wall s':>7}",
        flush=True,
    )
    try:
        for encoded in (True, False):
            for shard in (int(s) for s in args.shard_sizes.split(",")):
                ips, steady, wall = end_to_end(root, paths, model_dir, shard, encoded, args.workdir)
                path = "encoded" if encoded else "cpu decode"
                print(
                    f"{path:<12} {shard:>6} {ips:>10.1f} {steady:>13.1f} {steady / cores:>9.1f} "
                    f"{wall:>7.1f}",
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
