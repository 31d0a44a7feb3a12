"""Stage 3 of a scoring run: encode masks / heat maps and write the shard's Parquet file
atomically under its planned name (CPU tasks). Split from stages so each module stays one
concern: what a shard's rows look like on disk."""

from __future__ import annotations

import datetime as _dt
import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tfa_ray import storage
from tfa_ray.scoring.contract import ERROR, OK, PERMANENT, TRANSIENT, retry_marker, to_table

# helpers the other stages share (a shard row's first value, .npy bytes, an error item)


def _first(batch: dict[str, Any], key: str) -> Any:
    value = batch[key][0]
    return value.item() if isinstance(value, np.generic) else value


def _from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _error(item: dict[str, Any], message: str, kind: str) -> dict[str, Any]:
    item.update(status=ERROR, error=message, error_kind=kind)
    return item


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
