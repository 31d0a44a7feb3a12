"""The output contract of a scoring run: where files go, the row schema, reading and checking.

A run writes under ``<output>/run_id=<id>/``::

    _plan.json                           the plan's header: models, counts, manifest files
    _plan/part-<i>.parquet               the plan's paths: path, category, shard (see manifest)
    category=<c>/part-<i>.parquet        one file per shard, written atomically
    _retry/category=<c>/part-<i>.json    marker: that shard holds transient error rows
    _SUCCESS                             JSON counts, written after verification

One row per input path. ``status`` is ``ok`` or ``error``; an error row's ``error_kind`` says
whether it is ``permanent`` (an undecodable or unsupported file, a path without a category, a
category without a model: final) or ``transient`` (I/O, throttling, registry or model-load
failure that outlasted the retries: a rerun with the same run id scores the shard again and
replaces its file).

Masks (``mask_png``) and heat maps (``heatmap_png``, optional) are stored at the model's map
resolution (the S x S image the model saw) unless the run asked for full resolution; the
image's own size is in ``width`` / ``height``, and :func:`decode_mask` / :func:`decode_heatmap`
with ``image_size=True`` bring them to it (:func:`to_image_size`). Heat maps are 16-bit grey
PNGs on one scale per model version: ``value = heatmap_low + png / 65535 * (heatmap_high -
heatmap_low)`` recovers the anomaly map (see :func:`tfa_ray.calibration.heatmap_scale`);
:func:`decode_heatmap` does exactly that.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
from PIL import Image

from tfa_ray import storage

PLAN_FILE = "_plan.json"
SUCCESS_FILE = "_SUCCESS"
RETRY_DIR = "_retry"
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
OK, ERROR = "ok", "error"
PERMANENT, TRANSIENT = "permanent", "transient"

_DICT = pa.dictionary(pa.int32(), pa.string())
# category / run_id are dictionary strings: the type pyarrow gives hive partition keys, so a
# dataset read of the output root merges the file columns with the directory names.
OUTPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("category", _DICT),
        ("model_name", pa.string()),
        ("model_version", pa.int64()),
        ("score", pa.float64()),
        ("threshold", pa.float64()),
        ("is_anomalous", pa.bool_()),
        ("mask_png", pa.binary()),
        ("heatmap_png", pa.binary()),
        ("heatmap_low", pa.float64()),
        ("heatmap_high", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("run_id", _DICT),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


def run_dir_url(output: str, run_id: str) -> str:
    return storage.join(output, f"run_id={quote(run_id, safe='')}")


def shard_file(category: str | None, index: int) -> str:
    """The shard's file, relative to the run directory."""
    cat = quote(category, safe="") if category else NULL_PARTITION
    return f"category={cat}/part-{index:05d}.parquet"


def retry_marker(file: str) -> str:
    """The marker that says the shard ``file`` must be scored again (relative to the run)."""
    return f"{RETRY_DIR}/{file.removesuffix('.parquet')}.json"


def to_table(cols: dict[str, list]) -> pa.Table:
    """Column lists (every schema name) -> a table in :data:`OUTPUT_SCHEMA`."""
    arrays = []
    for f in OUTPUT_SCHEMA:
        values = cols.get(f.name) or [None] * len(cols["path"])
        if pa.types.is_dictionary(f.type):
            arrays.append(pa.array(values, pa.string()).dictionary_encode())
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def read_results(
    where: str | storage.Location,
    endpoint_url: str | None = None,
    columns: list[str] | None = None,
    filter=None,
) -> pa.Table:
    """The Parquet output under ``where`` (a run directory or the output root: a URL, or a
    location already resolved) as a table; ``filter`` is a pyarrow dataset expression."""
    import pyarrow.dataset as pads

    results = storage.locate(where, endpoint_url)
    # Every partition key is also a column in the files: read the files' own columns, with the
    # fixed schema (directory-name inference would turn a category "123" into an integer).
    dataset = pads.dataset(
        results.path, filesystem=results.fs, format="parquet", schema=OUTPUT_SCHEMA
    )
    return dataset.to_table(columns=columns, filter=filter)


def to_image_size(arr: np.ndarray, width: int, height: int, nearest: bool = False) -> np.ndarray:
    """A stored map (float) or mask (bool) brought to an image of ``width`` x ``height``: the
    inverse of the square resize the model's input got (bilinear; ``nearest`` for masks)."""
    if arr.shape == (height, width):
        return arr
    if nearest or arr.dtype == bool:
        img = Image.fromarray(arr.astype(np.uint8))
        return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)).astype(arr.dtype)
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def decode_mask(row: dict[str, Any], image_size: bool = False) -> np.ndarray | None:
    """The defect mask (bool) stored in a result row, or None; with ``image_size`` at the
    image's own ``height`` x ``width`` (nearest neighbour), else as stored."""
    if not row.get("mask_png"):
        return None
    mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])).convert("L")) > 0
    return to_image_size(mask, row["width"], row["height"]) if image_size else mask


def decode_heatmap(row: dict[str, Any], image_size: bool = False) -> np.ndarray | None:
    """The anomaly map (float32) stored in a result row, or None; with ``image_size`` at the
    image's own ``height`` x ``width`` (bilinear), else as stored."""
    if not row.get("heatmap_png"):
        return None
    png = np.asarray(Image.open(io.BytesIO(row["heatmap_png"])), dtype=np.float64)
    low, high = row["heatmap_low"], row["heatmap_high"]
    heat = (low + png / 65535.0 * (high - low)).astype(np.float32)
    return to_image_size(heat, row["width"], row["height"]) if image_size else heat
