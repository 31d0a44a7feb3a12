"""Decision thresholds and score statistics from held-out normal images (numpy only: the
scoring driver and the drift check read them without loading torch)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# The precisions a scorer may compute at (tfa_ray.precision.precision_key): each is calibrated
# at itself, since a bf16 forward pass shifts scores by more than a threshold's margin.
CALIBRATED_PRECISIONS = ("fp32", "bf16", "fp16")
REFERENCE_PRECISION = "fp32"  # what a package from before per-precision calibration holds


@dataclass(frozen=True)
class Calibration:
    """Decision threshold and score statistics, all from held-out normal training images that
    model selection never saw (their own split), at the precision scoring uses.

    ``threshold`` flags ``target_fpr`` of those normals; ``supported_fpr`` is the smallest
    false-positive rate their number can demonstrate, 1 / (n + 1): a target below it is
    met only by putting the threshold above every calibration image, and is not a measured
    rate; ``score_mean`` / ``score_std`` describe normal scores; ``map_low`` / ``map_high``
    fix one model-wide scale for heat maps
    (the median and the 99.9th percentile of normal pixels' anomaly values), so heat maps
    compare across images and nights; ``pixel_threshold`` binarises maps into defect masks;
    ``normal_scores`` are the calibration images' scores themselves (6 significant digits),
    the reference a nightly run's score distribution is compared with (:mod:`tfa_ray.drift`).
    """

    threshold: float
    target_fpr: float
    score_mean: float
    score_std: float
    num_images: int
    map_low: float
    map_high: float
    pixel_threshold: float
    supported_fpr: float = 0.0  # 0: unknown (a package from before it was recorded)
    normal_scores: tuple[float, ...] = ()  # empty: a package from before they were recorded

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        fields = json.loads(text)
        fields["normal_scores"] = tuple(float(s) for s in fields.get("normal_scores") or ())
        return cls(**fields)


def is_anomalous(score: float, threshold: float) -> bool:
    """The decision rule, the one place it lives: the calibrated threshold is the smallest
    score that is flagged (:func:`calibrate` puts it just above the highest allowed normal)."""
    return bool(score >= threshold)


def calibrate(
    normal_scores: np.ndarray,
    normal_maps: np.ndarray,
    target_fpr: float = 0.01,
    pixel_fpr: float = 0.001,
) -> Calibration:
    """Threshold at the (1 - target_fpr) quantile of held-out normal scores.

    With few held-out images the quantile is the conservative order statistic: the smallest
    threshold that flags at most ``target_fpr`` of them (for fewer than 1 / target_fpr images,
    just above the highest normal score).
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    n = scores.size
    allowed = int(math.floor(target_fpr * n))  # normals that may score above the threshold
    top = scores[n - 1 - allowed]
    threshold = float(np.nextafter(top, np.inf))
    pixels = np.asarray(normal_maps, dtype=np.float32).ravel()
    low, high, pix_thr = np.quantile(pixels, [0.5, 0.999, 1.0 - pixel_fpr])
    return Calibration(
        threshold=threshold,
        target_fpr=float(target_fpr),
        score_mean=float(scores.mean()),
        score_std=float(scores.std()),
        num_images=int(n),
        map_low=float(low),
        map_high=float(max(high, low + 1e-12)),
        pixel_threshold=float(pix_thr),
        supported_fpr=1.0 / (n + 1),
        normal_scores=tuple(float(f"{s:.6g}") for s in scores),
    )


@dataclass(frozen=True)
class Calibrations:
    """One :class:`Calibration` per precision, each computed at that precision; the scorer,
    evaluation and drift use the entry of the precision they actually compute at (:meth:`at`).

    ``calibration.json`` holds ``{"precisions": {"fp32": {...}, "bf16": {...}, ...}}``. A
    package from before holds one unkeyed calibration: it loads as the fp32 entry, and the other
    precisions fall back to it (``legacy``; a log line says so once per load).
    """

    entries: Mapping[str, Calibration]
    legacy: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if REFERENCE_PRECISION not in self.entries:
            raise ValueError(f"calibrations need a {REFERENCE_PRECISION} entry, got {list(self)}")
        unknown = [p for p in self.entries if p not in CALIBRATED_PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precisions {unknown}: expected {CALIBRATED_PRECISIONS}")

    def __iter__(self):
        return iter(self.entries)

    def at(self, precision: str) -> Calibration:
        """The entry for ``precision`` (fp32 / bf16 / fp16); a missing one falls back to fp32
        (an older package)."""
        if precision not in CALIBRATED_PRECISIONS:
            raise ValueError(f"precision must be one of {CALIBRATED_PRECISIONS}, got {precision!r}")
        return self.entries.get(precision, self.entries[REFERENCE_PRECISION])

    def precision_of(self, threshold: float) -> str | None:
        """The precision whose entry has this threshold (what a scoring run wrote), or None."""
        for precision, cal in self.entries.items():
            if cal.threshold == threshold:
                return precision
        return None

    def to_json(self) -> str:
        entries = {p: dataclasses.asdict(c) for p, c in self.entries.items()}
        return json.dumps({"precisions": entries}, indent=2, sort_keys=True)

    @classmethod
    def single(cls, calibration: Calibration) -> Calibrations:
        """One fp32 entry (tests, and callers that calibrated at fp32 only)."""
        return cls({REFERENCE_PRECISION: calibration})

    @classmethod
    def from_json(cls, text: str) -> Calibrations:
        fields = json.loads(text)
        if "precisions" not in fields:
            log.info(
                "calibration.json from before per-precision calibration: its one entry is "
                "taken as %s, and %s fall back to it",
                REFERENCE_PRECISION,
                " and ".join(p for p in CALIBRATED_PRECISIONS if p != REFERENCE_PRECISION),
            )
            return cls({REFERENCE_PRECISION: Calibration.from_json(text)}, legacy=True)
        entries = {p: Calibration.from_json(json.dumps(c)) for p, c in fields["precisions"].items()}
        return cls(entries)


# Heat maps are stored as 16-bit PNGs on one scale per model. With span = map_high - map_low
# (the 99.9th percentile minus the median of normal pixels' values), 0 stands for
# map_low - span and 65535 for map_low + HEATMAP_HEADROOM * span: defects far above every normal
# pixel keep their shape instead of saturating, and the normal range still gets ~2,000 levels.
HEATMAP_HEADROOM = 32.0


def heatmap_uint8(maps: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Anomaly maps for viewing (overlays): 0 at the median normal pixel, 255 at the 99.9th
    percentile of normal pixels, clipped. Stored heat maps use :func:`heatmap_uint16`."""
    scaled = (maps - calibration.map_low) / (calibration.map_high - calibration.map_low)
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)


def heatmap_scale(calibration: Calibration) -> tuple[float, float]:
    """(low, high): the anomaly values that 0 and 65535 stand for in a stored heat map."""
    median, span = float(calibration.map_low), float(calibration.map_high - calibration.map_low)
    return median - span, median + HEATMAP_HEADROOM * span


def heatmap_uint16(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Anomaly maps on the model-wide scale ``(low, high)`` as uint16 (never per-image)."""
    scaled = (np.asarray(maps, dtype=np.float64) - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 65535).round().astype(np.uint16)
