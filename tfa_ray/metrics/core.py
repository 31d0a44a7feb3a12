"""Image and pixel metrics for industrial anomaly detection (MVTec AD and MVTec LOCO AD).

Every metric is exact: curves are computed over *all* distinct anomaly-score thresholds and
AUROC counts ties as one half, so results do not depend on a threshold grid and agree with
the public MVTec evaluation code. The image-level metrics are scikit-learn's; the pixel
metrics (pixel AUROC, PRO, sPRO) are computed here, lean on memory.

Cost: the pixel metrics sort the scores of the normal pixels once (``O(N log N)``, about 3 s
for 600 maps of 256x256 in float32) and keep one copy of them; the anomalous pixels, which are
few, are sorted separately and located among the normal ones with ``np.searchsorted``. Nothing
is turned into Python lists. Scores keep their dtype (float32 stays float32, float64 stays
float64, float16 and integers are widened losslessly) so ties are neither made nor broken.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

LocoRegion = tuple[np.ndarray, float]
"""One MVTec LOCO ground-truth region: ``(bool mask HxW, saturation threshold in pixels)``."""

# The MVTec AD reference labels ground-truth regions with a 3x3 structuring element of ones.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Positive scores are located among the normal ones in chunks to bound the int64 temporaries.
_CHUNK = 1 << 22

Curve = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- input handling


def _score_dtype(dtype: np.dtype) -> np.dtype:
    """Keep float32/float64 as they are (no new ties, no extra memory); widen the rest."""
    if np.issubdtype(dtype, np.floating) and dtype.itemsize >= 4:
        return np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _binary_labels(labels: npt.ArrayLike, name: str = "labels") -> np.ndarray:
    """Return labels as a flat bool array; anything but 0/1 is a caller bug, so raise."""
    y = np.asarray(labels).ravel()
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1)")
        y = y.astype(bool)
    return y


def _scores_1d(scores: npt.ArrayLike, n: int) -> np.ndarray:
    s = np.asarray(scores).ravel()
    if s.size != n:
        raise ValueError(f"got {s.size} scores for {n} labels")
    s = s.astype(_score_dtype(s.dtype), copy=False)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _image_list(x: Any, name: str) -> list[np.ndarray]:
    """Accept a (N,H,W) array, a single (H,W) array or a sequence of (H,W) arrays."""
    if isinstance(x, np.ndarray):
        if x.ndim == 2:
            return [x]
        if x.ndim == 3:
            return list(x)  # views, no copy
        raise ValueError(f"{name} must be (N,H,W) or a list of (H,W) arrays, got {x.shape}")
    out = [np.asarray(a) for a in x]
    for a in out:
        if a.ndim != 2:
            raise ValueError(f"each entry of {name} must be 2-D (H,W), got shape {a.shape}")
    return out


def _common_dtype(maps: list[np.ndarray]) -> np.dtype:
    if not maps:
        raise ValueError("no anomaly maps given")
    return _score_dtype(np.result_type(*(m.dtype for m in maps)))


def _gather(maps: list[np.ndarray], select: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Concatenate ``maps[i][select[i]]`` into one preallocated array (no doubled peak)."""
    counts = [int(np.count_nonzero(s)) for s in select]
    out = np.empty(sum(counts), dtype=dtype)
    offset = 0
    for m, s, c in zip(maps, select, counts, strict=True):
        out[offset : offset + c] = m[s]
        offset += c
    return out


def _sorted_checked(x: np.ndarray, what: str) -> np.ndarray:
    """Sort in place; NaNs sort last, so one look at the end finds them."""
    x.sort()
    if x.size and np.isnan(x[-1]):
        raise ValueError(f"anomaly maps contain NaN ({what} pixels)")
    return x


