"""Training on Ray Train: one ``TorchTrainer`` per category, several categories at once.

The worker loop is the core :func:`tfa_ray.training.fit`. With more than one worker per
category it is data parallel: ``ray.train.torch.prepare_model`` wraps the TFA-Net in DDP and
each worker takes its strided share of every global batch (the backbone features are cached
tensors, so the sharding that ``prepare_data_loader``'s DistributedSampler would do is done on
the batch indices directly). Every epoch the resumable state (weights, optimiser, epoch and
step counters, RNG, best-so-far record, history) is written as a checkpoint to
``RunConfig(storage_path)``, of which Ray keeps the last ``CHECKPOINTS_KEPT``; the best weights
are written beside them only in the epochs where they improve (:mod:`tfa_ray.checkpoints`), not
copied into every checkpoint.
After a worker dies, ``FailureConfig(max_failures)`` restarts the group and it continues from
the last checkpoint (loaded onto the CPU, so a GPU checkpoint resumes anywhere). The last
report carries the tfa-ray model package.

Rank 0 then evaluates the package on the category's test split on its own device (the driver
may have no GPU, or no CPU to spare: a head with ``num-cpus: 0``) and returns the metrics with
the package.

The driver side (:func:`train_categories`) checks inputs before any worker starts, submits the
categories at once (threads, each blocking on its own trainer; ``max_concurrent`` bounds them) and
lets Ray queue their resource requests: on an autoscaling cluster the pending requests are what
scales it up, and a snapshot of its GPUs at start would read 0. Ray Train V2 waits for a worker
group's placement group for ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s), then gives it up
and asks again, without limit (``FailureConfig.controller_failure_limit`` -1): a queued trainer
waits, it does not fail. Each model is logged / registered through :mod:`tfa_ray.tracking`. A
failing category never stops the others; its outcome carries one error line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2  # epoch checkpoints Ray keeps (each holds the weights and Adam's moments)
BEST_DIR = "best"


@dataclass
class RaySettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None  # checkpoints; default ./runs/ray
    max_failures: int = 1
    endpoint_url: str | None = None  # S3 endpoint for data / checkpoints (else AWS_ENDPOINT_URL)
    # The workers' torch device: default the worker's GPU with use_gpu, else the CPU. "cpu" with
    # use_gpu schedules on (logical) GPUs but computes on the CPU: tests of the GPU scheduling.
    device: str | None = None
    backend: str | None = None  # the process group's; default NCCL with GPUs, else gloo


@dataclass
class Outcome:
    """What happened to one category."""

    category: str
    ok: bool
    error: str = ""
    name: str = ""
    version: int | None = None
    promoted: str = ""
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    package_dir: str = ""
    wall_time_s: float = 0.0


# --------------------------------------------------------------------------------------
# Ray


def _storage(settings: RaySettings):
    """(storage_path, storage_filesystem) for RunConfig.

    S3 goes through the same s3fs filesystem as the data (custom endpoints such as MinIO or
    moto honoured, credentials from the usual AWS chain), wrapped for pyarrow."""
    from tfa_ray import storage

    path = settings.storage_path or os.path.join(os.getcwd(), "runs", "ray")
    if storage.is_local(path):
        path = storage.normalize(path)
        os.makedirs(path, exist_ok=True)
        return path, None
    if path.startswith(("s3://", "s3a://")):
        import pyarrow.fs as pafs

        bucket_path = path.split("://", 1)[1].rstrip("/")
        bucket = bucket_path.split("/", 1)[0]
        checkpoints = storage.resolve(f"s3://{bucket}", settings.endpoint_url)
        if not checkpoints.exists():
            raise FileNotFoundError(
                f"checkpoint bucket not found: s3://{bucket} "
                "(check --storage-path, the endpoint and the credentials)"
            )
        return bucket_path, pafs.PyFileSystem(pafs.FSSpecHandler(checkpoints.fs))
    return path, None


# --------------------------------------------------------------------------------------
# the worker loop


def worker_loop(config: dict) -> None:
    """Body of every Ray Train worker: ``fit`` with checkpoints, resume and DDP."""
    import torch
    from ray import train
    from ray.train import Checkpoint

    from tfa_ray.checkpoints import BestWeights
    from tfa_ray.config import preset_from_json
    from tfa_ray.data import discover
    from tfa_ray.package import save_model
    from tfa_ray.ray_env import assigned_cpus
    from tfa_ray.training import fit

    if config.get("endpoint_url"):
        os.environ["AWS_ENDPOINT_URL"] = config["endpoint_url"]
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(assigned_cpus() or 1)  # decoding and checks: the CPUs Ray gave us
    preset = preset_from_json(config["preset"])
    data = discover(config["data"], config["category"])

    best = BestWeights(config["best_dir"])
    resume = None
    ckpt = train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        if resume["best"].get("epoch", -1) > 0:  # the best weights live beside the checkpoints
            resume["best_state"] = best.load(resume["best"]["epoch"])
            if rank == 0:
                best.keep_only(resume["best"]["epoch"])
        print(f"[{data.category}] rank {rank}: resuming after epoch {resume['epoch']}")
    resumed_from = int(resume["epoch"]) if resume else 0
    saved_best = [resume["best"].get("epoch", -1) if resume else -1]

    def on_checkpoint(state: dict) -> None:
        rec = state["history"][-1]
        metrics = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
        if rank != 0:
            train.report(metrics)
            return
        best_state = state.pop("best_state", None)
        previous, best_epoch = saved_best[0], state["best"].get("epoch", -1)
        if best_epoch != previous and best_state:
            best.save(best_epoch, best_state)  # before the checkpoint that names it
            saved_best[0] = best_epoch
        with tempfile.TemporaryDirectory(prefix="tfa-ckpt-") as d:
            torch.save(state, os.path.join(d, "state.pt"))
            train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        if saved_best[0] != previous and previous > 0:  # no checkpoint to resume names it now
            best.remove(previous)

    def wrap(net):  # data parallel: DDP
        return train.torch.prepare_model(net, move_to_device=False)

    device = torch.device(config["device"]) if config.get("device") else None
    device = device or (train.torch.get_device() if config.get("use_gpu") else torch.device("cpu"))

    def on_epoch_end(record: dict) -> None:
        # fit's train_loss is this worker's shard only; log the mean over the workers (the loss
        # whose gradient DDP's average is: the global batch mean when the shards are equal).
        # The record is the one in fit's history, so checkpoints and the result carry it too.
        if world > 1:
            import torch.distributed as dist

            loss = torch.tensor([record["train_loss"]], dtype=torch.float64, device=device)
            dist.all_reduce(loss)
            record["train_loss"] = loss.item() / world

    result = fit(
        data,
        preset,
        template=config.get("template"),
        skip_bad=bool(config.get("skip_bad")),
        device=device,
        on_epoch_end=on_epoch_end,
        resume_state=resume,
        on_checkpoint=on_checkpoint,
        wrap_model=wrap if world > 1 else None,
        shard=(rank, world) if world > 1 else None,
    )
    summary = {
        "best_epoch": result.best_epoch,
        "selection_score": result.selection_score,
        "wall_time_s": result.wall_time_s,
        "num_train": result.num_train,
        "num_val": result.num_val,
        "template_path": result.template_path,
        "resumed_from_epoch": resumed_from,
        "world_size": world,
    }
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="tfa-final-") as d:
            meta = {"category": data.category, "data": config["data"], **summary}
            meta["history"] = result.history
            pkg = save_model(
                os.path.join(d, "package"),
                result.detector,
                result.preset,
                result.calibration,
                meta,
                result.choice,
            )
            del result  # the package is the model now; its GPU memory is free for evaluation
            summary["test_metrics"] = evaluate_package(pkg, data, device)
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump({"summary": summary, "history": meta["history"]}, f, default=str)
            train.report({"done": 1}, checkpoint=Checkpoint.from_directory(d))
    else:
        train.report({"done": 1})


def evaluate_package(pkg: str, data, device) -> dict:
    """Test-split metrics of the package as saved (evaluation, never selection), on ``device``
    at the precision scoring uses there; {} without a test split."""
    from tfa_ray.evaluation import evaluate_model
    from tfa_ray.package import load_model

    if not data.test:
        return {}
    ev = evaluate_model(load_model(pkg, device=device), data)
    return {k: float(v) for k, v in ev.metrics.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------------------
# the driver


def one_line(exc: BaseException) -> str:
    """A single readable line for an exception (Ray wraps worker errors in tracebacks)."""
    from tfa_ray.data import BadImagesError

    if isinstance(exc, BadImagesError):
        return str(exc).splitlines()[0]
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return one_line(next(iter(failures.values())))
    cause = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return one_line(cause)
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the "SomeError: message" line at the end of a traceback
        if ":" in ln and not ln.startswith(("File ", "^", "~")):
            return ln[:500]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def train_one(
    data: str,
    category: str,
    preset_json: str,
    settings: RaySettings,
    *,
    template: str | None = None,
    skip_bad: bool = False,
    run_name: str | None = None,
    loop: Callable[[dict], None] = worker_loop,
) -> tuple[str, dict, list]:
    """Train one category on Ray Train; returns (local package dir, summary, history).

    The package directory is a fresh temporary directory the caller owns; the summary's
    ``test_metrics`` are the test split's, measured by the worker. ``loop`` is the worker body
    (tests wrap :func:`worker_loop` to inject faults)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tfa_ray import storage

    storage_path, storage_fs = _storage(settings)
    name = run_name or f"tfa-{category}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    env_vars = {}
    endpoint = settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        env_vars["AWS_ENDPOINT_URL"] = endpoint  # an address, not a secret
    if storage_fs is None:
        best_dir = storage.join(storage_path, name, BEST_DIR)
    else:  # the checkpoint bucket, addressed the way tfa_ray.storage does it
        best_dir = storage.join(f"s3://{storage_path}", name, BEST_DIR)
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "data": data,
            "category": category,
            "preset": preset_json,
            "template": template,
            "skip_bad": skip_bad,
            "use_gpu": settings.use_gpu,
            "device": settings.device,
            "endpoint_url": settings.endpoint_url,
            "best_dir": best_dir,
        },
        # NCCL with GPUs; gloo when the tensors live on the CPU (device "cpu") or when asked
        torch_config=TorchConfig(backend=settings.backend or "gloo")
        if settings.device == "cpu" or settings.backend
        else None,
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            worker_runtime_env={"env_vars": env_vars} if env_vars else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"[{category}] training ended without a checkpoint")
    out = tempfile.mkdtemp(prefix=f"tfa-{category}-")
    result.checkpoint.to_directory(out)
    with open(os.path.join(out, "result.json")) as f:
        res = json.load(f)
    return os.path.join(out, "package"), res["summary"], res["history"]


