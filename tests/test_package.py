"""The model package's scoring helpers: template cache, decision rule, heat map scale."""

from __future__ import annotations

import numpy as np
import torch

from tfa_ray.calibration import heatmap_scale, heatmap_uint16
from tfa_ray.package import is_anomalous, load_model


def test_predict_keeps_the_cached_template_embedding(tiny_model_dir):
    model = load_model(tiny_model_dir)
    x = torch.rand(2, 3, model.image_size, model.image_size)
    first, _ = model.predict(x)
    cached = model.detector._e_templates
    assert cached is not None
    again, _ = model.predict(x)
    assert model.detector._e_templates is cached  # not recomputed per call
    assert torch.equal(first, again)


def test_one_decision_rule():
    assert is_anomalous(1.0, 1.0) and is_anomalous(1.5, 1.0) and not is_anomalous(0.99, 1.0)


def test_heatmap_scale_has_headroom_and_round_trips(tiny_model_dir):
    cal = load_model(tiny_model_dir).calibration
    low, high = heatmap_scale(cal)
    assert low < cal.map_low < cal.map_high and high > cal.map_high + 10 * (cal.map_high - low) / 2
    values = np.linspace(low, high, 1001)
    back = low + heatmap_uint16(values, low, high) / 65535 * (high - low)
    assert np.abs(back - values).max() <= (high - low) / 65535
