"""One filesystem per run: the driver resolves the run's location once, and the stages read and
write through the locations they are handed (rebuilt from their pickle, never from a URL)."""

from __future__ import annotations

import io
import os
import sys
import uuid
from collections import Counter

import fsspec.core
import numpy as np
import pytest
import ray.cloudpickle
from PIL import Image

from tfa_ray import scoring, storage
from tfa_ray.synth import make_dataset, make_image


def _counted(stage, log: str):
    """``stage``, recording in ``log`` how many filesystems each call made from a URL (in
    whichever worker process runs it)."""

    def run(batch, **kw):
        made = []
        real = fsspec.core.url_to_fs
        fsspec.core.url_to_fs = lambda url, **o: made.append(url) or real(url, **o)
        try:
            return stage(batch, **kw)
        finally:
            fsspec.core.url_to_fs = real
            with open(log, "a") as f:
                f.write(f"{stage.__name__} {os.getpid()} {len(made)}\n")

    return run


def _local_input(tmp_path, request) -> tuple[dict, set[str]]:
    """Images in a local folder: everything is on the output's filesystem."""
    make_dataset(
        str(tmp_path / "in"),
        categories=("texture",),
        n_train=6,
        n_test_good=0,
        n_test_defect=0,
        size=64,
    )
    return {"input": str(tmp_path / "in")}, set()


def _s3_root(tmp_path, request) -> tuple[dict, set[str]]:
    """A local manifest of relative paths under a root on (moto) S3: the images' filesystem is
    another one, resolved once too."""
    request.getfixturevalue("s3_env")
    bucket = f"fs-{uuid.uuid4().hex[:8]}"
    day = storage.resolve(f"s3://{bucket}/day")
    day.fs.mkdir(bucket)
    names = [f"texture/{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        img = make_image("texture", 64, np.random.default_rng(i))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        day.join(name).write_bytes(buf.getvalue())
    (tmp_path / "night.txt").write_text("\n".join(names) + "\n")
    return {"input": str(tmp_path / "night.txt"), "root": day.url}, {day.url}


@pytest.mark.parametrize("inputs", [_local_input, _s3_root], ids=["local", "s3-root"])
def test_a_scoring_run_resolves_its_filesystem_once(
    inputs, ray_cluster, tiny_model_dir, tmp_path, monkeypatch, request
):
    where, elsewhere = inputs(tmp_path, request)
    made: Counter[str] = Counter()
    real = fsspec.core.url_to_fs
    monkeypatch.setattr(
        fsspec.core, "url_to_fs", lambda url, **kw: made.update([url]) or real(url, **kw)
    )
    log = str(tmp_path / "stages.log")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    summary = scoring.score(
        scoring.ScoreConfig(**where, output=str(tmp_path / "out"), run_id="once", shard_size=2),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
        stages=scoring.Stages(
            decode=_counted(scoring.decode_shard, log), write=_counted(scoring.write_shard, log)
        ),
    )
    assert summary.ok == summary.total == 6 and summary.shards == 3
    # the driver: the output once (the run directory and the input are on its filesystem),
    # and an input on another store once; the model package's files are its own business
    run_urls = {u: n for u, n in made.items() if not u.startswith(tiny_model_dir)}
    assert run_urls == dict.fromkeys([str(tmp_path / "out"), *elsewhere], 1)
    # every decode and write call: no filesystem made, the run's locations came with the task
    calls = [line.split() for line in open(log).read().splitlines()]
    assert Counter(stage for stage, _, _ in calls) == {"decode_shard": 3, "write_shard": 3}
    assert all(n == "0" for _, _, n in calls), calls
