"""The bank of normal templates and each input's pairing with its nearest one (beyond the
paper, whose single template is the first normal training image: T = 1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

Features = Callable[[torch.Tensor], torch.Tensor]


class TemplateBank(nn.Module):
    """T normal templates I_T, their features phi(I_T) and pooled keys k_T = mean_hw phi(I_T).

    Every input is paired with its nearest template by the distance of globally pooled
    features (T = 1 with the first training image is the paper). Template features never
    change for a trained model, so in eval mode their embeddings E_phi(I_T) are computed once
    and kept (``embedded``); in training the projection changes every step, so they are
    recomputed from the kept features.
    """

    def __init__(self, num: int, image_size: int, channels: int, feature_size: int):
        super().__init__()
        self.register_buffer("images", torch.zeros(num, 3, image_size, image_size))
        self.register_buffer("phi", torch.zeros(num, channels, feature_size, feature_size))
        self.register_buffer("keys", torch.zeros(num, channels))
        self.embedded: torch.Tensor | None = None

    @torch.no_grad()
    def refresh(self, features: Features) -> None:
        """phi(I_T) and k_T again, from ``features`` (the detector's current phi)."""
        self.phi.copy_(features(self.images))
        self.keys.copy_(self.phi.mean(dim=(2, 3)))
        self.embedded = None

    def nearest(self, phi: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        """(B,) index of each input's nearest template. ``exclude_self`` (training): an input
        that *is* a template is paired with its nearest other one (never a copy)."""
        keys = self.keys.float()
        d = torch.cdist(phi.float().mean(dim=(2, 3)), keys)
        if exclude_self and d.shape[1] > 1:
            # "the same image" up to the float16 rounding of cached training features
            same = d < 1e-3 * (1.0 + keys.norm(dim=1))
            d = d.masked_fill(same, float("inf"))
        return d.argmin(dim=1)

    def embeddings(self, embed: Features, fixed: bool) -> torch.Tensor:
        """(T, N, D) E_phi(I_T) by ``embed``; kept while ``fixed`` (eval mode, no autograd)."""
        if not fixed:
            return embed(self.phi)
        if self.embedded is None or self.embedded.device != self.phi.device:
            self.embedded = embed(self.phi)
        return self.embedded
