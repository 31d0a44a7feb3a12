"""MLflow: tracking runs, the model package as an MLflow model, the registry and its aliases.

The only module that knows MLflow. What it does:

* :func:`log_training` -- one MLflow run per category: params, per-epoch losses, wall time,
  test-split metrics (computed after training, never used for selection); the tfa-ray model
  package (see :mod:`tfa_ray.package`) logged as an MLflow pyfunc model and registered as
  ``<prefix><category>`` with the alias ``candidate``.
* The pyfunc model is logged *from code*: a two-line file that instantiates
  :class:`TFAPyfuncModel`. Nothing of ours is pickled; ``load_context`` reads the package
  (safetensors + JSON + PNG) from the model's artifacts with tfa-ray's own loader.
* :func:`promote` / :func:`promote_if_better` move aliases (``champion``, ...); stages are not
  used (deprecated in MLflow).
* :func:`resolve_model` turns ``(category, alias)`` into a local package directory, with
  downloads cached per (tracking URI, name, version) on disk and in memory.
* :func:`list_models` / :func:`show_model` feed ``tfa-ray models list / show``.

Tracking URI: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "tfa-"
CANDIDATE = "candidate"
CHAMPION = "champion"
EXPERIMENT = "tfa-ray"
PACKAGE_ARTIFACT = "package"  # key of the package directory in the pyfunc model's artifacts
METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


class RegistryError(RuntimeError):
    """The tracking server / registry cannot do what was asked; the message says why."""


# --------------------------------------------------------------------------------------
# tracking URI


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in use: ``uri``, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db`` (absolute, so worker processes agree on it)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.join(os.getcwd(), "mlflow.db")


def safe_uri(uri: str) -> str:
    """A URI for messages: any ``user:password@`` part removed."""
    parts = urlsplit(uri)
    if parts.netloc and "@" in parts.netloc:
        return urlunsplit(
            (parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, parts.query, "")
        )
    return uri


def check_tracking(uri: str | None = None, timeout_s: float = 5.0) -> str:
    """Fail fast with one clear line when an HTTP tracking server does not answer.

    Returns the URI. Database / file URIs are checked by MLflow itself when used."""
    uri = tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310
                if resp.status >= 400:
                    raise RegistryError(f"tracking server {safe_uri(uri)} answered {resp.status}")
        except urllib.error.HTTPError as e:
            raise RegistryError(f"tracking server {safe_uri(uri)} answered HTTP {e.code}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryError(
                f"tracking server {safe_uri(uri)} is unreachable ({reason}); "
                "start it or set MLFLOW_TRACKING_URI"
            ) from e
    return uri


def client(uri: str | None = None):
    """An ``MlflowClient`` for tracking and registry at ``uri`` (see :func:`tracking_uri`)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def model_name(category: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}{category}"


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


# --------------------------------------------------------------------------------------
# the pyfunc wrapper (logged from code: never pickled)


try:  # mlflow is a hard dependency; the guard only keeps import errors readable
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover
    _PythonModel = object  # type: ignore[assignment,misc]


