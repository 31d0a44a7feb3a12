"""The driver of a scoring run: plan, build the Ray Data pipeline, verify, summarise.

Exactly once, by construction:

* The plan (``plan.py``) is listed once and written before anything is scored; a rerun with
  the same run id reads it back, so shards never change. Its paths stay in Parquet manifest
  files (``manifest.py``): pipeline rows name a shard, and the decode task reads its paths.
* Each shard is one Parquet file under a name derived from the shard, written atomically: a
  file that exists is complete. A rerun scores the shards without a file and those marked for
  retry (transient error rows) and replaces their file whole; outputs of shards are disjoint.
* A scorer actor that dies is restarted by Ray and its task retried (Ray Data's actor pools run
  with ``max_restarts=-1, max_task_retries=-1``); writes happen downstream of the scorer, so a
  retried shard is still written exactly once, under the same name.
* ``<run>/_SUCCESS`` (JSON with counts) is written only after the driver has checked that every
  planned path is in the output exactly once. It also carries the run's drift per category
  (flag rate against target, scores against the calibration normals:
  :mod:`tfa_ray.scoring.drift`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tfa_ray import storage
from tfa_ray.scoring.config import RunSummary, ScoreConfig
from tfa_ray.scoring.contract import SUCCESS_FILE, run_dir_url
from tfa_ray.scoring.drift import drift_section
from tfa_ray.scoring.lease import hold
from tfa_ray.scoring.models import RegistryResolver, Resolver
from tfa_ray.scoring.plan import Plan, load_or_make_plan, pending_shards
from tfa_ray.scoring.stages import ShardScorer, decode_shard, write_shard
from tfa_ray.scoring.verify import COUNT_KEYS, verify

log = logging.getLogger(__name__)

DECODE_MAX_CALLS = 1000  # shards a decode worker process handles before it is replaced
# Ray Data blocks of shard rows: one block per shard up to this many shards (full parallelism
# for small runs), then groups of shards, so a night of 10^7 images is a few thousand blocks
# (each a task), not 156,000.
MAX_BLOCKS = 2048


def num_blocks(shards: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Blocks for ``shards`` shard rows: one each while they are few, else ``max_blocks``."""
    return max(1, min(shards, max_blocks))


@dataclass
class Stages:
    """The pipeline's three stages (tests hand in subclasses / wrappers to inject faults)."""

    decode: Callable[..., dict] = decode_shard
    scorer: type = ShardScorer
    write: Callable[..., dict] = write_shard


def check_urls(cfg: ScoreConfig, output: storage.Location) -> None:
    """Refuse URLs that would reach beyond what the user named, before anything is listed or
    written: an ``s3://`` URL without a bucket, an output bucket that does not exist (it is
    never created)."""
    for url in (cfg.input, cfg.output, cfg.root):
        if url and storage.is_s3(url):
            storage.split_bucket(url)
    output.require_bucket()


def _new_run_id() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _pipeline(
    cfg: ScoreConfig,
    plan: Plan,
    todo: list[dict],
    images: storage.Location,
    resolver: Resolver,
    st: Stages,
) -> Iterable[dict]:
    """The Ray Data pipeline over the shards ``todo``. The stages get the run's locations
    (``images``: where the input's files are, ``plan.run``: the run directory), pickled with
    their filesystems: a worker process rebuilds each filesystem once (fsspec's instance
    cache), never from a URL."""
    import ray.data

    from tfa_ray.ray_env import init_ray

    init_ray()
    _quiet_ray_data()
    rows = [
        {
            "file": s["file"],
            "category": s["category"] or "",
            "manifest": s["manifest"],
            "shard": s["shard"],
        }
        for s in todo
    ]
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks(len(rows)))
    decode_compute = (
        ray.data.TaskPoolStrategy(size=cfg.decode_concurrency) if cfg.decode_concurrency else None
    )
    # max_calls: decode workers are recycled now and then (image decoders fragment memory).
    # It also keeps Ray Data from fusing this stage into the scorer actors (fusion needs equal
    # remote args): decoding must scale over the CPUs independently of the (GPU) actor pool.
    ds = ds.map_batches(
        st.decode,
        batch_size=1,
        num_cpus=1,
        max_calls=DECODE_MAX_CALLS,
        compute=decode_compute,
        fn_kwargs={
            "models": plan.models,
            "max_pixels": cfg.max_pixels,
            "source": images,
            "run": plan.run,
            "gpu_decode": cfg.decode_on_device(),  # JPEGs travel encoded to the scorer
            "root": plan.header.get("root"),  # paths outside it: error rows that say so
        },
    )
    use_gpu = cfg.num_gpus_per_actor > 0
    ds = ds.map_batches(
        st.scorer,
        batch_size=max(1, int(cfg.shards_per_call)),
        compute=ray.data.ActorPoolStrategy(size=max(1, int(cfg.concurrency))),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor or None,
        fn_constructor_kwargs={
            "resolver": resolver,
            "alias": cfg.alias,
            "batch_size": cfg.batch_size,
            "device": cfg.device or ("cuda" if use_gpu else "cpu"),
            "precision": cfg.precision,
            "pinned": {c: m["version"] for c, m in plan.models.items() if "version" in m},
            "retry_after_s": cfg.retry_after_s,
            "model_cache_bytes": int(cfg.model_cache_gb * 1024**3),
        },
    )
    ds = ds.map_batches(
        st.write,
        batch_size=1,
        num_cpus=1,
        fn_kwargs={
            "run": plan.run,
            "run_id": plan.run_id,
            "heatmaps": cfg.heatmaps,
            "full_res": cfg.full_res_masks,
        },
    )
    yield from ds.iter_rows()


