"""Accuracy on a real category: train each variant, evaluate on the test split, print one table
with the same-feature baselines computed in the same run.

Every variant is the ``cpu-small`` preset with a few overrides (an ablation row each). Selection,
fusion weights and thresholds come from held-out *normal training* images (with synthetic
anomalies pasted in); the test split is read only for the final evaluation. The ``val`` column
is the selection score, the only number a variant may be chosen by. Each trained model also
gets rows for each evidence alone on the same weights (``rec``: the reconstruction map,
``gauss``: the per-position Gaussian), so the table shows what the reconstruction adds.

    python benchmarks/accuracy.py --data ../shared/data --category magnetic_tile
    python benchmarks/accuracy.py --variants final,T1,no-noise --time-budget 300 --json out.json
    python benchmarks/accuracy.py --variants final,T1,no-noise,dual,linear,hard \
        --time-budget 150 --no-test-masking --no-baselines        # the short ablation table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from baselines import BATCH, baseline_rows, per_defect, test_split

from tfa_ray.anomaly import image_score
from tfa_ray.config import get_preset
from tfa_ray.data import discover, load_image
from tfa_ray.metrics import evaluate
from tfa_ray.package import save_model
from tfa_ray.training import fit

BACKBONE = get_preset("cpu-small").model.backbone

# name -> (description, overrides on top of cpu-small)
VARIANTS: dict[str, tuple[str, dict]] = {
    "final": ("cpu-small as shipped", {}),
    "no-resid": (
        "no residual Gaussian (the features' Gaussian only)",
        {"model__residual_gaussian": False, "anomaly__statistics": "gaussian"},
    ),
    "raw": (
        "no per-image normalisation (the previous cpu-small input)",
        {"model__backbone": dataclasses.replace(BACKBONE, per_image_norm=False)},
    ),
    "px256": (
        "256-pixel inputs, plain bilinear taps (the cpu-small input before 384 px)",
        {
            "model__image_size": 256,
            "model__backbone": dataclasses.replace(BACKBONE, antialias=False),
        },
    ),
    "T1": ("one template (the paper's) instead of a bank of 8", {"model__num_templates": 1}),
    "no-noise": ("no noisy bottleneck (input dropout 0)", {"model__input_dropout": 0.0}),
    "dual": ("complementary (dual) masks in training", {"model__mask_mode": "dual"}),
    "linear": ("linear attention in TFAM", {"model__tfam_attention": "linear"}),
    "hard": ("hard-mined loss (easiest 90 % x 0.1)", {"anomaly__hard_mining": 0.9}),
    "small-synth": (
        "selection with small synthetic defects only",
        {"train__synthetic_large": False},
    ),
    "v1": (
        "the previous cpu-small: taps 1/2/4 @ 64, K=8, one template, no noise, no Gaussian",
        {
            "model__backbone": dataclasses.replace(
                BACKBONE,
                taps=("blocks.1", "blocks.2", "blocks.4"),
                antialias=False,
                per_image_norm=False,
            ),
            "model__image_size": 256,
            "model__feature_size": 64,
            "model__patch_size": 8,
            "model__num_templates": 1,
            "model__input_dropout": 0.0,
            "model__gaussian_size": 0,
            "model__knn_memory": 0,
            "train__epochs": 60,
        },
    ),
}


def evidence_rows(result, data, base: dict, name: str, focus: str) -> list[dict]:
    """The trained model as selected, and each evidence alone on the same weights."""
    preset, det = result.preset, result.detector.eval()
    size = preset.model.image_size
    labels, types, masks = test_split(data, size)
    maps: dict[str, list[torch.Tensor]] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data.test), BATCH):
            images = torch.stack([load_image(s.path, size) for s in data.test[i : i + BATCH]])
            for kind, m in det.evidence(det.features(images), preset.anomaly).items():
                maps.setdefault(kind, []).append(m)
    evidence = {k: torch.cat(v) for k, v in maps.items()}
    eval_s = time.perf_counter() - t0
    a = preset.anomaly
    # label -> AnomalyConfig overrides; each evidence alone and without each of the others
    options: dict[str, dict] = {"selected": {}}
    if "gaussian" in evidence:
        alone = dict(image_evidence="map", w_knn=0.0)
        options["rec alone"] = dict(alone, w_reconstruction=1.0)
        options["gauss alone"] = dict(alone, w_reconstruction=0.0, statistics="gaussian")
        if "residual" in evidence:
            options["resid alone"] = dict(alone, w_reconstruction=0.0, statistics="residual")
        if "knn" in evidence:
            options["knn alone"] = dict(alone, w_reconstruction=0.0)  # (the map, below)
            options["no knn"] = dict(w_knn=0.0)
            if 0 < a.w_reconstruction < 1:  # the other two, weighted as in the selected map
                w_knn = a.w_knn / (1 - a.w_reconstruction)
                options["no rec"] = dict(w_reconstruction=0.0, w_knn=w_knn)
                # no TFA-Net at all: PaDiM's and PatchCore's maps fused the same way
                no_tfa = dict(w_reconstruction=0.0, w_knn=w_knn, statistics="gaussian")
                options["gauss+knn"] = no_tfa
        # the other fusions the selection set ranked: a diagnostic that reads test labels
        # (not a result; the selected row is the only one chosen without them)
        for stat in [k for k in ("gaussian", "residual") if k in evidence]:
            for tried in preset.train.try_fusion_weights:
                if 0 < tried < 1:
                    options[f"{stat[:5]} w={tried:g}"] = dict(
                        w_reconstruction=tried, statistics=stat
                    )
    rows = []
    for label, overrides in options.items():
        cfg = dataclasses.replace(a, **overrides)
        if label != "selected" and cfg == a:
            continue  # that is the selected row
        if label == "knn alone":
            fused = det.map_norms()["knn"](evidence["knn"])
            scores = image_score(fused, cfg)
        else:
            fused, scores = det.decide(evidence, cfg)
        scores, fused = scores.numpy(), fused.numpy()
        defects = per_defect(types, labels, scores, masks, fused)
        rows.append(
            {
                **base,
                "variant": name if label == "selected" else f"  {name}",
                "evidence": label,
                "w_rec": cfg.w_reconstruction,
                "w_knn": cfg.w_knn if "knn" in evidence else 0.0,
                "statistics": cfg.statistics,
                "image_evidence": cfg.image_evidence,
                "score_kind": cfg.score,
                "passes": pass_label(preset.model.test_mask_passes, preset.model.test_mask_layout),
                "eval_s": eval_s,
                **evaluate(labels, scores, masks, fused),
                "focus": defects.get(focus, {}),
                "per_defect": defects,
            }
        )
    return rows


def pass_label(passes: int, layout: str) -> str:
    """Test-time masking in one word: 0 (off), 4 (4 lattice passes), b16 (16 blocks)."""
    return f"b{passes}" if passes and layout == "blocks" else str(passes)


# overrides that change the features, so the baselines are refitted for that variant
FEATURE_FIELDS = {"model__backbone", "model__image_size", "model__feature_size"}


def run_variant(name: str, data, args) -> list[dict]:
    desc, overrides = VARIANTS[name]
    overrides = dict(overrides)
    if args.time_budget is not None:
        overrides["train__time_budget_s"] = args.time_budget
    if args.no_test_masking:
        overrides.update(train__try_test_mask_passes=(), train__try_test_mask_blocks=())
    preset = get_preset("cpu-small", **overrides)
    t0 = time.perf_counter()
    result = fit(data, preset)
    base = {
        "train_s": time.perf_counter() - t0,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "val": result.selection_score,
        "description": desc,
    }
    if args.save:
        save_model(
            f"{args.save}/{name}",
            result.detector,
            result.preset,
            result.calibration,
            {"category": data.category, "history": result.history},
        )
    return evidence_rows(result, data, base, name, args.focus)


def print_table(rows: list[dict], focus: str) -> None:
    head = (
        f"{'variant':<28} {'train':>6} {'ep':>3} {'best':>4} {'evid.':>11} {'stat':>5} {'w':>4} "
        f"{'knn':>4} {'img':>4} {'kind':>4} "
        f"{'pass':>4} {'val':>6} {'image':>6} {'pixel':>6} {'AUPRO':>6} "
        f"{focus[:6] + '-px':>9} {focus[:6] + '-pro':>10}  description"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        train = f"{r['train_s'] / 60:.1f}m"
        fc = r.get("focus") or (r.get("per_defect") or {}).get(focus, {})
        print(
            f"{r['variant']:<28} {train:>6} {r.get('epochs', ''):>3} {r.get('best_epoch', ''):>4} "
            f"{r.get('evidence', ''):>11} {r.get('statistics', '')[:5]:>5} {r.get('w_rec', ''):>4} "
            f"{r.get('w_knn', ''):>4} {r.get('image_evidence', '')[:4]:>4} "
            f"{r.get('score_kind', 'max'):>4} "
            f"{r.get('passes', ''):>4} {r.get('val', float('nan')):>6.3f} "
            f"{r['image_auroc']:>6.3f} {r['pixel_auroc']:>6.3f} {r['aupro']:>6.3f} "
            f"{fc.get('pixel_auroc', float('nan')):>9.3f} {fc.get('aupro', float('nan')):>10.3f}"
            f"  {r['description']}"
        )


def print_per_defect(row: dict) -> None:
    print(f"\nper defect type, {row['variant'].strip()} ({row.get('evidence', '')}):")
    print(f"{'defect':<12} {'images':>6} {'area':>6} {'image':>6} {'pixel':>6} {'AUPRO':>6}")
    for kind, m in row["per_defect"].items():
        print(
            f"{kind:<12} {m['images']:>6} {m['area']:>6.3f} {m['image_auroc']:>6.3f} "
            f"{m['pixel_auroc']:>6.3f} {m['aupro']:>6.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--variants", default="final", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--time-budget", type=float, help="override the preset's training budget (s)")
    p.add_argument("--no-baselines", action="store_true", help="skip the PaDiM / PatchCore rows")
    p.add_argument(
        "--no-test-masking",
        action="store_true",
        help="selection tries no test-time masking (quicker ablations of training switches)",
    )
    p.add_argument("--focus", default="uneven", help="defect type with its own columns")
    p.add_argument("--per-defect", action="store_true", help="per-defect tables, selected rows")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--save", help="write each variant's model package to SAVE/<variant>")
    args = p.parse_args()

    data = discover(args.data, args.category)
    rows: list[dict] = []
    if not args.no_baselines:
        rows += baseline_rows(data, get_preset("cpu-small"))
    for name in args.variants.split(","):
        overrides = VARIANTS[name][1]
        if not args.no_baselines and FEATURE_FIELDS & set(overrides):
            rows += baseline_rows(data, get_preset("cpu-small", **overrides), suffix=f" ({name})")
        rows += run_variant(name, data, args)
        print_table(rows, args.focus)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2, default=float)
    if args.per_defect:
        for r in rows:
            if r.get("evidence", "selected") == "selected":
                print_per_defect(r)
    print(f"\n{data.category}: {len(data.test)} test images; image score of the baselines: max")


if __name__ == "__main__":
    main()
