"""The model package: everything scoring needs, nothing executable.

A package is a directory (local or any fsspec URL) holding

    weights.safetensors   the Detector's state: backbone, TFA-Net, feature statistics, template
    config.json           the preset (model, anomaly and training configs)
    template.png          the template image as the model saw it (S x S RGB)
    calibration.json      threshold and score statistics from held-out normal images, one
                          entry per precision a scorer may compute at (fp32, bf16, fp16)
    meta.json             category, metrics, training facts
    selection.json        what the selection chose and tried (InferenceChoice; packages written
                          before it existed, and models not trained here, have none)

It is the local form of the MLflow package: the registry logs this directory as artifacts.
Loading reads safetensors and JSON only; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass, field

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tfa_ray import storage
from tfa_ray.calibration import Calibration, Calibrations
from tfa_ray.choices import InferenceChoice
from tfa_ray.config import PRECISIONS, Preset, preset_from_json, preset_to_json
from tfa_ray.model import Detector

FILES = ("weights.safetensors", "config.json", "template.png", "calibration.json", "meta.json")
SELECTION_FILE = "selection.json"  # optional: older packages have none

# The precision policy, one for every forward pass that scores or calibrates: "auto" is bf16
# autocast on CUDA devices that run bf16 natively (compute capability 8.0+: Ampere and later),
# fp16 autocast on older CUDA devices and fp32 elsewhere; "bf16" also autocasts on CPUs (about
# 1.7x faster on CPUs with bf16 instructions, same AUROCs on magnetic_tile: benchmarks/forward.py);
# "fp32" never autocasts. Anomaly maps are computed in fp32 whatever the autocast
# (Detector.evidence).
NATIVE_BF16_CAPABILITY = (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (on older GPUs it is emulated, slowly)."""
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def autocast_dtype(
    precision: str, device: str | torch.device, training: bool = False
) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device`` (None: fp32, no autocast).

    ``training``: fp16 becomes fp32, since fp16 gradients underflow without loss scaling, which
    the training loop does not do; bf16 keeps fp32's range and needs none."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            return None
        dtype = torch.bfloat16 if native_bf16(device) else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else None
    if training and dtype == torch.float16:
        return None
    return dtype