def _pixel_inputs(
    masks: Any, maps: Any, label_regions: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Split the pixels into normal and anomalous ones.

    Returns the sorted scores of the normal (mask == 0) pixels, the scores of the anomalous
    pixels, and with ``label_regions`` the PRO weight ``1 / region area`` of each anomalous
    pixel and the number of regions (8-connected components, as in the MVTec AD reference).
    Any nonzero mask value counts as a defect so 0/255 PNG masks work unchanged.
    """
    mask_list = _image_list(masks, "masks")
    map_list = _image_list(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"got {len(mask_list)} masks but {len(map_list)} anomaly maps")
    dtype = _common_dtype(map_list)
    defect: list[np.ndarray] = []
    for i, (mk, mp) in enumerate(zip(mask_list, map_list, strict=True)):
        if mk.shape != mp.shape:
            raise ValueError(f"image {i}: mask shape {mk.shape} != map shape {mp.shape}")
        defect.append(mk if mk.dtype == np.bool_ else mk != 0)
    pos = _gather(map_list, defect, dtype)
    neg = _sorted_checked(_gather(map_list, [~d for d in defect], dtype), "normal")
    if np.isnan(pos).any():
        raise ValueError("anomaly maps contain NaN (anomalous pixels)")
    if not label_regions:
        return neg, pos, None, 0
    weights = np.empty(pos.size, dtype=np.float64)
    n_regions = 0
    offset = 0
    for d in defect:
        if not d.any():
            continue  # defect-free image: contributes only normal pixels (FPR)
        lab, n = ndimage.label(d, structure=_EIGHT_CONNECTED)
        area = np.bincount(lab.ravel())
        lab_px = lab[d]  # same C order as maps[i][d] in _gather
        weights[offset : offset + lab_px.size] = 1.0 / area[lab_px]
        offset += lab_px.size
        n_regions += n
    return neg, pos, weights, n_regions


# --------------------------------------------------------------------------- AUROC and F1


def _auroc_sorted(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg), ties counted 1/2, in exact integer arithmetic.

    For each positive, ``searchsorted`` gives the negatives below it (left) and below-or-equal
    (right); ``left + right`` is twice its U contribution, so the numerator stays an integer.
    """
    n_pos, n_neg = pos_sorted.size, neg_sorted.size
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "AUROC is undefined when only one class is present "
            f"({n_pos} positive, {n_neg} negative samples)"
        )
    twice_u = 0
    for start in range(0, n_pos, _CHUNK):
        chunk = pos_sorted[start : start + _CHUNK]
        twice_u += int(np.searchsorted(neg_sorted, chunk, side="left").sum(dtype=np.int64))
        twice_u += int(np.searchsorted(neg_sorted, chunk, side="right").sum(dtype=np.int64))
    return twice_u / (2 * n_pos * n_neg)


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Image-level ROC AUC (1 = anomalous): ``sklearn.metrics.roc_auc_score``. Raises
    ValueError if only one class is present, because the AUROC is undefined then and a silent
    0.5 or NaN would hide a broken split."""
    from sklearn.metrics import roc_auc_score

    y = _binary_labels(labels)
    s = _scores_1d(scores, y.size)
    if y.all() or not y.any():
        raise ValueError(
            "AUROC is undefined when only one class is present "
            f"({int(y.sum())} positive, {int((~y).sum())} negative samples)"
        )
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level ROC AUC over all pixels of all images (mask nonzero = anomalous).

    ``masks`` and ``maps`` are (N,H,W) arrays or sequences of (H,W) arrays. Exact (ties count
    1/2, equals ``roc_auc_score`` on the flattened pixels) but sorts only once, so 39 M pixels
    take a few seconds and about one extra copy of the normal pixels' scores.
    """
    neg, pos, _, _ = _pixel_inputs(masks, maps, label_regions=False)
    pos.sort()
    return _auroc_sorted(pos, neg)