def train_categories(
    data: str,
    categories: list[str],
    preset_name: str,
    preset,
    settings: RaySettings,
    *,
    max_concurrent: int | None = None,
    template: str | None = None,
    skip_bad: bool = False,
    outputs: dict[str, str] | None = None,
    track: bool = True,
    prefix: str = "tfa-",
    promote_if_better: str | None = None,
    echo: Callable[[str], None] = print,
    loop: Callable[[dict], None] = worker_loop,
) -> list[Outcome]:
    """Train, evaluate, log and register every category; never raises for one category.

    ``outputs``: category -> directory / URL where its model package is also written; ``loop``
    as in :func:`train_one`."""
    from tfa_ray import storage, train_register
    from tfa_ray.config import preset_to_json
    from tfa_ray.data import discover

    if storage.is_local(data):  # workers run in other directories: pass an absolute path
        data = storage.normalize(data)
    preset_json = preset_to_json(preset)
    outcomes = {c: Outcome(c, ok=False) for c in categories}
    # preflight: every category's folder and file list, before any worker starts
    ready = []
    for c in categories:
        try:
            discover(data, c)
        except Exception as e:  # noqa: BLE001 - reported per category
            outcomes[c].error = one_line(e)
            echo(f"[{c}] error: {outcomes[c].error}")
        else:
            ready.append(c)
    if ready:
        from tfa_ray.ray_env import init_ray

        _storage(settings)  # a missing checkpoint bucket fails here, once
        init_ray(log_to_driver=True)  # the epochs' lines come from the workers
    # All at once: Ray queues what does not fit yet (and an autoscaler scales up for it).
    concurrency = max(1, min(max_concurrent or len(ready), len(ready)))
    echo(
        f"training {len(ready)} categor{'y' if len(ready) == 1 else 'ies'} on Ray "
        f"({settings.num_workers} worker(s) each, up to {concurrency} at a time as resources "
        "allow)"
    )
    lock = threading.Lock()  # MLflow's fluent API is process-global: log one run at a time

    def run(category: str) -> None:
        out = outcomes[category]
        t0 = time.perf_counter()
        tmp_root = None
        kept = None
        if track:  # the job's package is kept here before the registry is asked
            key = train_register.job_key(data, category, preset_json, template)
            kept = train_register.kept_dir(_storage_url(settings), f"{prefix}{category}", key)
        try:
            record = train_register.find_unregistered(kept) if kept else None
            if record is not None:
                pkg = storage.join(kept, "package")
                echo(f"[{category}] found this job's trained package, never registered: {pkg}")
            else:
                pkg, summary, history = train_one(
                    data,
                    category,
                    preset_json,
                    settings,
                    template=template,
                    skip_bad=skip_bad,
                    loop=loop,
                )
                tmp_root = os.path.dirname(pkg)
                params = train_register.training_params(
                    preset_name, preset_json, category, data, settings, summary
                )
                wall = time.perf_counter() - t0
                record = train_register.training_record(params, summary, history, wall)
                if kept:
                    pkg = train_register.keep_package(pkg, record, kept)
            out.metrics, out.summary = record["metrics"], record["summary"]
            out.history = record["history"]
            if out.metrics:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in out.metrics.items())
                echo(f"[{category}] test split: {shown}")
            if outputs and outputs.get(category):
                with train_register.local_copy(pkg) as local:
                    train_register.copy_package(local, outputs[category])
                out.package_dir = outputs[category]
                echo(f"[{category}] model written to {out.package_dir}")
            if track:
                with lock:
                    _register(out, pkg, category, record, prefix, promote_if_better, echo)
            out.ok = True
        except Exception as e:  # noqa: BLE001 - one category's failure is its own
            out.error = out.error or one_line(e)
            log.debug("category %s failed:\n%s", category, traceback.format_exc())
            echo(f"[{category}] error: {out.error}")
        finally:
            out.wall_time_s = time.perf_counter() - t0
            if tmp_root:
                shutil.rmtree(tmp_root, ignore_errors=True)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(run, ready))
    return [outcomes[c] for c in categories]


