"""The MLflow model registry: tracking URI, aliases, resolving a model to a local package,
and the look-ups behind ``tfa-ray models list / show``.

* :func:`promote` / :func:`promote_if_better` move aliases (``champion``, ...); stages are not
  used (deprecated in MLflow).
* :func:`resolve_model` turns ``(category, alias)`` into a local package directory, with
  downloads cached per (tracking URI, name, version) on disk and in memory, and look-ups and
  downloads retried with backoff (a registry blip at night must not fail a run).
* Logging a training run is :mod:`tfa_ray.tracking`; the pyfunc wrapper is :mod:`tfa_ray.pyfunc`.

Tracking URI: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tfa_ray.pyfunc import PACKAGE_ARTIFACT, TFAPyfuncModel  # noqa: F401 - older models import it here
from tfa_ray.retry import RetryPolicy, call_with_retries

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "tfa-"
CANDIDATE = "candidate"
CHAMPION = "champion"
METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


class RegistryError(RuntimeError):
    """The tracking server / registry cannot do what was asked; the message says why."""


# --------------------------------------------------------------------------------------
# tracking URI


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in use: ``uri``, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db``; a relative sqlite path is made absolute, so worker processes
    (other working directories) open the same file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


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

    # no download progress bars: every scorer actor would draw its own on the driver's console
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def model_name(category: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}{category}"


# --------------------------------------------------------------------------------------
# aliases


def _not_found(e: Exception) -> bool:
    """The registry answered that the model / version / alias does not exist (as opposed to
    not answering: that is a :class:`RegistryError`, worth retrying)."""
    return getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _version_for_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _not_found(e):
            raise LookupError(f"registered model {name!r} has no alias {alias!r}") from e
        raise RegistryError(f"registry look-up of {name}@{alias} failed: {e}") from e


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
        if _not_found(e):
            raise LookupError(f"registered model {name!r} has no version {version}") from e
        raise RegistryError(f"registry look-up of {name} v{version} failed: {e}") from e


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


FILES_RECORD = "files.json"  # beside the cached package: its files' sizes and SHA-256


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record(package_dir: str) -> dict[str, list]:
    """{file: [size, sha256]} of every file in a package directory."""
    paths = {n: os.path.join(package_dir, n) for n in sorted(os.listdir(package_dir))}
    return {n: [os.path.getsize(p), _digest(p)] for n, p in paths.items() if os.path.isfile(p)}


def _verified(package_dir: str) -> bool:
    """The cached package is what was downloaded: every file recorded at download time has its
    size and content hash (a copy truncated or changed on this disk is fetched again)."""
    try:
        with open(os.path.join(os.path.dirname(package_dir), FILES_RECORD)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    if not _complete(package_dir):
        return False
    for name, (size, sha) in recorded.items():
        path = os.path.join(package_dir, name)
        try:
            if os.path.getsize(path) != size or _digest(path) != sha:
                log.warning("cached %s does not match its download: fetching it again", path)
                return False
        except OSError:
            return False
    return True


def _package_subpath(model_dir: str) -> str:
    """Where the pyfunc model keeps its ``package`` artifact (from its MLmodel file)."""
    import yaml

    with open(os.path.join(model_dir, "MLmodel")) as f:
        spec = yaml.safe_load(f)
    art = spec["flavors"]["python_function"].get("artifacts", {}).get(PACKAGE_ARTIFACT, {})
    return art.get("path", f"artifacts/{PACKAGE_ARTIFACT}")


def version_ident(mv) -> str:
    """What tells a model version apart from any other that had its name and number: the run
    it was logged from (or, registered without one, its creation time)."""
    return str(mv.run_id or mv.creation_timestamp or "")


def download_version(name: str, version: int, uri: str | None = None, ident: str = "") -> str:
    """The local package directory of ``name`` version ``version``, downloading it once.

    Cached in memory and on disk under :func:`cache_root` per (tracking URI, name, version,
    ``ident``): a registered version's files never change, so a cached copy is valid as long
    as it is the same version and its files still have the sizes and SHA-256 recorded at
    download (``files.json``; a copy damaged on this disk is fetched again). ``ident``
    (:func:`version_ident`) tells it from an earlier version of the same name and number in
    a registry recreated at the same URI (a rerun demo), whose cached files would otherwise
    be served. The download lands in a temporary
    directory renamed into place, so readers never see half a package."""
    import mlflow

    uri = tracking_uri(uri)
    key = (uri, name, int(version), ident)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit and _verified(hit):
        return hit
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    leaf = f"{int(version)}-{ident}" if ident else str(int(version))
    target = os.path.join(cache_root(), digest, name, leaf)
    pkg = os.path.join(target, "package")
    if not _verified(pkg):
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
            with open(os.path.join(tmp, FILES_RECORD), "w") as f:
                json.dump(_record(os.path.join(tmp, "package")), f)
            try:
                os.rename(tmp, target)
            except OSError:  # another process won the race, or a stale / corrupt copy
                if not _verified(pkg):
                    stale = f"{target}.stale-{os.getpid()}-{time.monotonic_ns()}"
                    os.rename(target, stale)  # out of the way in one step, then removed
                    shutil.rmtree(stale, ignore_errors=True)
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
    retry: RetryPolicy | None = None,
) -> tuple[str, int, str]:
    """(registered model name, version, local package directory) of ``<prefix><category>@alias``,
    or of that exact ``version`` when one is given (a scoring run pins what it planned with).

    Raises ``LookupError`` when the model, the alias or the version does not exist (at once: no
    retry changes that answer); other failures are retried with ``retry`` (default
    :class:`RetryPolicy`) and then raised. The alias is looked up on every call (one registry
    request, so promotions are seen at once); the download is cached per name + version (see
    :func:`download_version`)."""
    policy = retry or RetryPolicy()
    c = client(uri)
    name = model_name(category, prefix)

    def look_up():
        if version is None:
            return _version_for_alias(c, name, alias)
        return _get_version(c, name, int(version))

    mv = call_with_retries(look_up, policy, f"registry look-up of {name}")
    found = int(mv.version)
    pkg = call_with_retries(
        lambda: download_version(name, found, uri, version_ident(mv)),
        policy,
        f"download of {name} v{found}",
    )
    return name, found, pkg


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
        mv = _version_for_alias(c, name, m["alias"])
    else:
        mv = _get_version(c, name, int(m["version"]))
    return download_version(name, int(mv.version), uri, version_ident(mv))


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


def _all_pages(search, **kwargs) -> list:
    """Every result of an MLflow search, following ``next_page_token`` past the first page."""
    out, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _versions(c, name: str) -> list:
    found = _all_pages(c.search_model_versions, filter_string=f"name='{name}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def list_models(
    prefix: str = DEFAULT_PREFIX, uri: str | None = None, page_size: int | None = None
) -> list[dict]:
    """One row per registered ``<prefix>*`` model (every page of the search): name, latest
    version, champion version and its metrics and threshold, created time."""
    c = client(uri)
    rows = []
    paging = {"max_results": page_size} if page_size else {}
    models = _all_pages(
        c.search_registered_models, filter_string=f"name LIKE '{prefix}%'", **paging
    )
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
