"""Accuracy on a real category: train each variant, evaluate on the test split, print a table.

Every variant is the CPU preset with a few overrides. Selection and thresholds come from
held-out *normal training* images (with synthetic anomalies pasted in); the test split is
read only for the final evaluation. The ``val`` column is that selection score, the only
number a variant may be chosen by.

    python benchmarks/accuracy.py --data ../shared/data --category magnetic_tile
    python benchmarks/accuracy.py --variants paper-mask0,mask75,final --time-budget 300
"""

from __future__ import annotations

import argparse
import json
import time

from tfa_ray.config import get_preset
from tfa_ray.data import discover
from tfa_ray.evaluation import evaluate_model
from tfa_ray.package import TFAModel
from tfa_ray.training import fit

# name -> (description, preset overrides on top of cpu-small)
VARIANTS: dict[str, tuple[str, dict]] = {
    "paper-mask0": (
        "no masking, paper inference, std score",
        {"model__mask_ratio": 0.0, "model__test_mask_passes": 0, "anomaly__score": "std"},
    ),
    "mask25": (
        "mask 25 % of input tokens, paper inference, std score",
        {"model__mask_ratio": 0.25, "model__test_mask_passes": 0, "anomaly__score": "std"},
    ),
    "mask75": (
        "mask 75 %, paper inference, std score",
        {"model__mask_ratio": 0.75, "model__test_mask_passes": 0, "anomaly__score": "std"},
    ),
    "mask75-comp4": (
        "mask 75 %, 4 complementary test passes, std score",
        {"model__mask_ratio": 0.75, "model__test_mask_passes": 4, "anomaly__score": "std"},
    ),
    "mask75-auto": (
        "mask 75 %, paper inference, score kind selected on synthetic anomalies",
        {"model__mask_ratio": 0.75, "model__test_mask_passes": 0, "anomaly__score": "auto"},
    ),
    "final": ("the cpu-small preset as shipped", {}),
}

# Baselines measured on this machine with the same Lite0 features (from the issue).
REFERENCE = [
    ("PatchCore-style kNN (Lite0 2/4/10 @64)", 0.894, 0.795, 0.727),
    ("PaDiM-style Gaussian (Lite0 2/4/10 @64)", 0.937, 0.752, 0.744),
]


def run_variant(name: str, data, time_budget: float | None, epochs: int | None) -> dict:
    desc, overrides = VARIANTS[name]
    overrides = dict(overrides)
    if time_budget is not None:
        overrides["train__time_budget_s"] = time_budget
    if epochs is not None:
        overrides["train__epochs"] = epochs
    preset = get_preset("cpu-small", **overrides)
    t0 = time.perf_counter()
    result = fit(data, preset)
    train_s = time.perf_counter() - t0
    model = TFAModel(result.detector, result.preset, result.calibration)
    ev = evaluate_model(model, data)
    return {
        "variant": name,
        "description": desc,
        "train_s": train_s,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "score_kind": result.preset.anomaly.score,
        "val": result.selection_score,
        "eval_s": ev.seconds,
        **ev.metrics,
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'variant':<14} {'train':>7} {'ep':>3} {'best':>4} {'score':>5} {'val':>6} "
            f"{'image':>6} {'pixel':>6} {'AUPRO':>6} {'F1max':>6}  description")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:<14} {r['train_s'] / 60:>6.1f}m {r['epochs']:>3} "
              f"{r['best_epoch']:>4} {r['score_kind']:>5} {r['val']:>6.3f} "
              f"{r['image_auroc']:>6.3f} {r['pixel_auroc']:>6.3f} {r['aupro']:>6.3f} "
              f"{r['f1_max']:>6.3f}  {r['description']}")
    for name, img, pix, pro in REFERENCE:
        print(f"{'(reference)':<14} {'':>7} {'':>3} {'':>4} {'':>5} {'':>6} "
              f"{img:>6.3f} {pix:>6.3f} {pro:>6.3f} {'':>6}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--variants", default="final", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--time-budget", type=float, help="override the preset's training budget (s)")
    p.add_argument("--epochs", type=int, help="override the preset's epoch count")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()

    data = discover(args.data, args.category)
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, data, args.time_budget, args.epochs))
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