def precision_key(precision: str, device: str | torch.device) -> str:
    """The calibration entry ``precision`` computes at on ``device``: "fp32", "bf16" or
    "fp16" (inference: fp16 stays fp16)."""
    dtype = autocast_dtype(precision, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class HalfConvOnCpu(torch.overrides.TorchFunctionMode):
    """fp16 convolutions on a CPU as a GPU's fp16 autocast computes them: operands rounded to
    fp16, products accumulated in fp32, the result rounded to fp16. A CPU has only a reference
    kernel for fp16 convolutions (cpu-small's backbone ran 19x slower than in fp32 on two
    cores); this gives the same numbers at fp32 speed, so the fp16 calibration stays cheap."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.conv2d or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        x, weight, *rest = args
        bias = rest[0] if rest else kwargs.pop("bias", None)
        rest = rest[1:]
        half = lambda t: t if t is None else t.to(torch.float16).float()  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            out = func(half(x), half(weight), half(bias), *rest, **kwargs)
        return out.to(torch.float16)


def autocast_at(key: str, device: str | torch.device):
    """The autocast context of a calibration precision (:func:`precision_key`): calibration
    computes at each precision a scorer may run at, fp16 included (on a CPU with its
    convolutions as :class:`HalfConvOnCpu` computes them)."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if key not in dtypes:
        raise ValueError(f"precision must be one of {tuple(dtypes)}, got {key!r}")
    device = torch.device(device)
    dtype = dtypes[key]
    cast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    if dtype is torch.float16 and device.type == "cpu":
        return _half_on_cpu(cast)
    return cast


@contextlib.contextmanager
def _half_on_cpu(cast):
    with cast, HalfConvOnCpu():
        yield


def autocast(precision: str, device: str | torch.device, training: bool = False):
    """The autocast context that ``precision`` means on ``device`` (see :func:`autocast_dtype`):
    the one policy for training, selection, calibration, evaluation and scoring."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device, training)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def is_anomalous(score: float, threshold: float) -> bool:
    """The decision rule, the one place it lives: the calibrated threshold is the smallest
    score that is flagged (``calibrate`` puts it just above the highest allowed normal)."""
    return bool(score >= threshold)


@dataclass
class TFAModel:
    """A trained, calibrated detector ready to score images: ``calibration`` is the entry of
    the precision ``predict`` computes at on the detector's device."""

    detector: Detector
    preset: Preset
    calibrations: Calibrations  # a single Calibration is taken as the fp32 entry
    meta: dict = field(default_factory=dict)
    precision: str = "auto"  # see PRECISIONS
    choice: InferenceChoice | None = None  # the selection's record, where the package has one

    def __post_init__(self) -> None:
        if isinstance(self.calibrations, Calibration):
            self.calibrations = Calibrations.single(self.calibrations)

    @property
    def image_size(self) -> int:
        return self.preset.model.image_size

    @property
    def precision_key(self) -> str:
        """What ``predict`` computes at now: "fp32", "bf16" or "fp16"."""
        return precision_key(self.precision, self.detector.template.device)

    @property
    def calibration(self) -> Calibration:
        """Threshold, normal scores and heat-map scale at the precision ``predict`` runs at."""
        return self.calibrations.at(self.precision_key)

    def to(self, device: str | torch.device) -> TFAModel:
        self.detector.to(device)
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) float images in [0, 1] -> anomaly maps (B, S, S) and scores (B,)."""
        if self.detector.training:  # eval() drops the cached template embedding: only once
            self.detector.eval()
        device = self.detector.template.device
        with autocast(self.precision, device):
            return self.detector.detect(images.to(device), self.preset.anomaly)


def template_png(detector: Detector) -> bytes:
    arr = (detector.template.detach().cpu().clamp(0, 1) * 255).round().byte()
    buf = io.BytesIO()
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def save_model(
    url: str,
    detector: Detector,
    preset: Preset,
    calibration: Calibrations | Calibration,
    meta: dict | None = None,
    choice: InferenceChoice | None = None,
) -> str:
    """Write a model package to ``url`` (a directory); returns the url. A single
    ``Calibration`` is written as the fp32 entry; ``choice``, the selection's record, as
    selection.json."""
    if isinstance(calibration, Calibration):
        calibration = Calibrations.single(calibration)
    state = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    storage.write_bytes(storage.join(url, "weights.safetensors"), save_safetensors(state))
    storage.write_bytes(storage.join(url, "config.json"), preset_to_json(preset).encode())
    storage.write_bytes(storage.join(url, "template.png"), template_png(detector))
    storage.write_bytes(storage.join(url, "calibration.json"), calibration.to_json().encode())
    storage.write_bytes(
        storage.join(url, "meta.json"),
        json.dumps(meta or {}, indent=2, sort_keys=True, default=str).encode(),
    )
    if choice is not None:
        storage.write_bytes(storage.join(url, SELECTION_FILE), choice.to_json().encode())
    return url


def load_model(url: str, device: str | torch.device = "cpu") -> TFAModel:
    """Load a package written by ``save_model``: safetensors and JSON, never pickle."""
    missing = [f for f in FILES if not storage.exists(storage.join(url, f))]
    if missing:
        raise FileNotFoundError(f"{url} is not a tfa-ray model package: missing {missing}")
    preset = preset_from_json(storage.read_bytes(storage.join(url, "config.json")).decode())
    # The package carries the backbone's weights: build it empty and fill it from the file.
    model_cfg = dataclasses.replace(
        preset.model, backbone=dataclasses.replace(preset.model.backbone, weights="random")
    )
    detector = Detector(model_cfg)
    state = load_safetensors(storage.read_bytes(storage.join(url, "weights.safetensors")))
    detector.load_state_dict(state, strict=True)
    detector.eval()
    calibration = Calibrations.from_json(
        storage.read_bytes(storage.join(url, "calibration.json")).decode()
    )
    meta = json.loads(storage.read_bytes(storage.join(url, "meta.json")))
    choice_url = storage.join(url, SELECTION_FILE)
    choice = (
        InferenceChoice.from_json(storage.read_bytes(choice_url).decode())
        if storage.exists(choice_url)
        else None
    )
    return TFAModel(detector.to(device), preset, calibration, meta, choice=choice)