class TFAPyfuncModel(_PythonModel):
    """``mlflow.pyfunc`` face of a tfa-ray package.

    ``predict`` takes a DataFrame with one column of images -- ``image`` (or ``path`` /
    ``bytes``, else the first column): local paths, ``s3://`` URLs or encoded image bytes -- and
    returns one row per image: ``score``, ``threshold``, ``is_anomalous`` and ``mask`` (PNG
    bytes of the defect mask at the model's input size), plus ``status`` (``ok`` / ``error``)
    and ``error`` (undecodable images become error rows, not exceptions).
    """

    batch_size = 16

    def load_context(self, context) -> None:
        from tfa_ray.package import load_model

        device = os.environ.get("TFA_RAY_DEVICE") or "cpu"
        self.model = load_model(context.artifacts[PACKAGE_ARTIFACT], device=device)

    def predict(self, context, model_input, params=None):  # noqa: ARG002 - mlflow's signature
        import numpy as np
        import pandas as pd
        import torch
        from PIL import Image

        from tfa_ray import storage
        from tfa_ray.data import decode_image, image_to_tensor

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"image": list(model_input)})
        col = next((c for c in ("image", "path", "bytes") if c in model_input.columns), None)
        values = list(model_input[col if col is not None else model_input.columns[0]])
        size = self.model.image_size
        cal = self.model.calibration
        rows: list[dict] = [{} for _ in values]
        good: list[tuple[int, torch.Tensor]] = []
        for i, v in enumerate(values):
            try:
                data = bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else None
                if data is None:
                    data = storage.read_bytes(str(v))
                good.append((i, image_to_tensor(decode_image(data), size)))
            except Exception as e:  # noqa: BLE001 - a bad input is an error row
                rows[i] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            maps, scores = self.model.predict(torch.stack([t for _, t in chunk]))
            maps = maps.float().cpu().numpy()
            for (i, _), amap, score in zip(chunk, maps, scores.float().cpu().tolist(), strict=True):
                buf = io.BytesIO()
                mask = ((amap > cal.pixel_threshold) * 255).astype(np.uint8)
                Image.fromarray(mask).save(buf, format="PNG")
                rows[i] = {
                    "score": float(score),
                    "is_anomalous": bool(score > cal.threshold),
                    "mask": buf.getvalue(),
                    "status": "ok",
                    "error": None,
                }
        out = pd.DataFrame(
            {
                "score": [r.get("score", float("nan")) for r in rows],
                "threshold": [float(cal.threshold)] * len(rows),
                "is_anomalous": [r.get("is_anomalous", False) for r in rows],
                "mask": [r.get("mask") for r in rows],
                "status": [r["status"] for r in rows],
                "error": [r.get("error") for r in rows],
            }
        )
        return out


_MODEL_CODE = """\
# tfa-ray pyfunc entry point (MLflow "models from code"): nothing here is pickled.
import mlflow

from tfa_ray.registry import TFAPyfuncModel

mlflow.models.set_model(TFAPyfuncModel())
"""


# --------------------------------------------------------------------------------------
# logging a training run


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
                f.write(_MODEL_CODE)
            staged = os.path.join(tmp, PACKAGE_ARTIFACT)
            shutil.copytree(package_dir, staged)
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=code,
                    artifacts={PACKAGE_ARTIFACT: staged},
                    pip_requirements=_requirements(),
                )
        mv = mlflow.register_model(info.model_uri, name, tags={"category": category})
        version = int(mv.version)
        vtags = {
            "category": category,
            "run_id": run_id,
            "data_uri": str(params.get("data_uri", "")),
        }
        cal = _read_json(os.path.join(package_dir, "calibration.json"))
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


# --------------------------------------------------------------------------------------
# aliases


def _version_for_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise LookupError(f"registered model {name!r} has no alias {alias!r}") from e


def _metric(c, mv, metric: str) -> float | None:
    tag = (mv.tags or {}).get(f"metric.{metric}")
    if tag is not None:
        return float(tag)
    if mv.run_id:
        value = c.get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def promote(
    category: str,
    version: int | None = None,
    alias: str = CHAMPION,
    prefix: str = DEFAULT_PREFIX,
    uri: str | None = None,
) -> int:
    """Point ``alias`` of ``<prefix><category>`` at ``version`` (default: the ``candidate``);
    returns the version."""
    c = client(uri)
    name = model_name(category, prefix)
    if version is None:
        version = int(_version_for_alias(c, name, CANDIDATE).version)
    else:
        _get_version(c, name, version)
    c.set_registered_model_alias(name, alias, str(version))
    return int(version)


