"""Accuracy on a real category: train each variant, evaluate on the test split, print a table.

Every variant is the CPU preset with a few overrides. Selection and thresholds come from
held-out *normal training* images (with synthetic anomalies pasted in); the test split is
read only for the final evaluation. The ``val`` column is that selection score, the only
number a variant may be chosen by. With ``--inference-ablation`` each trained model is also
evaluated with the inference-only alternatives (test-time complementary masking on / off,
each image score kind) on the same weights.

    python benchmarks/accuracy.py --data ../shared/data --category magnetic_tile
    python benchmarks/accuracy.py --variants paper-mask0,mask75,final --time-budget 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from tfa_ray.anomaly import anomaly_map, image_score
from tfa_ray.config import get_preset
from tfa_ray.data import discover, load_image, load_mask
from tfa_ray.evaluation import evaluate_model
from tfa_ray.metrics import aupro, evaluate, image_auroc, pixel_auroc
from tfa_ray.package import TFAModel, save_model
from tfa_ray.training import fit

# name -> (description, preset overrides on top of cpu-small)
VARIANTS: dict[str, tuple[str, dict]] = {
    "paper-mask0": (
        "no masking, paper inference, std score, no pooling",
        {
            "model__mask_ratio": 0.0,
            "model__test_mask_passes": 0,
            "anomaly__score": "std",
            "model__feature_pool": 1,
        },
    ),
    "mask75": (
        "mask 75 %, paper inference, std score, no pooling",
        {
            "model__mask_ratio": 0.75,
            "model__test_mask_passes": 0,
            "anomaly__score": "std",
            "model__feature_pool": 1,
        },
    ),
    "k4-b16": ("K=4, batch 16", {"model__patch_size": 4, "train__batch_size": 16}),
    "k4-b4": ("K=4, batch 4 (the paper's batch)", {"model__patch_size": 4, "train__batch_size": 4}),
    "k8-b4": ("K=8, batch 4", {"model__patch_size": 8, "train__batch_size": 4}),
    "pool3": ("the shipped preset with 3x3 feature pooling", {"model__feature_pool": 3}),
    "k8-b4-dn50": (
        "K=8, batch 4, half the inputs with a pasted defect, clean target",
        {"model__patch_size": 8, "train__batch_size": 4, "train__denoise_fraction": 0.5},
    ),
    "final": ("the cpu-small preset as shipped", {}),
}

# Baselines measured on this machine with the same Lite0 features (from the issue).
REFERENCE = [
    ("PatchCore-style kNN (Lite0 2/4/10 @64)", 0.894, 0.795, 0.727),
    ("PaDiM-style Gaussian (Lite0 2/4/10 @64)", 0.937, 0.752, 0.744),
]


def pass_label(passes: int, layout: str) -> str:
    """Test-time masking in one word: 0 (off), 4 (4 lattice passes), b16 (16 blocks)."""
    return f"b{passes}" if passes and layout == "blocks" else str(passes)


def inference_ablation(result, data, base: dict, name: str) -> list[dict]:
    """The same weights with every (test passes, score kind) pair; test features once."""
    trained, det = result.preset, result.detector.eval()
    size = trained.model.image_size
    images = torch.stack([load_image(s.path, size) for s in data.test])
    masks = torch.stack([load_mask(s, size) > 0.5 for s in data.test]).numpy()
    labels = np.array([s.label for s in data.test])
    with torch.no_grad():
        phi = torch.cat([det.features(images[i : i + 32]) for i in range(0, len(images), 32)])
    rows = []
    as_trained = pass_label(trained.model.test_mask_passes, trained.model.test_mask_layout)
    for passes, layout in ((0, "lattice"), (4, "lattice"), (4, "blocks"), (16, "blocks")):
        det.cfg = dataclasses.replace(
            trained.model, test_mask_passes=passes, test_mask_layout=layout
        )
        with torch.no_grad():
            maps = torch.cat(
                [
                    anomaly_map(
                        phi[i : i + 32], det.reconstruct(phi[i : i + 32]), size, trained.anomaly
                    )
                    for i in range(0, len(phi), 32)
                ]
            )
        for kind in ("std", "topk", "max"):
            label = pass_label(passes, layout)
            if label == as_trained and kind == trained.anomaly.score:
                continue  # that is the as-trained row
            scores = image_score(maps, dataclasses.replace(trained.anomaly, score=kind))
            rows.append(
                {
                    **base,
                    "variant": f"  {name}",
                    "score_kind": kind,
                    "passes": label,
                    "description": "same weights, other inference",
                    **evaluate(labels, scores.numpy(), masks, maps.numpy()),
                }
            )
    det.cfg = trained.model
    return rows


def per_defect(result, data) -> None:
    """Each defect type against the normal test images, as trained: where the misses are."""
    model = TFAModel(result.detector, result.preset, result.calibration)
    size = model.image_size
    types = np.array([s.defect_type for s in data.test])
    maps, scores = [], []
    for i in range(0, len(data.test), 16):
        m, sc = model.predict(
            torch.stack([load_image(s.path, size) for s in data.test[i : i + 16]])
        )
        maps.append(m.numpy())
        scores.append(sc.numpy())
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    masks = np.stack([load_mask(s, size).numpy() > 0.5 for s in data.test])
    good = types == "good"
    print(f"\n{'defect':<12} {'images':>6} {'area':>6} {'image':>6} {'pixel':>6} {'AUPRO':>6}")
    for kind in sorted(set(types) - {"good"}):
        sel = good | (types == kind)
        print(
            f"{kind:<12} {int((types == kind).sum()):>6} {masks[types == kind].mean():>6.3f} "
            f"{image_auroc((~good[sel]).astype(int), scores[sel]):>6.3f} "
            f"{pixel_auroc(masks[sel], maps[sel]):>6.3f} {aupro(masks[sel], maps[sel]):>6.3f}"
        )
    print("(each defect type with the normal test images; area: mean defect fraction)\n")


def run_variant(name: str, data, args) -> list[dict]:
    desc, overrides = VARIANTS[name]
    overrides = dict(overrides)
    if args.time_budget is not None:
        overrides["train__time_budget_s"] = args.time_budget
    if args.epochs is not None:
        overrides["train__epochs"] = args.epochs
    preset = get_preset("cpu-small", **overrides)
    t0 = time.perf_counter()
    result = fit(data, preset)
    base = {
        "train_s": time.perf_counter() - t0,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "val": result.selection_score,
    }
    if args.save:
        save_model(
            f"{args.save}/{name}",
            result.detector,
            result.preset,
            result.calibration,
            {"category": data.category, "history": result.history},
        )
    ev = evaluate_model(TFAModel(result.detector, result.preset, result.calibration), data)
    rows = [
        {
            **base,
            "variant": name,
            "description": desc,
            "score_kind": result.preset.anomaly.score,
            "passes": pass_label(
                result.preset.model.test_mask_passes, result.preset.model.test_mask_layout
            ),
            "eval_s": ev.seconds,
            **ev.metrics,
        }
    ]
    if args.per_defect:
        per_defect(result, data)
    if args.inference_ablation:
        rows += inference_ablation(result, data, base, name)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'variant':<14} {'train':>7} {'ep':>3} {'best':>4} {'score':>5} {'pass':>4} "
        f"{'val':>6} {'image':>6} {'pixel':>6} {'AUPRO':>6} {'F1max':>6}  description"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['variant']:<14} {r['train_s'] / 60:>6.1f}m {r['epochs']:>3} "
            f"{r['best_epoch']:>4} {r['score_kind']:>5} {r['passes']:>4} {r['val']:>6.3f} "
            f"{r['image_auroc']:>6.3f} {r['pixel_auroc']:>6.3f} {r['aupro']:>6.3f} "
            f"{r['f1_max']:>6.3f}  {r['description']}"
        )
    for name, img, pix, pro in REFERENCE:
        print(
            f"{'(reference)':<14} {'':>7} {'':>3} {'':>4} {'':>5} {'':>4} {'':>6} "
            f"{img:>6.3f} {pix:>6.3f} {pro:>6.3f} {'':>6}  {name}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--variants", default="final", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--time-budget", type=float, help="override the preset's training budget (s)")
    p.add_argument("--epochs", type=int, help="override the preset's epoch count")
    p.add_argument(
        "--inference-ablation",
        action="store_true",
        help="also evaluate other test passes / score kinds on the same weights",
    )
    p.add_argument("--per-defect", action="store_true", help="print metrics per defect type")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--save", help="write each variant's model package to SAVE/<variant>")
    args = p.parse_args()

    data = discover(args.data, args.category)
    rows: list[dict] = []
    for name in args.variants.split(","):
        rows += run_variant(name, data, args)
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
