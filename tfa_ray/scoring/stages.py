"""The three Ray Data stages, one shard (one row) per call, as Ray's batch-inference examples
write them:

* :func:`decode_shard` -- a function (CPU tasks): read + decode + resize; never raises.
* :class:`ShardScorer` -- a callable class (actor pool): loads each category's model once per
  actor, scores the shard.
* :func:`write_shard` -- a function (CPU tasks): encode masks / heat maps, write the shard's
  Parquet file atomically under its planned name.

Every input path leaves the decode stage as one item (path, status, error, error_kind, size);
a bad input becomes an error item, never an exception. ``read_binary_files`` is deliberately
not used: it fails the whole read on one unreadable object.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tfa_ray import storage
from tfa_ray.data import ImageDecodeError, decode_image
from tfa_ray.retry import is_transient
from tfa_ray.scoring.cache import DEFAULT_MAX_BYTES, ModelCache, model_nbytes
from tfa_ray.scoring.contract import ERROR, OK, PERMANENT, TRANSIENT, retry_marker, to_table
from tfa_ray.scoring.manifest import read_shard_paths
from tfa_ray.scoring.models import Resolver

log = logging.getLogger(__name__)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _first(batch: dict[str, Any], key: str) -> Any:
    value = batch[key][0]
    return value.item() if isinstance(value, np.generic) else value


def _error(item: dict[str, Any], message: str, kind: str) -> dict[str, Any]:
    item.update(status=ERROR, error=message, error_kind=kind)
    return item


# --------------------------------------------------------------------------------------
# stage 1: read + decode + resize (CPU tasks; never raises)


def read_and_decode(
    path: str, size: int, max_pixels: int | None, endpoint_url: str | None
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(S x S RGB uint8 as (3, S, S), item) or (None, error item)."""
    item: dict[str, Any] = {"path": path}
    try:
        data = storage.read_bytes(path, endpoint_url)
    except Exception as e:  # noqa: BLE001 - unreadable object: an error row
        kind = TRANSIENT if is_transient(e) else PERMANENT  # gone / a directory: final
        return None, _error(item, f"cannot read: {type(e).__name__}: {e}", kind)
    try:
        img = decode_image(data, max_pixels=max_pixels)
        item["width"], item["height"] = img.size
        if img.size != (size, size):  # exactly what data.image_to_tensor does, kept as uint8
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except ImageDecodeError as e:
        return None, _error(item, f"cannot decode: {e}", PERMANENT)
    except Exception as e:  # noqa: BLE001
        return None, _error(item, f"cannot decode: {type(e).__name__}: {e}", PERMANENT)
    item.update(status=OK, error=None, error_kind=None)
    return arr, item


def shard_paths(batch: dict[str, Any], endpoint_url: str | None) -> list[str]:
    """The shard's paths: a JSON list in the row, or read from the plan's manifest file (the
    driver's rows name the shard only, so its memory does not grow with the paths)."""
    if "paths" in batch:
        return json.loads(_first(batch, "paths"))
    category = _first(batch, "category") or None
    shard = int(_first(batch, "shard"))
    return read_shard_paths(_first(batch, "manifest"), category, shard, endpoint_url)


def decode_shard(
    batch: dict[str, Any],
    models: dict[str, Any],
    max_pixels: int | None,
    endpoint_url: str | None,
) -> dict[str, list]:
    """One shard row in, one row out: ``images`` (n_ok, 3, S, S) uint8 as .npy bytes and
    ``items`` (JSON: path, status, error, error_kind, width, height per input path)."""
    file, category = _first(batch, "file"), _first(batch, "category") or None
    paths = shard_paths(batch, endpoint_url)
    model = models.get(category) if category else None
    items: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    size = int(model.get("image_size", 0)) if model else 0
    for path in paths:
        if category is None:
            msg = "path does not match the category pattern (no category)"
            items.append(_error({"path": path}, msg, PERMANENT))
        elif model is None or "error" in model:
            msg = model["error"] if model else f"no model for category {category!r}"
            kind = TRANSIENT if model and model.get("transient") else PERMANENT
            items.append(_error({"path": path}, msg, kind))
        else:
            arr, item = read_and_decode(path, size, max_pixels, endpoint_url)
            items.append(item)
            if arr is not None:
                arrays.append(arr)
    stack = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
    return {
        "file": [file],
        "category": [category or ""],
        "items": [json.dumps(items)],
        "images": [_npy(stack)],
        "decode_pid": [os.getpid()],
    }


