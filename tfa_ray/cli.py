"""`tfa-ray` command line: train, evaluate, synth."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from tfa_ray.config import PRESETS, get_preset


def metrics_table(metrics: dict, title: str = "") -> str:
    rows = [(k, v) for k, v in metrics.items() if v is not None and not isinstance(v, dict)]
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = [title] if title else []
    lines += [
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows
    ]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from tfa_ray.data import discover
    from tfa_ray.package import save_model
    from tfa_ray.training import fit

    overrides = {}
    if args.epochs is not None:
        overrides.update(train__epochs=args.epochs, train__time_budget_s=0.0)
    if args.time_budget is not None:
        overrides["train__time_budget_s"] = args.time_budget
    preset = get_preset(args.preset, **overrides)
    if args.backbone_weights is not None:
        backbone = dataclasses.replace(preset.model.backbone, weights=args.backbone_weights)
        preset = dataclasses.replace(
            preset, model=dataclasses.replace(preset.model, backbone=backbone)
        )
    data = discover(args.data, args.category)
    result = fit(data, preset, template=args.template, skip_bad=args.skip_bad, device=args.device)
    meta = {
        "category": data.category,
        "data": args.data,
        "preset": args.preset,
        "best_epoch": result.best_epoch,
        "selection_score": result.selection_score,
        "num_train": result.num_train,
        "num_val": result.num_val,
        "train_wall_time_s": result.wall_time_s,
        "template_path": result.template_path,
        "history": result.history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model(args.output, result.detector, preset, result.calibration, meta)
    print(f"model written to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tfa_ray.data import discover
    from tfa_ray.evaluation import evaluate_model
    from tfa_ray.package import load_model

    model = load_model(args.model, device=args.device or "cpu")
    category = args.category or model.meta.get("category")
    data = discover(args.data, category)
    result = evaluate_model(model, data, maps_dir=args.maps)
    print(metrics_table(result.metrics, f"{category}: {len(result.labels)} test images"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.metrics, f, indent=2)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tfa_ray.synth import make_dataset

    cats = make_dataset(args.output, seed=args.seed)
    print(f"wrote categories {', '.join(cats)} to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfa-ray", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one category and write a model directory")
    t.add_argument("--data", required=True, help="data root (local path or s3:// URL)")
    t.add_argument("--category", help="category folder under the data root")
    t.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    t.add_argument("--epochs", type=int, help="epochs (disables the preset's time budget)")
    t.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    t.add_argument("--template", help="template image (default: first normal training image)")
    t.add_argument("--backbone-weights", help="backbone weights: builtin, hub, a path or s3:// URL")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable training images")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--output", required=True, help="model directory to write")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a model on a category's test split")
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument("--data", required=True)
    e.add_argument("--category")
    e.add_argument("--json", help="write the metrics to this JSON file")
    e.add_argument("--maps", help="save image / heat map / mask overlays to this directory")
    e.add_argument("--device")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("synth", help="write a small procedural dataset in MVTec AD layout")
    s.add_argument("--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tfa-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
