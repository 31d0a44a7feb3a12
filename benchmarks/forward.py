"""Paper preset: trainable parameters and CPU forward time per image.

Times the whole inference path a scorer runs (backbone on the input, TFA-Net, anomaly map and
score) with the template path cached, at batch 1 and 8, in fp32 and, where the CPU supports
it, bf16 autocast. Timing does not depend on the weights' values, so the WRN50-2 backbone is
randomly initialised (no network here). Prints one table; medians of several runs.

    python benchmarks/forward.py [--repeats 5] [--preset paper]
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


def time_forward(det: Detector, preset, batch: int, repeats: int, bf16: bool) -> float:
    x = torch.rand(batch, 3, preset.model.image_size, preset.model.image_size)
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(repeats + 1):
            t = time.perf_counter()
            phi, phi_hat = det(x)
            maps = anomaly_map(phi, phi_hat, preset.model.image_size, preset.anomaly)
            image_score(maps, preset.anomaly)
            if i:  # the first run warms up
                times.append(time.perf_counter() - t)
    return statistics.median(times) / batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="paper")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()

    preset = get_preset(args.preset)
    backbone = dataclasses.replace(preset.model.backbone, weights="random")
    preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, backbone=backbone))
    torch.manual_seed(0)
    det = Detector(preset.model, torch.rand(3, preset.model.image_size, preset.model.image_size))
    det.eval()
    print(
        f"preset {args.preset}: backbone {preset.model.backbone.name} "
        f"({det.backbone.out_channels} channels at {preset.model.feature_size}^2), "
        f"trainable parameters {count_parameters(det.net):,} "
        f"(TFA-Net without backbone), torch threads {torch.get_num_threads()}"
    )
    print(f"{'batch':>5} {'precision':>9} {'s/image':>9} {'images/s':>9}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for bf16 in (False, True):
            per_image = time_forward(det, preset, batch, args.repeats, bf16)
            name = "bf16" if bf16 else "fp32"
            print(f"{batch:>5} {name:>9} {per_image:>9.3f} {1 / per_image:>9.2f}")


if __name__ == "__main__":
    main()
