"""How ``tests/data/package_a2d8127`` was written: run at commit a2d8127 (before issue 21 split
``Detector`` and ``package.py``), from the repository root:

    PYTHONPATH=. python tests/data/package_a2d8127/make.py

A test-tiny package with every kind of state a package carries (two templates, the features'
and the residual's Gaussians, a kNN memory, fitted map norms), written by ``save_model`` as it
was then. The backbone's weights are left out (19 MB): they are the builtin EfficientNet-Lite0
weights, which the test puts back. ``expected.json`` holds the maps and scores of four seeded
images as that code computed them. Kept for the record; the code it calls has moved on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tfa_ray.calibration import Calibrations, calibrate
from tfa_ray.config import get_preset
from tfa_ray.model import Detector
from tfa_ray.package import save_model

HERE = Path(__file__).parent


def main() -> None:
    torch.manual_seed(0)
    base = get_preset("test-tiny")
    preset = dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model,
            num_templates=2,
            gaussian_size=4,
            gaussian_channels=8,
            residual_gaussian=True,
            knn_memory=16,
        ),
        anomaly=dataclasses.replace(
            base.anomaly, w_reconstruction=0.5, w_knn=0.5, statistics="residual"
        ),
    )
    det = Detector(preset.model).eval()
    g = torch.Generator().manual_seed(1)
    S = preset.model.image_size
    normals = torch.rand(6, 3, S, S, generator=g)
    with torch.no_grad():
        phi = det.backbone(normals)
        det.set_feature_stats(phi.mean(dim=(0, 2, 3)), phi.std(dim=(0, 2, 3)))
        det.set_templates(normals[:2])
        phi = det.features(normals)
        det.gaussian.fit([phi])
        det.fit_residual_gaussian(phi)
        det.knn.fit([phi])
        maps = det.evidence(phi, preset.anomaly)
        for kind, m in maps.items():
            det.map_norms()[kind].fit(m)
        fused, scores = det.detect(normals, preset.anomaly)
    calibration = calibrate(scores.numpy(), fused.numpy(), target_fpr=0.1)
    out = HERE / "package"
    shutil.rmtree(out, ignore_errors=True)
    save_model(str(out), det, preset, Calibrations.single(calibration), {"category": "old"})
    state = load_file(out / "weights.safetensors")
    part = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    save_file(part, out / "part.safetensors")
    (out / "weights.safetensors").unlink()
    images = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps, scores = det.detect(images, preset.anomaly)
    expected = {"scores": scores.tolist(), "map_sums": maps.sum(dim=(1, 2)).tolist()}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
