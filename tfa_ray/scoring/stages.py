"""The three Ray Data stages of a scoring run, one module each, as Ray's batch-inference
examples write them:

* :func:`decode_shard` (``decode``) -- a function (CPU tasks): read + decode + resize, or read +
  header check with JPEGs left encoded for the device; never raises.
* :class:`ShardScorer` (``scorer``) -- a callable class (actor pool): loads each category's
  model once per actor, scores the shards it is handed.
* :func:`write_shard` (``write``) -- a function (CPU tasks): encode masks / heat maps, write the
  shard's Parquet file atomically under its planned name.

A shard travels between them as one row (``shard``)."""

from tfa_ray.scoring.decode import decode_array, decode_jpegs, decode_shard, jpeg_header
from tfa_ray.scoring.scorer import ShardScorer
from tfa_ray.scoring.write import shard_table, write_shard

__all__ = [
    "ShardScorer",
    "decode_array",
    "decode_jpegs",
    "decode_shard",
    "jpeg_header",
    "shard_table",
    "write_shard",
]
