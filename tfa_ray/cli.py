"""`tfa-ray` command line: train, register, evaluate, score, synth."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from tfa_ray.config import PRESETS, get_preset
from tfa_ray.errors import EXIT_ERROR_ROWS, EXIT_FAILED, EXIT_OK, EXIT_USAGE, one_line

log = logging.getLogger(__name__)


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
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or "__" not in key:
            raise ValueError(
                f"--set takes section__field=value (e.g. model__mask_ratio=0.5): {item}"
            )
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    preset = get_preset(args.preset, **overrides)
    if args.backbone_weights is not None:
        backbone = dataclasses.replace(preset.model.backbone, weights=args.backbone_weights)
        preset = dataclasses.replace(
            preset, model=dataclasses.replace(preset.model, backbone=backbone)
        )
    if args.categories or args.ray:
        return cmd_train_ray(args, preset)
    if not args.category or not args.output:
        raise ValueError("in-process training needs --category and --output (or use --categories)")
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
    save_model(args.output, result.detector, result.preset, result.calibration, meta, result.choice)
    print(f"model written to {args.output}")
    return 0


def cmd_train_ray(args: argparse.Namespace, preset) -> int:
    """Ray Train: one TorchTrainer per category, several at once, tracked in MLflow."""
    import os

    from tfa_ray import registry, train_ray
    from tfa_ray.data import list_categories

    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url  # workers inherit the address
    if args.categories == "all":
        categories = list_categories(args.data)
        if not categories:
            raise ValueError(f"{args.data}: no category folders with train/good found")
    elif args.categories:
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    else:
        categories = [args.category] if args.category else []
    if not categories:
        raise ValueError("name the categories: --categories a,b,c or --categories all")
    if not args.no_track:
        try:
            registry.check_tracking()
        except registry.RegistryError as e:
            raise ValueError(str(e)) from None
    outputs = None
    if args.output:
        outputs = (
            {categories[0]: args.output}
            if args.category and not args.categories
            else {c: os.path.join(args.output, c) for c in categories}
        )
    settings = train_ray.RaySettings(
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path,
        max_failures=args.max_failures,
        endpoint_url=args.endpoint_url,
    )
    t0 = time.perf_counter()
    outcomes = train_ray.train_categories(
        args.data,
        categories,
        args.preset,
        preset,
        settings,
        max_concurrent=args.max_concurrent,
        template=args.template,
        skip_bad=args.skip_bad,
        outputs=outputs,
        track=not args.no_track,
        prefix=args.model_prefix,
        promote_if_better=args.promote_if_better,
    )
    failed = [o.category for o in outcomes if not o.ok]
    print(train_ray.summary_table(outcomes))
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} categories trained in "
        f"{time.perf_counter() - t0:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from tfa_ray import registry

    try:
        if args.models_command == "list":
            rows = registry.list_models(prefix=args.prefix)
            cols = ["name", "latest", "champion", "candidate", *registry.METRIC_NAMES]
            print(registry.format_table(rows, [*cols, "threshold", "created"]))
        else:
            rows = registry.show_model(args.name)
            cols = ["version", "aliases", *registry.METRIC_NAMES, "threshold", "created"]
            print(registry.format_table(rows, [*cols, "data_uri", "run"]))
    except (LookupError, registry.RegistryError) as e:
        print(f"tfa-ray models: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tfa_ray import registry

    try:
        if args.promote_if_better:
            ok, why = registry.promote_if_better(
                args.category, args.promote_if_better, args.version, args.alias, args.prefix
            )
            print(why)
            return 0 if ok else 3
        version = registry.promote(args.category, args.version, args.alias, args.prefix)
    except (LookupError, registry.RegistryError) as e:
        print(f"tfa-ray promote: error: {e}", file=sys.stderr)
        return 2
    print(f"{registry.model_name(args.category, args.prefix)}@{args.alias} -> version {version}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register a package that is already trained: one a training job kept when the registry
    failed, or one trained elsewhere."""
    from tfa_ray import registry
    from tfa_ray.train_register import register_package

    mv = register_package(args.package, args.category, prefix=args.prefix)
    print(f"registered {mv.name} version {mv.version} (alias candidate) from {args.package}")
    if args.promote_if_better:
        _, why = registry.promote_if_better(
            args.category, args.promote_if_better, version=mv.version, prefix=args.prefix
        )
        print(why)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tfa_ray.data import discover
    from tfa_ray.evaluation import evaluate_model, pick_device
    from tfa_ray.package import load_model
    from tfa_ray.registry import resolve_uri

    try:
        model_dir = resolve_uri(args.model)  # a directory, or models:/NAME@ALIAS, models:/NAME/N
    except LookupError as e:
        raise ValueError(str(e)) from None
    model = load_model(model_dir, device=pick_device(args.device))
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


