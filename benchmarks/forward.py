"""Paper preset: trainable parameters, the size of a training checkpoint, and CPU forward time
per image.

Times the whole inference path a scorer runs (backbone on the input, TFA-Net, anomaly map and
score) with the template path cached, at batch 1 and 8, in fp32 and, where the CPU supports
it, bf16 autocast. Timing does not depend on the weights' values, so the WRN50-2 backbone is
randomly initialised (no network here). Prints one table; medians of several runs.

bf16 must not cost accuracy: the script also runs real images (the first ``--check-images``
test images of ``--category``) through the same network in fp32 and bf16 and prints how far
the maps and scores move; with ``--model DIR`` it evaluates that trained package on the test
split in both precisions (image / pixel AUROC, AUPRO).

    python benchmarks/forward.py [--repeats 5] [--preset paper]
    python benchmarks/forward.py --model runs/magnetic_tile   # + a trained model's AUROCs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tfa_ray.anomaly import anomaly_map, image_score
from tfa_ray.config import get_preset
from tfa_ray.model import Detector, count_parameters
from tfa_ray.precision import autocast
from tfa_ray.train_ray import CHECKPOINTS_KEPT

CPU = torch.device("cpu")


def checkpoint_sizes(det: Detector) -> dict[str, int]:
    """Bytes of what Ray Train stores per category: the per-epoch checkpoint (TFA-Net weights
    and Adam's two moments per trainable parameter) and the best weights (written only when
    they improve). Computed from the tensors, so no multi-GB file is written."""
    net = sum(v.numel() * v.element_size() for v in det.net.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in det.net.parameters() if p.requires_grad)
    return {"net": net, "adam": moments, "epoch": net + moments, "best": net}


def random_backbone(preset):
    """The preset with a randomly initialised backbone: timing does not depend on the weights'
    values, and nothing is downloaded."""
    backbone = dataclasses.replace(preset.model.backbone, weights="random")
    return dataclasses.replace(preset, model=dataclasses.replace(preset.model, backbone=backbone))


def time_forward(
    det: Detector,
    preset,
    batch: int,
    repeats: int,
    bf16: bool,
    device: torch.device = CPU,
    warmup: int = 1,
) -> float:
    """Median seconds per image of the scorer's inference path (``det`` may be compiled)."""
    x = torch.rand(batch, 3, preset.model.image_size, preset.model.image_size, device=device)
    times = []
    with torch.no_grad(), autocast("bf16" if bf16 else "fp32", device):
        for i in range(repeats + warmup):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            phi, phi_hat = det(x)
            maps = anomaly_map(phi, phi_hat, preset.model.image_size, preset.anomaly)
            image_score(maps, preset.anomaly)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:  # the first runs warm up
                times.append(time.perf_counter() - t)
    return statistics.median(times) / batch


def bf16_agreement(det: Detector, preset, paths: list[str]) -> tuple[float, float]:
    """(mean relative map error, largest relative score change) of bf16 against fp32."""
    from tfa_ray.data import load_image

    x = torch.stack([load_image(p, preset.model.image_size) for p in paths])
    out = {}
    for bf16 in (False, True):
        with torch.no_grad(), autocast("bf16" if bf16 else "fp32", CPU):
            maps = torch.cat(
                [
                    anomaly_map(*det(x[i : i + 4]), preset.model.image_size, preset.anomaly)
                    for i in range(0, len(x), 4)
                ]
            )
        out[bf16] = (maps, image_score(maps, preset.anomaly))
    (m32, s32), (m16, s16) = out[False], out[True]
    map_err = ((m16 - m32).abs().mean() / m32.abs().mean()).item()
    score_err = ((s16 - s32).abs() / s32.abs()).max().item()
    return map_err, score_err


def model_precisions(model_dir: str, data_root: str, category: str) -> None:
    from tfa_ray.data import discover
    from tfa_ray.evaluation import evaluate_model
    from tfa_ray.package import load_model

    data = discover(data_root, category)
    print(f"\ntrained package {model_dir} on {category}/test ({len(data.test)} images)")
    print(f"{'precision':>9} {'image':>6} {'pixel':>6} {'AUPRO':>6} {'seconds':>8}")
    for precision in ("fp32", "bf16"):
        model = load_model(model_dir)
        model.precision = precision
        ev = evaluate_model(model, data)
        m = ev.metrics
        print(
            f"{precision:>9} {m['image_auroc']:>6.3f} {m['pixel_auroc']:>6.3f} "
            f"{m['aupro']:>6.3f} {ev.seconds:>8.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="paper")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--check-images", type=int, default=16, help="real images for bf16 vs fp32")
    p.add_argument("--model", help="also evaluate this trained package in fp32 and bf16")
    args = p.parse_args()

    preset = random_backbone(get_preset(args.preset))
    torch.manual_seed(0)
    det = Detector(preset.model, torch.rand(3, preset.model.image_size, preset.model.image_size))
    det.eval()
    print(
        f"preset {args.preset}: backbone {preset.model.backbone.name} "
        f"({det.backbone.out_channels} channels at {preset.model.feature_size}^2), "
        f"trainable parameters {count_parameters(det.net):,} "
        f"(TFA-Net without backbone), torch threads {torch.get_num_threads()}"
    )
    size = checkpoint_sizes(det)
    gb = 1e9
    print(
        f"checkpoint per epoch {size['epoch'] / gb:.2f} GB (weights {size['net'] / gb:.2f} + Adam "
        f"moments {size['adam'] / gb:.2f}), Ray keeps the last {CHECKPOINTS_KEPT}; best weights "
        f"{size['best'] / gb:.2f} GB, written only when they improve (before: "
        f"{(size['epoch'] + size['best']) / gb:.2f} GB uploaded every epoch)"
    )
    print(f"{'batch':>5} {'precision':>9} {'s/image':>9} {'images/s':>9}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for bf16 in (False, True):
            per_image = time_forward(det, preset, batch, args.repeats, bf16)
            name = "bf16" if bf16 else "fp32"
            print(f"{batch:>5} {name:>9} {per_image:>9.3f} {1 / per_image:>9.2f}")

    if args.check_images:
        from tfa_ray.data import discover

        paths = [s.path for s in discover(args.data, args.category).test][::7][: args.check_images]
        map_err, score_err = bf16_agreement(det, preset, paths)
        print(
            f"\nbf16 vs fp32 on {len(paths)} real {args.category} test images: mean relative "
            f"map difference {map_err:.2%}, largest relative score change {score_err:.2%}"
        )
    if args.model:
        model_precisions(args.model, args.data, args.category)


if __name__ == "__main__":
    main()