def promote_if_better(
    category: str,
    metric: str,
    version: int | None = None,
    alias: str = CHAMPION,
    prefix: str = DEFAULT_PREFIX,
    uri: str | None = None,
) -> tuple[bool, str]:
    """The gate: promote the candidate (or ``version``) to ``alias`` only when its ``metric`` is
    at least the current holder's. Returns (promoted, reason)."""
    c = client(uri)
    name = model_name(category, prefix)
    if version is None:
        new = _version_for_alias(c, name, CANDIDATE)
    else:
        new = _get_version(c, name, version)
    new_value = _metric(c, new, metric)
    if new_value is None:
        return False, f"{name} v{new.version} has no metric {metric!r}: not promoted"
    try:
        old = _version_for_alias(c, name, alias)
    except LookupError:
        c.set_registered_model_alias(name, alias, str(new.version))
        return True, f"{name} v{new.version} is the first {alias} ({metric} {new_value:.4f})"
    old_value = _metric(c, old, metric)
    if old_value is not None and new_value < old_value:
        return False, (
            f"{name} v{new.version} {metric} {new_value:.4f} < {alias} v{old.version} "
            f"{old_value:.4f}: not promoted"
        )
    c.set_registered_model_alias(name, alias, str(new.version))
    shown = "n/a" if old_value is None else f"{old_value:.4f}"
    return True, (
        f"{name} v{new.version} {metric} {new_value:.4f} >= v{old.version} {shown}: now {alias}"
    )


