"""One GPU check, one table: what a single CUDA GPU does with tfa-ray, in under 8 minutes,
and whether what ships trains and scores there.

    bash benchmarks/gpu_check.sh          # checks for a GPU first, then runs this module
    python -m benchmarks.gpu_check --only forward,decode

Sections (each in a subprocess of its own with a time limit, so a crash, an out-of-memory or a
hang is a FAILED row and the others still run):

* forward: paper preset (WRN50-2 randomly initialised: timing does not depend on the weights'
  values, and the GPU host may have no network), scorer inference path with the template path
  cached, images/s at batch 32/64/128 in bf16;
* decode: 2,000 synthetic 256-px JPEGs, GPU batched decode (``decode_jpegs``, nvjpeg) vs the
  CPU path (Pillow) on every core; and how far the GPU's pixels are from the CPU's;
* train: one training step (TFA-Net forward + backward + AdamW on cached features, as
  ``train_epochs`` runs it) of the paper preset on one GPU;
* fit-cpu-small, fit-gpu: the whole ``fit`` of the cpu-small and gpu presets (features,
  Gaussians, kNN memory, :data:`FIT_BUDGET_S` of training, selection, calibration at each
  precision) on a small ``tfa_ray.synth`` category on the GPU; the package scored on the GPU
  (auto precision and fp32) and on the CPU (fp32 and bf16). Each scorer must use the
  calibration of the precision it computes at, and its scores must lie within
  :data:`SCORE_TOLERANCE` (in normal-score standard deviations) of the CPU's fp32 scores;
* ray-train: ``tfa_ray.train_ray.train_one`` of a test-tiny category with one Ray Train
  worker on one GPU, its process group NCCL (checked in the worker by an all-reduce);
* pipeline: Ray Data scoring (``tfa_ray.scoring.score``) of 4,000 synthetic 256-px JPEGs with
  the paper-preset package on one GPU actor, JPEGs decoded on the GPU, vs model only;
* compile: the forward rows again under ``torch.compile`` (last: compiling takes the longest).

A dry run of the code without a GPU (small and slow, for development only):
``GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESET=test-tiny GPU_CHECK_IMAGES=64 python -m
benchmarks.gpu_check --section decode --workdir /tmp/x`` (``GPU_CHECK_FIT_BUDGET_S=2`` and
``GPU_CHECK_FIT_SIZE=64`` shrink the fit sections).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing import Pool

import numpy as np

BATCHES = (32, 64, 128)
TOTAL_S = 460.0  # the whole check stays under 8 minutes (sections start in ~5 s each)
# section -> its own time limit (seconds); run in this order, printed in this order. The
# limits add up to TOTAL_S: every section gets its full limit.
LIMITS = {
    "forward": 30.0,
    "decode": 25.0,
    "train": 25.0,
    "fit-cpu-small": 90.0,
    "fit-gpu": 90.0,
    "ray-train": 75.0,  # Ray and the Train controller start in ~20 s
    "pipeline": 65.0,
    "compile": 60.0,
}
assert sum(LIMITS.values()) <= TOTAL_S
FIT_BUDGET_S = float(os.environ.get("GPU_CHECK_FIT_BUDGET_S", "15"))  # training time per fit
FIT_SIZE = int(os.environ.get("GPU_CHECK_FIT_SIZE", "256"))  # synthetic images' side
# |score - CPU fp32 score| / (fp32 normal score std), at most: fp32 on the GPU differs by
# kernels and TF32 convolutions only; bf16 / fp16 by their rounding, which the calibration at
# that precision absorbs (the threshold is compared with scores at its own precision).
SCORE_TOLERANCE = {"fp32": 0.05, "bf16": 0.5, "fp16": 0.5}
Row = tuple[str, str, str]  # (what, value, note)
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu": a dry run of the code only
PRESET = os.environ.get("GPU_CHECK_PRESET", "paper")


# --------------------------------------------------------------------------------------
# helpers (no GPU needed; unit-tested)


def format_table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    head = ("measure", "value", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def _write_one(args: tuple[str, int, int, int]) -> str:
    from PIL import Image

    from tfa_ray.synth import make_image

    path, i, size, seed = args
    rng = np.random.default_rng(seed + i)
    base = make_image("texture", size, np.random.default_rng(seed + i % 16))
    img = np.roll(base, tuple(int(v) for v in rng.integers(0, size, 2)), axis=(0, 1))
    if i % 2:
        img = img[:, ::-1]
    Image.fromarray(np.ascontiguousarray(img)).save(path, format="JPEG", quality=90)
    return path


def write_jpegs(folder: str, n: int, size: int = 256, seed: int = 0, workers: int = 0) -> list[str]:
    """``n`` distinct synthetic ``size`` px JPEGs (textures, shifted and flipped) in ``folder``
    (reused when already there), written on ``workers`` processes (0: all cores)."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i:06d}.jpg") for i in range(n)]
    todo = [(p, i, size, seed) for i, p in enumerate(paths) if not os.path.exists(p)]
    if todo:
        with Pool(workers or os.cpu_count() or 1) as pool:
            pool.map(_write_one, todo, chunksize=64)
    return paths


