"""The settings of one scoring run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tfa_ray.data import MAX_PIXELS

GPU_DECODE = ("auto", "on", "off")


@dataclass
class ScoreConfig:
    input: str  # URL prefix (local, file://, s3://) or manifest file (text or Parquet)
    output: str  # URL prefix; the run goes to <output>/run_id=<id>/
    category: str | None = None  # one category for every input
    category_pattern: str = "{category}/**"  # relative to the input prefix / manifest root
    root: str | None = None  # manifest input: relative paths are under this (default: its dir)
    allow_outside_root: bool = False  # score manifest paths outside the root (else error rows)
    alias: str = "champion"
    prefix: str = "tfa-"
    batch_size: int | None = None  # images per forward pass (None: 64 on GPUs, 16 on CPUs)
    shard_size: int = 64  # images per shard = per output file = unit of resume
    # shards a scorer actor is handed per call: while one is scored, the next one's host work
    # (parsing, pinning) runs in the actor's prefetch thread
    shards_per_call: int = 2
    concurrency: int = 1  # scorer actors
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    decode_concurrency: int | None = None  # max decode tasks in flight (None: Ray decides)
    heatmaps: bool = False
    full_res_masks: bool = False  # masks / heat maps at the image's size, not the map's
    run_id: str | None = None
    wait: bool = False  # the run id is in progress elsewhere: wait for it (else refuse)
    lease_ttl_s: float = 120.0  # a run's lease expires this long after its last renewal
    max_pixels: int | None = MAX_PIXELS
    endpoint_url: str | None = None
    device: str | None = None  # scorer device; default cuda when the actor has a GPU
    precision: str = "auto"  # see tfa_ray.package.PRECISIONS
    retry_after_s: float = 30.0  # a scorer actor tries a failed model load again after this
    model_cache_gb: float = 4.0  # models a scorer actor keeps (least recently used out first)
    # JPEGs decoded by the scorer on its device (nvjpeg) instead of by the CPU decode tasks;
    # auto: on when the scorer actors have GPUs. Other formats and odd JPEGs decode on CPU.
    gpu_decode: str = "auto"

    def decode_on_device(self) -> bool:
        """Whether the decode stage leaves JPEGs encoded for the scorer's device."""
        if self.gpu_decode not in GPU_DECODE:
            raise ValueError(f"gpu_decode must be one of {GPU_DECODE}, got {self.gpu_decode!r}")
        return self.gpu_decode == "on" or (
            self.gpu_decode == "auto" and self.num_gpus_per_actor > 0
        )


@dataclass
class RunSummary:
    run_id: str
    run_dir: str
    total: int
    ok: int
    error: int
    anomalous: int
    per_category: dict[str, dict[str, int]]
    shards: int
    shards_skipped: int
    seconds: float
    transient: int = 0  # error rows a rerun with the same run id will score again
    models: dict[str, Any] = field(default_factory=dict)
    # distinct worker processes this invocation used per stage (decode tasks, scorer actors)
    processes: dict[str, int] = field(default_factory=dict)
    scorer_peak_rss_mb: float = 0.0  # the largest scorer actor's peak resident memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
