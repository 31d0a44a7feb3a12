"""Same-feature baselines: a PaDiM-style per-position Gaussian and a PatchCore-style coreset kNN,
fitted on exactly the fused, standardised features a preset's TFA-Net sees, on the same
training split, and evaluated with the project's metrics.

``benchmarks/accuracy.py`` prints these rows in the same table as the TFA-Net rows, computed
in that run. Alone:

    python benchmarks/baselines.py --data ../shared/data --category magnetic_tile
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from tfa_ray.anomaly import to_image
from tfa_ray.config import Preset, get_preset
from tfa_ray.data import CategoryData, check_images, discover, load_image, load_mask
from tfa_ray.evidence import GaussianEvidence, KNNEvidence
from tfa_ray.metrics import aupro, evaluate, image_auroc, pixel_auroc
from tfa_ray.model import Detector
from tfa_ray.selection import split_normals
from tfa_ray.training import compute_features, feature_statistics

BATCH = 16


def test_split(data: CategoryData, size: int):
    """Test images' labels, defect types and masks (S x S bool)."""
    labels = np.array([s.label for s in data.test])
    types = np.array([s.defect_type for s in data.test])
    masks = np.stack([load_mask(s, size).numpy() > 0.5 for s in data.test])
    return labels, types, masks


def per_defect(types, labels, scores, masks, maps) -> dict[str, dict]:
    """Each defect type against the normal test images: image / pixel AUROC, AUPRO, area."""
    good = types == "good"
    out = {}
    for kind in sorted(set(types) - {"good"}):
        sel = good | (types == kind)
        out[kind] = {
            "images": int((types == kind).sum()),
            "area": float(masks[types == kind].mean()),
            "image_auroc": image_auroc(labels[sel], scores[sel]),
            "pixel_auroc": pixel_auroc(masks[sel], maps[sel]),
            "aupro": aupro(masks[sel], maps[sel]),
        }
    return out


def baseline_rows(
    data: CategoryData, preset: Preset, echo: Callable[[str], None] = print, suffix: str = ""
) -> list[dict]:
    """Fit both baselines on the preset's features of its training split, evaluate both
    (``suffix`` is appended to the row names)."""
    cfg, tcfg = preset.model, preset.train
    t0 = time.perf_counter()
    torch.manual_seed(tcfg.seed)
    detector = Detector(cfg).eval()
    paths = check_images(data.train)
    train, _, _ = split_normals(paths, tcfg.val_fraction, tcfg.calib_fraction, tcfg.seed)
    images = torch.stack([load_image(p, cfg.image_size) for p in train])
    phi = compute_features(detector, (images * 255).round().to(torch.uint8), torch.device("cpu"))
    if cfg.standardize_features:
        mean, std = feature_statistics(phi)
        detector.set_feature_stats(mean, std)
        phi = ((phi.float() - mean[:, None, None]) / std.clamp_min(1e-6)[:, None, None]).half()
    t_features = time.perf_counter() - t0
    echo(f"baselines: features of {len(train)} training images in {t_features:.0f}s")
    size = min(cfg.feature_size, 32)
    methods = {
        "PaDiM-style Gaussian": GaussianEvidence(
            phi.shape[1], cfg.gaussian_size or size, cfg.gaussian_channels or 192
        ),
        "PatchCore-style kNN": KNNEvidence(phi.shape[1], size, memory=4096),
    }
    labels, types, masks = test_split(data, cfg.image_size)
    test_phi = torch.cat(
        [
            detector.features(
                torch.stack([load_image(s.path, cfg.image_size) for s in data.test[i : i + BATCH]])
            )
            for i in range(0, len(data.test), BATCH)
        ]
    )
    rows = []
    for name, method in methods.items():
        t1 = time.perf_counter()
        method.fit(phi[i : i + 32] for i in range(0, len(phi), 32))
        fit_s = time.perf_counter() - t1 + t_features
        with torch.no_grad():
            maps = torch.cat(
                [
                    to_image(method(test_phi[i : i + BATCH]), cfg.image_size, preset.anomaly)
                    for i in range(0, len(test_phi), BATCH)
                ]
            ).numpy()
        scores = maps.reshape(len(maps), -1).max(axis=1)
        rows.append(
            {
                "variant": name + suffix,
                "description": f"same features, {method.size}x{method.size} positions",
                "train_s": fit_s,
                "eval_s": time.perf_counter() - t1 - (fit_s - t_features),
                **evaluate(labels, scores, masks, maps),
                "per_defect": per_defect(types, labels, scores, masks, maps),
            }
        )
        echo(f"baselines: {name} {rows[-1]['image_auroc']:.3f} / {rows[-1]['pixel_auroc']:.3f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--preset", default="cpu-small")
    args = p.parse_args()
    rows = baseline_rows(discover(args.data, args.category), get_preset(args.preset))
    print(f"{'method':<24} {'image':>6} {'pixel':>6} {'AUPRO':>6} {'fit':>6}")
    for r in rows:
        print(
            f"{r['variant']:<24} {r['image_auroc']:>6.3f} {r['pixel_auroc']:>6.3f} "
            f"{r['aupro']:>6.3f} {r['train_s']:>5.0f}s"
        )


if __name__ == "__main__":
    main()
