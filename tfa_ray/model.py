"""TFA-Net: Template-based Feature Aggregation Network (the paper's Sec. 3, Algorithm 1).

    phi(I), phi(I_T)        fused CNN features of input and template        (Eq. 1-2, backbones.py)
    E_phi(I), E_phi(I_T)    one shared KxK patch projection + fixed 2-D sin-cos positions (Eq. 3-4)
    E_cat = [E_phi(I); E_phi(I_T)]  ->  TFAM (ViT blocks over 2N tokens)
    keep the template half  ->  linear to the FDRM width  ->  FDRM blocks  ->  LayerNorm
    inverse projection: linear to K*K*C, rearranged back to a C x H x W map = phi_hat(I)

In training a random subset of input tokens is dropped (MAE-style random masking), the
paper's strategy that the released code defined but never called. ``Detector`` at the bottom
wraps the frozen backbone, the network, the bank of templates (:mod:`tfa_ray.template_bank`)
and the statistical evidence (:mod:`tfa_ray.evidence`), and fuses the evidence into a decision
(:mod:`tfa_ray.fusion`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tfa_ray import fusion
from tfa_ray.anomaly import anomaly_map, to_image
from tfa_ray.backbones import FeatureExtractor
from tfa_ray.config import AnomalyConfig, ModelConfig
from tfa_ray.evidence import GaussianEvidence, KNNEvidence, MapNorm
from tfa_ray.fusion import EVIDENCE
from tfa_ray.template_bank import TemplateBank


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
    """Multi-head self-attention: softmax (ViT, the paper) or linear.

    Linear attention (Dinomaly) replaces softmax(q k^T) v by phi(q) (phi(k)^T v) with
    phi = elu + 1: it cannot focus sharply, so it cannot route a token to itself (an anti-copy
    prior), and it costs O(T) instead of O(T^2) on long token sequences.
    """

    def __init__(self, dim: int, heads: int, kind: str = "softmax"):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        if kind not in ("softmax", "linear"):
            raise ValueError(f"attention must be 'softmax' or 'linear', got {kind!r}")
        self.heads, self.kind = heads, kind
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.kind == "softmax":
            x = F.scaled_dot_product_attention(q, k, v)  # fused kernel where available
        else:
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
            kv = torch.einsum("bhtd,bhte->bhde", k, v)
            norm = torch.einsum("bhtd,bhd->bht", q, k.sum(dim=2)).clamp_min(1e-6)
            x = torch.einsum("bhtd,bhde->bhte", q, kv) / norm[..., None]
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """The ViT transformer block (pre-norm attention + MLP), as the paper specifies."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attention: str = "softmax"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attention)
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
        self.init_fixed_buffers()
        self.tfam = nn.ModuleList(
            [
                Block(cfg.tfam_dim, cfg.tfam_heads, cfg.mlp_ratio, cfg.tfam_attention)
                for _ in range(cfg.tfam_depth)
            ]
        )
        # the noisy bottleneck (Dinomaly): dropout on the input tokens entering TFAM, training only
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.tfam_to_fdrm = nn.Linear(cfg.tfam_dim, cfg.fdrm_dim)
        self.fdrm = nn.ModuleList(
            [Block(cfg.fdrm_dim, cfg.fdrm_heads, cfg.mlp_ratio) for _ in range(cfg.fdrm_depth)]
        )
        self.norm = nn.LayerNorm(cfg.fdrm_dim, eps=1e-6)
        self.inverse_proj = nn.Linear(cfg.fdrm_dim, cfg.patch_size**2 * channels)
        self.apply(self._init_weights)

    def init_fixed_buffers(self) -> None:
        """E_pos: computed, never stored (so again after a meta-device build)."""
        pos_embed = sincos_pos_embed_2d(self.cfg.tfam_dim, self.grid)[None]
        self.register_buffer("pos_embed", pos_embed, persistent=False)

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
        """phi: (B, C, H, W) input features; e_template: (1 or B, N, D) embedded template
        features (one template for all, or each input's own).

        ``mask_ratio`` drops a random subset of input tokens (training); ``visible`` keeps
        exactly these token indices instead (complementary masking).
        """
        e_input = self.input_dropout(self.embed(phi))
        if visible is not None and visible.ndim == 2:  # each image its own visible tokens
            e_input = torch.gather(e_input, 1, visible[..., None].expand(-1, -1, e_input.shape[2]))
        elif visible is not None:
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


