"""TFA-Net: Template-based Feature Aggregation Network (the paper's Sec. 3, Algorithm 1).

    phi(I), phi(I_T)        fused CNN features of input and template        (Eq. 1-2, backbones.py)
    E_phi(I), E_phi(I_T)    one shared KxK patch projection + fixed 2-D sin-cos positions (Eq. 3-4)
    E_cat = [E_phi(I); E_phi(I_T)]  ->  TFAM (ViT blocks over 2N tokens)
    keep the template half  ->  linear to the FDRM width  ->  FDRM blocks  ->  LayerNorm
    inverse projection: linear to K*K*C, rearranged back to a C x H x W map = phi_hat(I)

In training a random subset of input tokens is dropped (MAE-style random masking), the
paper's strategy that the released code defined but never called. ``Detector`` at the bottom
wraps the frozen backbone, the network and the template, whose features are computed once.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tfa_ray.backbones import FeatureExtractor
from tfa_ray.config import ModelConfig


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE), (grid*grid, dim); half the channels encode y, half x."""
    assert dim % 4 == 0, "embedding width must be divisible by 4 for 2-D sin-cos positions"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(ys), embed_1d(xs)], dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # fused kernel where available
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """The ViT transformer block (pre-norm attention + MLP), as the paper specifies."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TFANet(nn.Module):
    """Reconstructs phi(I) from the input and template features (Algorithm 1)."""

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        if cfg.feature_size % cfg.patch_size:
            raise ValueError(f"feature_size {cfg.feature_size} not divisible by K={cfg.patch_size}")
        self.cfg = cfg
        self.channels = channels
        self.grid = cfg.feature_size // cfg.patch_size
        self.num_tokens = self.grid**2  # N

        # Eq. 3-4: the same projection and the same fixed positions for input and template
        self.patch_embed = nn.Conv2d(channels, cfg.tfam_dim, cfg.patch_size, cfg.patch_size)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(cfg.tfam_dim, self.grid)[None], persistent=False
        )
        self.tfam = nn.ModuleList(
            [Block(cfg.tfam_dim, cfg.tfam_heads, cfg.mlp_ratio) for _ in range(cfg.tfam_depth)]
        )
        self.tfam_to_fdrm = nn.Linear(cfg.tfam_dim, cfg.fdrm_dim)
        self.fdrm = nn.ModuleList(
            [Block(cfg.fdrm_dim, cfg.fdrm_heads, cfg.mlp_ratio) for _ in range(cfg.fdrm_depth)]
        )
        self.norm = nn.LayerNorm(cfg.fdrm_dim, eps=1e-6)
        self.inverse_proj = nn.Linear(cfg.fdrm_dim, cfg.patch_size**2 * channels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)

    def embed(self, phi: torch.Tensor) -> torch.Tensor:
        """E_phi = Proj(phi) + E_pos, (B, N, D)  (Eq. 3-4)."""
        return self.patch_embed(phi).flatten(2).transpose(1, 2) + self.pos_embed

    def random_masking(self, e: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """Keep a random (1 - mask_ratio) subset of each image's input tokens."""
        B, N, D = e.shape
        keep = max(1, int(round(N * (1.0 - mask_ratio))))
        order = torch.rand(B, N, device=e.device).argsort(dim=1)[:, :keep]
        return torch.gather(e, 1, order[..., None].expand(-1, -1, D))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, K*K*C) -> (B, C, H, W): the inverse of the patch projection's layout."""
        B, K, g, C = tokens.shape[0], self.cfg.patch_size, self.grid, self.channels
        x = tokens.reshape(B, g, g, K, K, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * K, g * K)

    def forward(
        self,
        phi: torch.Tensor,
        e_template: torch.Tensor,
        mask_ratio: float = 0.0,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """phi: (B, C, H, W) input features; e_template: (1, N, D) embedded template features.

        ``mask_ratio`` drops a random subset of input tokens (training); ``visible`` keeps
        exactly these token indices instead (complementary masking at test time).
        """
        e_input = self.embed(phi)
        if visible is not None:
            e_input = e_input[:, visible]
        elif mask_ratio > 0:
            e_input = self.random_masking(e_input, mask_ratio)
        n_input = e_input.shape[1]
        e_cat = torch.cat([e_input, e_template.expand(phi.shape[0], -1, -1)], dim=1)
        for block in self.tfam:  # template-based feature aggregation
            e_cat = block(e_cat)
        e = self.tfam_to_fdrm(e_cat[:, n_input:])  # discard the input half, keep the template half
        for block in self.fdrm:  # feature detail refinement
            e = block(e)
        return self.unpatchify(self.inverse_proj(self.norm(e)))

    def token_groups(self, passes: int, layout: str = "lattice") -> torch.Tensor:
        """(passes, N / passes) token indices, s^2 = passes groups: an s x s lattice split
        (regular, scattered subsets) or s x s contiguous square blocks."""
        s = math.isqrt(passes)
        if s * s != passes or self.grid % s:
            raise ValueError(f"test_mask_passes must be a square dividing the grid, got {passes}")
        ys, xs = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        if layout == "lattice":
            group = ((ys % s) * s + xs % s).flatten()
        elif layout == "blocks":
            b = self.grid // s
            group = ((ys // b) * s + xs // b).flatten()
        else:
            raise ValueError(f"test_mask_layout must be 'lattice' or 'blocks', got {layout!r}")
        return torch.stack([torch.nonzero(group == g)[:, 0] for g in range(passes)])

    def forward_complementary(
        self, phi: torch.Tensor, e_template: torch.Tensor, passes: int, layout: str = "lattice"
    ) -> torch.Tensor:
        """Reconstruct every position only from passes in which its own input token is hidden.

        Masked training teaches the net to fill in hidden tokens from context and the template;
        scoring each position from passes that never saw it keeps an anomaly from being
        reconstructed by copying itself. "lattice": pass g sees group g, a position is averaged
        over the P - 1 passes that hide it; "blocks": pass g hides block g and sees the rest.
        """
        groups = self.token_groups(passes, layout).to(phi.device)
        K = self.cfg.patch_size
        total = torch.zeros_like(phi)
        for group in groups:
            in_group = torch.zeros(self.num_tokens, dtype=torch.bool, device=phi.device)
            in_group[group] = True
            hidden = in_group if layout == "blocks" else ~in_group
            weight = hidden.float().view(1, 1, self.grid, self.grid).repeat_interleave(K, 2)
            weight = weight.repeat_interleave(K, 3)
            visible = torch.nonzero(~hidden)[:, 0]
            total = total + self(phi, e_template, visible=visible) * weight
        return total / (1 if layout == "blocks" else passes - 1)


class Detector(nn.Module):
    """Frozen backbone + TFA-Net + template: images in, (phi, phi_hat) out.

    The template's features never change for a trained model, so in eval mode its embedding is
    computed once and cached; in training the projection changes every step, so it is recomputed
    from the (cached) template features.
    """

    def __init__(self, cfg: ModelConfig, template: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = FeatureExtractor(cfg.backbone, cfg.feature_size)
        channels = self.backbone.out_channels
        self.net = TFANet(cfg, channels)
        # Per-channel standardisation of phi (identity until set from training features).
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        size = cfg.image_size
        self.register_buffer("template", torch.zeros(3, size, size))
        self.register_buffer(
            "template_phi", torch.zeros(1, channels, cfg.feature_size, cfg.feature_size)
        )
        self._e_template: torch.Tensor | None = None
        if template is not None:
            self.set_template(template)

    def train(self, mode: bool = True) -> Detector:
        self._e_template = None
        return super().train(mode)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """phi(I): standardised fused backbone features of (B, 3, S, S) images in [0, 1]."""
        phi = self.backbone(images)
        p = self.cfg.feature_pool
        if p > 1:
            phi = F.avg_pool2d(phi, p, stride=1, padding=p // 2, count_include_pad=False)
        return (phi - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    @torch.no_grad()
    def set_template(self, template: torch.Tensor) -> None:
        """The template image (3, S, S) in [0, 1], resized and normalised exactly like inputs."""
        self.template.copy_(template.to(self.template))
        self.refresh_template()

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))
        self.refresh_template()

    @torch.no_grad()
    def refresh_template(self) -> None:
        self.template_phi.copy_(self.features(self.template[None]))
        self._e_template = None

    def template_embedding(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.net.embed(self.template_phi)
        if self._e_template is None or self._e_template.device != self.template_phi.device:
            self._e_template = self.net.embed(self.template_phi)
        return self._e_template

    def reconstruct(self, phi: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """phi_hat(I) from already computed features (training uses cached features)."""
        passes = self.cfg.test_mask_passes
        if not self.training and passes > 1:
            return self.net.forward_complementary(
                phi, self.template_embedding(), passes, self.cfg.test_mask_layout
            )
        return self.net(phi, self.template_embedding(), mask_ratio)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.features(images)
        return phi, self.reconstruct(phi)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
