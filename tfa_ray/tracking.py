"""Logging a training run to MLflow: params, per-epoch losses, test metrics, and the model
package registered as ``<prefix><category>`` (alias ``candidate``) through :mod:`tfa_ray.pyfunc`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from tfa_ray.pyfunc import MODEL_CODE, PACKAGE_ARTIFACT
from tfa_ray.registry import CANDIDATE, DEFAULT_PREFIX, client, model_name, tracking_uri

EXPERIMENT = "tfa-ray"


def git_commit() -> str | None:
    """The commit of the working directory's git checkout, if there is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


@dataclass
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    aliases: list[str] = field(default_factory=list)


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        if v is None:
            continue
        s = v if isinstance(v, str) else json.dumps(v, default=str)
        out[k] = s[:6000]  # MLflow's param value limit
    return out


def _experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # noqa: BLE001 - created concurrently by another category
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_training(
    package_dir: str,
    category: str,
    *,
    params: dict[str, Any],
    history: list[dict],
    metrics: dict[str, float] | None = None,
    summary: dict[str, float] | None = None,
    prefix: str = DEFAULT_PREFIX,
    alias: str | None = CANDIDATE,
    uri: str | None = None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
) -> RegisteredVersion:
    """One MLflow run for one trained category; returns the registered model version.

    ``history``: per-epoch records (``train_loss``, ``val_loss``, ... logged with ``step`` =
    epoch). ``metrics``: test-split evaluation (image_auroc, ...), logged as run metrics and
    copied to the version's tags. ``summary``: other scalars (wall time, best epoch).
    ``package_dir``: a local tfa-ray model package directory.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    uri = tracking_uri(uri)
    c = client(uri)
    exp_id = _experiment_id(c, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    name = model_name(category, prefix)
    run_tags = {"category": category, "mlflow.runName": f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"}
    run_tags.update(tags or {})
    run = c.create_run(exp_id, tags=run_tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        ps = [Param(k, v) for k, v in _flat_params(params).items()]
        ms = []
        for rec in history:
            step = int(rec.get("epoch", len(ms)))
            for k, v in rec.items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    ms.append(Metric(k, float(v), now, step))
        for k, v in {**(summary or {}), **(metrics or {})}.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                ms.append(Metric(k, float(v), now, 0))
        for i in range(0, max(len(ms), len(ps), 1), 900):  # log_batch limits: 1000 metrics
            c.log_batch(run_id, metrics=ms[i : i + 900], params=ps[i : i + 90] if i == 0 else [])
        if len(ps) > 90:
            for j in range(90, len(ps), 90):
                c.log_batch(run_id, params=ps[j : j + 90])
        c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

        with tempfile.TemporaryDirectory(prefix="tfa-mlflow-") as tmp:
            code = os.path.join(tmp, "tfa_pyfunc.py")
            with open(code, "w") as f:
                f.write(MODEL_CODE)
            staged = os.path.join(tmp, PACKAGE_ARTIFACT)
            shutil.copytree(package_dir, staged)
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            # MLflow cannot infer a signature from a DataFrame type hint and says so; the
            # wrapper takes any column of paths or bytes on purpose
            pyfunc_log = logging.getLogger("mlflow.pyfunc")
            level = pyfunc_log.level
            pyfunc_log.setLevel(logging.ERROR)
            try:
                with mlflow.start_run(run_id=run_id):
                    info = mlflow.pyfunc.log_model(
                        name="model",
                        python_model=code,
                        artifacts={PACKAGE_ARTIFACT: staged},
                        pip_requirements=_requirements(),
                    )
            finally:
                pyfunc_log.setLevel(level)
        mv = mlflow.register_model(info.model_uri, name, tags={"category": category})
        version = int(mv.version)
        vtags = {
            "category": category,
            "run_id": run_id,
            "data_uri": str(params.get("data_uri", "")),
        }
        cal = _read_json(os.path.join(package_dir, "calibration.json"))
        cal = cal.get("precisions", {}).get("fp32", cal)  # keyed by precision: fp32's is listed
        if "threshold" in cal:
            vtags["threshold"] = repr(float(cal["threshold"]))
        for k, v in (metrics or {}).items():
            if isinstance(v, (int, float)):
                vtags[f"metric.{k}"] = repr(float(v))
        for k, v in vtags.items():
            c.set_model_version_tag(name, str(version), k, v)
        aliases = []
        if alias:
            c.set_registered_model_alias(name, alias, str(version))
            aliases.append(alias)
        c.set_terminated(run_id, "FINISHED")
    except BaseException:
        try:
            c.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001
            pass
        raise
    return RegisteredVersion(name, version, run_id, aliases)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("tfa-ray", "torch", "timm", "safetensors", "pillow", "numpy", "pandas", "s3fs"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