def _cuda() -> str:
    import torch

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: gpu_check needs one (torch.cuda.is_available() is False)")
    return DEVICE


def _sync() -> None:
    import torch

    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _paper_detector(device: str):
    import torch

    from benchmarks.forward import random_backbone
    from tfa_ray.config import get_preset
    from tfa_ray.model import Detector

    preset = random_backbone(get_preset(PRESET))
    torch.manual_seed(0)
    size = preset.model.image_size
    det = Detector(preset.model, torch.rand(3, size, size)).to(device).eval()
    return det, preset


# --------------------------------------------------------------------------------------
# sections: each yields its rows; run in a subprocess by main()


def section_forward(workdir: str, compiled: bool = False) -> Iterator[Row]:
    import torch

    from benchmarks.forward import time_forward

    device = torch.device(_cuda())
    det, preset = _paper_detector(DEVICE)
    name = f"{PRESET} forward bf16"
    if compiled:
        det = torch.compile(det)  # mode "default"; the first call per shape compiles
        name += " torch.compile"
    for batch in BATCHES:
        t = time.perf_counter()
        per_image = time_forward(det, preset, batch, 20, True, device, warmup=3)
        note = f"median of 20 after 3 warm-up ({time.perf_counter() - t:.0f}s incl. warm-up)"
        yield f"{name}, batch {batch}", f"{1 / per_image:.0f} images/s", note


def section_compile(workdir: str) -> Iterator[Row]:
    yield from section_forward(workdir, compiled=True)


def _cpu_decode(path: str) -> int:
    from tfa_ray.scoring.stages import decode_array

    with open(path, "rb") as f:
        decode_array(f.read(), 256, None)
    return 1


def section_decode(workdir: str) -> Iterator[Row]:
    from tfa_ray.scoring.stages import decode_array, decode_jpegs

    device = _cuda()
    n = min(2000, int(os.environ.get("GPU_CHECK_IMAGES", "2000")))
    paths = write_jpegs(os.path.join(workdir, "archive", "texture"), n)  # pipeline's first n
    datas = [open(p, "rb").read() for p in paths]
    cores = os.cpu_count() or 1
    with Pool(cores) as pool:
        pool.map(_cpu_decode, paths[:64])  # warm-up: imports in every worker
        t = time.perf_counter()
        pool.map(_cpu_decode, paths, chunksize=16)
        cpu_ips = len(paths) / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in paths[:200]:
        _cpu_decode(p)
    one_ips = len(paths[:200]) / (time.perf_counter() - t)
    decode_jpegs(datas[:128], 256, device)  # warm-up: nvjpeg handles, allocator
    _sync()
    t = time.perf_counter()
    out = []
    for i in range(0, len(datas), 128):
        out += decode_jpegs(datas[i : i + 128], 256, device)
    _sync()
    gpu_ips = len(datas) / (time.perf_counter() - t)
    errors = sum(isinstance(o, str) for o in out)
    diffs = [
        (o.cpu().numpy().astype(int) - decode_array(d, 256, None)[0].astype(int))
        for o, d in zip(out[:200], datas[:200], strict=True)
        if not isinstance(o, str)
    ]
    worst = max(int(np.abs(d).max()) for d in diffs)
    mean = float(np.mean([np.abs(d).mean() for d in diffs]))
    yield from [
        ("JPEG decode 256 px, GPU (decode_jpegs, batch 128)", f"{gpu_ips:.0f} images/s",
         f"{len(datas)} images, {errors} errors"),
        (f"JPEG decode 256 px, CPU (Pillow, {cores} processes)", f"{cpu_ips:.0f} images/s",
         f"one core: {one_ips:.0f} images/s"),
        ("GPU vs CPU decoded pixels (200 images)", f"max {worst}, mean {mean:.3f}",
         "0..255 levels; nvjpeg's IDCT / upsampling vs libjpeg"),
    ]  # fmt: skip