def f1_max(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Best image-level F1 over all thresholds ``score >= t``: the maximum of ``2PR/(P+R)``
    over ``sklearn.metrics.precision_recall_curve`` (a threshold-free F1)."""
    from sklearn.metrics import precision_recall_curve

    y = _binary_labels(labels)
    s = _scores_1d(scores, y.size)
    if not y.any():
        raise ValueError("F1 is undefined without anomalous samples")
    precision, recall, _ = precision_recall_curve(y, s)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


# --------------------------------------------------------------------------- (s)PRO curves


def _overlap_curve(
    neg_sorted: np.ndarray,
    pos_scores: np.ndarray,
    pos_weights: np.ndarray,
    n_regions: int,
    num_thresholds: int | None,
) -> Curve:
    """FPR and mean per-region overlap for the positive sets ``{score >= t}``.

    ``pos_weights`` holds, per anomalous pixel entry, how much the sum of the per-region
    overlaps grows when that pixel turns positive (``1/area`` for PRO; for sPRO the first
    ``saturation`` pixels of a region get ``1/saturation``, the rest 0). Summing the weights in
    descending score order is the cumulative-sum scheme of the MVTec AD reference, but only
    over the anomalous pixels: the false-positive counts come from ``searchsorted`` in the
    sorted normal scores. Between two consecutive anomalous scores only the FPR moves, so the
    curve is a horizontal segment there and its interior points are left out: the polygon, its
    area and any interpolation are identical to the curve over every distinct threshold.

    Returns ``(fpr, overlap, thresholds)``, FPR ascending, starting at ``(0, 0)`` with
    threshold ``+inf`` (nothing positive) and ending at ``(1, 1)`` (everything positive).
    """
    n_neg = neg_sorted.size
    if n_neg == 0:
        raise ValueError("the FPR is undefined: there is no normal (defect-free) pixel")
    if n_regions == 0 or pos_scores.size == 0:
        raise ValueError("the (s)PRO is undefined: there is no ground-truth defect region")
    order = np.argsort(pos_scores, kind="stable")[::-1]
    s_desc = pos_scores[order]
    cum = np.cumsum(pos_weights[order])

    if num_thresholds is not None:
        if num_thresholds < 2:
            raise ValueError("num_thresholds must be at least 2")
        # Quantiles of the pooled scores; two sorted runs, so the stable sort is a merge.
        pooled = np.concatenate([neg_sorted, s_desc[::-1]])
        pooled.sort(kind="stable")
        idx = np.round(np.linspace(0, pooled.size - 1, num_thresholds)).astype(np.int64)
        thr = np.unique(pooled[idx])[::-1]
        del pooled
        fp = n_neg - np.searchsorted(neg_sorted, thr, side="left")
        n_ge = s_desc.size - np.searchsorted(s_desc[::-1], thr, side="left")
        ov = np.where(n_ge > 0, cum[np.maximum(n_ge - 1, 0)], 0.0)
        fpr = np.concatenate(([0.0], fp / n_neg))
        overlap = np.concatenate(([0.0], ov / n_regions))
        thresholds = np.concatenate(([np.inf], thr.astype(np.float64)))
        overlap[-1] = 1.0  # lowest threshold = global minimum: every region fully covered
        return fpr, np.minimum(overlap, 1.0), thresholds

    ends = np.flatnonzero(np.append(s_desc[1:] != s_desc[:-1], True))
    d = s_desc[ends]  # distinct anomalous scores, descending
    ov_ge = cum[ends]  # overlap sum with all pixels >= d_k positive
    ov_gt = np.concatenate(([0.0], ov_ge[:-1]))  # ... with pixels > d_k positive
    right = np.searchsorted(neg_sorted, d, side="right")
    fp_ge = n_neg - np.searchsorted(neg_sorted, d, side="left")
    fp_gt = n_neg - right
    # Point "just above d_k" (threshold = smallest normal score > d_k); only needed when some
    # normal pixels lie strictly between d_k and d_(k-1), otherwise it repeats the point of
    # d_(k-1).
    keep_above = fp_gt > np.concatenate(([0], fp_ge[:-1]))
    k = d.size
    fp = np.empty(2 * k, dtype=np.int64)
    ov = np.empty(2 * k, dtype=np.float64)
    thr = np.empty(2 * k, dtype=np.float64)
    keep = np.ones(2 * k, dtype=bool)
    fp[0::2], fp[1::2] = fp_gt, fp_ge
    ov[0::2], ov[1::2] = ov_gt, ov_ge
    thr[1::2] = d
    above = thr[0::2]
    above[keep_above] = neg_sorted[right[keep_above]]
    keep[0::2] = keep_above
    fp, ov, thr = fp[keep], ov[keep], thr[keep]

    fp_list = [np.zeros(1, dtype=np.int64), fp]
    ov_list = [np.zeros(1), ov]
    thr_list = [np.array([np.inf]), thr]
    if fp[-1] < n_neg:  # normal pixels below the lowest anomalous score
        fp_list.append(np.array([n_neg]))
        ov_list.append(np.array([ov[-1]]))
        thr_list.append(np.array([float(neg_sorted[0])]))
    fpr = np.concatenate(fp_list) / n_neg
    overlap = np.concatenate(ov_list) / n_regions
    overlap[-1] = 1.0  # everything positive: every region fully covered (no rounding drift)
    return fpr, np.minimum(overlap, 1.0), np.concatenate(thr_list)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` on ``[0, x_max]``, normalised by ``x_max``.

    As the MVTec ``trapezoid(..., x_max)``: when ``x_max`` is not a curve point, ``y`` is
    interpolated linearly between its neighbours, so the result is exact for the polygon.
    """
    if not 0.0 < x_max <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {x_max}")
    n = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max (n >= 1)
    area = float(np.sum(0.5 * (y[1:n] + y[: n - 1]) * np.diff(x[:n])))
    if x[n - 1] < x_max:  # then n < len(x) because the curve ends at x = 1
        x0, x1, y0, y1 = x[n - 1], x[n], y[n - 1], y[n]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return float(area / x_max)


def pro_curve(masks: Any, maps: Any, num_thresholds: int | None = None) -> Curve:
    """MVTec AD per-region-overlap curve: ``(fpr, pro, thresholds)``.

    Regions are the 8-connected components of each ground-truth mask (``scipy.ndimage.label``
    with a 3x3 structure, as the MVTec reference). For the positive set ``score >= t``:
    PRO = mean over all regions of all images of overlap / region area, FPR = positives among
    all normal pixels of all images; defect-free images only add normal pixels.

    ``num_thresholds=None`` (default) gives the exact curve over the sorted distinct scores,
    as the reference's cumulative sums do (collinear points on horizontal runs are omitted,
    see ``_overlap_curve``). An integer evaluates the curve at that many quantiles of all
    pixel scores instead, which is only useful to get a short curve for plotting.
    """
    neg, pos, weights, n_regions = _pixel_inputs(masks, maps, label_regions=True)
    assert weights is not None
    return _overlap_curve(neg, pos, weights, n_regions, num_thresholds)


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the exact PRO curve for FPR in ``[0, fpr_limit]``, divided by ``fpr_limit``.

    The MVTec AD AU-PRO: the curve starts at (0, 0), points are joined linearly (also across
    the gap from the lowest anomalous threshold to (1, 1)), the curve is interpolated at
    ``fpr_limit`` and integrated with the trapezoid rule, so the result lies in [0, 1].
    """
    fpr, pro, _ = pro_curve(masks, maps)
    return _area_up_to(fpr, pro, fpr_limit)
