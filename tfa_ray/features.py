"""The host cache of backbone features that training reads, and its statistics.

Features are computed once per image and kept as float16 on the CPU (a GPU holds the model,
not the training set). On a GPU the cache is page-locked (pinned) and filled / read with
non-blocking copies, and standardisation works through it in chunks: the whole set never
exists in fp32 (the paper preset's cache of ~1,000 images is 15 GB in fp16).
"""

from __future__ import annotations

import torch

from tfa_ray.data import load_image
from tfa_ray.model import Detector

CHUNK = 64  # images per chunk of statistics / standardisation


def load_images_uint8(paths: list[str], size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8: a quarter of the memory of float images for the whole training set."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        out[i] = (load_image(p, size) * 255).round().to(torch.uint8)
    return out


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).float().div_(255.0)


def host_cache(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An empty float16 CPU tensor, pinned when ``device`` is a GPU (asynchronous copies)."""
    return torch.empty(shape, dtype=torch.float16, pin_memory=torch.device(device).type == "cuda")


@torch.no_grad()
def compute_features(
    detector: Detector, images: torch.Tensor, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """phi for a uint8 image tensor, in batches, into one float16 host cache (no second copy
    of the set: the batches are written in place)."""
    device = torch.device(device)
    out = None
    for i in range(0, len(images), batch_size):
        phi = detector.features(to_float(images[i : i + batch_size], device)).half()
        if out is None:
            out = host_cache((len(images), *phi.shape[1:]), device)
        out[i : i + len(phi)].copy_(phi, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last non-blocking copies have landed
    return out if out is not None else torch.empty(0, dtype=torch.float16)


@torch.no_grad()
def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over all images and positions (float64 accumulation)."""
    c = features.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for chunk in features.split(CHUNK):
        x = chunk.double().transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


@torch.no_grad()
def standardize_(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(phi - mean) / std per channel, in place, a chunk at a time."""
    m, s = mean[:, None, None], std.clamp_min(1e-6)[:, None, None]
    for chunk in features.split(CHUNK):
        chunk.copy_((chunk.float() - m) / s)
    return features


class BatchLoader:
    """Rows of the host cache onto the device: gathered into a pinned staging buffer and copied
    without blocking. The buffer is reused for the next batch only after the step that read it
    synchronised (the training loop reads its loss every step)."""

    def __init__(self, cache: torch.Tensor, device: torch.device):
        self.cache, self.device = cache, torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.staging: torch.Tensor | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return self.cache[rows].to(self.device).float()
        shape = (len(rows), *self.cache.shape[1:])
        if self.staging is None or self.staging.shape[0] < len(rows):
            self.staging = host_cache(shape, self.device)
        staged = torch.index_select(self.cache, 0, rows, out=self.staging[: len(rows)])
        return staged.to(self.device, non_blocking=True).float()
