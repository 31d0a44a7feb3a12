"""A shard as it travels between the stages: one Ray Data row per shard, its arrays as .npy
bytes (no pickle), its per-path items as JSON."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from tfa_ray.scoring.contract import ERROR


def to_npy(arr: np.ndarray) -> bytes:
    """An array as .npy bytes (Ray's object store carries bytes; no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """The inverse of :func:`to_npy`."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def cell(batch: dict[str, Any], key: str, i: int = 0) -> Any:
    """Row ``i``'s value of ``key`` as a plain Python value."""
    value = batch[key][i]
    return value.item() if isinstance(value, np.generic) else value


def mark_error(item: dict[str, Any], message: str, kind: str) -> dict[str, Any]:
    """Make ``item`` an error row (``kind``: permanent or transient)."""
    item.update(status=ERROR, error=message, error_kind=kind)
    return item
