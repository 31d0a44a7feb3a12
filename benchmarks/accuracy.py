"""Accuracy on a real category: train each variant, evaluate on the test split, print one table
with the same-feature baselines computed in the same run.

Every variant is the ``cpu-small`` preset with a few overrides (an ablation row each). Selection,
fusion weights and thresholds come from held-out *normal training* images (with synthetic
anomalies pasted in); the test split is read only for the final evaluation. The ``val`` column
is the selection score, the only number a variant may be chosen by. Each trained model also
gets rows for each evidence alone on the same weights (``rec``: the reconstruction map,
``gauss``: the per-position Gaussian), so the table shows what the reconstruction adds.

    python benchmarks/accuracy.py --data ../shared/data --category magnetic_tile,mvtec3d_tire

Several categories: one table each, then a summary (per metric, the shipped row's margin over
the better same-run baseline: per category, mean and worst) and the selection-regret table (the
evidence mix the selection chose against the test-best of the diagnostic rows of the same
trained model: each evidence alone, without each, and the mixes in ``DIAGNOSTIC_MIXES``).

    python benchmarks/accuracy.py --variants final,T1,no-noise --time-budget 300 --json out.json
    python benchmarks/accuracy.py --variants final,T1,no-noise,dual,linear,hard \
        --time-budget 150 --no-test-masking --no-baselines        # the short ablation table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/accuracy.py`: the repo root on the path,
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*`

import numpy as np
import torch

from benchmarks.baselines import BATCH, baseline_rows, per_defect, test_split
from tfa_ray.anomaly import image_score
from tfa_ray.choices import mix_of, with_mix
from tfa_ray.config import AnomalyConfig, get_preset
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


# Diagnostic mixes (reconstruction, statistics, kNN) each trained model is also evaluated with:
# the candidates of the selection-regret table, spread over the simplex
DIAGNOSTIC_MIXES = (
    (1 / 3, 1 / 3, 1 / 3),
    (0.2, 0.6, 0.2),
    (0.2, 0.2, 0.6),
    (0.5, 0.0, 0.5),
    (0.1, 0.0, 0.9),
)
METRICS = ("image_auroc", "pixel_auroc", "aupro")
BASELINES = ("PaDiM-style Gaussian", "PatchCore-style kNN")


def mix_label(mix) -> str:
    """(rec, stat, knn) shares in one word: .33/.33/.33"""
    return "/".join("1" if x > 0.995 else "0" if x < 0.005 else f"{x:.2f}"[1:] for x in mix)


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
    # label -> AnomalyConfig; each evidence alone, without each of the others, and the
    # diagnostic mixes (the regret table's candidates: they read test labels, so they are a
    # diagnostic of the selection, never a result; "selected" is the only row chosen without)
    options: dict[str, AnomalyConfig] = {"selected": a}
    if "gaussian" in evidence:
        alone = dataclasses.replace(a, image_evidence="map")
        options["rec alone"] = with_mix(alone, (1, 0, 0))
        if "residual" in evidence:
            resid = dataclasses.replace(alone, statistics="residual")
            options["resid alone"] = with_mix(resid, (0, 1, 0))
        if "knn" in evidence:
            options["knn alone"] = with_mix(alone, (0, 0, 1))
            rec, stat, knn = mix_of(a)
            options["no knn"] = with_mix(a, (rec, stat, 0))
            if rec > 0 and stat + knn > 0:
                options["no rec"] = with_mix(a, (0, stat, knn))
                # no TFA-Net at all: PaDiM's and PatchCore's maps fused the same way
                options["gauss+knn"] = with_mix(
                    dataclasses.replace(a, statistics="gaussian"), (0, stat, knn)
                )
            for mix in DIAGNOSTIC_MIXES:
                options[mix_label(mix)] = with_mix(a, mix)
    rows = []
    seen: set[AnomalyConfig] = set()
    for label, cfg in options.items():
        if cfg in seen:
            continue  # the same map as a row above (the selected one first)
        seen.add(cfg)
        if label == "knn alone":  # exactly the kNN map (with_mix keeps 1e-3 of the others)
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
                "mix": mix_of(cfg, "knn" in evidence),
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
            result.choice,
        )
    return evidence_rows(result, data, base, name, args.focus)


def print_table(rows: list[dict], focus: str) -> None:
    head = (
        f"{'variant':<28} {'train':>6} {'ep':>3} {'best':>4} {'evid.':>11} {'stat':>5} "
        f"{'rec/stat/knn':>12} {'img':>4} {'kind':>4} "
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
            f"{r.get('evidence', ''):>11} {r.get('statistics', '')[:5]:>5} "
            f"{mix_label(r['mix']) if 'mix' in r else '':>12} {r.get('image_evidence', '')[:4]:>4} "
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
    p.add_argument("--category", default="magnetic_tile", help="one or a comma list")
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
    p.add_argument(
        "--save",
        help="write each variant's model package to SAVE/<variant> (SAVE/<category>/<variant> "
        "for several categories)",
    )
    args = p.parse_args()

    rows: list[dict] = []
    for category in args.category.split(","):
        data = discover(args.data, category)
        save = args.save and (f"{args.save}/{category}" if "," in args.category else args.save)
        rows += category_rows(data, argparse.Namespace(**{**vars(args), "save": save}), rows)
    if args.per_defect:
        for r in rows:
            if r.get("evidence", "selected") == "selected":
                print_per_defect(r)
    print_summary(rows)
    print_regret(rows)


def category_rows(data, args, done: list[dict]) -> list[dict]:
    """One category's baselines and variants (``done``: earlier categories' rows, for --json)."""
    rows: list[dict] = []
    if not args.no_baselines:
        rows += baseline_rows(data, get_preset("cpu-small"))
    for name in args.variants.split(","):
        overrides = VARIANTS[name][1]
        if not args.no_baselines and FEATURE_FIELDS & set(overrides):
            rows += baseline_rows(data, get_preset("cpu-small", **overrides), suffix=f" ({name})")
        rows += run_variant(name, data, args)
        for r in rows:
            r["category"] = data.category
        print(f"\n{data.category}:")
        print_table(rows, args.focus)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(done + rows, f, indent=2, default=float)
    print(f"{data.category}: {len(data.test)} test images; image score of the baselines: max")
    return rows


def shipped(rows: list[dict], category: str) -> dict | None:
    """The shipped model's row: variant ``final`` as selected."""
    for r in rows:
        if r.get("category") == category and r["variant"] == "final":
            if r.get("evidence") == "selected":
                return r
    return None