def _quiet_ray_data() -> None:
    """Ray Data's progress table and INFO lines off the console (they stay in Ray's
    ``ray-data.log``): the driver prints one progress line of its own instead."""
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # "progress bars disabled": we know
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)


class Progress:
    """One line now and then: images done / total, images per second, ETA."""

    def __init__(self, total: int, echo: Callable[[str], None], every_s: float = 10.0):
        self.total, self.echo, self.every_s = total, echo, every_s
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def add(self, images: int) -> None:
        self.done += images
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.echo(
                f"  scored {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta:.0f}s"
            )


def score(
    cfg: ScoreConfig,
    resolver: Resolver | None = None,
    echo: Callable[[str], None] = print,
    stages: Stages | None = None,
) -> RunSummary:
    """Score ``cfg.input`` into ``cfg.output``; resumes a run whose run id already exists. One
    process at a time per run id (:mod:`~tfa_ray.scoring.lease`): another waits or refuses."""
    t0 = time.perf_counter()
    if cfg.endpoint_url is None:  # the driver's environment decides the endpoint for all workers
        env_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cfg = dataclasses.replace(cfg, endpoint_url=env_endpoint or None)
    output = storage.resolve(cfg.output, cfg.endpoint_url)  # the run's filesystem, made once
    check_urls(cfg, output)
    resolver = resolver or RegistryResolver(prefix=cfg.prefix)
    run_id = cfg.run_id or _new_run_id()
    run = output.at(run_dir_url(cfg.output, run_id))
    with hold(run, run_id, cfg.wait, cfg.lease_ttl_s):
        return _score(cfg, resolver, echo, stages, run_id, run, t0)


def _score(
    cfg: ScoreConfig,
    resolver: Resolver,
    echo: Callable[[str], None],
    stages: Stages | None,
    run_id: str,
    run: storage.Location,
    t0: float,
) -> RunSummary:
    """The run, with its lease held."""
    source = run.at(cfg.input)  # the input: on the run's filesystem unless on another store
    images = source.at(cfg.root) if cfg.root else source  # a manifest's files: under its root
    plan = load_or_make_plan(cfg, run_id, run, resolver, source=source)
    todo = pending_shards(plan)
    skipped = plan.num_shards - len(todo)
    echo(
        f"run {run_id}: {plan.num_paths} images in {plan.num_shards} shards"
        + (f" ({skipped} already done, resuming)" if skipped else "")
    )
    for cat, m in sorted(plan.models.items()):
        echo(f"  {cat}: " + (m["error"] if "error" in m else f"{m['name']} v{m['version']}"))
    pids: dict[str, set[int]] = {"decode": set(), "score": set()}
    peak_rss = 0.0
    if todo:
        progress = Progress(sum(s["rows"] for s in todo), echo)
        for row in _pipeline(cfg, plan, todo, images, resolver, stages or Stages()):
            pids["decode"].add(int(row["decode_pid"]))
            pids["score"].add(int(row["score_pid"]))
            peak_rss = max(peak_rss, float(row["score_rss_mb"]))
            log.info("shard %s written: %s rows", row["file"], row["rows"])
            progress.add(int(row["rows"]))
    counts = verify(plan)
    total = {k: sum(c[k] for c in counts.values()) for k in COUNT_KEYS}
    summary = RunSummary(
        run_id=run_id,
        run_dir=run.url,
        total=total["total"],
        ok=total["ok"],
        error=total["error"],
        transient=total["transient"],
        anomalous=total["anomalous"],
        per_category=counts,
        shards=plan.num_shards,
        shards_skipped=skipped,
        seconds=time.perf_counter() - t0,
        models=plan.models,
        processes={
            "decode": len(pids["decode"]),
            "score": len(pids["score"]),
            "shared": len(pids["decode"] & pids["score"]),  # 0: stages were not fused
        },
        scorer_peak_rss_mb=peak_rss,
    )
    drift = drift_section(run, plan.models, resolver, cfg.alias)
    success: dict[str, Any] = dict(
        summary.to_dict(),
        input=cfg.input,
        finished=_dt.datetime.now(_dt.UTC).isoformat(),
        drift=drift,
    )
    run.join(SUCCESS_FILE).write_bytes(json.dumps(success, indent=2).encode())
    echo(
        f"run {run_id} done: {summary.total} images, {summary.ok} ok, {summary.error} errors, "
        f"{summary.anomalous} anomalous -> {run.url}"
    )
    for cat, d in sorted(drift["categories"].items()):
        for warning in d["warnings"]:
            echo(f"  drift warning, {cat}: {warning}")
    if summary.transient:
        echo(
            f"  {summary.transient} errors are transient (I/O, registry, model load): rerun with "
            f"--run-id {run_id} to score them again"
        )
    return summary
