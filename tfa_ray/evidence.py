"""Statistical evidence on the same features TFA-Net reconstructs, and how maps are fused.

Reconstruction wins on small, sharp defects; per-position statistics win on large,
low-frequency ones (D2Rec, EfficientAD). Two memory-bank detectors live here, written once and
used both by the hybrid detector and by the baselines in ``benchmarks/baselines.py``:

    GaussianEvidence   per-position Gaussian of normal features (PaDiM): Mahalanobis distance
    KNNEvidence        coreset of locally aggregated normal patches (PatchCore): distance to
                       the nearest one

and ``MapNorm``, which puts any map on a common scale with *held-out normal* pixels' quantiles
(never per image), so maps of different kinds can be summed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def pooled(phi: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool (B, C, H, W) features to (B, C, size, size); identity at the same size."""
    if phi.shape[-1] == size:
        return phi
    return F.adaptive_avg_pool2d(phi, size)


class GaussianEvidence(nn.Module):
    """A Gaussian per feature position, fitted on normal features (PaDiM).

    ``size`` x ``size`` positions (the features are average-pooled to it), ``channels`` of the
    C feature channels (a fixed, seeded random subset when fewer: PaDiM's reduction, which
    keeps the P x c x c precision matrices small). The covariance is shrunk towards a scaled
    identity, ``(1 - a) S + a tr(S) / c I``: a few hundred images do not determine c x c
    numbers per position.
    """

    def __init__(
        self, in_channels: int, size: int, channels: int = 0, shrinkage: float = 0.1, seed: int = 0
    ):
        super().__init__()
        c = channels if 0 < channels < in_channels else in_channels
        self.size, self.shrinkage = size, shrinkage
        order = torch.randperm(in_channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("channel_index", order[:c].sort().values)
        self.register_buffer("mean", torch.zeros(size * size, c))
        self.register_buffer("precision", torch.eye(c).repeat(size * size, 1, 1))

    def _positions(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (P, B, c) on the buffers' device (cached features live on the CPU)."""
        x = pooled(phi.to(self.channel_index.device).float(), self.size)[:, self.channel_index]
        return x.flatten(2).permute(2, 0, 1)

    @torch.no_grad()
    def fit(self, batches) -> GaussianEvidence:
        """Fit on an iterable of (B, C, H, W) normal feature batches (two passes are not needed:
        sums of x and x x^T in float64)."""
        P, c = self.mean.shape
        dev = self.mean.device
        total = torch.zeros(P, c, dtype=torch.float64, device=dev)
        total_sq = torch.zeros(P, c, c, dtype=torch.float64, device=dev)
        n = 0
        for phi in batches:
            x = self._positions(phi).double()
            total += x.sum(1)
            total_sq += torch.einsum("pnc,pnd->pcd", x, x)
            n += x.shape[1]
        if n < 2:
            raise ValueError("a Gaussian needs at least two normal images")
        mean = total / n
        cov = total_sq / n - torch.einsum("pc,pd->pcd", mean, mean)
        scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-6)
        eye = torch.eye(c, dtype=torch.float64, device=dev)
        cov = (1 - self.shrinkage) * cov + self.shrinkage * scale[:, None, None] * eye
        # numpy's batched inverse: torch's MKL batched LU fails on some CPU builds
        precision = torch.from_numpy(np.linalg.inv(cov.cpu().numpy()))
        self.mean.copy_(mean.float())
        self.precision.copy_(precision.float())
        return self

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of every position to its normal Gaussian, (B, size, size)."""
        d = self._positions(phi) - self.mean[:, None]
        m = torch.einsum("pbc,pcd,pbd->bp", d, self.precision, d)
        return m.clamp_min(0).sqrt().reshape(-1, self.size, self.size)


def greedy_coreset(
    x: torch.Tensor, k: int, seed: int = 0, proj_dim: int = 128, start: int | None = None
) -> torch.Tensor:
    """Indices of ``k`` rows of ``x`` chosen by greedy k-center (PatchCore), starting from row
    ``start`` (a seeded random one if None); distances are taken in a seeded random projection
    to ``proj_dim`` dimensions (Johnson-Lindenstrauss) for speed."""
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    z = x.float()
    if z.shape[1] > proj_dim:
        z = z @ (torch.randn(z.shape[1], proj_dim, generator=g) / proj_dim**0.5).to(z.device)
    sq = z.pow(2).sum(1)

    def dist_to(i: int) -> torch.Tensor:  # |z - z_i|^2 as one matrix-vector product
        return (sq - 2 * (z @ z[i]) + sq[i]).clamp_min(0)

    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=g)) if start is None else start
    dist = dist_to(int(chosen[0]))
    for i in range(1, k):
        chosen[i] = int(dist.argmax())
        dist = torch.minimum(dist, dist_to(int(chosen[i])))
    return chosen


# Patches the greedy coreset chooses from (a seeded random draw beyond): every patch of a
# category up to ~190 images at 32 x 32. Which 100,000 of the tyre's 172,000 were drawn moved
# its kNN map's AUPRO by 0.006; the greedy pass costs ~0.25 s per 1,000 candidates on 2 cores.
CORESET_CANDIDATES = 200_000


class KNNEvidence(nn.Module):
    """Distance of each (3 x 3 locally aggregated) feature to its nearest normal patch in a
    coreset memory bank (PatchCore)."""

    def __init__(self, in_channels: int, size: int, memory: int = 4096, local: int = 3):
        super().__init__()
        self.size, self.local = size, local
        self.register_buffer("bank", torch.zeros(memory, in_channels))

    def _patches(self, phi: torch.Tensor) -> torch.Tensor:
        x = pooled(phi.to(self.bank.device).float(), self.size)
        if self.local > 1:
            x = F.avg_pool2d(x, self.local, 1, self.local // 2, count_include_pad=False)
        return x.flatten(2).transpose(1, 2)  # (B, P, C)

    @torch.no_grad()
    def fit(
        self, batches, candidates: int = CORESET_CANDIDATES, seed: int = 0, total: int = 0
    ) -> KNNEvidence:
        """Coreset of the normal patches: a seeded random sample of at most ``candidates``
        patches, thinned by greedy k-center to the bank size. With ``total`` (the number of
        patches the batches hold) the sample is drawn batch by batch, so the whole set never
        sits in memory. Fewer patches than the bank holds: some repeat (the distance to the
        nearest one is unchanged, the buffer keeps its size for loading)."""
        g = torch.Generator().manual_seed(seed)
        c = self.bank.shape[1]
        kept = []
        for phi in batches:
            x = self._patches(phi).reshape(-1, c)
            if total > candidates:
                x = x[(torch.rand(len(x), generator=g) < candidates / total).to(x.device)]
            kept.append(x)
        patches = torch.cat(kept)
        if len(patches) > candidates:
            keep = torch.randperm(len(patches), generator=g)[:candidates]
            patches = patches[keep.to(patches.device)]
        chosen = greedy_coreset(patches, self.bank.shape[0], seed)
        chosen = chosen.repeat(-(-self.bank.shape[0] // len(chosen)))[: self.bank.shape[0]]
        self.bank = patches[chosen.to(patches.device)].to(self.bank.device).clone()
        return self

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        x = self._patches(phi)
        d = torch.cdist(x.reshape(-1, x.shape[-1]), self.bank).amin(dim=1)
        return d.reshape(-1, self.size, self.size)


class MapNorm(nn.Module):
    """Maps onto one scale: the held-out normal pixels' median goes to 0, their ``q`` quantile
    to 1. Fitted on normal images only, applied identically to every image."""

    def __init__(self, q: float = 0.999):
        super().__init__()
        self.q = q
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.ones(()))

    @torch.no_grad()
    def fit(self, normal_maps: torch.Tensor) -> MapNorm:
        flat = normal_maps.float().flatten()
        if flat.numel() > 4_000_000:  # quantile() has a size limit; a seeded sample is plenty
            g = torch.Generator().manual_seed(0)
            flat = flat[torch.randint(flat.numel(), (4_000_000,), generator=g)]
        low, high = torch.quantile(flat, torch.tensor([0.5, self.q], device=flat.device))
        self.low.fill_(float(low))
        self.high.fill_(float(max(high, low + 1e-12)))
        return self

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """On the maps' device (selection and calibration fuse maps gathered on the CPU)."""
        low, high = self.low.to(maps.device), self.high.to(maps.device)
        return (maps - low) / (high - low)