def section_pipeline(workdir: str) -> Iterator[Row]:
    import ray

    from benchmarks.scoring import make_model, model_only
    from tfa_ray import scoring

    device = _cuda()
    n = int(os.environ.get("GPU_CHECK_IMAGES", "4000"))
    t = time.perf_counter()
    folder = os.path.join(workdir, "archive", "texture")
    write_jpegs(folder, n)
    prep = time.perf_counter() - t
    model_dir = make_model(
        os.path.join(workdir, f"model-{PRESET}"), PRESET, backbone_weights="random"
    )
    batch = 128
    ips_model = model_only(model_dir, batch, 4, 20, "auto", device=device)
    note = f"TFAModel.predict on tensors already on the GPU; JPEGs written in {prep:.0f}s"
    yield f"model only, {PRESET} package, batch {batch}", f"{ips_model:.0f} images/s", note
    cpus = os.cpu_count() or 1
    actor_cpus = max(1, min(4, cpus // 4))  # the rest decode and write
    ray.init(num_cpus=cpus, num_gpus=1, include_dashboard=False, log_to_driver=False)
    resolver = scoring.LocalResolver({"texture": model_dir})
    try:
        for mode in ("on", "off"):
            cfg = scoring.ScoreConfig(
                input=os.path.join(workdir, "archive"),
                output=os.path.join(workdir, f"out-{mode}"),
                batch_size=batch,
                shard_size=512,
                concurrency=1,
                num_gpus_per_actor=1.0,
                num_cpus_per_actor=float(actor_cpus),
                gpu_decode=mode,
                device=None if device.startswith("cuda") else device,  # a dry run on CPU
            )
            t = time.perf_counter()
            summary = scoring.score(cfg, resolver, echo=lambda _m: None)
            wall = time.perf_counter() - t
            if summary.total != n or summary.ok != n:
                raise RuntimeError(f"{summary.ok} of {n} ok, {summary.error} errors")
            ips = n / wall
            yield (
                f"Ray Data scoring {n} JPEGs 256 px, GPU decode {mode}",
                f"{ips:.0f} images/s",
                f"{ips / ips_model:.2f} of model only; wall {wall:.0f}s incl. actor start; "
                f"{cpus} CPUs, 1 actor x {actor_cpus} CPUs, shard 512",
            )  # fmt: skip
    finally:
        ray.shutdown()


def section_train(workdir: str) -> Iterator[Row]:
    import torch

    from tfa_ray.precision import autocast
    from tfa_ray.training import training_loss

    device = torch.device(_cuda())
    det, preset = _paper_detector(DEVICE)
    det.train()
    peak = torch.cuda.max_memory_allocated if device.type == "cuda" else (lambda: 0)
    opt = torch.optim.AdamW([p for p in det.net.parameters() if p.requires_grad], lr=1e-4)
    size = preset.model.image_size
    for batch in (preset.train.batch_size, 32):
        with torch.no_grad():
            phi = det.features(torch.rand(batch, 3, size, size, device=device))
        times = []
        for i in range(13):
            _sync()
            t = time.perf_counter()
            with autocast("auto", device):
                loss = training_loss(det, det.net, phi, preset)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync()
            if i >= 3:
                times.append(time.perf_counter() - t)
        step = float(np.median(times))
        yield (
            f"train step, {PRESET} preset, batch {batch}",
            f"{step * 1000:.0f} ms",
            f"{batch / step:.0f} images/s; TFA-Net fwd+bwd+AdamW on cached features, "
            f"peak {peak() / 2**30:.1f} GiB",
        )  # fmt: skip


def _fit_and_score(preset_name: str, workdir: str) -> Iterator[Row]:
    """``fit`` of a shipped preset on the GPU (short budget, random backbone weights where the
    preset downloads them), then its package scored on the GPU and on the CPU."""
    import dataclasses

    from benchmarks.forward import random_backbone
    from tfa_ray.config import get_preset
    from tfa_ray.data import discover
    from tfa_ray.evaluation import evaluate_model
    from tfa_ray.package import load_model, save_model
    from tfa_ray.synth import make_dataset
    from tfa_ray.training import fit

    gpu = _cuda()
    root = os.path.join(workdir, f"fit-{preset_name}")
    make_dataset(os.path.join(root, "data"), ("texture",), n_train=40, n_test_good=8,
                 n_test_defect=8, size=FIT_SIZE)  # fmt: skip
    data = discover(os.path.join(root, "data"), "texture")
    preset = get_preset(preset_name)
    if preset.model.backbone.weights == "hub":
        preset = random_backbone(preset)  # the GPU host may have no network
    train = dataclasses.replace(preset.train, epochs=0, time_budget_s=FIT_BUDGET_S)
    preset = dataclasses.replace(preset, train=train)
    t = time.perf_counter()
    result = fit(data, preset, device=gpu, echo=lambda _m: None)
    fit_s = time.perf_counter() - t
    cals = result.calibration
    thresholds = ", ".join(f"{p} {cals.at(p).threshold:.4g}" for p in cals)
    yield (
        f"fit {preset_name} on {gpu}", f"{fit_s:.0f} s",
        f"{result.num_train}/{result.num_val}/{result.num_calib} train/selection/calibration "
        f"images, {FIT_BUDGET_S:g}s training; thresholds {thresholds}",
    )  # fmt: skip
    pkg = save_model(os.path.join(root, "model"), result.detector, result.preset, cals,
                     {"category": "texture"})  # fmt: skip
    runs = {}
    for device, precision in (("cpu", "fp32"), ("cpu", "bf16"), (gpu, "auto"), (gpu, "fp32")):
        model = load_model(pkg, device=device)
        model.precision = precision
        key = model.precision_key
        if model.calibration != cals.at(key):
            raise RuntimeError(f"{device} {precision} computes at {key}, scores another entry")
        runs[(device, precision)] = (key, evaluate_model(model, data))
    ref_key, ref = runs[("cpu", "fp32")]
    std = max(cals.at("fp32").score_std, 1e-12)
    for (device, precision), (key, ev) in runs.items():
        dev = float(np.abs(ev.scores - ref.scores).max() / std)
        tol = SCORE_TOLERANCE[key]
        flips = int(
            np.sum(
                (ev.scores >= cals.at(key).threshold) != (ref.scores >= cals.at(ref_key).threshold)
            )
        )
        verdict = "" if dev <= tol else "FAILED: "
        yield (
            f"{preset_name} package scored on {device} {precision} ({key} calibration)",
            f"{verdict}max score change vs cpu fp32 {dev:.3f} normal std (tolerance {tol:g})",
            f"image AUROC {ev.metrics['image_auroc']:.3f}, {len(ev.scores)} test images, "
            f"{flips} decisions differ from cpu fp32's",
        )  # fmt: skip


def section_fit_cpu_small(workdir: str) -> Iterator[Row]:
    yield from _fit_and_score("cpu-small", workdir)


def section_fit_gpu(workdir: str) -> Iterator[Row]:
    yield from _fit_and_score("gpu", workdir)


def nccl_worker_loop(config: dict) -> None:
    """The shipped worker loop, after checking the process group Ray Train set up: NCCL on a
    GPU (gloo in a CPU dry run), and an all-reduce through it."""
    import torch
    import torch.distributed as dist

    from tfa_ray.train_ray import worker_loop

    want = "nccl" if config.get("use_gpu") else "gloo"
    if dist.get_backend() != want:
        raise RuntimeError(f"process group backend {dist.get_backend()}, not {want}")
    device = "cuda" if want == "nccl" else "cpu"
    one = torch.ones(1, device=device)
    dist.all_reduce(one)
    if one.item() != dist.get_world_size():
        raise RuntimeError(f"all_reduce gave {one.item()}")
    worker_loop(config)


def section_ray_train(workdir: str) -> Iterator[Row]:
    import dataclasses

    import ray

    from tfa_ray.config import get_preset, preset_to_json
    from tfa_ray.synth import make_dataset
    from tfa_ray.train_ray import RaySettings, train_one

    gpu = _cuda()
    use_gpu = gpu.startswith("cuda")
    data = os.path.join(workdir, "ray-train", "data")
    make_dataset(data, ("texture",), n_train=24, n_test_good=4, n_test_defect=4, size=64)
    preset = get_preset("test-tiny")
    preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, epochs=3))
    ray.init(num_cpus=os.cpu_count() or 1, num_gpus=1 if use_gpu else 0,
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    try:
        t = time.perf_counter()
        settings = RaySettings(
            num_workers=1, use_gpu=use_gpu, storage_path=os.path.join(workdir, "ray-train", "runs")
        )
        pkg, summary, history = train_one(
            data, "texture", preset_to_json(preset), settings, loop=nccl_worker_loop
        )
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
    auroc = summary.get("test_metrics", {}).get("image_auroc", float("nan"))
    yield (
        f"Ray Train, 1 worker on 1 {'GPU' if use_gpu else 'CPU'}, test-tiny",
        f"{wall:.0f} s",
        f"{'NCCL' if use_gpu else 'gloo'} process group all-reduce ok; {len(history)} epochs; "
        f"test image AUROC {auroc:.3f}; package {'ok' if os.path.isdir(pkg) else 'missing'}",
    )  # fmt: skip


SECTIONS: dict[str, Callable[[str], Iterator[Row]]] = {
    "forward": section_forward,
    "decode": section_decode,
    "train": section_train,
    "fit-cpu-small": section_fit_cpu_small,
    "fit-gpu": section_fit_gpu,
    "ray-train": section_ray_train,
    "pipeline": section_pipeline,
    "compile": section_compile,
}
assert list(SECTIONS) == list(LIMITS)


# --------------------------------------------------------------------------------------
# the driver: one subprocess per section, one table


def _read_rows(path: str) -> list[Row]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f if line.strip()]