def run_score(args: argparse.Namespace):
    """Score, then the report and the JSON summary when asked (``tfa-ray score``, jobs/score.py)."""
    from tfa_ray.report import write_report
    from tfa_ray.scoring import config_from_args, score

    cfg, resolver = config_from_args(args)
    summary = score(cfg, resolver)
    if args.report:
        write_report(summary.run_dir, args.report, endpoint_url=cfg.endpoint_url)
        print(f"report written to {args.report}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return summary


def score_exit_code(summary) -> int:
    """0: every input ok; 3: finished with error rows; 1: nothing was scored."""
    if not summary.total:
        return EXIT_FAILED
    return EXIT_ERROR_ROWS if summary.error else EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    return score_exit_code(run_score(args))


def cmd_report(args: argparse.Namespace) -> int:
    from tfa_ray.report import write_report

    write_report(
        args.results, args.output, endpoint_url=args.endpoint_url, top_n=args.top, last=args.last
    )
    print(f"report written to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tfa_ray.demo import DemoSettings, run_demo

    settings = DemoSettings(workdir=args.workdir, num_cpus=args.num_cpus)
    if args.quick:  # seconds instead of minutes: tiny model and data (tests, smoke checks)
        settings.preset, settings.size, settings.epochs = "test-tiny", 64, 2
        settings.n_train, settings.n_test_good, settings.n_test_defect = 12, 3, 5
    if args.time_budget is not None:
        settings.time_budget_s = args.time_budget
    run_demo(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfa-ray", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--log-file",
        help="full logs go here; default: <demo workdir>/tfa-ray.log for the demo, "
        "else a file in the temporary directory; named at the end of the run",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train categories on Ray Train (or one in-process) and register them"
    )
    t.add_argument("--data", required=True, help="data root (local path or s3:// URL)")
    t.add_argument(
        "--category", help="one category, trained in-process (with --output; --ray for Ray)"
    )
    t.add_argument("--categories", help="a,b,c or 'all' (discovered): trained on Ray Train")
    t.add_argument("--ray", action="store_true", help="train --category on Ray Train too")
    t.add_argument("--num-workers", type=int, default=1, help="Ray workers per category (DDP)")
    t.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker")
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument(
        "--max-concurrent",
        type=int,
        help="categories at once (default: all; Ray queues what does not fit yet)",
    )
    t.add_argument("--storage-path", help="checkpoints: a directory or s3:// (default ./runs/ray)")
    t.add_argument("--max-failures", type=int, default=1, help="worker-group restarts allowed")
    t.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    t.add_argument("--no-track", action="store_true", help="do not log / register in MLflow")
    t.add_argument("--model-prefix", default="tfa-", help="registered name prefix")
    t.add_argument(
        "--promote-if-better", metavar="METRIC", help="make champion if METRIC >= champion's"
    )
    t.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    t.add_argument("--epochs", type=int, help="epochs (disables the preset's time budget)")
    t.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    t.add_argument(
        "--set",
        action="append",
        metavar="SECTION__FIELD=VALUE",
        help="override a preset field, e.g. --set model__mask_ratio=0.5 (repeatable)",
    )
    t.add_argument("--template", help="template image (default: first normal training image)")
    t.add_argument("--backbone-weights", help="backbone weights: builtin, hub, a path or s3:// URL")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable training images")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument(
        "--output", help="model directory (--category) or parent of one per category (--categories)"
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a model on a category's test split")
    e.add_argument(
        "--model", required=True, help="model directory, models:/NAME@ALIAS or models:/NAME/N"
    )
    e.add_argument("--data", required=True)
    e.add_argument("--category")
    e.add_argument("--json", help="write the metrics to this JSON file")
    e.add_argument("--maps", help="save image / heat map / mask overlays to this directory")
    e.add_argument(
        "--device", default="auto", help="auto (cuda when available, like train), cpu or cuda"
    )
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="registered models: list, show")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="one row per registered category")
    ml.add_argument("--prefix", default="tfa-")
    ms = msub.add_parser("show", help="every version of one registered model")
    ms.add_argument("name", help="e.g. tfa-bottle")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("promote", help="point an alias (champion) at a model version")
    pr.add_argument("category")
    pr.add_argument("--version", type=int, help="default: the current candidate")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--prefix", default="tfa-")
    pr.add_argument(
        "--promote-if-better", metavar="METRIC", help="only if METRIC >= the alias holder's"
    )
    pr.set_defaults(func=cmd_promote)

    rg = sub.add_parser(
        "register", help="register a trained package (kept by a training job, or from elsewhere)"
    )
    rg.add_argument("--package", required=True, help="package directory or s3:// URL")
    rg.add_argument("--category", required=True)
    rg.add_argument("--prefix", default="tfa-")
    rg.add_argument(
        "--promote-if-better", metavar="METRIC", help="make champion if METRIC >= champion's"
    )
    rg.set_defaults(func=cmd_register)

    s = sub.add_parser("synth", help="write a small procedural dataset in MVTec AD layout")
    s.add_argument("--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    from tfa_ray.scoring import add_score_arguments

    sc = sub.add_parser("score", help="batch-score images on Ray Data into Parquet")
    add_score_arguments(sc)
    sc.set_defaults(func=cmd_score)

    r = sub.add_parser("report", help="write the HTML report of scoring results")
    r.add_argument("--results", required=True, help="a run directory or the output root")
    r.add_argument("--output", required=True, help="HTML file to write (path or URL)")
    r.add_argument("--top", type=int, default=8, help="most anomalous images per category")
    r.add_argument(
        "--last",
        type=int,
        metavar="N",
        help="--results is an output root: report its latest finished run, with a trend "
        "(flag rate, median score, PSI, KS per category) over its last N finished runs",
    )
    r.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    r.set_defaults(func=cmd_report)

    dm = sub.add_parser("demo", help="synthetic data -> train -> register -> score -> report")
    dm.add_argument("--workdir", default="demo", help="where everything is written")
    dm.add_argument("--num-cpus", type=int, help="CPUs for the local Ray cluster")
    dm.add_argument("--time-budget", type=float, help="training seconds per category")
    dm.add_argument("--quick", action="store_true", help="tiny model and data (a smoke run)")
    dm.set_defaults(func=cmd_demo)
    return p


LONG_RUNNING = ("train", "evaluate", "score", "demo")  # these name their log file at the end


def setup_logging(verbose: bool, log_file: str) -> list[logging.Handler]:
    """Warnings (INFO with -v) on the console, INFO and up in ``log_file``."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(fmt)
    file_handler.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    return [file_handler, console]


def _default_log_file(args: argparse.Namespace) -> str:
    import os
    import tempfile

    if args.command == "demo":
        return os.path.join(os.path.abspath(args.workdir), "tfa-ray.log")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(tempfile.gettempdir(), f"tfa-ray-{args.command}-{stamp}.log")


def main(argv: list[str] | None = None) -> int:
    from tfa_ray.ray_env import session_log_dir

    args = build_parser().parse_args(argv)
    log_file = args.log_file or _default_log_file(args)
    handlers = setup_logging(args.verbose, log_file)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted", exc_info=True, extra={"file_only": True})
        print(f"tfa-ray {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - every failure: one line here, the rest in the log
        usage = isinstance(exc, FileNotFoundError | ValueError)
        log.error("%s failed", args.command, exc_info=exc, extra={"file_only": True})
        print(f"tfa-ray {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILED
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if args.command in LONG_RUNNING:
            ray_logs = session_log_dir()
            print(f"logs: {log_file}" + (f" (Ray workers: {ray_logs})" if ray_logs else ""))


if __name__ == "__main__":
    sys.exit(main())