def _storage_url(settings: RaySettings) -> str:
    """The checkpoint location as a URL (kept packages live beside the checkpoints)."""
    from tfa_ray import storage

    path = settings.storage_path or os.path.join(os.getcwd(), "runs", "ray")
    return storage.normalize(path)


def _register(out, pkg, category, record, prefix, promote_if_better, echo) -> None:
    """Register the kept package; if the registry fails (after its retries) the outcome's
    error is one line with where the package is and the command that registers it."""
    from tfa_ray import registry, train_register

    try:
        mv = train_register.register_package(pkg, category, record=record, prefix=prefix)
    except Exception as e:
        out.error = (
            f"registration failed ({one_line(e)}); the trained package is kept at {pkg}: "
            f"register it with `{train_register.register_command(pkg, category, prefix)}`"
        )
        raise
    out.name, out.version = mv.name, mv.version
    if promote_if_better:
        _, why = registry.promote_if_better(
            category, promote_if_better, version=mv.version, prefix=prefix
        )
        out.promoted = why
        echo(f"[{category}] {why}")


def summary_table(outcomes: list[Outcome]) -> str:
    from tfa_ray.registry import format_table

    rows = []
    for o in outcomes:
        rows.append(
            {
                "category": o.category,
                "status": "ok" if o.ok else "FAILED",
                "model": f"{o.name} v{o.version}" if o.version else "",
                "image_auroc": o.metrics.get("image_auroc"),
                "best_epoch": o.summary.get("best_epoch"),
                "wall_s": round(o.wall_time_s, 1),
                "error": o.error,
            }
        )
    cols = ["category", "status", "model", "image_auroc", "best_epoch", "wall_s", "error"]
    return format_table(rows, cols)
