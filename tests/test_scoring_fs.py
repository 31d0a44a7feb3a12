"""One filesystem per run: the driver resolves the run's location once, and the stages read and
write through the locations they are handed (rebuilt from their pickle, never from a URL)."""

from __future__ import annotations

import os
import sys
from collections import Counter

import fsspec.core
import ray.cloudpickle

from tfa_ray import scoring
from tfa_ray.synth import make_dataset


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


def test_a_scoring_run_resolves_its_filesystem_once(
    ray_cluster, tiny_model_dir, tmp_path, monkeypatch
):
    make_dataset(
        str(tmp_path / "in"),
        categories=("texture",),
        n_train=6,
        n_test_good=0,
        n_test_defect=0,
        size=64,
    )
    made: Counter[str] = Counter()
    real = fsspec.core.url_to_fs
    monkeypatch.setattr(
        fsspec.core, "url_to_fs", lambda url, **kw: made.update([url]) or real(url, **kw)
    )
    log = str(tmp_path / "stages.log")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    summary = scoring.score(
        scoring.ScoreConfig(
            input=str(tmp_path / "in"), output=str(tmp_path / "out"), run_id="once", shard_size=2
        ),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
        stages=scoring.Stages(
            decode=_counted(scoring.decode_shard, log), write=_counted(scoring.write_shard, log)
        ),
    )
    assert summary.ok == summary.total == 6 and summary.shards == 3
    # the driver: the output once (the run directory and the input are on its filesystem);
    # the model package's files are the package's own business
    run_urls = {u: n for u, n in made.items() if not u.startswith(tiny_model_dir)}
    assert run_urls == {str(tmp_path / "out"): 1}
    # every decode and write call: no filesystem made, the run's locations came with the task
    calls = [line.split() for line in open(log).read().splitlines()]
    assert Counter(stage for stage, _, _ in calls) == {"decode_shard": 3, "write_shard": 3}
    assert all(n == "0" for _, _, n in calls), calls