def run_section(name: str, workdir: str, limit_s: float) -> tuple[list[Row], float]:
    """The rows one section produced in its subprocess, plus a FAILED row when it crashed or
    ran out of time (the rows it finished before still count); and its seconds."""
    out = os.path.join(workdir, f"{name}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name, "--workdir", workdir]
    t = time.perf_counter()
    # its own process group: on timeout, SIGINT lets it shut Ray down, then the group goes
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        failed = (name, f"FAILED: over its {limit_s:.0f}s limit", "rows above: finished in time")
        return [*_read_rows(out), failed], time.perf_counter() - t
    seconds = time.perf_counter() - t
    rows = _read_rows(out)
    if proc.returncode != 0:
        lines = (stderr or stdout or "").strip().splitlines()
        reason = lines[-1][:160] if lines else f"exit status {proc.returncode}"
        rows.append((name, f"FAILED: {reason}", "details: rerun with --only " + name))
    return rows, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated sections (default: all)")
    p.add_argument("--workdir", help="scratch folder (default: a new temporary one)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section
    args = p.parse_args(argv)
    if args.section:  # the subprocess: each row to <workdir>/<section>.jsonl when it is done
        with open(os.path.join(args.workdir, f"{args.section}.jsonl"), "a") as f:
            for row in SECTIONS[args.section](args.workdir):
                f.write(json.dumps(row) + "\n")
                f.flush()
        return 0
    _cuda()
    import torch

    workdir = args.workdir or tempfile.mkdtemp(prefix="tfa-gpu-check-")
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    gpu = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else DEVICE
    print(f"gpu_check on {gpu} (torch {torch.__version__}, preset {PRESET}), {workdir}")
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name in names:
        left = TOTAL_S - (time.perf_counter() - t0)
        if left < 20:
            rows.append((name, "SKIPPED: the check's time is used up", ""))
            continue
        got, seconds = run_section(name, workdir, min(LIMITS[name], left))
        print(f"  {name}: {seconds:.0f}s", flush=True)
        rows += got
    rows.append(("total", f"{time.perf_counter() - t0:.0f} s", f"limit {TOTAL_S:.0f}s"))
    print()
    print(format_table(rows))
    return 1 if any(v.startswith("FAILED") for _, v, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
