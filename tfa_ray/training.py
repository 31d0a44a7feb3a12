"""Training one TFA-Net for one category.

``fit`` is the whole single-category loop; it runs in-process here and as the body of a Ray
Train worker loop (training on Ray lives with the orchestration code). What it guarantees:

* gradients are zeroed every step; the backbone is frozen and its features are computed once;
* two splits are carved from the *normal training images* (never the test split): a
  selection split drives the epoch, early stopping and every inference choice, and a
  calibration split, which nothing else sees, sets the threshold;
* the epoch is selected on detection, not on validation loss (:mod:`tfa_ray.selection`).

``fit`` reads as its steps: :func:`prepare` (splits, templates, cached features, statistics),
:func:`train_epochs` (the loop, checkpoints in a :class:`TrainState`), :func:`select_inference`
(test-time masking, image score, evidence fusion) and :func:`calibrate_model`.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tfa_ray.anomaly import reconstruction_loss
from tfa_ray.calibration import Calibrations
from tfa_ray.choices import InferenceChoice
from tfa_ray.config import Preset
from tfa_ray.data import CategoryData, check_images, load_image, template_path
from tfa_ray.distributed import (
    active,
    agreed_seconds,
    agreed_stop,
    broadcast_cache,
    broadcast_object,
    broadcast_training_state,
    shard_batch,
)
from tfa_ray.evidence import greedy_coreset
from tfa_ray.features import (
    BatchLoader,
    compute_features,
    feature_statistics,
    load_images_uint8,
    standardize_,
)
from tfa_ray.model import Detector, dual_masks
from tfa_ray.selection import (
    autocast,
    calibrate_model,
    make_validation_set,
    predict_evidence,
    select_inference,
    selection_score,
    split_normals,
)
from tfa_ray.train_state import Prepared, TrainState, ValidationSet

ECHO = functools.partial(print, flush=True)  # progress lines reach logs as they happen


@dataclass
class TrainResult:
    detector: Detector
    preset: Preset  # as trained; a score kind of "auto" is resolved to the selected one
    # one entry per precision a scorer may compute at; None on the ranks > 0 of data-parallel
    # training
    calibration: Calibrations | None
    template_path: str
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    selection_score: float = float("nan")
    wall_time_s: float = 0.0
    num_train: int = 0
    num_val: int = 0  # selection split
    num_calib: int = 0  # calibration split
    # what the selection chose and every variant it tried; None on the ranks > 0
    choice: InferenceChoice | None = None

    @property
    def selection(self) -> dict[str, float]:
        """Every inference variant tried, and its selection score."""
        return dict(self.choice.tried) if self.choice else {}


def learning_rate(base: float, progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay over training progress in [0, 1].

    Progress is the larger of steps done and time budget used, so a run cut short by its
    time budget still ends with an annealed learning rate.
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    return base * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def validate(
    detector: Detector,
    val: ValidationSet,
    normal_phi: torch.Tensor,
    anomalous_phi: torch.Tensor,
    preset: Preset,
    device: torch.device,
) -> tuple[float, dict, float]:
    """Selection score of the reconstruction map alone (the epoch is chosen on what the
    network learnt, not on the fixed statistics), its parts, and the validation loss."""
    bs = preset.train.batch_size
    maps_n, val_loss = predict_evidence(detector, normal_phi, preset, device, bs, False)
    maps_a, _ = predict_evidence(detector, anomalous_phi, preset, device, bs, False)
    rec = "reconstruction"
    sel, parts = selection_score(maps_n[rec], maps_a[rec], val.masks, preset.anomaly)
    return sel, parts, val_loss


def pick_templates(
    data_template: str, train_paths: list[str], train_phi: torch.Tensor, count: int
) -> list[str]:
    """The paper's template first, then ``count - 1`` more training images by greedy k-center
    on globally pooled features: the bank covers the normal variation, not one mode of it."""
    if count <= 1:
        return [data_template]
    keys = train_phi.float().mean(dim=(2, 3))
    first = train_paths.index(data_template) if data_template in train_paths else None
    if first is None:  # an external template: k-center over the training images alone
        picked = [data_template] + [train_paths[i] for i in greedy_coreset(keys, count - 1)]
    else:
        picked = [train_paths[i] for i in greedy_coreset(keys, count, start=first)]
    return (picked * count)[:count]  # fewer images than templates: some repeat


def prepare(
    data: CategoryData,
    preset: Preset,
    detector: Detector,
    device: torch.device,
    template: str | None,
    skip_bad: bool,
    echo: Callable[[str], None],
) -> Prepared:
    """Splits, templates, cached backbone features, feature statistics and the Gaussian."""
    cfg, tcfg = preset.model, preset.train
    size = cfg.image_size
    paths = check_images(data.train, skip_bad=skip_bad)
    tpl = template_path(data, template)
    train_paths, val_paths, calib_paths = split_normals(
        paths, tcfg.val_fraction, tcfg.calib_fraction, tcfg.seed
    )
    echo(
        f"[{data.category}] {len(train_paths)} train / {len(val_paths)} selection / "
        f"{len(calib_paths)} calibration normal images, template {tpl}"
    )
    t_feat = time.perf_counter()
    detector.set_templates(load_image(tpl, size).expand(cfg.num_templates, -1, -1, -1))
    train_images = load_images_uint8(train_paths, size)
    train_phi = compute_features(detector, train_images, device)
    if cfg.standardize_features:
        mean, std = feature_statistics(train_phi)
        detector.set_feature_stats(mean.to(device), std.to(device))
        train_phi = standardize_(train_phi, mean, std)
    if cfg.num_templates > 1:
        bank = pick_templates(tpl, train_paths, train_phi, cfg.num_templates)
        detector.set_templates(torch.stack([load_image(p, size) for p in bank]).to(device))
        echo(f"[{data.category}] template bank: {', '.join(p.rsplit('/', 1)[-1] for p in bank)}")
    if detector.gaussian is not None:
        detector.gaussian.fit(train_phi[i : i + 32] for i in range(0, len(train_phi), 32))
    if detector.knn is not None:
        t_knn = time.perf_counter()
        detector.knn.fit(
            (train_phi[i : i + 32] for i in range(0, len(train_phi), 32)),
            seed=tcfg.seed,
            total=len(train_phi) * detector.knn.size**2,
        )
        echo(f"[{data.category}] kNN memory fitted in {time.perf_counter() - t_knn:.0f}s")
    val = make_validation_set(
        load_images_uint8(val_paths, size), tcfg.synthetic_per_val, tcfg.seed, tcfg.synthetic_large
    )
    prepared = Prepared(
        train_paths=train_paths,
        val_paths=val_paths,
        calib_paths=calib_paths,
        template_path=tpl,
        train_phi=train_phi,
        val=val,
        val_normal_phi=compute_features(detector, val.normal, device),
        val_anomalous_phi=compute_features(detector, val.anomalous, device),
    )
    echo(f"[{data.category}] backbone features cached in {time.perf_counter() - t_feat:.1f}s")
    return prepared


def share_prepared(prep: Prepared | None, detector: Detector, device: torch.device) -> Prepared:
    """Rank 0's preparation on every rank: the training cache and the detector state the loss
    reads (the held-out splits stay with rank 0, which alone validates, selects, calibrates)."""
    lead = prep is not None
    paths = broadcast_object(
        (prep.train_paths, prep.val_paths, prep.calib_paths, prep.template_path) if lead else None,
        device,
    )
    broadcast_training_state(detector, device)
    train_phi = broadcast_cache(prep.train_phi if lead else None, device)
    if lead:
        return prep
    none = torch.empty(0, dtype=torch.float16)
    val = ValidationSet(torch.empty(0, 3, 1, 1, dtype=torch.uint8), none, none)
    return Prepared(*paths, train_phi, val, none, none)


def token_weights(visible: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """(B, n) visible token indices -> (B, H, W) 1 where the token was hidden, else 0."""
    hidden = torch.ones(visible.shape[0], grid * grid, device=visible.device)
    hidden.scatter_(1, visible, 0.0)
    hidden = hidden.view(-1, grid, grid)
    return hidden.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def training_loss(
    detector: Detector,
    net: torch.nn.Module,
    phi: torch.Tensor,
    preset: Preset,
) -> torch.Tensor:
    """One step's loss: random masking (the paper) or complementary halves, each scored where
    it was hidden. ``net`` is ``detector.net`` or its DDP wrapper."""
    cfg = preset.model
    e_t = detector.paired_templates(phi)
    if cfg.mask_mode == "random":
        return reconstruction_loss(phi, net(phi, e_t, cfg.mask_ratio), preset.anomaly)[0]
    if cfg.mask_mode != "dual":
        raise ValueError(f"mask_mode must be 'random' or 'dual', got {cfg.mask_mode!r}")
    halves = dual_masks(len(phi), detector.net.num_tokens, phi.device)  # (2, B, N/2)
    visible = halves.reshape(-1, halves.shape[-1])
    e_t = e_t.expand(len(phi), -1, -1).repeat(2, 1, 1)
    phi_hat = net(phi.repeat(2, 1, 1, 1), e_t, visible=visible)
    weight = token_weights(visible, detector.net.grid, cfg.patch_size)
    return reconstruction_loss(phi.repeat(2, 1, 1, 1), phi_hat, preset.anomaly, weight)[0]


def train_epochs(
    state: TrainState,
    prep: Prepared,
    preset: Preset,
    device: torch.device,
    category: str,
    echo: Callable[[str], None],
    on_epoch_end: Callable[[dict], None] | None,
    on_checkpoint: Callable[[dict], None] | None,
    train_net: torch.nn.Module | None,
    shard: tuple[int, int] | None,
) -> None:
    """The training loop: epochs until ``train.epochs`` or the time budget, whichever first
    (``epochs=0``: the budget alone, so a small category gets the same optimiser time as a
    large one), selecting the best epoch on the selection split."""
    tcfg, detector = preset.train, state.detector
    net = train_net if train_net is not None else detector.net
    if not tcfg.epochs and not tcfg.time_budget_s:
        raise ValueError("train.epochs=0 needs a time budget (train.time_budget_s)")
    steps_per_epoch = math.ceil(len(prep.train_phi) / tcfg.batch_size)
    total_steps = tcfg.epochs * steps_per_epoch
    distributed = shard is not None
    lead = not active(shard) or shard[0] == 0  # rank 0 validates and decides; the others train
    load = BatchLoader(prep.train_phi, device)
    t_train = time.perf_counter() - (state.history[-1]["elapsed_s"] if state.history else 0.0)
    if shard is not None:  # data parallel: each worker draws its own input-token masks
        torch.manual_seed(tcfg.seed + 1 + shard[0])
    epochs = range(state.epoch, tcfg.epochs) if tcfg.epochs else itertools.count(state.epoch)
    for epoch in epochs:
        detector.train()
        t_epoch = time.perf_counter()
        order = torch.randperm(len(prep.train_phi), generator=state.generator)
        total, seen = 0.0, 0
        for i in range(0, len(order), tcfg.batch_size):
            batch = order[i : i + tcfg.batch_size]
            if shard is not None:  # data parallel: this worker's share of the global batch
                batch = shard_batch(batch, *shard)
            phi = load(batch)
            with autocast(device, training=True):
                loss = training_loss(detector, net, phi, preset)
            progress = state.step / total_steps if total_steps else 0.0
            if tcfg.time_budget_s:
                used = agreed_seconds(time.perf_counter() - t_train, device, distributed)
                progress = max(progress, used / tcfg.time_budget_s)
            for group in state.optimizer.param_groups:
                group["lr"] = learning_rate(tcfg.lr, progress)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.step += 1
            total += loss.detach().item() * len(phi)
            seen += len(phi)
        train_time = time.perf_counter() - t_epoch
        state.epoch = epoch + 1

        detector.eval()
        sel, parts, val_loss = math.nan, {"val_image_auroc": math.nan, "val_aupro": math.nan}, 0.0
        if lead:
            sel, parts, val_loss = validate(
                detector, prep.val, prep.val_normal_phi, prep.val_anomalous_phi, preset, device
            )
        elapsed = time.perf_counter() - t_train
        record = {
            "epoch": epoch + 1,
            "train_loss": total / seen,
            "val_loss": val_loss,
            "selection": sel,
            **parts,
            "images_per_s": seen / train_time,
            "elapsed_s": elapsed,
        }
        state.history.append(record)
        improved = lead and state.record_best(sel, parts["score_kind"])
        if tcfg.epochs:
            eta = elapsed / (epoch + 1) * (tcfg.epochs - epoch - 1)
        else:
            eta = max(tcfg.time_budget_s - elapsed, 0.0)
        (echo if lead else lambda _line: None)(
            f"[{category}] epoch {epoch + 1}{f'/{tcfg.epochs}' if tcfg.epochs else ''} "
            f"loss {record['train_loss']:.4f} val_loss {val_loss:.4f} select {sel:.4f} "
            f"(img {parts['val_image_auroc']:.3f} pro {parts['val_aupro']:.3f})"
            f"{' *' if improved else ''} {record['images_per_s']:.1f} img/s ETA {eta / 60:.1f}m"
        )
        if on_epoch_end is not None:
            on_epoch_end(record)
        if on_checkpoint is not None:
            on_checkpoint(state.checkpoint())
        flat = lead and tcfg.patience and epoch + 1 - state.best_epoch >= tcfg.patience
        if agreed_stop(bool(flat), device, distributed):  # every rank stops at this epoch
            echo(f"[{category}] early stop: selection flat for {tcfg.patience} epochs")
            break
        used = agreed_seconds(elapsed, device, distributed) if tcfg.time_budget_s else 0.0
        if tcfg.time_budget_s and used + used / (epoch + 1) > tcfg.time_budget_s:
            echo(f"[{category}] stopping: time budget of {tcfg.time_budget_s:.0f}s reached")
            break


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
    """Train one TFA-Net on ``data.train`` (normal images only), choose its inference on the
    selection split and calibrate it on the calibration split.

    For Ray Train (all default to plain in-process training): ``on_checkpoint`` receives the
    resumable state after every epoch (:meth:`TrainState.checkpoint`), ``resume_state``
    continues from such a state, ``wrap_model`` wraps ``detector.net`` for the training forward
    pass (DDP) and ``shard=(rank, world_size)`` trains on this worker's share of every batch.
    """
    t_start = time.perf_counter()
    tcfg = preset.train
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(tcfg.seed)
    detector = Detector(preset.model).to(device)
    lead = not active(shard) or shard[0] == 0
    prep = prepare(data, preset, detector, device, template, skip_bad, echo) if lead else None
    if active(shard):  # data parallel: rank 0 prepared, the others receive what they train on
        prep = share_prepared(prep, detector, device)

    optimizer = torch.optim.AdamW(
        detector.net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay
    )
    state = TrainState(detector, optimizer, torch.Generator().manual_seed(tcfg.seed))
    if resume_state is not None:  # a restarted worker continues after its last checkpoint
        state.restore(resume_state)
    train_net = wrap_model(detector.net) if wrap_model is not None else None
    train_epochs(
        state,
        prep,
        preset,
        device,
        data.category,
        echo,
        on_epoch_end,
        on_checkpoint,
        train_net,
        shard,
    )

    if not lead:  # rank 0 selects and calibrates (alone: no collectives from here on)
        return TrainResult(
            detector=detector.cpu(),
            preset=preset,
            calibration=None,
            template_path=prep.template_path,
            history=state.history,
            wall_time_s=time.perf_counter() - t_start,
            num_train=len(prep.train_paths),
        )
    detector.net.load_state_dict(state.best_net)
    detector.eval()
    choice = select_inference(state, prep, preset, device, data.category, echo)
    preset, sel = choice.apply(preset), choice.selection_score
    calibration = calibrate_model(detector, prep, preset, device)
    wall = time.perf_counter() - t_start
    echo(
        f"[{data.category}] best epoch {state.best_epoch}; inference selected {sel:.4f}: "
        f"{choice.text()}; threshold "
        f"{calibration.at('fp32').threshold:.5g} (fp32) at FPR {tcfg.target_fpr:g} from "
        f"{calibration.at('fp32').num_images} calibration images; {wall:.0f}s"
    )
    return TrainResult(
        detector=detector.cpu(),
        preset=preset,
        calibration=calibration,
        template_path=prep.template_path,
        history=state.history,
        best_epoch=state.best_epoch,
        selection_score=sel,
        wall_time_s=wall,
        num_train=len(prep.train_paths),
        num_val=len(prep.val_paths),
        num_calib=len(prep.calib_paths),
        choice=choice,
    )