# --------------------------------------------------------------------------------------
# stage 2: score (actor pool)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ShardScorer:
    """Callable class for ``map_batches``: scores one shard per call.

    Each actor loads the model of each category it meets once and keeps it while it fits the
    model cache (``model_cache_bytes``, least recently used out first; the template's embedding
    is computed at load). A failed load is not kept for the actor's lifetime: the shard's rows
    become transient error rows and the load is tried again after ``retry_after_s`` (the
    resolver itself already retried with backoff). Torch gets as many threads as the CPUs Ray
    gave the actor (``num_threads`` overrides): a GPU actor's CPU work uses them too.
    """

    def __init__(
        self,
        resolver: Resolver,
        alias: str = "champion",
        batch_size: int = 16,
        device: str | None = None,
        num_threads: int | None = None,
        precision: str = "auto",
        pinned: dict[str, int] | None = None,
        retry_after_s: float = 30.0,
        model_cache_bytes: int = DEFAULT_MAX_BYTES,
    ):
        import torch

        from tfa_ray.ray_env import assigned_cpus

        self.torch = torch
        self.resolver = resolver
        self.alias = alias
        self.batch_size = max(1, int(batch_size))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = num_threads or assigned_cpus()  # None: called outside Ray, leave torch be
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.precision = precision
        self.pinned = dict(pinned or {})  # category -> the version the run's plan resolved
        self.retry_after_s = retry_after_s
        self.models = ModelCache(model_cache_bytes, size=lambda entry: model_nbytes(entry[2]))
        self.failed: dict[str, tuple[float, str]] = {}  # category -> (monotonic time, message)

    def load(self, category: str) -> tuple[str, int, Any]:
        """(name, version, TFAModel) for the category's pinned version; raises on failure."""
        from tfa_ray.package import load_model

        name, version, url = self.resolver(category, self.alias, version=self.pinned.get(category))
        model = load_model(url, device=self.device)
        model.precision = self.precision
        with self.torch.no_grad():
            model.detector.template_embedding()  # template features: once per actor
        log.info("scorer loaded %s v%s for %s", name, version, category)
        return name, int(version), model

    def _model(self, category: str) -> tuple[str, int, Any] | str:
        """The loaded model, or the message of a failed load."""
        entry = self.models.get(category)
        if entry is not None:
            return entry
        failed = self.failed.get(category)
        if failed and time.monotonic() - failed[0] < self.retry_after_s:
            return failed[1]
        try:
            entry = self.load(category)
            self.models.put(category, entry)
            self.failed.pop(category, None)
            return entry
        except Exception as e:  # noqa: BLE001 - the shard's rows become transient error rows
            msg = f"cannot load model for category {category!r}: {type(e).__name__}: {e}"
            self.failed[category] = (time.monotonic(), msg)
            return msg

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from tfa_ray.package import heatmap_scale, is_anomalous

        category = _first(batch, "category") or None
        items = json.loads(_first(batch, "items"))
        images = _from_npy(_first(batch, "images"))
        ok = [it for it in items if it["status"] == OK]
        model_info: dict[str, Any] = {}
        maps = np.zeros((0, 1, 1), np.float16)
        entry = self._model(category) if ok else None
        if isinstance(entry, str):
            for it in ok:
                _error(it, entry, TRANSIENT)
        elif entry is not None:
            name, version, model = entry
            cal = model.calibration
            model_info = {
                "model_name": name,
                "model_version": version,
                "threshold": cal.threshold,
                "pixel_threshold": cal.pixel_threshold,
                **dict(zip(("heatmap_low", "heatmap_high"), heatmap_scale(cal), strict=True)),
            }
            out_maps, scores = [], []
            for i in range(0, len(images), self.batch_size):
                x = self.torch.from_numpy(images[i : i + self.batch_size]).float().div_(255.0)
                if x.shape[-1] != model.image_size:  # package overwritten in place
                    x = self.torch.nn.functional.interpolate(
                        x, size=(model.image_size,) * 2, mode="bilinear", antialias=True
                    )
                m, s = model.predict(x)
                out_maps.append(m.float().cpu().numpy().astype(np.float16))
                scores.append(s.float().cpu().numpy())
            maps = np.concatenate(out_maps)
            now = _dt.datetime.now(_dt.UTC).isoformat()
            for it, sc in zip(ok, np.concatenate(scores).astype(np.float64), strict=True):
                it.update(
                    score=float(sc), is_anomalous=is_anomalous(sc, cal.threshold), scored_at=now
                )
        return {
            "file": [_first(batch, "file")],
            "category": [category or ""],
            "items": [json.dumps(items)],
            "model": [json.dumps(model_info)],
            "maps": [_npy(maps)],
            "decode_pid": [int(_first(batch, "decode_pid"))],
            "score_pid": [os.getpid()],
            "score_rss_mb": [_peak_rss_mb()],
        }


