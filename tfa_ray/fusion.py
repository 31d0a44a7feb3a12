"""From the evidence maps to one map and one score per image: the fusion and the decision.

Each kind of evidence is first put on the scale of held-out normal pixels (its ``MapNorm``,
fitted in selection), then

    fused = w * rec + (1 - w) * stat             w = cfg.w_reconstruction, stat = cfg.statistics
    fused = (fused + w_knn * knn) / (1 + w_knn)  with a kNN memory and cfg.w_knn > 0
    score = image_score(fused)                   or of stat alone (cfg.image_evidence)

A model with no statistics (the paper) has the reconstruction map alone, unnormalised.
``kinds`` below is what a model has: ``reconstruction`` always, and ``gaussian``, ``residual``
and ``knn`` where it was built with them.
"""

from __future__ import annotations

import torch

from tfa_ray.anomaly import image_score
from tfa_ray.config import AnomalyConfig
from tfa_ray.evidence import MapNorm

EVIDENCE = ("reconstruction", "gaussian", "residual", "knn")


def fused_kinds(kinds: tuple[str, ...], cfg: AnomalyConfig) -> tuple[str, ...]:
    """The evidence :func:`decide` reads under ``cfg``, of the model's ``kinds``."""
    if "gaussian" not in kinds:
        return ("reconstruction",)
    w = cfg.w_reconstruction
    read = (("reconstruction",) if w > 0 else ()) + ((cfg.statistics,) if w < 1 else ())
    if cfg.image_evidence == "statistics" and cfg.statistics not in read:
        read += (cfg.statistics,)
    return read + (("knn",) if "knn" in kinds and cfg.w_knn > 0 else ())


def fuse(
    maps: dict[str, torch.Tensor],
    norms: dict[str, MapNorm],
    kinds: tuple[str, ...],
    cfg: AnomalyConfig,
) -> torch.Tensor:
    """The paper's map alone, or the weighted mean of the normalised maps (module docstring)."""
    if "gaussian" not in kinds:
        return maps["reconstruction"]
    w, stat = cfg.w_reconstruction, cfg.statistics
    if stat not in ("gaussian", "residual") or stat not in kinds:
        raise ValueError(f"this model has no {stat!r} statistics to fuse")
    if w >= 1:
        out = norms["reconstruction"](maps["reconstruction"])
    else:
        out = norms[stat](maps[stat]) * (1.0 - w)
        if w > 0:
            out = out + norms["reconstruction"](maps["reconstruction"]) * w
    if "knn" in kinds and cfg.w_knn > 0:
        out = (out + norms["knn"](maps["knn"]) * cfg.w_knn) / (1.0 + cfg.w_knn)
    return out


def score_maps(
    maps: dict[str, torch.Tensor],
    fused: torch.Tensor,
    norms: dict[str, MapNorm],
    kinds: tuple[str, ...],
    cfg: AnomalyConfig,
) -> torch.Tensor:
    """The maps image scores are taken from: the fused map, or (``cfg.image_evidence =
    "statistics"``) the normalised statistical map alone."""
    if cfg.image_evidence == "map" or "gaussian" not in kinds:
        return fused
    if cfg.image_evidence != "statistics":
        raise ValueError(f"unknown image evidence {cfg.image_evidence!r}")
    return norms[cfg.statistics](maps[cfg.statistics])


def decide(
    maps: dict[str, torch.Tensor],
    norms: dict[str, MapNorm],
    kinds: tuple[str, ...],
    cfg: AnomalyConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused map and each image's score (from :func:`score_maps`)."""
    fused = fuse(maps, norms, kinds, cfg)
    return fused, image_score(score_maps(maps, fused, norms, kinds, cfg), cfg)
