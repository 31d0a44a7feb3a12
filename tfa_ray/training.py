"""Training one TFA-Net for one category.

``fit`` is the whole single-category loop; it runs in-process here and as the body of a Ray
Train worker loop (training on Ray lives with the orchestration code). What it guarantees:

* gradients are zeroed every step; the backbone is frozen and, without augmentation, its
  features are computed once and cached;
* a validation split carved from the *normal training images* (never the test split) drives
  model selection, early stopping and calibration;
* the epoch is selected on detection, not on validation loss: synthetic anomalies with exact
  masks (CutPaste patches, noise blobs, scratches, ...) are pasted into the held-out normal
  images and the selection score is the mean of image AUROC and AUPRO on them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tfa_ray.anomaly import Calibration, anomaly_map, calibrate, image_score, reconstruction_loss
from tfa_ray.config import AnomalyConfig, Preset
from tfa_ray.data import CategoryData, check_images, load_image, template_path
from tfa_ray.metrics import aupro, image_auroc
from tfa_ray.model import Detector
from tfa_ray.synth import paint_defect

log = logging.getLogger(__name__)
ECHO = functools.partial(print, flush=True)  # progress lines reach logs as they happen


@dataclass
class TrainResult:
    detector: Detector
    preset: Preset  # as trained; a score kind of "auto" is resolved to the selected one
    calibration: Calibration
    template_path: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    selection_score: float = float("nan")
    wall_time_s: float = 0.0
    num_train: int = 0
    num_val: int = 0


@dataclass
class ValidationSet:
    """Held-out normal images plus copies with pasted synthetic anomalies and their masks."""

    normal: torch.Tensor  # (V, 3, S, S) uint8
    anomalous: torch.Tensor  # (A, 3, S, S) uint8
    masks: torch.Tensor  # (A, S, S) bool


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


def load_images_uint8(paths: list[str], size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8: a quarter of the memory of float images for the whole training set."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        out[i] = (load_image(p, size) * 255).round().to(torch.uint8)
    return out


def paste_synthetic(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect pasted into an (H, W, 3) uint8 image, and its exact mask.

    Real defects are often faint: the defect is blended in at a random opacity, so neither
    selection nor denoising training is decided by glaring anomalies only.
    """
    bad, mask = paint_defect(image, rng)
    opacity = rng.uniform(0.3, 1.0)
    bad = np.where(mask[..., None], opacity * bad + (1 - opacity) * image, image)
    bad = bad.round().astype(np.uint8)
    return np.ascontiguousarray(bad), mask & (bad != image).any(axis=-1)


def make_validation_set(images: torch.Tensor, per_image: int, seed: int) -> ValidationSet:
    rng = np.random.default_rng(seed + 1)
    anomalous, masks = [], []
    for img in images:
        hwc = img.permute(1, 2, 0).numpy()
        for _ in range(per_image):
            bad, mask = paste_synthetic(hwc, rng)
            anomalous.append(torch.from_numpy(bad).permute(2, 0, 1))
            masks.append(torch.from_numpy(mask))
    return ValidationSet(images, torch.stack(anomalous), torch.stack(masks))


def corrupted_copies(images: torch.Tensor, seed: int) -> torch.Tensor:
    """One copy of every training image with a pasted synthetic defect (denoising inputs)."""
    rng = np.random.default_rng(seed + 2)
    out = torch.empty_like(images)
    for i, img in enumerate(images):
        bad, _ = paste_synthetic(img.permute(1, 2, 0).numpy(), rng)
        out[i] = torch.from_numpy(bad).permute(2, 0, 1)
    return out


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).float().div_(255.0)


