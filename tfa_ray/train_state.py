"""What one category's training run holds between its steps: the held-out selection images
(:class:`ValidationSet`), the splits with their cached features (:class:`Prepared`) and the
resumable state (:class:`TrainState`).

Both :mod:`tfa_ray.training` (which builds and advances them) and :mod:`tfa_ray.selection`
(which reads them) import these from here, a layer below both.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from tfa_ray.model import Detector


@dataclass
class ValidationSet:
    """Held-out normal images plus copies with pasted synthetic anomalies and their masks."""

    normal: torch.Tensor  # (V, 3, S, S) uint8
    anomalous: torch.Tensor  # (A, 3, S, S) uint8
    masks: torch.Tensor  # (A, S, S) bool


@dataclass
class Prepared:
    """Everything training reads, computed once: the splits and their cached features."""

    train_paths: list[str]
    val_paths: list[str]
    calib_paths: list[str]
    template_path: str
    train_phi: torch.Tensor  # (N, C, h, w) float16, standardised
    val: ValidationSet
    val_normal_phi: torch.Tensor
    val_anomalous_phi: torch.Tensor


@dataclass
class TrainState:
    """The resumable state of a run: tensors, numbers and strings only, so a checkpoint reads
    back with ``torch.load(..., weights_only=True)`` without unpickling code."""

    detector: Detector
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    best_kind: str = ""
    best_net: dict | None = None

    def checkpoint(self) -> dict:
        """The state after ``epoch``; ``best_state`` is the best epoch's weights, which a
        checkpoint writer stores once per improvement, not in every checkpoint."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "history": copy.deepcopy(self.history),
            "best": {"score": self.best_score, "epoch": self.best_epoch, "kind": self.best_kind},
            "best_state": self.best_net or {},
            "net": self.detector.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def restore(self, state: dict) -> None:
        self.detector.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        best = state["best"]
        self.best_score, self.best_epoch = float(best["score"]), int(best["epoch"])
        self.best_kind = str(best["kind"])
        self.best_net = state.get("best_state") or None

    def record_best(self, score: float, kind: str) -> bool:
        if score <= self.best_score:
            return False
        self.best_score, self.best_epoch, self.best_kind = score, self.epoch, kind
        self.best_net = copy.deepcopy(self.detector.net.state_dict())
        return True
