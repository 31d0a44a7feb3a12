"""Metrics against scikit-learn, brute-force reimplementations of the MVTec AD / LOCO
definitions, and hand-computed curves."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from tfa_ray.metrics import (
    aupro,
    auspro,
    evaluate,
    f1_max,
    image_auroc,
    loco_regions,
    pixel_auroc,
    pro_curve,
    spro_curve,
)

# --------------------------------------------------------------------------- brute force


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """The MVTec reference's trapezoid with linear interpolation at x_max."""
    x, y = list(x), list(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    pts = [(a, b) for a, b in zip(x, y, strict=True) if a <= x_max]
    area = sum(
        0.5 * (pts[i][1] + pts[i + 1][1]) * (pts[i + 1][0] - pts[i][0]) for i in range(len(pts) - 1)
    )
    return area + correction


def _brute_curve(regions_per_image, maps):
    """Overlap curve evaluated at every distinct score; regions are (mask, saturation) pairs.

    PRO is the special case saturation = area. FPR over the pixels outside every region.
    """
    maps = np.asarray(maps, dtype=np.float64)
    normal = np.ones(maps.shape, dtype=bool)
    for i, regions in enumerate(regions_per_image):
        for m, _ in regions:
            normal[i] &= ~m
    n_neg = normal.sum()
    fprs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / n_neg)
        vals = [
            min((pred[i] & m).sum() / min(s, m.sum()), 1.0)
            for i, regions in enumerate(regions_per_image)
            for m, s in regions
        ]
        ys.append(float(np.mean(vals)))
    fprs.append(1.0)
    ys.append(1.0)
    return np.array(fprs), np.array(ys)


def _components(masks, structure):
    out = []
    for m in masks:
        lab, n = ndimage.label(m, structure=structure)
        out.append([(lab == k, float((lab == k).sum())) for k in range(1, n + 1)])
    return out


def _random_masks(rng, n, h, w, p=0.12):
    masks = rng.random((n, h, w)) < p
    masks[0, 2:7, 3:9] = True  # at least one sizeable region
    masks[-1] = False  # one defect-free image
    return masks


# --------------------------------------------------------------------------- AUROC / F1


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_image_auroc_matches_sklearn(kind):
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.random(300) if kind == "float" else rng.integers(0, 5, 300)
    scores = scores + labels * 0.7  # informative but not separable
    if kind == "ties":
        scores = np.floor(scores)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(int), -scores) == pytest.approx(
        roc_auc_score(labels, -scores), abs=1e-12
    )


def test_image_auroc_single_class_raises():
    with pytest.raises(ValueError, match="one class"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_pixel_auroc_matches_sklearn(dtype):
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, 6, 24, 20)
    maps = rng.random(masks.shape) + 0.5 * masks
    maps = (maps * 4).astype(dtype) if dtype == np.uint8 else maps.astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # 0/255 PNG masks and a list of (H,W) images are accepted as well
    assert pixel_auroc(list(masks.astype(np.uint8) * 255), list(maps)) == pytest.approx(
        expected, abs=1e-12
    )


def test_pixel_auroc_ragged_list_and_single_class():
    rng = np.random.default_rng(2)
    masks = [rng.random((8, 9)) < 0.3, rng.random((5, 7)) < 0.3]
    maps = [rng.integers(0, 3, m.shape).astype(np.float32) for m in masks]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_f1_max_matches_sklearn(kind):
    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.4
    scores = rng.random(200) + 0.6 * labels
    if kind == "ties":
        scores = np.round(scores * 3)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert f1_max(labels, scores) == pytest.approx(f1.max(), abs=1e-12)


def test_f1_max_perfect_and_no_positive():
    assert f1_max([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3]) == 1.0
    with pytest.raises(ValueError):
        f1_max([0, 0], [0.1, 0.2])


# --------------------------------------------------------------------------- PRO


def test_perfect_map():
    rng = np.random.default_rng(4)
    masks = _random_masks(rng, 5, 32, 32, p=0.05)
    maps = masks.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-6)
    assert pixel_auroc(masks, maps) == 1.0
    fpr, pro, _ = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 1, 1])


def _two_regions():
    mask = np.zeros((20, 20), dtype=bool)
    region_a = (slice(2, 6), slice(2, 6))
    region_b = (slice(12, 16), slice(12, 16))
    mask[region_a] = True
    mask[region_b] = True
    return mask, region_a, region_b


def test_pro_one_of_two_regions_found():
    mask, region_a, _ = _two_regions()
    score = np.zeros((20, 20))
    score[region_a] = 1.0
    # For every threshold in (0, 1] only region A is positive: PRO 0.5 at FPR 0.
    fpr, pro, thresholds = pro_curve(mask[None], score[None])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 1.0, 0.0])
    # As in the MVTec reference the points are joined linearly, also from (0, 0.5) to (1, 1)
    # (threshold 0 = everything positive): PRO(0.3) = 0.65, area = (0.5 + 0.65) / 2 * 0.3.
    assert aupro(mask[None], score[None]) == pytest.approx(0.575, abs=1e-12)
    assert aupro(mask[None], score[None], fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)
    # The quantile-threshold variant finds the same two operating points here.
    fpr_q, pro_q, _ = pro_curve(mask[None], score[None], num_thresholds=1000)
    np.testing.assert_allclose(fpr_q, fpr)
    np.testing.assert_allclose(pro_q, pro)


