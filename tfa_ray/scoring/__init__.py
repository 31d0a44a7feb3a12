"""Nightly batch scoring on Ray Data: images from object storage in, Parquet rows out.

    plan (driver)  ->  read + decode + resize (CPU tasks, never raise)
                   ->  score (actor pool: one model per category, loaded once per actor)
                   ->  encode masks / heat maps + write the shard's Parquet (CPU tasks)

Modules, one concern each: ``contract`` (output layout, schema, reading, verification),
``config`` (the run's settings and summary), ``models`` (category -> model package),
``listing`` (the input as bounded batches), ``manifest`` (the plan's paths as Parquet, sorted
out of core), ``plan`` (categories, models, shards, resume), ``verify`` (every path exactly
once, streamed), ``stages`` (the three Ray Data stages, one module each: ``decode``,
``scorer``, ``write``; ``shard`` is the row that travels between them), ``lease`` (one run at
a time per run id), ``drift`` (the finished run's drift, into its ``_SUCCESS``), ``driver``
(the run), ``args`` (command line options).
"""

from tfa_ray.scoring.args import add_score_arguments, config_from_args
from tfa_ray.scoring.config import RunSummary, ScoreConfig
from tfa_ray.scoring.contract import (
    OUTPUT_SCHEMA,
    SUCCESS_FILE,
    decode_heatmap,
    decode_mask,
    read_results,
    run_dir_url,
)
from tfa_ray.scoring.driver import Stages, score
from tfa_ray.scoring.listing import list_inputs
from tfa_ray.scoring.models import LocalResolver, RegistryResolver, Resolver
from tfa_ray.scoring.plan import category_regex
from tfa_ray.scoring.stages import ShardScorer, decode_shard, write_shard

__all__ = [
    "OUTPUT_SCHEMA",
    "SUCCESS_FILE",
    "LocalResolver",
    "RegistryResolver",
    "Resolver",
    "RunSummary",
    "ScoreConfig",
    "ShardScorer",
    "Stages",
    "add_score_arguments",
    "category_regex",
    "config_from_args",
    "decode_heatmap",
    "decode_mask",
    "decode_shard",
    "list_inputs",
    "read_results",
    "run_dir_url",
    "score",
    "write_shard",
]
