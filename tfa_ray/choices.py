"""What the selection chose for a model, as a record: the package stores it (``selection.json``)
and the tables print it, so a reader sees every inference choice without running anything.

Pure configuration arithmetic (no torch): the fused map's shares and the record itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from tfa_ray.config import AnomalyConfig, Preset

MIX = ("reconstruction", "statistics", "knn")  # the fused map's parts, in this order
SELECTION_FILE = "selection.json"  # the record's file in a package (older ones have none)


def mix_of(cfg: AnomalyConfig, knn: bool = True) -> tuple[float, float, float]:
    """The fused map's shares (reconstruction, statistics, kNN), summing to 1: ``fuse`` is
    ``(w * rec + (1 - w) * stat + w_knn * knn) / (1 + w_knn)``."""
    w_knn = cfg.w_knn if knn else 0.0
    return (
        cfg.w_reconstruction / (1 + w_knn),
        (1 - cfg.w_reconstruction) / (1 + w_knn),
        w_knn / (1 + w_knn),
    )


def with_mix(cfg: AnomalyConfig, mix: tuple[float, float, float]) -> AnomalyConfig:
    """``cfg`` fusing the maps with shares (reconstruction, statistics, kNN) (any scale): the
    inverse of :func:`mix_of`. A kNN-only mix keeps a share of 1e-3 on the other two."""
    rec, stat, knn = (max(float(x), 0.0) for x in mix)
    base = max(rec + stat, 1e-3 * (rec + stat + knn), 1e-12)
    w_rec = rec / (rec + stat) if rec + stat > 0 else 0.0
    return dataclasses.replace(cfg, w_reconstruction=w_rec, w_knn=knn / base)


def mix_text(mix: tuple[float, float, float], parts: dict | None = None) -> str:
    """rec/stat/knn shares, and with ``parts`` each one's separation and reliability."""
    text = "/".join(f"{x:.2f}" for x in mix)
    if parts:
        text += (
            " ("
            + ", ".join(
                f"{p}: separation {v['separation']:.3f} reliability {v['reliability']:.3f}"
                for p, v in parts.items()
            )
            + ")"
        )
    return text


@dataclass(frozen=True)
class InferenceChoice:
    """The inference choices made on the selection split (normal images and synthetic defects
    only), the signals behind the evidence mix, and the score of every variant tried."""

    test_mask_passes: int
    test_mask_layout: str
    statistics: str  # which per-position Gaussian is the statistical map
    mix: tuple[float, float, float]  # shares of (reconstruction, statistics, kNN) in the map
    image_evidence: str  # what the image score is taken from: the fused "map" or "statistics"
    score: str  # the image score's kind
    selection_score: float
    # (part, separation above chance, reliability) behind a selected mix; empty otherwise
    evidence: tuple[tuple[str, float, float], ...] = ()
    tried: tuple[tuple[str, float], ...] = ()  # (variant, its selection score)

    def apply(self, preset: Preset) -> Preset:
        """``preset`` configured with these choices (what the package's config.json holds)."""
        model = dataclasses.replace(
            preset.model,
            test_mask_passes=self.test_mask_passes,
            test_mask_layout=self.test_mask_layout,
        )
        anomaly = dataclasses.replace(
            preset.anomaly,
            statistics=self.statistics,
            image_evidence=self.image_evidence,
            score=self.score,
        )
        return dataclasses.replace(preset, model=model, anomaly=with_mix(anomaly, self.mix))

    def text(self) -> str:
        """One line for logs and tables."""
        return (
            f"passes {self.test_mask_passes} ({self.test_mask_layout}), {self.statistics} "
            f"statistics, mix rec/stat/knn {mix_text(self.mix)}, score {self.score} of the "
            f"{self.image_evidence}"
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> InferenceChoice:
        d = json.loads(text)
        d["mix"] = tuple(float(x) for x in d["mix"])
        d["evidence"] = tuple((str(p), float(s), float(r)) for p, s, r in d.get("evidence", ()))
        d["tried"] = tuple((str(k), float(v)) for k, v in d.get("tried", ()))
        return cls(**d)