def test_pro_region_plus_false_positives_by_hand():
    mask, region_a, region_b = _two_regions()
    score = np.zeros((2, 20, 20))
    score[0][region_a] = 0.9
    score[0][region_b] = 0.4
    score[0, 0, 0:4] = 0.9  # 4 normal pixels tied with region A
    score[0, 19, 0:2] = 0.6  # 2 normal pixels between A and B
    score[1, 10, 10:13] = 0.6  # 3 pixels of a defect-free image
    masks = np.stack([mask, np.zeros_like(mask)])
    n_normal = 2 * 400 - 32
    fpr, pro, thresholds = pro_curve(masks, score)
    np.testing.assert_allclose(fpr, np.array([0, 4, 9, 9, n_normal]) / n_normal)
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.6, 0.4, 0.0])
    # (0,0)-(4/n,.5): 1/n; (4/n,.5)-(9/n,.5): 2.5/n; vertical; (9/n,1)-(0.3,1): 0.3 - 9/n
    expected = (0.3 - 5.5 / n_normal) / 0.3
    assert aupro(masks, score) == pytest.approx(expected, abs=1e-12)


def test_pro_uses_8_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 1] = True  # one region if diagonals connect, else two
    score = np.zeros((6, 6))
    score[0, 0] = 1.0
    _, pro, _ = pro_curve(mask[None], score[None])
    assert pro[1] == pytest.approx(1 / 3)  # 4-connectivity would give mean(1, 0) = 0.5


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_pro_matches_brute_force(kind):
    rng = np.random.default_rng(5)
    masks = _random_masks(rng, 5, 14, 12)
    maps = rng.random(masks.shape) + 0.4 * masks
    if kind == "ties":
        maps = np.floor(maps * 4)
    regions = _components(masks, np.ones((3, 3)))
    bx, by = _brute_curve(regions, maps)
    fpr, pro, _ = pro_curve(masks, maps.astype(np.float32))
    for limit in (0.01, 0.05, 0.3, 1.0):
        expected = _trapezoid(bx, by, limit) / limit
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    # every point of the (compressed) exact curve is a point of the brute-force curve
    brute = {(round(a, 9), round(b, 9)) for a, b in zip(bx, by, strict=True)}
    assert {(round(a, 9), round(b, 9)) for a, b in zip(fpr, pro, strict=True)} <= brute
    # quantile thresholds approximate the exact value
    fq, pq, _ = pro_curve(masks, maps, num_thresholds=200)
    assert fq[0] == 0 and pq[0] == 0 and fq[-1] == 1 and pq[-1] == 1
    assert np.all(np.diff(fq) >= 0) and np.all(np.diff(pq) >= 0)


def test_aupro_random_low_noisy_perfect_high():
    rng = np.random.default_rng(6)
    masks = np.zeros((8, 64, 64), dtype=bool)
    for m in masks[:6]:
        y, x = rng.integers(0, 48, 2)
        m[y : y + rng.integers(4, 16), x : x + rng.integers(4, 16)] = True
    random_score = aupro(masks, rng.random(masks.shape).astype(np.float32))
    assert 0.05 < random_score < 0.2  # chance level is about 0.3 / 2 = 0.15
    noisy = masks + 0.25 * rng.standard_normal(masks.shape)
    assert aupro(masks, noisy) > 0.9


def test_pro_errors():
    with pytest.raises(ValueError, match="no ground-truth defect region"):
        aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="no normal"):
        aupro(np.ones((1, 4, 4)), np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(4)[None], np.eye(4)[None], fpr_limit=0.0)
    with pytest.raises(ValueError, match="shape"):
        aupro(np.eye(4)[None], np.ones((1, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.eye(4)[None], np.full((1, 4, 4), np.nan))


# --------------------------------------------------------------------------- LOCO sPRO

DEFECTS_CONFIG = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 20,
     "relative_saturation": False},
    {"defect_name": "misplaced", "pixel_value": 254, "saturation_threshold": 0.5,
     "relative_saturation": True},
    {"defect_name": "huge_threshold", "pixel_value": 253, "saturation_threshold": 5000,
     "relative_saturation": False},
]  # fmt: skip


def _square(value: int, y: int, x: int, size: int = 10, shape=(30, 30)) -> np.ndarray:
    img = np.zeros(shape, dtype=np.uint8)
    img[y : y + size, x : x + size] = value
    return img


