"""Batch scoring throughput: model only vs the whole Ray Data pipeline (local folder, moto S3).

    python benchmarks/scoring.py                      # 2,000 images, CPU preset, local + S3
    python benchmarks/scoring.py --num-images 200     # a quick look
    python benchmarks/scoring.py --no-s3

The archive: PNG and JPEG images (half each) of random sizes from 256 x 256 to 1024 x 1024,
procedural textures, written once to ``--workdir`` and reused. The model: a CPU-preset
(``cpu-small``) package with the real offline backbone and an untrained TFA-Net (throughput
does not depend on the weights' values).

* model only: ``TFAModel.predict`` on already decoded (B, 3, S, S) tensors, with as many torch
  threads as one scorer actor gets (``--num-cpus-per-actor``): the ceiling the pipeline can
  reach with one actor;
* pipeline: ``tfa_ray.scoring.score`` end to end (listing, reading, decoding, resizing,
  scoring, mask encoding, Parquet writing, the exactly-once check), wall time from the call to
  its return, with the actor pool already started out of the timing only where noted;
* ratio: pipeline / model only (target >= 0.7);
* scorer actor peak memory: the largest ``ru_maxrss`` any scorer actor reported.

The S3 run starts moto's server on 127.0.0.1 (nothing leaves the machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from tfa_ray.config import PRECISIONS


def make_archive(root: str, n: int, seed: int = 0) -> list[str]:
    from tfa_ray.synth import make_image

    d = os.path.join(root, "texture")
    os.makedirs(d, exist_ok=True)
    existing = sorted(os.listdir(d))
    if len(existing) == n:
        return [os.path.join(d, f) for f in existing]
    shutil.rmtree(d)
    os.makedirs(d)
    rng = np.random.default_rng(seed)
    base = [make_image("texture", 256, np.random.default_rng(i)) for i in range(16)]
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 1025, size=2))
        img = Image.fromarray(base[i % len(base)]).resize((w, h), Image.Resampling.BILINEAR)
        ext = "png" if i % 2 == 0 else "jpg"
        path = os.path.join(d, f"{i:05d}.{ext}")
        if ext == "png":
            img.save(path, format="PNG", compress_level=1)
        else:
            img.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(
    path: str,
    preset_name: str,
    passes: int = 0,
    layout: str = "lattice",
    backbone_weights: str | None = None,
) -> str:
    from tfa_ray.calibration import Calibration
    from tfa_ray.config import get_preset
    from tfa_ray.model import Detector
    from tfa_ray.package import save_model

    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    preset = get_preset(preset_name)
    if backbone_weights:  # e.g. "random": the paper's WRN50-2 without a download
        backbone = dataclasses.replace(preset.model.backbone, weights=backbone_weights)
        preset = dataclasses.replace(
            preset, model=dataclasses.replace(preset.model, backbone=backbone)
        )
    if preset.anomaly.score == "auto":  # a trained package holds the kind training selected
        preset = dataclasses.replace(
            preset, anomaly=dataclasses.replace(preset.anomaly, score="topk")
        )
    preset = dataclasses.replace(
        preset,
        model=dataclasses.replace(preset.model, test_mask_passes=passes, test_mask_layout=layout),
    )
    torch.manual_seed(0)
    size = preset.model.image_size
    det = Detector(preset.model, torch.rand(preset.model.num_templates, 3, size, size)).eval()
    cal = Calibration(1.0, 0.01, 0.5, 0.1, 10, 0.0, 1.0, 0.5)
    return save_model(path, det, preset, cal, {"category": "texture", "benchmark": True})


def model_only(
    model_dir: str,
    batch: int,
    threads: int,
    n_batches: int,
    precision: str = "auto",
    device: str = "cpu",
) -> float:
    from tfa_ray.package import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir, device=device)
    model.precision = precision
    x = torch.rand(batch, 3, model.image_size, model.image_size, device=device)
    with torch.no_grad():
        model.predict(x)  # warm-up (template embedding, allocator)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_batches):
            model.predict(x)
        sync()
    return batch * n_batches / (time.perf_counter() - t)


def upload(paths: list[str], root: str, bucket: str) -> str:
    from tfa_ray import storage

    fs, _ = storage.get_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    for p in paths:
        rel = os.path.relpath(p, root)
        with open(p, "rb") as f:
            storage.write_bytes(f"s3://{bucket}/archive/{rel}", f.read())
    return f"s3://{bucket}/archive"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="scorer actors")
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="local Ray CPUs")
    p.add_argument("--model-batches", type=int, default=10)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tfa-bench-scoring"))
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument(
        "--test-mask",
        default="0",
        help="test-time masking of the model: 0 (off), 4 (4 lattice passes), b16 (16 blocks)",
    )
    args = p.parse_args()

    import ray

    from tfa_ray import scoring

    os.makedirs(args.workdir, exist_ok=True)
    t = time.perf_counter()
    root = os.path.join(args.workdir, f"archive-{args.num_images}")
    paths = make_archive(root, args.num_images)
    print(f"archive: {len(paths)} images in {root} ({time.perf_counter() - t:.0f}s to prepare)")
    passes = int(args.test_mask.lstrip("b"))
    layout = "blocks" if args.test_mask.startswith("b") else "lattice"
    model_dir = make_model(
        os.path.join(args.workdir, f"model-{args.preset}-{args.test_mask}"),
        args.preset,
        passes,
        layout,
    )
    resolver = scoring.LocalResolver({"texture": model_dir})
    threads = max(1, int(round(args.num_cpus_per_actor)))

    rows = []
    ips_model = model_only(model_dir, args.batch_size, threads, args.model_batches, args.precision)
    rows.append((f"model only ({threads} thread(s), batch {args.batch_size})", ips_model, None))
    ips_all = model_only(
        model_dir, args.batch_size, os.cpu_count() or 1, args.model_batches, args.precision
    )
    rows.append((f"model only (all {os.cpu_count()} cores)", ips_all, None))
    torch.set_num_threads(1)  # the driver does little; leave the cores to the pipeline

    server = None
    if not args.no_s3:  # before Ray starts, so its workers inherit the S3 settings
        from moto.server import ThreadedMotoServer

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    peak = 0.0

    def run(input_url: str, output: str, label: str) -> None:
        nonlocal peak
        cfg = scoring.ScoreConfig(
            input=input_url,
            output=output,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            concurrency=args.concurrency,
            num_cpus_per_actor=args.num_cpus_per_actor,
            precision=args.precision,
        )
        t = time.perf_counter()
        summary = scoring.score(cfg, resolver, echo=lambda _m: None)
        wall = time.perf_counter() - t
        assert summary.total == len(paths) and summary.ok == len(paths), summary
        peak = max(peak, summary.scorer_peak_rss_mb)
        rows.append((label, len(paths) / wall, wall))

    shutil.rmtree(os.path.join(args.workdir, "out"), ignore_errors=True)
    run(root, os.path.join(args.workdir, "out"), "pipeline, local folder")
    if server is not None:
        try:
            t = time.perf_counter()
            url = upload(paths, root, "bench")
            print(f"uploaded to moto S3 in {time.perf_counter() - t:.0f}s")
            run(url, "s3://bench/out", "pipeline, moto S3 -> S3")
        finally:
            server.stop()

    print()
    print(f"{'':<44} {'images/s':>9} {'wall s':>8} {'vs model':>9}")
    for label, ips, wall in rows:
        ratio = f"{ips / ips_model:.2f}" if wall is not None else ""
        wall_s = f"{wall:.1f}" if wall is not None else ""
        print(f"{label:<44} {ips:>9.2f} {wall_s:>8} {ratio:>9}")
    print(f"{'scorer actor peak memory (MiB)':<44} {peak:>9.0f}")
    print(
        f"\n{len(paths)} images 256-1024 px (PNG/JPEG), preset {args.preset}, batch "
        f"{args.batch_size}, shard {args.shard_size}, {args.concurrency} actor(s) x "
        f"{args.num_cpus_per_actor} CPU, Ray with {args.num_cpus} CPUs, "
        f"precision {args.precision}, test-time masking {args.test_mask}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