@torch.no_grad()
def compute_features(
    detector: Detector, images: torch.Tensor, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """phi for a uint8 image tensor, in batches, kept as float16 on the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(detector.features(to_float(images[i : i + batch_size], device)).half().cpu())
    return torch.cat(out)


@torch.no_grad()
def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over all images and positions (float64 accumulation)."""
    c = features.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for chunk in features.split(64):
        x = chunk.double().transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def agreed_seconds(seconds: float, device: torch.device, distributed: bool) -> float:
    """Under data parallelism every worker must follow the same clock (learning rate, time
    budget stop), or their steps drift apart: take the slowest worker's."""
    if not (
        distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL needs CUDA tensors
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def learning_rate(base: float, progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay over training progress in [0, 1].

    Progress is the larger of steps done and time budget used, so a run cut short by its
    time budget still ends with an annealed learning rate.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    return base * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict_features(
    detector: Detector, phi: torch.Tensor, preset: Preset, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, float]:
    """Anomaly maps and mean loss for cached features (eval mode)."""
    maps, losses = [], []
    for i in range(0, len(phi), batch_size):
        x = phi[i : i + batch_size].to(device).float()
        with autocast(device):
            x_hat = detector.reconstruct(x)
        loss, _ = reconstruction_loss(x, x_hat, preset.anomaly)
        amap = anomaly_map(x, x_hat, preset.model.image_size, preset.anomaly)
        maps.append(amap.cpu())
        losses.append(loss.item() * len(x))
    return torch.cat(maps), sum(losses) / len(phi)


SCORE_KINDS = ("std", "max", "topk")


def best_image_score(
    normal_maps: torch.Tensor, anomalous_maps: torch.Tensor, cfg: AnomalyConfig
) -> tuple[str, float]:
    """The image score kind that best separates held-out normals from their synthetic-anomaly
    copies, and its AUROC. ``score="auto"`` tries every kind; otherwise the configured one."""
    kinds = SCORE_KINDS if cfg.score == "auto" else (cfg.score,)
    labels = np.r_[np.zeros(len(normal_maps)), np.ones(len(anomalous_maps))]
    best = ("", -1.0)
    for kind in kinds:
        kind_cfg = dataclasses.replace(cfg, score=kind)
        scores = torch.cat(
            [image_score(normal_maps, kind_cfg), image_score(anomalous_maps, kind_cfg)]
        )
        auc = image_auroc(labels, scores.numpy())
        if auc > best[1]:
            best = (kind, auc)
    return best


def selection_score(
    normal_maps: torch.Tensor, anomalous_maps: torch.Tensor, masks: torch.Tensor, cfg: AnomalyConfig
) -> tuple[float, dict]:
    """Mean of image AUROC and AUPRO on held-out normals vs. their synthetic-anomaly copies.

    Pixel maps are average-pooled 4x (masks max-pooled) to keep this cheap every epoch.
    """
    kind, img = best_image_score(normal_maps, anomalous_maps, cfg)
    pool = torch.nn.functional.avg_pool2d
    maps = pool(torch.cat([normal_maps, anomalous_maps])[:, None], 4)[:, 0].numpy()
    gt = torch.cat([torch.zeros_like(normal_maps, dtype=torch.bool), masks])
    gt = torch.nn.functional.max_pool2d(gt[:, None].float(), 4)[:, 0].numpy() > 0
    pro = aupro(gt, maps)
    return 0.5 * (img + pro), {"val_image_auroc": img, "val_aupro": pro, "score_kind": kind}


def validate(
    detector: Detector,
    val: ValidationSet,
    normal_phi: torch.Tensor,
    anomalous_phi: torch.Tensor,
    preset: Preset,
    device: torch.device,
) -> tuple[float, dict, float]:
    """Selection score, its parts, and the validation loss on the held-out normal images."""
    bs = preset.train.batch_size
    maps_n, val_loss = predict_features(detector, normal_phi, preset, device, bs)
    maps_a, _ = predict_features(detector, anomalous_phi, preset, device, bs)
    sel, parts = selection_score(maps_n, maps_a, val.masks, preset.anomaly)
    return sel, parts, val_loss


def shard_batch(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Worker ``rank``'s share of a global batch (strided, like DistributedSampler). A batch
    smaller than the world is wrapped around so every worker steps (DDP needs all of them)."""
    if len(batch) < world_size:
        return batch[rank % len(batch) : rank % len(batch) + 1]
    return batch[rank::world_size]


def checkpoint_state(
    epoch: int,
    step: int,
    history: list[dict],
    best: dict,
    detector: Detector,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict:
    """Everything needed to continue training after ``epoch``: tensors, numbers and strings
    only, so ``torch.load(..., weights_only=True)`` reads it back without unpickling code."""
    return {
        "epoch": epoch,
        "step": step,
        "history": copy.deepcopy(history),
        "best": {k: v for k, v in best.items() if k != "state"},
        "best_state": best.get("state") or {},
        "net": detector.net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }


def restore_state(
    state: dict, detector: Detector, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[int, int, list[dict], dict]:
    """Load a :func:`checkpoint_state` dict; returns (epochs done, step, history, best)."""
    detector.net.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    best = dict(state["best"])
    best["state"] = state["best_state"] or None
    return int(state["epoch"]), int(state["step"]), list(state["history"]), best


def fit(
    data: CategoryData,
    preset: Preset,
    *,
    template: str | None = None,
    skip_bad: bool = False,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    echo: Callable[[str], None] = ECHO,
    resume_state: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    shard: tuple[int, int] | None = None,
) -> TrainResult:
    """Train one TFA-Net on ``data.train`` (normal images only) and calibrate it.

    For Ray Train (all default to plain in-process training): ``on_checkpoint`` receives the
    resumable state after every epoch (see :func:`checkpoint_state`), ``resume_state`` continues
    from such a state, ``wrap_model`` wraps ``detector.net`` for the training forward pass (DDP)
    and ``shard=(rank, world_size)`` trains on this worker's share of every global batch.
    """
    t_start = time.perf_counter()
    cfg, tcfg = preset.model, preset.train
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(tcfg.seed)
    size = cfg.image_size

    paths = check_images(data.train, skip_bad=skip_bad)
    tpl = template_path(data, template)
    train_paths, val_paths = split_train_val(paths, tcfg.val_fraction, tcfg.seed)
    echo(
        f"[{data.category}] {len(train_paths)} train / {len(val_paths)} held-out normal images, "
        f"template {tpl}"
    )

    detector = Detector(cfg, load_image(tpl, size)).to(device)
    train_images = load_images_uint8(train_paths, size)
    val = make_validation_set(load_images_uint8(val_paths, size), tcfg.synthetic_per_val, tcfg.seed)

    t_feat = time.perf_counter()
    train_phi = compute_features(detector, train_images, device)
    if cfg.standardize_features:
        mean, std = feature_statistics(train_phi)
        detector.set_feature_stats(mean.to(device), std.to(device))
        train_phi = (
            (train_phi.float() - mean[:, None, None]) / std.clamp_min(1e-6)[:, None, None]
        ).half()
    corrupt_phi = None
    if tcfg.denoise_fraction > 0:
        corrupt_phi = compute_features(detector, corrupted_copies(train_images, tcfg.seed), device)
    val_normal_phi = compute_features(detector, val.normal, device)
    val_anom_phi = compute_features(detector, val.anomalous, device)
    echo(f"[{data.category}] backbone features cached in {time.perf_counter() - t_feat:.1f}s")
    del train_images

    optimizer = torch.optim.AdamW(
        detector.net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay
    )
    total_steps = tcfg.epochs * math.ceil(len(train_phi) / tcfg.batch_size)
    generator = torch.Generator().manual_seed(tcfg.seed)
    history: list[dict] = []
    best = {"score": -math.inf, "epoch": -1, "state": None}
    t_train = time.perf_counter()
    step = 0
    start_epoch = 0
    if resume_state is not None:  # a restarted worker continues after its last checkpoint
        start_epoch, step, history, best = restore_state(
            resume_state, detector, optimizer, generator
        )
        t_train -= history[-1]["elapsed_s"] if history else 0.0
    train_net = wrap_model(detector.net) if wrap_model is not None else None
    if shard is not None:  # data parallel: each worker draws its own input-token masks
        torch.manual_seed(tcfg.seed + 1 + shard[0])
    for epoch in range(start_epoch, tcfg.epochs):
        detector.train()
        t_epoch = time.perf_counter()
        order = torch.randperm(len(train_phi), generator=generator)
        total, seen = 0.0, 0
        for i in range(0, len(order), tcfg.batch_size):
            batch = order[i : i + tcfg.batch_size]
            if shard is not None:  # data parallel: this worker's share of the global batch
                batch = shard_batch(batch, *shard)
            phi = train_phi[batch].to(device).float()
            phi_in = phi
            if corrupt_phi is not None:  # these inputs carry a defect; the target stays clean
                noisy = torch.rand(len(batch)) < tcfg.denoise_fraction
                if noisy.any():
                    phi_in = phi.clone()
                    phi_in[noisy] = corrupt_phi[batch[noisy]].to(device).float()
            with autocast(device):
                if train_net is None:
                    phi_hat = detector.reconstruct(phi_in, mask_ratio=cfg.mask_ratio)
                else:  # the wrapped (DDP) net; in training mode the same as reconstruct
                    phi_hat = train_net(phi_in, detector.template_embedding(), cfg.mask_ratio)
            loss, _ = reconstruction_loss(phi, phi_hat, preset.anomaly)
            progress = step / total_steps
            if tcfg.time_budget_s:
                used = agreed_seconds(time.perf_counter() - t_train, device, shard is not None)
                progress = max(progress, used / tcfg.time_budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(tcfg.lr, progress)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.detach().item() * len(phi)
            seen += len(phi)
        train_time = time.perf_counter() - t_epoch

        detector.eval()
        sel, parts, val_loss = validate(detector, val, val_normal_phi, val_anom_phi, preset, device)
        elapsed = time.perf_counter() - t_train
        eta = elapsed / (epoch + 1) * (tcfg.epochs - epoch - 1)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / seen,
            "val_loss": val_loss,
            "selection": sel,
            **parts,
            "images_per_s": seen / train_time,
            "elapsed_s": elapsed,
        }
        history.append(record)
        improved = sel > best["score"]
        if improved:
            best = {
                "score": sel,
                "epoch": epoch + 1,
                "kind": parts["score_kind"],
                "state": copy.deepcopy(detector.net.state_dict()),
            }
        echo(
            f"[{data.category}] epoch {epoch + 1}/{tcfg.epochs} loss {record['train_loss']:.4f} "
            f"val_loss {val_loss:.4f} select {sel:.4f} (img {parts['val_image_auroc']:.3f} "
            f"pro {parts['val_aupro']:.3f}){' *' if improved else ''} "
            f"{record['images_per_s']:.1f} img/s ETA {eta / 60:.1f}m"
        )
        if on_epoch_end is not None:
            on_epoch_end(record)
        if on_checkpoint is not None:
            on_checkpoint(
                checkpoint_state(epoch + 1, step, history, best, detector, optimizer, generator)
            )
        if tcfg.patience and epoch + 1 - best["epoch"] >= tcfg.patience:
            echo(f"[{data.category}] early stop: selection flat for {tcfg.patience} epochs")
            break
        used = agreed_seconds(elapsed, device, shard is not None) if tcfg.time_budget_s else 0.0
        if tcfg.time_budget_s and used + used / (epoch + 1) > tcfg.time_budget_s:
            echo(f"[{data.category}] stopping: time budget of {tcfg.time_budget_s:.0f}s reached")
            break

    detector.net.load_state_dict(best["state"])
    detector.eval()
    preset = dataclasses.replace(
        preset, anomaly=dataclasses.replace(preset.anomaly, score=best["kind"])
    )
    trials = [(p, "lattice") for p in tcfg.try_test_mask_passes]
    trials += [(p, "blocks") for p in tcfg.try_test_mask_blocks]
    for passes, layout in trials:
        if (passes, layout) == (preset.model.test_mask_passes, preset.model.test_mask_layout):
            continue
        trial = dataclasses.replace(preset.model, test_mask_passes=passes, test_mask_layout=layout)
        detector.cfg = trial
        sel, parts, _ = validate(detector, val, val_normal_phi, val_anom_phi, preset, device)
        echo(f"[{data.category}] test-time mask passes {passes} ({layout}): selection {sel:.4f}")
        if sel > best["score"]:
            best.update(score=sel, kind=parts["score_kind"])
            preset = dataclasses.replace(
                preset,
                model=trial,
                anomaly=dataclasses.replace(preset.anomaly, score=parts["score_kind"]),
            )
        detector.cfg = preset.model
    maps_n, _ = predict_features(detector, val_normal_phi, preset, device, tcfg.batch_size)
    scores_n = image_score(maps_n, preset.anomaly)
    calibration = calibrate(scores_n.numpy(), maps_n.numpy(), tcfg.target_fpr)
    wall = time.perf_counter() - t_start
    echo(
        f"[{data.category}] best epoch {best['epoch']} (selection {best['score']:.4f}, "
        f"image score {best['kind']}); "
        f"threshold {calibration.threshold:.5g} at FPR {tcfg.target_fpr:g}; {wall:.0f}s"
    )
    return TrainResult(
        detector=detector.cpu(),
        preset=preset,
        calibration=calibration,
        template_path=tpl,
        history=history,
        best_epoch=best["epoch"],
        selection_score=best["score"],
        wall_time_s=wall,
        num_train=len(train_paths),
        num_val=len(val_paths),
    )
