"""What the workers of one data-parallel training agree on, and what rank 0 shares.

Rank 0 alone prepares (splits, backbone features, statistics, templates), validates, selects
and calibrates; the other ranks only train. Every decision that ends the loop is taken
together: a rank that stops while another one steps hangs both in the next all-reduce. With
NCCL the collectives need CUDA tensors: each one is made on the training device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tfa_ray.features import host_cache
from tfa_ray.model import Detector

CHUNK = 64  # images per broadcast of the feature cache

# the detector's state that the training step reads (the evidence is rank 0's alone)
TRAINING_BUFFERS = ("feature_mean", "feature_std", "bank.images", "bank.phi", "bank.keys")


def active(shard: tuple[int, int] | None) -> bool:
    """Whether this is one of several workers in an initialised process group."""
    return shard is not None and shard[1] > 1 and dist.is_available() and dist.is_initialized()


def shard_batch(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Worker ``rank``'s share of a global batch (strided, like DistributedSampler). A batch
    smaller than the world is wrapped around so every worker steps (DDP needs all of them)."""
    if len(batch) < world_size:
        return batch[rank % len(batch) : rank % len(batch) + 1]
    return batch[rank::world_size]


def agreed_seconds(seconds: float, device: torch.device, distributed: bool) -> float:
    """Under data parallelism every worker must follow the same clock (learning rate, time
    budget stop), or their steps drift apart: take the slowest worker's."""
    if not (distributed and dist.is_available() and dist.is_initialized()):
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL needs CUDA tensors
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def agreed_stop(stop: bool, device: torch.device, distributed: bool) -> bool:
    """Stop when any worker says so (rank 0, which validates), all of them at once."""
    if not (distributed and dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def broadcast_cache(cache: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Rank 0's float16 host cache on every rank, a chunk at a time through the device."""
    rank = dist.get_rank()
    shape = [tuple(cache.shape) if cache is not None else None]
    dist.broadcast_object_list(shape, src=0, device=device)
    if shape[0] is None:
        return None
    out = cache if rank == 0 else host_cache(shape[0], device)  # pinned on a GPU, like rank 0's
    for i in range(0, shape[0][0], CHUNK):
        rows = out[i : i + CHUNK]
        buf = rows.to(device) if rank == 0 else torch.empty_like(rows, device=device)
        dist.broadcast(buf, src=0)
        if rank != 0:
            rows.copy_(buf)
    return out


def broadcast_training_state(detector: Detector, device: torch.device) -> None:
    """Rank 0's feature statistics and templates (the detector state the loss reads)."""
    with torch.no_grad():
        for name in TRAINING_BUFFERS:
            buf = detector.get_buffer(name)
            dist.broadcast(buf, src=0)
    detector.bank.embedded = None


def broadcast_object(obj, device: torch.device):
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
