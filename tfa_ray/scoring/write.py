"""Stage 3 of a scoring run: encode masks / heat maps and write the shard's Parquet file
atomically under its planned name (CPU tasks, one shard per call).

Masks and heat maps are stored at the model's map resolution (the S x S the model saw) by
default, the image's own size in the row's ``width`` / ``height``:
:func:`tfa_ray.scoring.contract.decode_mask` / ``decode_heatmap`` bring them to the image's size.
``full_res=True`` stores them at the image's size instead (tens of milliseconds per
5-megapixel image, against well under one at map resolution)."""

from __future__ import annotations

import datetime as _dt
import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tfa_ray import storage
from tfa_ray.calibration import heatmap_uint16
from tfa_ray.scoring.contract import (
    ERROR,
    OK,
    PERMANENT,
    TRANSIENT,
    retry_marker,
    to_image_size,
    to_table,
)
from tfa_ray.scoring.shard import cell, from_npy, mark_error


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def shard_table(
    items: list[dict[str, Any]],
    maps: np.ndarray,
    model: dict[str, Any],
    category: str | None,
    run_id: str,
    heatmaps: bool,
    full_res: bool = False,
):
    """The shard's rows as a table in the output schema; masks and heat maps at the maps'
    resolution, or with ``full_res`` at each image's own size."""
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
            amap = maps[k].astype(np.float32)
            k += 1
            if full_res:
                amap = to_image_size(amap, it["width"], it["height"])
            mask_png = _png(Image.fromarray(amap > model["pixel_threshold"]))
            if heatmaps:
                heat_png = _png(Image.fromarray(heatmap_uint16(amap, low, high)))
        elif it["status"] == OK:  # decoded, but never scored: should not happen
            mark_error(it, it.get("error") or "not scored", TRANSIENT)
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
    run: storage.Location,
    run_id: str,
    heatmaps: bool,
    full_res: bool = False,
) -> dict[str, list]:
    """Build the shard's table and write it atomically under its planned name in the run
    directory ``run``; returns the shard's counts.

    A shard with transient error rows gets its retry marker *before* its file is written, and a
    clean shard loses its marker only *after*: a crash in between leaves one more rescore, never
    a transient row that no rerun looks at."""
    file, category = cell(batch, "file"), cell(batch, "category") or None
    items = json.loads(cell(batch, "items"))
    model = json.loads(cell(batch, "model"))
    maps = from_npy(cell(batch, "maps"))
    table = shard_table(items, maps, model, category, run_id, heatmaps, full_res)
    kinds = table.column("error_kind").to_pylist()
    transient = kinds.count(TRANSIENT)
    marker = run.join(retry_marker(file))
    if transient:
        marker.write_bytes(json.dumps({"transient": transient}).encode())
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    run.join(file).write_bytes(buf.getvalue())
    if not transient:
        marker.remove()
    status = table.column("status").to_pylist()
    return {
        "file": [file],
        "rows": [len(items)],
        "ok": [status.count(OK)],
        "error": [status.count(ERROR)],
        "transient": [transient],
        "anomalous": [sum(1 for a in table.column("is_anomalous").to_pylist() if a)],
        "decode_pid": [int(cell(batch, "decode_pid"))],
        "score_pid": [int(cell(batch, "score_pid"))],
        "score_rss_mb": [float(cell(batch, "score_rss_mb"))],
    }
