"""The tail of a training job: keep the trained package durable, then register it.

A finished training is never lost to a registry that does not answer. Before MLflow is asked,
the package and its training record (summary, history, test metrics, params) are written to
durable storage beside the job's checkpoints::

    <storage path>/packages/<prefix><category>-<job key>/package/     the model package
                                                      /result.json  written last: complete
                                                      /registered.json  after registration

The job key is a hash of what defines the training (data URL, category, preset, template),
so a rerun of the same job finds a kept package that was never registered and registers it
instead of training again. A failed registration ends with one line naming the package and
the command that registers it: ``tfa-ray register --package URL --category NAME`` (which also
registers packages trained elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tfa_ray import storage

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
REGISTERED_FILE = "registered.json"


def job_key(data: str, category: str, preset_json: str, template: str | None) -> str:
    """What makes two training jobs "the same job", as 12 hex digits."""
    text = json.dumps([data, category, json.loads(preset_json), template], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def kept_dir(storage_root: str, name: str, key: str) -> str:
    """Where a job's trained package is kept (``storage_root``: a directory or s3:// URL)."""
    return storage.join(storage_root, "packages", f"{name}-{key}")


def keep_package(package_dir: str, record: dict[str, Any], dest: str) -> str:
    """Copy a local package and its training record to ``dest``; the record last (the commit
    point: a kept package with a record is complete). Returns the kept package's URL."""
    from tfa_ray.package import FILES

    kept = storage.resolve(dest)
    pkg = kept.join("package")
    for f in FILES:
        with open(os.path.join(package_dir, f), "rb") as fh:
            pkg.join(f).write_bytes(fh.read())
    kept.join(RESULT_FILE).write_bytes(json.dumps(record).encode())
    kept.join(REGISTERED_FILE).remove()
    return pkg.url


def find_unregistered(dest: str) -> dict[str, Any] | None:
    """The training record of a complete kept package that was never registered, or None."""
    kept = storage.resolve(dest)
    if kept.join(REGISTERED_FILE).exists():
        return None
    try:
        record = json.loads(kept.join(RESULT_FILE).read_bytes())
    except FileNotFoundError:
        return None
    from tfa_ray.package_check import PackageError, check_package

    try:
        check_package(kept.join("package"))
    except (PackageError, FileNotFoundError) as e:
        log.warning("kept package in %s is unusable (%s): training again", dest, e)
        return None
    return record


@contextmanager
def local_copy(url: str | storage.Location) -> Iterator[str]:
    """A local directory holding the package at ``url`` (itself when it is local)."""
    package = storage.locate(url)
    if package.local:
        yield storage.normalize(package.url)
        return
    from tfa_ray.package import FILES

    tmp = tempfile.mkdtemp(prefix="tfa-register-")
    try:
        for f in FILES:
            with open(os.path.join(tmp, f), "wb") as fh:
                fh.write(package.join(f).read_bytes())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record_beside(package: storage.Location) -> dict[str, Any]:
    """The training record kept beside ``<dir>/package`` (a kept package), else {}."""
    if package.url.rstrip("/").rsplit("/", 1)[-1] != "package":
        return {}
    parent = package.at(package.url.rstrip("/").rsplit("/", 1)[0])
    try:
        return json.loads(parent.join(RESULT_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}


def register_package(
    package_url: str,
    category: str,
    *,
    record: dict[str, Any] | None = None,
    prefix: str = "tfa-",
    uri: str | None = None,
):
    """Log and register a package (local or s3://) as ``<prefix><category>`` with its training
    record (params, history, test metrics, summary; read from beside a kept package when not
    given); marks a kept package registered. Returns MLflow's registered version."""
    from tfa_ray import tracking
    from tfa_ray.package_check import check_package

    package = storage.resolve(package_url)
    check_package(package)  # a broken package is not registered
    record = record if record is not None else _record_beside(package)
    if not record:  # a package trained elsewhere: what its meta.json says
        meta = json.loads(package.join("meta.json").read_bytes())
        record = {
            "params": {k: v for k, v in meta.items() if isinstance(v, str | int | float)},
            "history": meta.get("history") or [],
        }
    with local_copy(package) as local:
        mv = tracking.log_training(
            local,
            category,
            params=record.get("params") or {"category": category},
            history=record.get("history") or [],
            metrics=record.get("metrics") or {},
            summary=record.get("summary_metrics") or {},
            prefix=prefix,
            uri=uri,
        )
    parent, _, leaf = package_url.rstrip("/").rpartition("/")
    kept = package.at(parent)
    if leaf == "package" and kept.join(RESULT_FILE).exists():  # kept: mark it
        marker = {"name": mv.name, "version": int(mv.version)}
        kept.join(REGISTERED_FILE).write_bytes(json.dumps(marker).encode())
    return mv


def training_record(
    params: dict[str, Any], summary: dict[str, Any], history: list, wall_time_s: float
) -> dict[str, Any]:
    """What registration logs besides the package: params, per-epoch history, the test split's
    metrics and the run's scalars (kept with the package, so a later registration has them)."""
    import math

    summary = dict(summary)
    metrics = summary.pop("test_metrics", None) or {}
    scalars = {
        "wall_time_s": wall_time_s,
        "train_wall_time_s": float(summary.get("wall_time_s", 0.0)),
        "best_epoch": float(summary.get("best_epoch", -1)),
        "selection_score": float(summary.get("selection_score", math.nan)),
        "resumed_from_epoch": float(summary.get("resumed_from_epoch", 0)),
    }
    return {
        "params": params,
        "summary": summary,
        "history": history,
        "metrics": metrics,
        "summary_metrics": scalars,
    }


def training_params(preset_name, preset_json, category, data, settings, summary) -> dict:
    """The MLflow params of a training run (``settings``: the Ray settings it ran with)."""
    from tfa_ray import tracking
    from tfa_ray.config import preset_from_json

    trained = preset_from_json(preset_json)
    return {
        "preset": preset_name,
        "category": category,
        "data_uri": data,
        "backbone": trained.model.backbone.name,
        "backbone_weights": trained.model.backbone.weights,
        "image_size": trained.model.image_size,
        "epochs": trained.train.epochs,
        "batch_size": trained.train.batch_size,
        "lr": trained.train.lr,
        "num_workers": settings.num_workers,
        "use_gpu": settings.use_gpu,
        "num_train": summary.get("num_train"),
        "num_val": summary.get("num_val"),
        "git_commit": tracking.git_commit(),
    }


def copy_package(src: str, dst: str) -> None:
    """A local package's files to ``dst`` (a directory or URL)."""
    from tfa_ray.package import FILES

    out = storage.resolve(dst)
    for f in FILES:
        with open(os.path.join(src, f), "rb") as fh:
            out.join(f).write_bytes(fh.read())


def register_command(package_url: str, category: str, prefix: str = "tfa-") -> str:
    """The command that registers a kept package, for the one line of a failed registration."""
    extra = f" --prefix {prefix}" if prefix != "tfa-" else ""
    return f"tfa-ray register --package {package_url} --category {category}{extra}"
