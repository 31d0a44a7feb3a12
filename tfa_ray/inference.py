"""A trained, calibrated detector scoring images: the thing a model package loads into.

``TFAModel.predict`` runs the detector under the package's precision policy
(:mod:`tfa_ray.precision`); its ``calibration`` is the entry of the precision it computes at,
whose threshold the decision rule (:func:`tfa_ray.calibration.is_anomalous`) compares scores with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tfa_ray.calibration import Calibration, Calibrations
from tfa_ray.choices import InferenceChoice
from tfa_ray.config import Preset
from tfa_ray.model import Detector
from tfa_ray.precision import autocast, precision_key


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
