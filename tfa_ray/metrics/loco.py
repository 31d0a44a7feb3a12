"""MVTec LOCO AD's saturated PRO (sPRO): ground-truth regions from the LOCO mask PNGs and
``defects_config.json``, the sPRO curve and the area under it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tfa_ray.metrics.core import (
    Curve,
    LocoRegion,
    _area_up_to,
    _common_dtype,
    _gather,
    _image_list,
    _overlap_curve,
    _sorted_checked,
)


def loco_regions(
    mask_images: Sequence[np.ndarray], defects_config: Sequence[Mapping[str, Any]]
) -> list[LocoRegion]:
    """Turn the ground-truth PNGs of one LOCO image (000.png, 001.png, ...) into regions.

    Each PNG is one region, whatever its connectivity, and holds a single nonzero value: the
    ``pixel_value`` of its defect type in ``defects_config.json`` (a list of dicts with
    ``defect_name``, ``pixel_value``, ``saturation_threshold``, ``relative_saturation``).
    The saturation threshold in pixels is, as in the MVTec LOCO reference,
    ``int(saturation_threshold * area)`` when relative and ``min(saturation_threshold, area)``
    when absolute; it is raised to at least one pixel (the reference would divide by zero).
    """
    by_value = {int(e["pixel_value"]): e for e in defects_config}
    regions: list[LocoRegion] = []
    for i, img in enumerate(mask_images):
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f"ground-truth image {i} must be 2-D, got shape {arr.shape}")
        values = np.unique(arr)
        values = values[values != 0]
        if values.size != 1:
            raise ValueError(
                f"ground-truth image {i} must hold exactly one nonzero pixel value, "
                f"found {values.tolist()}"
            )
        pixel_value = int(values[0])
        if pixel_value not in by_value:
            raise ValueError(
                f"pixel value {pixel_value} of ground-truth image {i} is not in defects_config "
                f"(known: {sorted(by_value)})"
            )
        entry = by_value[pixel_value]
        mask = arr == values[0]
        area = int(np.count_nonzero(mask))
        threshold = float(entry["saturation_threshold"])
        if entry["relative_saturation"]:
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"relative saturation_threshold must be in (0, 1]: {entry}")
            saturation = float(int(threshold * area))
        else:
            saturation = min(threshold, float(area))
        regions.append((mask, max(saturation, 1.0)))
    return regions


def _as_regions(
    gt: Sequence[Sequence[Any]], defects_config: Sequence[Mapping[str, Any]] | None
) -> list[list[LocoRegion]]:
    if defects_config is not None:
        return [loco_regions(list(images), defects_config) for images in gt]
    out: list[list[LocoRegion]] = []
    for i, regions in enumerate(gt):
        image_regions: list[LocoRegion] = []
        for region in regions:
            if isinstance(region, np.ndarray) or len(region) != 2:
                raise TypeError(
                    f"gt[{i}] must be a list of (mask, saturation_threshold) tuples; pass "
                    "defects_config to convert raw LOCO mask images"
                )
            image_regions.append((np.asarray(region[0]), float(region[1])))
        out.append(image_regions)
    return out


def _spro_inputs(
    gt: list[list[LocoRegion]], maps: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Normal scores (sorted) plus per-pixel sPRO weights of every region.

    A region with saturation ``s`` reaches sPRO ``min(overlap / s, 1)``; ranking its pixels by
    score, the j-th one adds ``min(j/s, 1) - min((j-1)/s, 1)``, which is 0 after ``ceil(s)``
    pixels, so only the top ``ceil(s)`` pixels are kept. Which of several tied pixels gets a
    weight does not matter: tied pixels turn positive at the same threshold.
    """
    map_list = _image_list(maps, "maps")
    if len(gt) != len(map_list):
        raise ValueError(f"got ground truth for {len(gt)} images but {len(map_list)} maps")
    dtype = _common_dtype(map_list)
    normal: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    n_regions = 0
    for i, (regions, mp) in enumerate(zip(gt, map_list, strict=True)):
        union = np.zeros(mp.shape, dtype=bool)
        for mask, saturation in regions:
            if mask.shape != mp.shape:
                raise ValueError(f"image {i}: region shape {mask.shape} != map {mp.shape}")
            m = mask if mask.dtype == np.bool_ else mask != 0
            area = int(np.count_nonzero(m))
            if area == 0 or not saturation > 0:
                raise ValueError(f"image {i}: empty region or saturation_threshold <= 0")
            s = min(float(saturation), float(area))
            top = int(np.ceil(s))
            scores = mp[m].astype(dtype, copy=False)
            best = np.argsort(scores, kind="stable")[::-1][:top]
            j = np.arange(1, top + 1, dtype=np.float64)
            pos_parts.append(scores[best])
            weight_parts.append(np.minimum(j / s, 1.0) - np.minimum((j - 1) / s, 1.0))
            union |= m
            n_regions += 1
        normal.append(~union)
    neg = _sorted_checked(_gather(map_list, normal, dtype), "normal")
    pos = np.concatenate(pos_parts) if pos_parts else np.empty(0, dtype=dtype)
    if np.isnan(pos).any():
        raise ValueError("anomaly maps contain NaN (anomalous pixels)")
    weights = np.concatenate(weight_parts) if weight_parts else np.empty(0)
    return neg, pos, weights, n_regions


def spro_curve(
    gt: Sequence[Sequence[Any]],
    maps: Any,
    defects_config: Sequence[Mapping[str, Any]] | None = None,
    num_thresholds: int | None = None,
) -> Curve:
    """MVTec LOCO saturated-PRO curve: ``(fpr, spro, thresholds)``.

    ``gt`` has one entry per image: a list of ``(mask, saturation_threshold)`` regions (see
    ``loco_regions``; empty for good images) or, with ``defects_config``, the raw ground-truth
    PNG arrays of that image. sPRO of a region = ``min(overlap / saturation, 1)`` (saturation
    capped at the region area as in the reference), the curve is the mean over all regions;
    FPR counts the pixels outside every region, over all images. Like the reference, regions
    of one image may overlap. ``num_thresholds`` as in ``pro_curve`` (quantiles of the normal
    and the still-unsaturated region scores). The reference refines a threshold grid
    adaptively; the exact curve (default) is the limit of that refinement.
    """
    neg, pos, weights, n_regions = _spro_inputs(_as_regions(gt, defects_config), maps)
    return _overlap_curve(neg, pos, weights, n_regions, num_thresholds)


def auspro(
    gt: Sequence[Sequence[Any]],
    maps: Any,
    defects_config: Sequence[Mapping[str, Any]] | None = None,
    fpr_limit: float = 0.05,
) -> float:
    """Area under the sPRO curve up to ``fpr_limit`` (default 0.05, the LOCO headline value),
    divided by ``fpr_limit`` so that it lies in [0, 1]; same integration as ``aupro``.

    The LOCO reference reports it separately for logical and structural anomalies, each
    together with all good images: pass the corresponding subset of images to get those.
    """
    fpr, spro, _ = spro_curve(gt, maps, defects_config)
    return _area_up_to(fpr, spro, fpr_limit)
