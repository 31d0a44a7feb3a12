"""The best weights of a training run, stored beside Ray Train's checkpoints.

Ray keeps the last few epoch checkpoints (weights + optimiser moments); the best weights are
written here only in the epochs where they improve, one safetensors file per best epoch
(``<dir>/epoch-<n>.safetensors``), and the checkpoint names that epoch. A file no checkpoint
names any more is removed, so one (two, around a crash) is kept at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from tfa_ray import storage


@dataclass(frozen=True)
class BestWeights:
    directory: str  # local path or URL

    def url(self, epoch: int) -> str:
        return storage.join(self.directory, f"epoch-{int(epoch):05d}.safetensors")

    def save(self, epoch: int, state: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        storage.write_bytes(self.url(epoch), save(tensors))

    def load(self, epoch: int) -> dict[str, torch.Tensor]:
        return load(storage.read_bytes(self.url(epoch)))

    def remove(self, epoch: int) -> None:
        storage.remove(self.url(epoch))

    def keep_only(self, epoch: int) -> None:
        """Remove every other epoch's file (left by a crash between a save and a cleanup)."""
        keep = storage.normalize(self.url(epoch))
        for f in storage.list_files(self.directory, (".safetensors",)):
            if f != keep:
                storage.remove(f)
