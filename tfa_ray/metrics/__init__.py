"""Evaluation metrics for industrial anomaly detection (MVTec AD and MVTec LOCO AD): image
AUROC and F1-max (scikit-learn), memory-lean exact pixel AUROC and AU-PRO (:mod:`.core`), and
LOCO's sPRO (:mod:`.loco`); :func:`evaluate` computes all of one test set at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tfa_ray.metrics.core import (
    LocoRegion,
    _area_up_to,
    _auroc_sorted,
    _overlap_curve,
    _pixel_inputs,
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
)
from tfa_ray.metrics.loco import auspro, loco_regions, spro_curve

__all__ = [
    "LocoRegion",
    "aupro",
    "auspro",
    "evaluate",
    "f1_max",
    "image_auroc",
    "loco_regions",
    "pixel_auroc",
    "pro_curve",
    "spro_curve",
]


def evaluate(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    masks: Any = None,
    maps: Any = None,
    loco_gt: Sequence[Sequence[LocoRegion]] | None = None,
    *,
    pro_fpr_limit: float = 0.3,
    spro_fpr_limit: float = 0.05,
) -> dict[str, float | None]:
    """All metrics of one test set in a dict.

    Keys ``image_auroc``, ``f1_max``, ``pixel_auroc`` and ``aupro`` (the last two None when
    ``masks`` is None), plus ``auspro`` when ``loco_gt`` (regions as from ``loco_regions``) is
    given. The normal pixels are sorted once and shared by pixel AUROC and AU-PRO.
    """
    result: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": f1_max(labels, scores),
    }
    if (masks is not None or loco_gt is not None) and maps is None:
        raise ValueError("pixel metrics need the anomaly maps")
    if masks is not None:
        neg, pos, weights, n_regions = _pixel_inputs(masks, maps, label_regions=True)
        assert weights is not None
        result["pixel_auroc"] = _auroc_sorted(np.sort(pos), neg)
        fpr, pro, _ = _overlap_curve(neg, pos, weights, n_regions, None)
        del neg
        result["aupro"] = _area_up_to(fpr, pro, pro_fpr_limit)
    if loco_gt is not None:
        result["auspro"] = auspro(loco_gt, maps, fpr_limit=spro_fpr_limit)
    return result