def test_loco_regions_maps_pixel_values():
    pngs = [_square(255, 0, 0), _square(254, 10, 10, size=9), _square(253, 20, 20, size=5)]
    regions = loco_regions(pngs, DEFECTS_CONFIG)
    assert [s for _, s in regions] == [20.0, 40.0, 25.0]  # abs; int(0.5 * 81); capped at area
    for (mask, _), png in zip(regions, pngs, strict=True):
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, png != 0)
    with pytest.raises(ValueError, match="not in defects_config"):
        loco_regions([_square(7, 0, 0)], DEFECTS_CONFIG)
    two_values = _square(255, 0, 0)
    two_values[20, 20] = 254
    with pytest.raises(ValueError, match="exactly one"):
        loco_regions([two_values], DEFECTS_CONFIG)


def test_spro_saturates():
    region = np.zeros((30, 30), dtype=bool)
    region[0:10, 0:10] = True  # area 100
    score = np.zeros((30, 30))
    score.flat[np.flatnonzero(region.ravel())[:20]] = 1.0  # 20 of its pixels
    _, spro, _ = spro_curve([[(region, 20.0)]], [score])
    assert spro[1] == 1.0  # 20 px reach the saturation threshold of 20
    _, spro, _ = spro_curve([[(region, 40.0)]], [score])
    assert spro[1] == pytest.approx(0.5)
    _, spro, _ = spro_curve([[(region, 100.0)]], [score])  # no saturation: plain overlap
    assert spro[1] == pytest.approx(0.2)
    assert auspro([[(region, 20.0)]], [score]) == pytest.approx(1.0)


def test_spro_relative_saturation_via_defects_config():
    png = _square(254, 0, 0)  # area 100, relative 0.5 -> saturation 50
    score = np.zeros((30, 30))
    score[0:5, 0:5] = 1.0  # 25 px
    _, spro, _ = spro_curve([[png]], [score], DEFECTS_CONFIG)
    assert spro[1] == pytest.approx(0.5)
    score[0:5, 0:10] = 1.0  # 50 px
    _, spro, _ = spro_curve([[png]], [score], DEFECTS_CONFIG)
    assert spro[1] == 1.0


def test_spro_fpr_counts_pixels_outside_all_regions():
    pngs = [_square(255, 0, 0), _square(254, 5, 5)]  # overlapping regions, union 175 px
    good = np.zeros((30, 30))
    good[0, 0:9] = 1.0
    score = np.zeros((30, 30))
    fpr, _, _ = spro_curve([loco_regions(pngs, DEFECTS_CONFIG), []], [score, good])
    n_normal = 900 - 175 + 900
    assert fpr[1] == pytest.approx(9 / n_normal)


def test_auspro_perfect_map_and_raw_masks():
    gt_raw = [[_square(255, 0, 0), _square(254, 5, 5)], [], [_square(253, 15, 3, size=6)]]
    maps = [
        np.logical_or.reduce([g != 0 for g in images]) if images else np.zeros((30, 30))
        for images in gt_raw
    ]
    maps = np.asarray(maps, dtype=np.float32)
    gt = [loco_regions(images, DEFECTS_CONFIG) for images in gt_raw]
    assert auspro(gt, maps) == pytest.approx(1.0, abs=1e-9)
    assert auspro(gt_raw, maps, DEFECTS_CONFIG) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(TypeError, match="defects_config"):
        auspro(gt_raw, maps)


@pytest.mark.parametrize("kind", ["float", "ties"])
def test_spro_matches_brute_force(kind):
    rng = np.random.default_rng(7)
    gt = []
    for _ in range(4):
        regions = []
        for _ in range(rng.integers(0, 3)):
            m = np.zeros((12, 14), dtype=bool)
            y, x = rng.integers(0, 8, 2)
            m[y : y + rng.integers(2, 6), x : x + rng.integers(2, 7)] = True
            regions.append((m, float(rng.integers(1, 25))))  # some above the region area
        gt.append(regions)
    gt.append([(np.eye(12, 14, dtype=bool), 3.0)])
    maps = rng.random((5, 12, 14))
    for i, regions in enumerate(gt):
        for m, _ in regions:
            maps[i] += 0.3 * m
    if kind == "ties":
        maps = np.floor(maps * 5)
    bx, by = _brute_curve(gt, maps)
    for limit in (0.01, 0.05, 0.3, 1.0):
        expected = _trapezoid(bx, by, limit) / limit
        assert auspro(gt, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------- evaluate


def test_evaluate():
    rng = np.random.default_rng(8)
    masks = _random_masks(rng, 6, 16, 16)
    maps = rng.random(masks.shape) + masks
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    only_image = evaluate(labels, scores)
    assert only_image == {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": f1_max(labels, scores),
    }
    full = evaluate(labels, scores, masks, maps)
    assert full["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert full["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert "auspro" not in full
    loco_gt = [[(m, 5.0)] if m.any() else [] for m in masks]
    with_loco = evaluate(labels, scores, masks, maps, loco_gt=loco_gt)
    assert with_loco["auspro"] == pytest.approx(auspro(loco_gt, maps), abs=1e-12)
    with pytest.raises(ValueError, match="anomaly maps"):
        evaluate(labels, scores, masks=masks)
