"""The ``score`` command line options, shared by ``tfa-ray score`` and ``jobs/score.py``."""

from __future__ import annotations

from tfa_ray.config import PRECISIONS
from tfa_ray.data import MAX_PIXELS
from tfa_ray.scoring.config import GPU_DECODE, ScoreConfig
from tfa_ray.scoring.models import LocalResolver, Resolver


def add_score_arguments(p) -> None:
    """The ``score`` options on an argparse parser."""
    p.add_argument("--input", required=True, help="URL prefix (path, file://, s3://) or manifest")
    p.add_argument("--output", required=True, help="output URL prefix for the Parquet results")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--category", help="score every input as this category")
    g.add_argument(
        "--category-pattern",
        default="{category}/**",
        help="where the category sits in the path under the input prefix "
        "(default '{category}/**': the first component)",
    )
    p.add_argument("--root", help="manifest input: paths are relative to this URL")
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="score manifest paths that resolve outside the input root (default: error rows)",
    )
    p.add_argument("--alias", default="champion", help="registry alias to score with")
    p.add_argument("--prefix", default="tfa-", help="registered model name prefix")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="CATEGORY=URL",
        help="use this model package for a category instead of the registry (repeatable)",
    )
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass (default: 64 on GPUs, 16 on CPUs)"
    )
    p.add_argument("--shard-size", type=int, default=64, help="images per output file")
    p.add_argument("--concurrency", type=int, default=1, help="scorer actors")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--decode-concurrency", type=int, help="max decode tasks at once")
    p.add_argument(
        "--model-cache-gb",
        type=float,
        default=4.0,
        help="GB of models each scorer actor keeps loaded, least recently used out first "
        "(a paper model is about 0.9 GB)",
    )
    p.add_argument(
        "--heatmaps", action="store_true", help="also store heat maps (16-bit PNG, model scale)"
    )
    p.add_argument(
        "--full-res-masks",
        action="store_true",
        help="store masks / heat maps at each image's own size (default: the model's map "
        "resolution; tfa_ray.scoring.decode_mask(row, image_size=True) resizes one)",
    )
    p.add_argument("--run-id", help="run id; rerun with the same id to resume a run")
    p.add_argument(
        "--wait",
        action="store_true",
        help="if the run id is in progress elsewhere, wait for it to end (default: refuse)",
    )
    p.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help="larger images become error rows"
    )
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--device", help="scorer device (default: cuda with GPUs, else cpu)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast on GPUs with native bf16 (compute capability 8.0+), fp16 "
        "on older GPUs, fp32 on CPU; bf16: also on CPU",
    )
    p.add_argument(
        "--gpu-decode",
        choices=GPU_DECODE,
        default="auto",
        help="decode JPEGs on the scorer's device (auto: when actors have GPUs)",
    )
    p.add_argument("--report", help="also write the HTML run report to this file")
    p.add_argument("--json", help="write the run summary as JSON to this file")


def config_from_args(args) -> tuple[ScoreConfig, Resolver | None]:
    """The run's config and resolver (``--model`` packages, else the registry: None)."""
    cfg = ScoreConfig(
        input=args.input,
        output=args.output,
        category=args.category,
        category_pattern=args.category_pattern,
        root=args.root,
        allow_outside_root=args.allow_outside_root,
        alias=args.alias,
        prefix=args.prefix,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor,
        decode_concurrency=args.decode_concurrency,
        model_cache_gb=args.model_cache_gb,
        heatmaps=args.heatmaps,
        full_res_masks=args.full_res_masks,
        run_id=args.run_id,
        wait=args.wait,
        max_pixels=args.max_pixels,
        endpoint_url=args.endpoint_url,
        device=args.device,
        precision=args.precision,
        gpu_decode=args.gpu_decode,
    )
    resolver: Resolver | None = None
    if args.model:
        packages = {}
        for spec in args.model:
            cat, sep, url = spec.partition("=")
            if not sep or not cat or not url:
                raise ValueError(f"--model expects CATEGORY=URL, got {spec!r}")
            packages[cat] = url
        resolver = LocalResolver(packages, prefix=args.prefix)
    return cfg, resolver
