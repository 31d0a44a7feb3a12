"""From features to decisions: the loss (Eq. 5-7), the anomaly map (Eq. 8), image scores and
the calibration that turns a score into a verdict.

Training and testing measure the cosine term the same way, per feature vector (per pixel,
over channels); the released reference code took it per 4x4 patch in training.
"""

from __future__ import annotations

import math

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
