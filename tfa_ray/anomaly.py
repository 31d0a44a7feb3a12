"""From features to decisions: the loss (Eq. 5-7), the anomaly map (Eq. 8), image scores and
the calibration that turns a score into a verdict.

Training and testing measure the cosine term the same way, per feature vector (per pixel,
over channels); the released reference code took it per 4x4 patch in training.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tfa_ray.config import AnomalyConfig


def euclidean_term(phi: torch.Tensor, phi_hat: torch.Tensor) -> torch.Tensor:
    """AS_euc = ||phi - phi_hat||_2 over channels, (B, H, W)."""
    return (phi - phi_hat).pow(2).sum(dim=1).add(1e-12).sqrt()


def cosine_term(phi: torch.Tensor, phi_hat: torch.Tensor) -> torch.Tensor:
    """AS_cos = 1 - cos(phi, phi_hat) over channels, (B, H, W)."""
    return 1.0 - F.cosine_similarity(phi, phi_hat, dim=1, eps=1e-6)


def hard_mined_mean(term: torch.Tensor, easy_fraction: float, easy_weight: float = 0.1):
    """Mean of a per-pixel loss whose easiest ``easy_fraction`` of points count ``easy_weight``
    times (Dinomaly's hard mining: the net stops polishing what it already reconstructs well,
    including, by then, anomalies it could learn to copy). 0 = the plain mean."""
    if easy_fraction <= 0:
        return term.mean()
    flat = term.flatten()
    k = max(1, int(flat.numel() * easy_fraction))
    cut = flat.detach().kthvalue(k).values
    weight = torch.where(flat.detach() <= cut, easy_weight, 1.0)
    return (flat * weight).sum() / weight.sum()


def reconstruction_loss(
    phi: torch.Tensor,
    phi_hat: torch.Tensor,
    cfg: AnomalyConfig,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_rec = w_euc * L_euc + w_cos * L_cos (Eq. 5-7), both averaged over pixels and images.

    ``weight`` (B, H, W) in {0, 1} restricts the loss to some pixels (complementary masks:
    each pass is scored where its input was hidden); ``cfg.hard_mining`` down-weights the
    easiest pixels.
    """
    phi, phi_hat = phi.float(), phi_hat.float()
    euc, cos = euclidean_term(phi, phi_hat), cosine_term(phi, phi_hat)
    if weight is not None:
        keep = weight.flatten() > 0
        euc, cos = euc.flatten()[keep], cos.flatten()[keep]
    l_euc = hard_mined_mean(euc, cfg.hard_mining)
    l_cos = hard_mined_mean(cos, cfg.hard_mining)
    loss = cfg.w_euc * l_euc + cfg.w_cos * l_cos
    return loss, {"l_euc": l_euc.detach().item(), "l_cos": l_cos.detach().item()}


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # scipy's default truncate=4
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps[:, None]
    r_h, r_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    x = F.pad(x, (r_w, r_w, r_h, r_h), mode="reflect")
    kh = k[r - r_h : r + r_h + 1]
    kw = k[r - r_w : r + r_w + 1]
    x = F.conv2d(x, kh.view(1, 1, -1, 1))
    x = F.conv2d(x, kw.view(1, 1, 1, -1))
    return x[:, 0]


def to_image(amap: torch.Tensor, image_size: int, cfg: AnomalyConfig) -> torch.Tensor:
    """A (B, h, w) feature-resolution map upsampled to the image and Gaussian-smoothed; the
    blur is sigma at 256 px, scaled with the image size so it covers the same area."""
    amap = F.interpolate(
        amap.float()[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )[:, 0]
    return gaussian_blur(amap, cfg.sigma * image_size / 256.0)


def anomaly_map(
    phi: torch.Tensor, phi_hat: torch.Tensor, image_size: int, cfg: AnomalyConfig
) -> torch.Tensor:
    """AS_final = AS_euc (x) AS_cos (Eq. 8), upsampled to the image and Gaussian-smoothed."""
    phi, phi_hat = phi.float(), phi_hat.float()
    return to_image(euclidean_term(phi, phi_hat) * cosine_term(phi, phi_hat), image_size, cfg)


def image_score(maps: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """One score per map: std (paper), max, or the mean of the top-k fraction of pixels."""
    flat = maps.flatten(1)
    if cfg.score == "std":
        return flat.std(dim=1)
    if cfg.score == "max":
        return flat.amax(dim=1)
    if cfg.score == "topk":
        k = max(1, int(round(flat.shape[1] * cfg.topk_fraction)))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image score {cfg.score!r}; use 'std', 'max' or 'topk'")


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
