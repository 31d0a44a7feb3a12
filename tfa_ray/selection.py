"""Everything chosen without the test split: held-out splits of the normal training images,
synthetic anomalies pasted into the selection images, the selection score, the inference
choices made on it and the calibration on a split of its own.

The selection images carry synthetic anomalies with exact masks, half small local defects
(scratches, blobs, CutPaste, ...) and half large low-frequency ones (shading, stains); the
selection score is the mean of image AUROC and AUPRO on them. The calibration split sees
nothing but the final model.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from tfa_ray.anomaly import image_score, reconstruction_loss
from tfa_ray.calibration import CALIBRATED_PRECISIONS, Calibrations, calibrate
from tfa_ray.choices import MIX, InferenceChoice, mix_of, mix_text, with_mix
from tfa_ray.config import AnomalyConfig, Preset
from tfa_ray.data import load_image
from tfa_ray.metrics import aupro, image_auroc
from tfa_ray.model import Detector
from tfa_ray.precision import autocast as package_autocast
from tfa_ray.precision import autocast_at
from tfa_ray.synth import KINDS, LARGE_KINDS, paint_defect
from tfa_ray.train_state import Prepared, TrainState, ValidationSet


def split_train_val(
    paths: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded random split of the normal training images; at least one on each side."""
    if len(paths) < 2:
        raise ValueError(f"need at least 2 normal training images, found {len(paths)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    n_val = min(len(paths) - 1, max(1, int(round(val_fraction * len(paths)))))
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


def split_normals(
    paths: list[str], val_fraction: float, calib_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """(train, selection, calibration): seeded, disjoint, complete; calibration may be empty
    (``calib_fraction`` 0: the selection images calibrate too, as before)."""
    if calib_fraction <= 0:
        return (*split_train_val(paths, val_fraction, seed), [])
    if len(paths) < 3:
        raise ValueError(f"need at least 3 normal training images, found {len(paths)}")
    held = min(len(paths) - 1, max(2, round((val_fraction + calib_fraction) * len(paths))))
    train, held_out = split_train_val(paths, held / len(paths), seed)
    calib, val = split_train_val(held_out, val_fraction / (val_fraction + calib_fraction), seed)
    return train, val, calib


def paste_synthetic(
    image: np.ndarray, rng: np.random.Generator, large: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect pasted into an (H, W, 3) uint8 image, and its exact mask.

    Half are small local defects, half large low-frequency ones (real lines have both). Real
    defects are often faint: the defect is blended in at a random opacity, so neither
    selection nor denoising training is decided by glaring anomalies only.
    """
    kinds = LARGE_KINDS if large and rng.random() < 0.5 else KINDS
    bad, mask = paint_defect(image, rng, kinds[int(rng.integers(len(kinds)))])
    opacity = rng.uniform(0.3, 1.0)
    bad = np.where(mask[..., None], opacity * bad + (1 - opacity) * image, image)
    bad = bad.round().astype(np.uint8)
    return np.ascontiguousarray(bad), mask & (bad != image).any(axis=-1)


def make_validation_set(
    images: torch.Tensor, per_image: int, seed: int, large: bool = True
) -> ValidationSet:
    rng = np.random.default_rng(seed + 1)
    anomalous, masks = [], []
    for img in images:
        hwc = img.permute(1, 2, 0).numpy()
        for _ in range(per_image):
            bad, mask = paste_synthetic(hwc, rng, large)
            anomalous.append(torch.from_numpy(bad).permute(2, 0, 1))
            masks.append(torch.from_numpy(mask))
    return ValidationSet(images, torch.stack(anomalous), torch.stack(masks))


def autocast(device: torch.device, training: bool = False):
    """The package's precision policy at ``auto`` (:func:`tfa_ray.precision.autocast_dtype`):
    selection and calibration run at the precision scoring will use."""
    return package_autocast("auto", device, training)


@torch.no_grad()
def predict_evidence(
    detector: Detector,
    phi: torch.Tensor,
    preset: Preset,
    device: torch.device,
    batch_size: int,
    statistics: bool = True,
) -> tuple[dict[str, torch.Tensor], float]:
    """Raw evidence maps (eval mode, the device's inference precision) for cached features, and
    the mean reconstruction loss."""
    maps: dict[str, list[torch.Tensor]] = {}
    losses = []
    for i in range(0, len(phi), batch_size):
        x = phi[i : i + batch_size].to(device).float()
        with autocast(device):
            x_hat = detector.reconstruct(x)
            evidence = detector.evidence(x, preset.anomaly, x_hat, statistics)
        loss, _ = reconstruction_loss(x, x_hat, preset.anomaly)
        for kind, m in evidence.items():
            maps.setdefault(kind, []).append(m.float().cpu())
        losses.append(loss.item() * len(x))
    return {k: torch.cat(v) for k, v in maps.items()}, sum(losses) / len(phi)


SCORE_KINDS = ("max", "std", "topk")  # max first: PaDiM's and PatchCore's image score
# Another kind replaces max only where it separates this much better (image AUROC on the
# selection split): with about 20 held-out normals, smaller differences are one image, and a
# kind chosen on them can cost far more on real defects (the tyre's std: 0.54 against max 0.82)
SCORE_MARGIN = 0.01


def best_image_score(
    normal_maps: torch.Tensor, anomalous_maps: torch.Tensor, cfg: AnomalyConfig
) -> tuple[str, float]:
    """The image score kind that best separates held-out normals from their synthetic-anomaly
    copies, and its AUROC. ``score="auto"`` tries every kind (``max`` unless another leads it
    by ``SCORE_MARGIN``); otherwise the configured one."""
    kinds = SCORE_KINDS if cfg.score == "auto" else (cfg.score,)
    labels = np.r_[np.zeros(len(normal_maps)), np.ones(len(anomalous_maps))]
    best = ("", -1.0)
    for kind in kinds:
        kind_cfg = dataclasses.replace(cfg, score=kind)
        scores = torch.cat(
            [image_score(normal_maps, kind_cfg), image_score(anomalous_maps, kind_cfg)]
        )
        auc = image_auroc(labels, scores.numpy())
        if auc > best[1] + (SCORE_MARGIN if best[0] else 0.0):
            best = (kind, auc)
    return best


def selection_score(
    normal_maps: torch.Tensor,
    anomalous_maps: torch.Tensor,
    masks: torch.Tensor,
    cfg: AnomalyConfig,
    image_maps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, dict]:
    """Mean of image AUROC and AUPRO on held-out normals vs. their synthetic-anomaly copies;
    image scores from ``image_maps`` (normal, anomalous) where they are not the maps.

    Pixel maps are average-pooled 4x (masks max-pooled) to keep this cheap every epoch.
    """
    kind, img = best_image_score(*(image_maps or (normal_maps, anomalous_maps)), cfg)
    pool = torch.nn.functional.avg_pool2d
    maps = pool(torch.cat([normal_maps, anomalous_maps])[:, None], 4)[:, 0].numpy()
    gt = torch.cat([torch.zeros_like(normal_maps, dtype=torch.bool), masks])
    gt = torch.nn.functional.max_pool2d(gt[:, None].float(), 4)[:, 0].numpy() > 0
    pro = aupro(gt, maps)
    return 0.5 * (img + pro), {"val_image_auroc": img, "val_aupro": pro, "score_kind": kind}


# Training images whose maps measure each evidence's reliability (a seeded subset)
PROBE_IMAGES = 64


def map_spread(maps: torch.Tensor) -> float:
    """The normal-pixel spread MapNorm puts at 1 on held-out normals: q99.9 - median."""
    flat = maps.float().flatten()
    if flat.numel() > 4_000_000:  # a seeded sample, drawn where the maps live
        g = torch.Generator(device=flat.device).manual_seed(0)
        idx = torch.randint(flat.numel(), (4_000_000,), generator=g, device=flat.device)
        flat = flat[idx]
    q = torch.tensor([0.5, 0.999], device=flat.device)
    low, high = torch.quantile(flat, q).tolist()
    return high - low


def evidence_mix(
    normal: dict[str, torch.Tensor],
    anomalous: dict[str, torch.Tensor],
    probe: dict[str, torch.Tensor],
    masks: torch.Tensor,
    cfg: AnomalyConfig,
) -> tuple[tuple[float, float, float], dict[str, dict]]:
    """The shares (reconstruction, statistics, kNN) of the fused map, from normal images and
    synthetic defects only; maps already on the held-out normal scale (``MapNorm``).

    The kNN memory is the reference, weight 1: it assumes nothing about where things are, so it
    does not collapse when the object moves, and it is what a user compares with (PatchCore).
    The reconstruction and the statistics join it only where they lead it on the selection
    split, each with weight ``reliability^2 * lead / MIX_MARGIN``:

    * lead: how much better the evidence alone separates the synthetic defects from held-out
      normals than the kNN does (image AUROC and AUPRO, each rescaled from chance), 0 if not;
    * reliability: the spread of its maps on training images it was fitted on, against held-out
      normals (1 by construction of the scale). A per-position Gaussian of an object that
      moves fits its own training images far more tightly than any new image, so held-out
      normals carry noise it cannot tell from a defect; synthetic defects pasted into copies
      of the held-out images do not show that, the reliability does.

    Without a kNN memory the evidence that separates best is the reference.
    """
    kinds = dict(zip(MIX, ("reconstruction", cfg.statistics, "knn"), strict=True))
    parts: dict[str, dict] = {}
    for part, kind in kinds.items():
        if kind not in normal:
            continue
        _, sel_parts = selection_score(normal[kind], anomalous[kind], masks, cfg)
        reliability = min(max(map_spread(probe[kind]), 0.0), 1.0)
        parts[part] = {"separation": above_chance(sel_parts), "reliability": reliability}
    reference = "knn" if "knn" in parts else max(parts, key=lambda p: parts[p]["separation"])
    weights = []
    for part in MIX:
        if part == reference:
            weights.append(1.0)
        elif part in parts:
            lead = max(parts[part]["separation"] - parts[reference]["separation"], 0.0)
            weights.append(parts[part]["reliability"] ** MIX_TRUST_POWER * lead / MIX_MARGIN)
        else:
            weights.append(0.0)
    total = sum(weights)
    return tuple(w / total for w in weights), parts


MIX_TRUST_POWER = 2.0
# A lead over the kNN of this many separation points (above chance), at reliability 1, makes an
# evidence count as much as the kNN
MIX_MARGIN = 0.05
# AUPRO of a map that knows nothing: PRO ~ FPR, integrated up to 0.3 and divided by it
AUPRO_CHANCE = 0.15


def above_chance(parts: dict) -> float:
    """Separation of synthetic defects above chance, 0 (chance) to 1 (perfect): the mean of
    image AUROC and AUPRO, each rescaled from its chance level."""
    img = (parts["val_image_auroc"] - 0.5) / 0.5
    pro = (parts["val_aupro"] - AUPRO_CHANCE) / (1 - AUPRO_CHANCE)
    return max(0.5 * (img + pro), 0.0)


# At most this many training images fit the residual Gaussian (a seeded subset beyond): a
# 256-image fit cost cpu-small 0.016 image AUROC against all 602 of magnetic_tile's.
RESIDUAL_FIT_IMAGES = 1024


def select_inference(
    state: TrainState, prep: Prepared, preset: Preset, device: torch.device, category: str, echo
) -> InferenceChoice:
    """On the selection split only: test-time masking, the statistical map and the evidence
    mix, what the image score is taken from and its kind, for the best epoch's weights. Fits the
    residual Gaussian on the training split and each map's normal scale on the selection
    normals, for each test-time masking tried; the detector keeps the chosen one's. Returns the
    record of the choices (``choice.apply(preset)`` is the preset to package)."""
    detector, tcfg = state.detector, preset.train
    trials = [(preset.model.test_mask_passes, preset.model.test_mask_layout)]
    trials += [(p, "lattice") for p in tcfg.try_test_mask_passes]
    trials += [(p, "blocks") for p in tcfg.try_test_mask_blocks]
    stats = tuple(dict.fromkeys((preset.anomaly.statistics, *tcfg.try_statistics)))
    sources = tuple(dict.fromkeys((preset.anomaly.image_evidence, *tcfg.try_image_evidence)))
    if detector.residual_gaussian is None:
        stats = tuple(s for s in stats if s != "residual")
    if detector.gaussian is None:
        stats, sources = (preset.anomaly.statistics,), ("map",)
    masks, bs = prep.val.masks, tcfg.batch_size
    norms = detector.map_norms()
    # the residual Gaussian is refitted for each test-time masking (P passes: P forwards per
    # image), on the training split (a seeded subset of it beyond RESIDUAL_FIT_IMAGES)
    g = torch.Generator().manual_seed(tcfg.seed)
    n_fit = min(len(prep.train_phi), RESIDUAL_FIT_IMAGES)
    residual_phi = prep.train_phi[torch.randperm(len(prep.train_phi), generator=g)[:n_fit]]
    probe_phi = prep.train_phi[torch.randperm(len(prep.train_phi), generator=g)[:PROBE_IMAGES]]

    def on_scale(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {kind: norms[kind](m) for kind, m in maps.items()}

    best: tuple[InferenceChoice, dict] | None = None
    tried: dict[str, float] = {}
    for passes, layout in dict.fromkeys(trials):
        detector.cfg = dataclasses.replace(
            preset.model, test_mask_passes=passes, test_mask_layout=layout
        )
        fitted = {}
        if detector.residual_gaussian is not None:
            t0 = time.perf_counter()
            with autocast(device):
                detector.fit_residual_gaussian(residual_phi, bs * 8)
            fitted["residual_gaussian"] = detector.residual_gaussian.state_dict()
            echo(
                f"[{category}] residual Gaussian ({passes}/{layout}) fitted on "
                f"{len(residual_phi)} training images in {time.perf_counter() - t0:.0f}s"
            )
        normal, _ = predict_evidence(detector, prep.val_normal_phi, preset, device, bs)
        anomalous, _ = predict_evidence(detector, prep.val_anomalous_phi, preset, device, bs)
        fitted.update({kind: norms[kind].fit(m).state_dict() for kind, m in normal.items()})
        candidates = []  # (AnomalyConfig, its mix, the evidence behind it, its label)
        select_mix = tcfg.select_mix and detector.gaussian is not None
        if select_mix:  # training images' maps: each evidence's reliability
            on_train = on_scale(predict_evidence(detector, probe_phi, preset, device, bs)[0])
            on_val = on_scale(normal), on_scale(anomalous)
        for stat in stats:
            if select_mix:
                base = dataclasses.replace(preset.anomaly, statistics=stat)
                mix, mix_parts = evidence_mix(*on_val, on_train, masks, base)
                echo(f"[{category}] evidence mix ({stat}): {mix_text(mix, mix_parts)}")
                signals = tuple(
                    (part, v["separation"], v["reliability"]) for part, v in mix_parts.items()
                )
                for source in dict.fromkeys(("map", *sources)):
                    if source == "statistics" and mix[1] <= 0:
                        continue  # the image score from the statistics only where they count
                    anomaly_cfg = dataclasses.replace(with_mix(base, mix), image_evidence=source)
                    label = f"{stat} mix={mix_text(mix)} image={source}"
                    candidates.append((anomaly_cfg, mix, signals, label))
                continue
            w = preset.anomaly.w_reconstruction
            for source in sources:
                if w >= 1 and stat != stats[0] and source == "map":
                    continue  # the reconstruction alone: already tried
                anomaly_cfg = dataclasses.replace(
                    preset.anomaly, statistics=stat, image_evidence=source
                )
                label = f"{stat} w_rec={w:g} image={source}"
                candidates.append((anomaly_cfg, mix_of(anomaly_cfg), (), label))
        for anomaly_cfg, mix, signals, what in candidates:
            evidence = (normal, anomalous)
            fused = [detector.fuse(m, anomaly_cfg) for m in evidence]
            image_maps = tuple(
                detector.score_maps(m, f, anomaly_cfg) for m, f in zip(evidence, fused, strict=True)
            )
            sel, parts = selection_score(*fused, masks, anomaly_cfg, image_maps)
            label = f"passes={passes}/{layout} {what} score={parts['score_kind']}"
            tried[label] = sel
            echo(f"[{category}] selection {sel:.4f} with {label}")
            if best is None or sel > best[0].selection_score:
                choice = InferenceChoice(
                    test_mask_passes=passes,
                    test_mask_layout=layout,
                    statistics=anomaly_cfg.statistics,
                    mix=mix,
                    image_evidence=anomaly_cfg.image_evidence,
                    score=parts["score_kind"],
                    selection_score=sel,
                    evidence=signals,
                )
                best = (choice, copy.deepcopy(fitted))
    choice, fitted = best
    choice = dataclasses.replace(choice, tried=tuple(tried.items()))
    # the detector configured once, from the record, with the chosen trial's fitted maps
    detector.cfg = choice.apply(preset).model
    for kind, fitted_state in fitted.items():
        module = detector.residual_gaussian if kind == "residual_gaussian" else norms[kind]
        module.load_state_dict(fitted_state)
    return choice


@torch.no_grad()
def calibrate_model(
    detector: Detector, prep: Prepared, preset: Preset, device: torch.device
) -> Calibrations:
    """Threshold, normal scores and map scale from the calibration split (the selection split
    when there is none), once for each precision a scorer may compute at (fp32, bf16, fp16),
    each through the scorer's own path at that precision on ``device``: the images' backbone
    features, the fused maps and scores under that autocast, the template embedding in fp32
    (as a scorer caches it at load). A bf16 scorer then compares bf16 scores with a bf16
    threshold and bf16 normal scores."""
    size, bs = preset.model.image_size, preset.train.batch_size
    if prep.calib_paths:  # uint8 as training loads them (load_images_uint8)
        images = torch.stack([(load_image(p, size) * 255).round().byte() for p in prep.calib_paths])
    else:
        images = prep.val.normal
    detector.eval()  # drops a template embedding cached under another autocast
    detector.template_embedding()
    entries = {}
    for precision in CALIBRATED_PRECISIONS:
        maps, scores = [], []
        for i in range(0, len(images), bs):
            x = images[i : i + bs].to(device).float().div_(255.0)
            with autocast_at(precision, device):
                m, s = detector.detect(x, preset.anomaly)
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        entries[precision] = calibrate(
            torch.cat(scores).numpy(), torch.cat(maps).numpy(), preset.train.target_fpr
        )
    return Calibrations(entries)
