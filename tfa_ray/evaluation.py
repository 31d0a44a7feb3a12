"""Honest evaluation of a trained model on a category's test split.

The test split is only ever read here, after training: it never feeds selection,
thresholds or any other choice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tfa_ray.calibration import heatmap_uint8, is_anomalous
from tfa_ray.data import CategoryData, load_image, load_mask
from tfa_ray.inference import TFAModel
from tfa_ray.metrics import evaluate


@dataclass
class Evaluation:
    metrics: dict
    scores: np.ndarray
    labels: np.ndarray
    paths: list[str]
    seconds: float


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when one is present, as training picks it; else as named
    (``cpu``, ``cuda``, ``cuda:1``)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    return device


def evaluate_model(
    model: TFAModel,
    data: CategoryData,
    batch_size: int = 16,
    maps_dir: str | None = None,
    num_maps: int = 8,
) -> Evaluation:
    """Image AUROC, pixel AUROC, AUPRO, F1-max (and AUsPRO for LOCO) on ``data.test``."""
    if not data.test:
        raise ValueError(f"category {data.category!r} has no test split to evaluate on")
    t0 = time.perf_counter()
    size = model.image_size
    samples = data.test
    has_masks = any(s.mask_paths for s in samples)
    scores = np.empty(len(samples), dtype=np.float64)
    maps = np.empty((len(samples), size, size), dtype=np.float32)
    masks = np.zeros((len(samples), size, size), dtype=bool) if has_masks else None
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = torch.stack([load_image(s.path, size) for s in chunk])
        batch_maps, batch_scores = model.predict(images)
        maps[i : i + len(chunk)] = batch_maps.float().cpu().numpy()
        scores[i : i + len(chunk)] = batch_scores.float().cpu().numpy()
        if masks is not None:
            for j, s in enumerate(chunk):
                masks[i + j] = load_mask(s, size).numpy() > 0.5
    labels = np.array([s.label for s in samples])
    loco_gt = None
    if data.layout == "loco" and data.defects_config is not None:
        loco_gt = loco_ground_truth(data, size)
    metrics = evaluate(labels, scores, masks, maps, loco_gt=loco_gt)
    metrics.update(threshold_rates(labels, scores, model.calibration.threshold))
    if maps_dir:
        save_overlays(maps_dir, model, samples, maps, masks, scores, num_maps)
    return Evaluation(metrics, scores, labels, [s.path for s in samples], time.perf_counter() - t0)


def threshold_rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """The stored threshold applied to the test split: the fraction of normal images flagged
    and of defective images caught (the two numbers a line operator asks first)."""
    flagged = np.array([is_anomalous(float(s), threshold) for s in scores])

    def rate(group: np.ndarray) -> float:
        return float(flagged[group].mean()) if group.any() else float("nan")

    return {"fpr_at_threshold": rate(labels == 0), "recall_at_threshold": rate(labels == 1)}


def loco_ground_truth(data: CategoryData, size: int) -> list:
    """Per test image, the sPRO regions of MVTec LOCO (one per ground-truth file)."""
    from tfa_ray import storage
    from tfa_ray.data import decode_mask_values
    from tfa_ray.metrics import loco_regions

    out = []
    for s in data.test:
        raw = [decode_mask_values(storage.read_bytes(p), size) for p in s.mask_paths]
        out.append(loco_regions(raw, data.defects_config) if raw else [])
    return out


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Image | heat map blended over it | ground-truth mask, side by side (uint8 RGB)."""
    red = np.zeros_like(image)
    red[..., 0] = heat
    blend = (0.55 * image + 0.45 * red).astype(np.uint8)
    gt = np.zeros_like(image) if mask is None else np.repeat(mask[..., None] * 255, 3, -1)
    return np.concatenate([image, blend, gt.astype(np.uint8)], axis=1)


def save_overlays(
    out_dir: str,
    model: TFAModel,
    samples: list,
    maps: np.ndarray,
    masks: np.ndarray | None,
    scores: np.ndarray,
    num: int,
) -> None:
    """The ``num`` highest-scoring and a few normal test images, for a human look."""
    os.makedirs(out_dir, exist_ok=True)
    chosen = [int(i) for i in np.argsort(-scores)[: num // 2]]
    normals = [i for i, s in enumerate(samples) if s.label == 0 and i not in chosen]
    chosen += normals[: num - len(chosen)]
    for i in chosen:
        image = (load_image(samples[i].path, model.image_size) * 255).byte()
        heat = heatmap_uint8(maps[i], model.calibration)
        mask = None if masks is None else masks[i]
        name = f"{i:04d}_{samples[i].defect_type}_{scores[i]:.4g}.png"
        Image.fromarray(overlay(image.permute(1, 2, 0).numpy(), heat, mask)).save(
            os.path.join(out_dir, name)
        )