def print_summary(rows: list[dict]) -> None:
    """Per metric, the shipped row's margin over the better same-run baseline: per category,
    mean and worst case."""
    margins: dict[str, dict[str, float]] = {}
    for category in dict.fromkeys(r["category"] for r in rows):
        ours = shipped(rows, category)
        base = [r for r in rows if r["category"] == category and r["variant"] in BASELINES]
        if ours is None or not base:
            continue
        margins[category] = {m: ours[m] - max(b[m] for b in base) for m in METRICS}
    if not margins:
        return
    print("\ncpu-small (final, selected) minus the better same-run baseline, per metric:")
    print(f"{'category':<16} {'image':>7} {'pixel':>7} {'AUPRO':>7}")
    for category, m in margins.items():
        print(f"{category:<16} " + " ".join(f"{m[k]:>+7.3f}" for k in METRICS))
    for what, agg in (("mean", np.mean), ("worst", np.min)):
        values = [agg([m[k] for m in margins.values()]) for k in METRICS]
        print(f"{what:<16} " + " ".join(f"{v:>+7.3f}" for v in values))


def print_regret(rows: list[dict]) -> None:
    """Per category: the mix the selection chose, the test-best mix among the diagnostic rows
    of the same trained model (by the mean of the three metrics) and the gap between them."""
    lines = []
    for category in dict.fromkeys(r["category"] for r in rows):
        ours = shipped(rows, category)
        if ours is None:
            continue
        tried = [r for r in rows if r["category"] == category and r["variant"].strip() == "final"]
        best = max(tried, key=lambda r: np.mean([r[m] for m in METRICS]))
        gap = [ours[m] - best[m] for m in METRICS]
        lines.append(
            f"{category:<16} {mix_label(ours['mix']):>14} {ours['image_evidence'][:4]:>4} "
            f"{best['evidence']:>14} {mix_label(best['mix']):>14} {best['image_evidence'][:4]:>4} "
            + " ".join(f"{g:>+7.3f}" for g in [*gap, float(np.mean(gap))])
        )
    if lines:
        print(
            "\nselection regret: the chosen mix (rec/stat/knn) against the test-best diagnostic row"
        )
        print(
            f"{'category':<16} {'chosen':>14} {'img':>4} {'test-best row':>14} {'its mix':>14} "
            f"{'img':>4} {'image':>7} {'pixel':>7} {'AUPRO':>7} {'mean':>7}"
        )
        print("\n".join(lines))


if __name__ == "__main__":
    main()