def _get_version(c, name: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as e:
        raise LookupError(f"registered model {name!r} has no version {version}") from e


# --------------------------------------------------------------------------------------
# resolving a model to a local package directory


_CACHE: dict[tuple[str, str, int], str] = {}
_CACHE_LOCK = threading.Lock()


def cache_root() -> str:
    return os.environ.get("TFA_RAY_MODEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tfa-ray", "models"
    )


def _complete(package_dir: str) -> bool:
    from tfa_ray.package import FILES

    return all(os.path.isfile(os.path.join(package_dir, f)) for f in FILES)


def _package_subpath(model_dir: str) -> str:
    """Where the pyfunc model keeps its ``package`` artifact (from its MLmodel file)."""
    import yaml

    with open(os.path.join(model_dir, "MLmodel")) as f:
        spec = yaml.safe_load(f)
    art = spec["flavors"]["python_function"].get("artifacts", {}).get(PACKAGE_ARTIFACT, {})
    return art.get("path", f"artifacts/{PACKAGE_ARTIFACT}")


def download_version(name: str, version: int, uri: str | None = None) -> str:
    """The local package directory of ``name`` version ``version``, downloading it once.

    Cached in memory and on disk under :func:`cache_root` per (tracking URI, name, version):
    a registered version's files never change, so a cached copy is always valid. The download
    lands in a temporary directory renamed into place, so readers never see half a package."""
    import mlflow

    uri = tracking_uri(uri)
    key = (uri, name, int(version))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit and _complete(hit):
        return hit
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    target = os.path.join(cache_root(), digest, name, str(int(version)))
    pkg = os.path.join(target, "package")
    if not _complete(pkg):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{version}-", dir=os.path.dirname(target))
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            model_dir = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{int(version)}", dst_path=os.path.join(tmp, "m")
            )
            src = os.path.join(model_dir, _package_subpath(model_dir))
            if not _complete(src):
                raise RegistryError(f"{name} v{version} does not hold a tfa-ray package")
            shutil.move(src, os.path.join(tmp, "package"))
            shutil.rmtree(os.path.join(tmp, "m"), ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:  # another process won the race (or a stale partial target)
                if not _complete(pkg):
                    shutil.rmtree(target, ignore_errors=True)
                    os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with _CACHE_LOCK:
        _CACHE[key] = pkg
    return pkg


def resolve_model(
    category: str,
    alias: str = CHAMPION,
    prefix: str = DEFAULT_PREFIX,
    uri: str | None = None,
    version: int | None = None,
) -> tuple[str, int, str]:
    """(registered model name, version, local package directory) of ``<prefix><category>@alias``,
    or of that exact ``version`` when one is given (a scoring run pins what it planned with).

    Raises ``LookupError`` when the model, the alias or the version does not exist. The alias
    is looked up on every call (one registry request, so promotions are seen at once); the
    download is cached per name + version (see :func:`download_version`)."""
    c = client(uri)
    name = model_name(category, prefix)
    if version is None:
        version = int(_version_for_alias(c, name, alias).version)
    else:
        version = int(_get_version(c, name, int(version)).version)
    return name, version, download_version(name, version, uri)


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def resolve_uri(model_uri: str, uri: str | None = None) -> str:
    """A local package directory for ``models:/<name>@<alias>`` or ``models:/<name>/<version>``;
    any other string is returned unchanged (a package directory or URL)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    m = _MODELS_URI.match(model_uri)
    if not m:
        raise ValueError(f"not a model URI: {model_uri!r} (models:/NAME@ALIAS or models:/NAME/N)")
    name = m["name"]
    c = client(uri)
    if m["alias"]:
        version = int(_version_for_alias(c, name, m["alias"]).version)
    else:
        version = int(_get_version(c, name, int(m["version"])).version)
    return download_version(name, version, uri)


# --------------------------------------------------------------------------------------
# look-ups


def run_link(run_id: str, uri: str | None = None) -> str:
    uri = tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            exp = client(uri).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001
            return f"{safe_uri(uri).rstrip('/')}/#/runs/{run_id}"
        return f"{safe_uri(uri).rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"runs:/{run_id}"


def _versions(c, name: str) -> list:
    return sorted(
        c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True
    )


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def list_models(prefix: str = DEFAULT_PREFIX, uri: str | None = None) -> list[dict]:
    """One row per registered ``<prefix>*`` model: name, latest version, champion version and its
    metrics and threshold, created time."""
    c = client(uri)
    rows = []
    models = c.search_registered_models(filter_string=f"name LIKE '{prefix}%'")
    for rm in sorted(models, key=lambda m: m.name):
        versions = _versions(c, rm.name)
        aliases = dict(rm.aliases or {})
        champ = aliases.get(CHAMPION)
        champ_mv = next((v for v in versions if str(v.version) == str(champ)), None)
        row = {
            "name": rm.name,
            "latest": int(versions[0].version) if versions else None,
            "champion": int(champ) if champ is not None else None,
            "candidate": int(aliases[CANDIDATE]) if CANDIDATE in aliases else None,
            "threshold": None,
            "created": _time(champ_mv.creation_timestamp if champ_mv else rm.creation_timestamp),
        }
        if champ_mv is not None:
            thr = (champ_mv.tags or {}).get("threshold")
            row["threshold"] = float(thr) if thr else None
            for m in METRIC_NAMES:
                row[m] = _metric(c, champ_mv, m)
        rows.append(row)
    return rows


def show_model(name: str, uri: str | None = None) -> list[dict]:
    """Every version of ``name``: metrics, aliases, data URI, threshold, run link."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        rm = c.get_registered_model(name)
    except MlflowException as e:
        raise LookupError(f"no registered model {name!r}") from e
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in _versions(c, name):
        tags = mv.tags or {}
        row = {
            "version": int(mv.version),
            "aliases": sorted(by_version.get(str(mv.version), [])),
            "created": _time(mv.creation_timestamp),
            "threshold": float(tags["threshold"]) if tags.get("threshold") else None,
            "data_uri": tags.get("data_uri", ""),
            "run": run_link(mv.run_id, uri) if mv.run_id else "",
        }
        for m in METRIC_NAMES:
            row[m] = _metric(c, mv, m)
        rows.append(row)
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain fixed-width table (floats with 4 decimals, None as '-')."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v)) or "-"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(line.rstrip() for line in lines)
