"""`tfa-ray demo`: the whole system on one machine, from nothing, in minutes.

1. a synthetic MVTec-layout dataset of two categories (exact defect masks);
2. training of both categories with the CPU preset on local Ray Train, logged and registered in
   a local MLflow (``sqlite:///<workdir>/mlflow.db``), then promoted to ``champion``;
3. a scoring archive (``archive/<category>/<defect type>/<image>.png``: the test images plus a
   few deliberately broken files) scored by the Ray Data pipeline into local Parquet, with
   models looked up in the registry;
4. the HTML report, and a summary: counts, anomalies found, and image / pixel AUROC of the
   scored archive against the synthetic ground truth (pixel AUROC from the stored 8-bit heat
   maps).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tfa_ray import storage

__all__ = ["DemoSettings", "run_demo"]

BROKEN = {
    "broken-empty.png": b"",
    "broken-truncated.png": None,  # filled in: half of a real PNG
    "broken-text.jpg": b"this is not a JPEG\n",
}


@dataclass
class DemoSettings:
    workdir: str = "demo"
    preset: str = "cpu-small"
    time_budget_s: float = 150.0  # training time per category
    epochs: int | None = None
    n_train: int = 40
    n_test_good: int = 8
    n_test_defect: int = 12
    size: int = 256
    shard_size: int = 16
    batch_size: int = 8
    num_cpus: int | None = None
    seed: int = 0


def build_archive(data_root: str, archive: str, categories: list[str]) -> dict[str, tuple]:
    """Copy each category's test split to ``archive/<cat>/<type>/<stem>.png`` and add broken
    files; returns ``{path: (label, mask path or None)}`` for the real images."""
    from tfa_ray.data import discover

    truth: dict[str, tuple] = {}
    for cat in categories:
        data = discover(data_root, cat)
        for s in data.test:
            dst = os.path.join(archive, cat, s.defect_type, os.path.basename(s.path))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(s.path, dst)
            truth[dst] = (s.label, s.mask_paths[0] if s.mask_paths else None)
        png = open(data.test[0].path, "rb").read()
        for name, content in BROKEN.items():
            with open(os.path.join(archive, cat, name), "wb") as f:
                f.write(png[: len(png) // 2] if content is None else content)
    return truth


def ground_truth_metrics(results: list[dict], truth: dict[str, tuple]) -> dict[str, dict]:
    """Image AUROC from scores, pixel AUROC from the stored heat maps, per category."""
    from tfa_ray.data import decode_mask
    from tfa_ray.metrics import image_auroc, pixel_auroc
    from tfa_ray.scoring import decode_heatmap

    out: dict[str, dict] = {}
    by_cat: dict[str, list[dict]] = {}
    for r in results:
        if r["status"] == "ok" and r["path"] in truth:
            by_cat.setdefault(r["category"], []).append(r)
    for cat, rows in sorted(by_cat.items()):
        labels = np.array([truth[r["path"]][0] for r in rows])
        scores = np.array([r["score"] for r in rows])
        metrics: dict = {"images": len(rows)}
        if 0 < labels.sum() < len(labels):
            metrics["image_auroc"] = image_auroc(labels, scores)
        masks, maps = [], []
        for r in rows:
            heat = decode_heatmap(r, image_size=True)  # the truth masks are at image size
            if heat is None:
                continue
            mask_path = truth[r["path"]][1]
            mask = (
                decode_mask(storage.read_bytes(mask_path))
                if mask_path
                else np.zeros(heat.shape, bool)
            )
            masks.append(mask)
            maps.append(heat.astype(np.float32))
        if masks and any(m.any() for m in masks):
            metrics["pixel_auroc"] = pixel_auroc(np.stack(masks), np.stack(maps))
        out[cat] = metrics
    return out


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> dict:
    from tfa_ray import registry, scoring
    from tfa_ray.config import get_preset
    from tfa_ray.ray_env import init_ray
    from tfa_ray.report import write_report
    from tfa_ray.synth import make_dataset
    from tfa_ray.train_ray import RaySettings, summary_table, train_categories

    t0 = time.perf_counter()
    work = os.path.abspath(settings.workdir)
    os.makedirs(work, exist_ok=True)
    uri = "sqlite:///" + os.path.join(work, "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # before Ray starts: its workers inherit it
    # a busy laptop may take more than Ray Train's default 60 s to start a worker group
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    data_root = os.path.join(work, "data")
    archive = os.path.join(work, "archive")
    shutil.rmtree(data_root, ignore_errors=True)
    shutil.rmtree(archive, ignore_errors=True)

    echo(f"[1/4] synthetic dataset -> {data_root}")
    cats = make_dataset(
        data_root,
        n_train=settings.n_train,
        n_test_good=settings.n_test_good,
        n_test_defect=settings.n_test_defect,
        size=settings.size,
        seed=settings.seed,
    )

    overrides: dict = {"train__time_budget_s": settings.time_budget_s}
    if settings.epochs is not None:
        overrides["train__epochs"] = settings.epochs
    preset = get_preset(settings.preset, **overrides)
    init_ray(settings.num_cpus)
    echo(f"[2/4] training {', '.join(cats)} with preset {settings.preset} (MLflow: {uri})")
    outcomes = train_categories(
        data_root,
        cats,
        settings.preset,
        preset,
        RaySettings(storage_path=os.path.join(work, "ray-checkpoints")),
        max_concurrent=1,
        echo=echo,
    )
    echo(summary_table(outcomes))
    for o in outcomes:
        if o.ok:
            registry.promote(o.category, o.version, uri=uri)
            echo(f"[{o.category}] {o.name} v{o.version} promoted to champion")

    echo(f"[3/4] scoring {archive} (test images + broken files)")
    truth = build_archive(data_root, archive, cats)
    out = os.path.join(work, "scores")
    report_path = os.path.join(work, "report.html")
    summary = scoring.score(
        scoring.ScoreConfig(
            input=archive,
            output=out,
            heatmaps=True,
            shard_size=settings.shard_size,
            batch_size=settings.batch_size,
        ),
        scoring.RegistryResolver(uri),
        echo=echo,
    )
    write_report(summary.run_dir, report_path)
    echo("[4/4] ground truth check")
    results = scoring.read_results(
        summary.run_dir,
        columns=[
            "path",
            "category",
            "status",
            "score",
            "is_anomalous",
            "heatmap_png",
            "heatmap_low",
            "heatmap_high",
            "width",
            "height",
        ],  # fmt: skip
    ).to_pylist()
    metrics = ground_truth_metrics(results, truth)
    lines = [
        "",
        f"{'category':<10} {'images':>6} {'ok':>4} {'error':>5} {'anomalous':>9} "
        f"{'true defects':>12} {'image AUROC':>11} {'pixel AUROC':>11}",
    ]
    for cat, c in sorted(summary.per_category.items()):
        m = metrics.get(cat, {})
        defects = sum(1 for p, (lab, _) in truth.items() if lab and f"/{cat}/" in p)
        lines.append(
            f"{cat:<10} {c['total']:>6} {c['ok']:>4} {c['error']:>5} {c['anomalous']:>9} "
            f"{defects:>12} {m.get('image_auroc', float('nan')):>11.3f} "
            f"{m.get('pixel_auroc', float('nan')):>11.3f}"
        )
    lines += [
        "",
        f"results: {summary.run_dir}",
        f"report:  {report_path}",
        f"MLflow:  {uri}  (mlflow ui --backend-store-uri {uri})",
        f"total time {time.perf_counter() - t0:.0f}s",
    ]
    echo("\n".join(lines))
    return {"summary": summary.to_dict(), "metrics": metrics, "report": report_path}