# --------------------------------------------------------------------------------------
# stage 3: encode masks / heat maps and write the shard (CPU tasks)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _resize_map(amap: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(amap.astype(np.float32), mode="F")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img)


def shard_table(
    items: list[dict[str, Any]],
    maps: np.ndarray,
    model: dict[str, Any],
    category: str | None,
    run_id: str,
    heatmaps: bool,
):
    """The shard's rows as a table in the output schema."""
    from tfa_ray.package import heatmap_uint16

    low, high = model.get("heatmap_low"), model.get("heatmap_high")
    now = _dt.datetime.now(_dt.UTC)
    cols: dict[str, list] = {}

    def add(**row: Any) -> None:
        for k, v in row.items():
            cols.setdefault(k, []).append(v)

    k = 0
    for it in items:
        scored = it["status"] == OK and "score" in it
        mask_png = heat_png = None
        if scored:
            full = _resize_map(maps[k], it["width"], it["height"])
            k += 1
            mask_png = _png(Image.fromarray(full > model["pixel_threshold"]))
            if heatmaps:
                heat_png = _png(Image.fromarray(heatmap_uint16(full, low, high)))
        elif it["status"] == OK:  # decoded, but never scored: should not happen
            _error(it, it.get("error") or "not scored", TRANSIENT)
        add(
            path=it["path"],
            category=category,
            model_name=model.get("model_name") if model else None,
            model_version=model.get("model_version") if model else None,
            score=it.get("score") if scored else None,
            threshold=model.get("threshold") if model else None,
            is_anomalous=it.get("is_anomalous") if scored else None,
            mask_png=mask_png,
            heatmap_png=heat_png,
            heatmap_low=low if heat_png else None,
            heatmap_high=high if heat_png else None,
            width=it.get("width"),
            height=it.get("height"),
            status=OK if scored else ERROR,
            error=None if scored else it.get("error"),
            error_kind=None if scored else it.get("error_kind") or PERMANENT,
            run_id=run_id,
            scored_at=_dt.datetime.fromisoformat(it["scored_at"]) if scored else now,
        )
    return to_table(cols)


def write_shard(
    batch: dict[str, Any],
    run_dir: str,
    run_id: str,
    heatmaps: bool,
    endpoint_url: str | None,
) -> dict[str, list]:
    """Build the shard's table and write it atomically under its planned name; returns the
    shard's counts.

    A shard with transient error rows gets its retry marker *before* its file is written, and a
    clean shard loses its marker only *after*: a crash in between leaves one more rescore, never
    a transient row that no rerun looks at."""
    file, category = _first(batch, "file"), _first(batch, "category") or None
    items = json.loads(_first(batch, "items"))
    model = json.loads(_first(batch, "model"))
    table = shard_table(items, _from_npy(_first(batch, "maps")), model, category, run_id, heatmaps)
    kinds = table.column("error_kind").to_pylist()
    transient = kinds.count(TRANSIENT)
    marker = storage.join(run_dir, retry_marker(file))
    if transient:
        storage.write_bytes(marker, json.dumps({"transient": transient}).encode(), endpoint_url)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(storage.join(run_dir, file), buf.getvalue(), endpoint_url)
    if not transient:
        storage.remove(marker, endpoint_url)
    status = table.column("status").to_pylist()
    return {
        "file": [file],
        "rows": [len(items)],
        "ok": [status.count(OK)],
        "error": [status.count(ERROR)],
        "transient": [transient],
        "anomalous": [sum(1 for a in table.column("is_anomalous").to_pylist() if a)],
        "decode_pid": [int(_first(batch, "decode_pid"))],
        "score_pid": [int(_first(batch, "score_pid"))],
        "score_rss_mb": [float(_first(batch, "score_rss_mb"))],
    }