def dual_masks(batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """(2, B, N/2) token indices: per image a random half and its complement (D2Rec's
    complementary masks: each half is reconstructed from the other, at any masking ratio)."""
    order = torch.rand(batch, num_tokens, device=device).argsort(dim=1)
    half = num_tokens // 2
    return torch.stack([order[:, :half], order[:, half : 2 * half]])


# Where the template bank's buffers were before it was a module of its own (packages written
# before issue 21 hold these keys; ``Detector`` loads them under the new ones).
OLD_TEMPLATE_KEYS = {
    "templates": "bank.images",
    "template_phi": "bank.phi",
    "template_keys": "bank.keys",
}


def _rename_old_template_keys(module, state_dict, prefix, *args) -> None:
    for old, new in OLD_TEMPLATE_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class Detector(nn.Module):
    """Frozen backbone + TFA-Net + a bank of templates (+ optional statistical evidence):
    images in, anomaly maps and image scores out.

        phi = (psi(I) - mu) / sigma                        features (standardised)
        phi_hat = TFANet(phi, E_phi(I_T*))                 I_T* the nearest template
        maps = {rec: Eq. 8 (phi, phi_hat), gaussian: Mahalanobis(phi),
                residual: Mahalanobis(phi - phi_hat), knn: d(phi, nearest normal patch)}
        fused, score = decide(maps)                        (tfa_ray.fusion)
    """

    def __init__(self, cfg: ModelConfig, templates: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = FeatureExtractor(cfg.backbone, cfg.feature_size)
        C, h = self.backbone.out_channels, cfg.feature_size
        self.net = TFANet(cfg, C)
        # Per-channel standardisation of phi (identity until set from training features).
        self.register_buffer("feature_mean", torch.zeros(C))
        self.register_buffer("feature_std", torch.ones(C))
        self.bank = TemplateBank(cfg.num_templates, cfg.image_size, C, h)
        g = cfg.gaussian_size
        self.gaussian = GaussianEvidence(C, g, cfg.gaussian_channels) if g else None
        residual = g and cfg.residual_gaussian
        self.residual_gaussian = GaussianEvidence(C, g, cfg.gaussian_channels) if residual else None
        self.knn = KNNEvidence(C, g or h, cfg.knn_memory) if cfg.knn_memory else None
        self.reconstruction_norm = MapNorm()
        self.gaussian_norm = MapNorm()
        self.residual_norm = MapNorm()
        self.knn_norm = MapNorm()
        self.register_load_state_dict_pre_hook(_rename_old_template_keys)
        if templates is not None:
            self.set_templates(templates)

    @property
    def template(self) -> torch.Tensor:
        """The first template (the paper's single template when T = 1)."""
        return self.bank.images[0]

    def train(self, mode: bool = True) -> Detector:
        self.bank.embedded = None
        return super().train(mode)

    def init_fixed_buffers(self) -> None:
        """Compute the buffers no state dict holds (positions, pixel normalisation), as after a
        build on the meta device with the stored tensors assigned in (``load_model``); any
        tensor still without values then is an error, not a silent garbage value."""
        for part in (self.backbone, self.net):
            part.init_fixed_buffers()
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"no values for {left} (not in the state dict, not computed)")

    # ---- features and the template bank

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """phi(I): standardised fused backbone features of (B, 3, S, S) images in [0, 1]."""
        phi = self.backbone(images)
        return (phi - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    @torch.no_grad()
    def set_templates(self, templates: torch.Tensor) -> None:
        """(T, 3, S, S) or (3, S, S) template images in [0, 1], normalised exactly like inputs."""
        images = self.bank.images
        images.copy_(templates.reshape(images.shape).to(images))
        self.refresh_templates()

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))
        self.refresh_templates()

    def refresh_templates(self) -> None:
        self.bank.refresh(self.features)

    def nearest_template(self, phi: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        return self.bank.nearest(phi, exclude_self)

    def template_embeddings(self) -> torch.Tensor:
        """(T, N, D) embedded template features: kept in eval mode without autograd."""
        fixed = not self.training and not torch.is_grad_enabled()
        return self.bank.embeddings(self.net.embed, fixed)

    def template_embedding(self) -> torch.Tensor:
        """The first template's embedding (1, N, D): warms the cache for all of them."""
        return self.template_embeddings()[:1]

    def paired_templates(self, phi: torch.Tensor) -> torch.Tensor:
        """(B or 1, N, D): each input's nearest template's embedding."""
        e = self.template_embeddings()
        if len(e) == 1:
            return e
        return e[self.bank.nearest(phi, exclude_self=self.training)]

    # ---- reconstruction and evidence

    def reconstruct(self, phi: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """phi_hat(I) from already computed features (training uses cached features)."""
        e_t = self.paired_templates(phi)
        passes = self.cfg.test_mask_passes
        if not self.training and passes > 1:
            return self.net.forward_complementary(phi, e_t, passes, self.cfg.test_mask_layout)
        return self.net(phi, e_t, mask_ratio)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = self.features(images)
        return phi, self.reconstruct(phi)

    def evidence(
        self,
        phi: torch.Tensor,
        cfg: AnomalyConfig,
        phi_hat: torch.Tensor | None = None,
        statistics: bool = True,
        kinds: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw image-size maps of each kind of evidence (all the model has, or ``kinds``): Eq. 8
        on the reconstruction, and (with ``statistics``) the Mahalanobis distances of the
        features (``gaussian``) and of the residual phi - phi_hat (``residual``), and the
        distance of each feature patch to its nearest normal one (``knn``)."""
        S = self.cfg.image_size
        want = kinds or EVIDENCE
        if phi_hat is None and ("reconstruction" in want or "residual" in want):
            phi_hat = self.reconstruct(phi)
        maps = {}
        with torch.autocast(phi.device.type, enabled=False):  # maps in fp32 at any precision
            phi = phi.float()
            phi_hat = phi_hat.float() if phi_hat is not None else None
            if "reconstruction" in want:
                maps["reconstruction"] = anomaly_map(phi, phi_hat, S, cfg)
            if statistics and self.gaussian is not None and "gaussian" in want:
                maps["gaussian"] = to_image(self.gaussian(phi), S, cfg)
            if statistics and self.residual_gaussian is not None and "residual" in want:
                maps["residual"] = to_image(self.residual_gaussian(phi - phi_hat), S, cfg)
            if statistics and self.knn is not None and "knn" in want:
                maps["knn"] = to_image(self.knn(phi), S, cfg)
        return maps

    @torch.no_grad()
    def fit_residual_gaussian(self, phi: torch.Tensor, batch_size: int = 32) -> None:
        """Fit the residual Gaussian on normal features (eval mode, the current inference)."""
        dev = self.feature_mean.device

        def residuals():
            for i in range(0, len(phi), batch_size):
                x = phi[i : i + batch_size].to(dev).float()
                yield x - self.reconstruct(x).float()

        self.residual_gaussian.fit(residuals())

    # ---- fusion and decision (tfa_ray.fusion), on this model's evidence and norms

    @property
    def evidence_kinds(self) -> tuple[str, ...]:
        """The kinds of evidence this model has."""
        parts = {"gaussian": self.gaussian, "residual": self.residual_gaussian, "knn": self.knn}
        return ("reconstruction", *(kind for kind, part in parts.items() if part is not None))

    def map_norms(self) -> dict[str, MapNorm]:
        """Each kind of evidence's normal-pixel scale (fitted in selection, used by ``fuse``)."""
        norms = (self.reconstruction_norm, self.gaussian_norm, self.residual_norm, self.knn_norm)
        return dict(zip(EVIDENCE, norms, strict=True))

    def fused_kinds(self, cfg: AnomalyConfig) -> tuple[str, ...]:
        """The evidence ``decide`` reads under ``cfg``."""
        return fusion.fused_kinds(self.evidence_kinds, cfg)

    def fuse(self, maps: dict[str, torch.Tensor], cfg: AnomalyConfig) -> torch.Tensor:
        return fusion.fuse(maps, self.map_norms(), self.evidence_kinds, cfg)

    def score_maps(
        self, maps: dict[str, torch.Tensor], fused: torch.Tensor, cfg: AnomalyConfig
    ) -> torch.Tensor:
        return fusion.score_maps(maps, fused, self.map_norms(), self.evidence_kinds, cfg)

    def decide(
        self, maps: dict[str, torch.Tensor], cfg: AnomalyConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fusion.decide(maps, self.map_norms(), self.evidence_kinds, cfg)

    def detect(self, images: torch.Tensor, cfg: AnomalyConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) images in [0, 1] -> (B, S, S) anomaly maps and (B,) image scores."""
        phi = self.features(images)
        return self.decide(self.evidence(phi, cfg, kinds=self.fused_kinds(cfg)), cfg)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
