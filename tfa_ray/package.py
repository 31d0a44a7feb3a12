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
Loading reads safetensors and JSON only; nothing is ever unpickled. This module is the files
only: what a loaded package is and does lives in :mod:`tfa_ray.inference`, the precision
policy in :mod:`tfa_ray.precision`, the decision rule and heat-map scale in
:mod:`tfa_ray.calibration`.
"""

from __future__ import annotations

import dataclasses
import io
import json

import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tfa_ray import storage
from tfa_ray.calibration import Calibration, Calibrations, is_anomalous
from tfa_ray.choices import SELECTION_FILE, InferenceChoice
from tfa_ray.config import Preset, preset_from_json, preset_to_json
from tfa_ray.inference import TFAModel
from tfa_ray.model import Detector
from tfa_ray.precision import autocast, autocast_at, autocast_dtype, precision_key

# Names that lived here before the package / precision / inference split, for callers that
# still import them from here (new code imports them from their own modules).
__all__ = [
    "FILES",
    "TFAModel",
    "autocast",
    "autocast_at",
    "autocast_dtype",
    "is_anomalous",
    "load_model",
    "precision_key",
    "save_model",
    "template_png",
]

FILES = ("weights.safetensors", "config.json", "template.png", "calibration.json", "meta.json")


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
    # The package carries every weight, the backbone's too: build the detector on the meta
    # device (no memory, no random initialisation), assign the stored tensors to it, then
    # compute the few buffers that are never stored.
    model_cfg = dataclasses.replace(
        preset.model, backbone=dataclasses.replace(preset.model.backbone, weights="random")
    )
    with torch.device("meta"):
        detector = Detector(model_cfg)
    state = load_safetensors(storage.read_bytes(storage.join(url, "weights.safetensors")))
    detector.load_state_dict(state, strict=True, assign=True)
    detector.init_fixed_buffers()
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
