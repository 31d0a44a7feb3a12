"""GPU scheduling on Ray's logical GPUs: Ray schedules on declared resources, so a
``ray.cluster_utils.Cluster`` whose nodes declare ``num_gpus`` runs the GPU code paths'
scheduling on CPUs (the torch device forced to the CPU). Plus the pieces that decide what runs
on a GPU: the precision policy and the scorer actors' model cache."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch

from tfa_ray import package, scoring, selection, train_ray
from tfa_ray.config import get_preset
from tfa_ray.scoring.cache import ModelCache, model_nbytes
from tfa_ray.synth import make_dataset

MiB = 1024 * 1024


# --------------------------------------------------------------------------------------
# the precision policy (one function for training, calibration and scoring)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)],
)
def test_auto_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    seen = []

    def capability_of(device=None):
        seen.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    cuda = torch.device("cuda", 1)
    assert package.autocast_dtype("auto", cuda) == expected
    assert seen[-1] == cuda  # the capability of the device that computes, not of GPU 0
    # training never autocasts to fp16 (no loss scaling); bf16 where native
    assert package.autocast_dtype("auto", cuda, training=True) == (
        torch.bfloat16 if expected == torch.bfloat16 else None
    )
    assert package.autocast_dtype("fp32", cuda) is None
    assert package.autocast_dtype("bf16", cuda) == torch.bfloat16
    # training, calibration / selection and scoring all go through the one policy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the dtype is still decided
        assert package.autocast("auto", cuda).fast_dtype == expected
        assert selection.autocast(cuda).fast_dtype == expected


def test_auto_precision_on_cpu_is_fp32(monkeypatch):
    def no_cuda(device=None):
        raise AssertionError("the CPU path must not ask CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    cpu = torch.device("cpu")
    assert package.autocast_dtype("auto", cpu) is None
    assert package.autocast_dtype("bf16", cpu) == torch.bfloat16
    with package.autocast("auto", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with package.autocast("bf16", cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        package.autocast_dtype("fp8", cpu)


# --------------------------------------------------------------------------------------
# the scorer actors' model cache


def test_model_cache_evicts_least_recently_used_by_bytes():
    evicted = []
    cache = ModelCache(100, size=len, on_evict=lambda k, v: evicted.append(k))
    cache.put("a", "x" * 40)
    cache.put("b", "x" * 40)
    assert cache.get("a") == "x" * 40  # a is now the most recently used
    cache.put("c", "x" * 40)  # 120 > 100: b goes, not a
    assert evicted == ["b"] and cache.keys() == ["a", "c"] and cache.nbytes == 80
    assert cache.get("b") is None
    cache.put("d", "x" * 70)  # 150: a and c both go
    assert evicted == ["b", "a", "c"] and cache.keys() == ["d"]
    cache.put("huge", "x" * 500)  # bigger than the bound: kept, alone
    assert cache.keys() == ["huge"] and cache.get("huge") == "x" * 500
    cache.put("e", "x" * 10)  # the huge one is the least recently used now
    assert cache.keys() == ["e"] and cache.nbytes == 10


def test_scorer_keeps_models_within_the_byte_bound(tiny_model_dir, tmp_path):
    """Three categories through one scorer whose cache holds two models: the least recently
    used is dropped and loaded again when its category comes back."""
    from tfa_ray.package import load_model

    model = load_model(tiny_model_dir)
    params = sum(t.numel() * t.element_size() for t in model.detector.parameters())
    buffers = sum(t.numel() * t.element_size() for t in model.detector.buffers())
    assert model_nbytes(model) == params + buffers
    with torch.no_grad():
        e = model.detector.template_embeddings()  # cached from now on
    assert model_nbytes(model) == params + buffers + e.numel() * e.element_size()
    size = model_nbytes(model)

    local = scoring.LocalResolver({c: tiny_model_dir for c in "abc"})
    loads = []

    def resolver(category, alias="champion", version=None):
        loads.append(category)
        return local(category, alias, version)

    scorer = scoring.ShardScorer(resolver, model_cache_bytes=int(2.5 * size))
    for category in ["a", "b", "a", "c", "b", "a"]:
        assert not isinstance(scorer._model(category), str)
    # c evicts b (a was used after it), b evicts a, a evicts c
    assert loads == ["a", "b", "c", "b", "a"]
    assert scorer.models.keys() == ["b", "a"] and scorer.models.nbytes <= 2.5 * size


# --------------------------------------------------------------------------------------
# a 2-node cluster with 4 logical GPUs (a head that only schedules, like the shipped specs)


@pytest.fixture(scope="module")
def gpu_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    store = 100 * MiB
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "object_store_memory": store},
    )
    nodes = [cluster.add_node(num_cpus=4, num_gpus=2, object_store_memory=store) for _ in "ab"]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def recording_loop(record_dir: str, together: int, wait_s: float = 60.0):
    """The Ray Train worker body, recording which GPU of which node it held and when; it starts
    training only once ``together`` workers hold a GPU (or fails after ``wait_s``)."""

    def loop(config: dict) -> None:
        ctx = ray.get_runtime_context()
        rec = {
            "category": config["category"],
            "node": ctx.get_node_id(),
            "gpus": ctx.get_accelerator_ids()["GPU"],
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": torch.get_num_threads(),
            "start": time.time(),
        }
        Path(record_dir, f"{config['category']}.start").write_text(json.dumps(rec))
        deadline = time.monotonic() + wait_s
        while len(list(Path(record_dir).glob("*.start"))) < together:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {together} workers ever held a GPU at once")
            time.sleep(0.1)
        train_ray.worker_loop(config)
        rec.update(end=time.time(), threads=torch.get_num_threads())
        Path(record_dir, f"{config['category']}.json").write_text(json.dumps(rec))

    return loop


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = now = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def test_categories_train_at_once_on_all_four_gpus(gpu_cluster, tmp_path, monkeypatch):
    """Five categories, four logical GPUs: four train at once, one GPU each, never two on one
    GPU; the fifth waits in Ray's queue past Ray Train's placement timeout (set to 3 s here),
    then trains. Evaluation runs in the workers: the driver's evaluator is broken here."""
    import tfa_ray.evaluation

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")

    def no_driver_evaluation(*a, **k):
        raise AssertionError("the driver evaluated a model")

    monkeypatch.setattr(tfa_ray.evaluation, "evaluate_model", no_driver_evaluation)
    data = tmp_path / "data"
    make_dataset(
        str(data), categories=("texture",), n_train=8, n_test_good=2, n_test_defect=2, size=64
    )
    categories = [f"c{i}" for i in range(5)]
    for c in categories:
        shutil.copytree(data / "texture", data / c)
    record = tmp_path / "record"
    record.mkdir()
    settings = train_ray.RaySettings(
        use_gpu=True, device="cpu", cpus_per_worker=1.5, storage_path=str(tmp_path / "ckpt")
    )
    lines: list[str] = []
    outcomes = train_ray.train_categories(
        str(data),
        categories,
        "test-tiny",
        get_preset("test-tiny", train__epochs=1),
        settings,
        track=False,
        echo=lines.append,
        loop=recording_loop(str(record), together=4),
    )
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert "up to 5 at a time" in lines[0]
    for o in outcomes:  # measured by the worker, logged by the driver
        assert 0.0 <= o.metrics["image_auroc"] <= 1.0 and "pixel_auroc" in o.metrics
        assert any(ln.startswith(f"[{o.category}] test split: image_auroc") for ln in lines)
    recs = [json.loads((record / f"{c}.json").read_text()) for c in categories]
    assert all(len(r["gpus"]) == 1 and r["cuda_visible"] == r["gpus"][0] for r in recs)
    assert all(r["threads"] == 2 for r in recs)  # torch threads: the worker's 1.5 CPUs, rounded
    slots = {(r["node"], r["gpus"][0]) for r in recs}
    assert len(slots) == 4 and len({n for n, _ in slots}) == 2
    assert max_overlap([(r["start"], r["end"]) for r in recs]) == 4
    for slot in slots:  # no GPU held by two workers at overlapping times
        spans = sorted((r["start"], r["end"]) for r in recs if (r["node"], r["gpus"][0]) == slot)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


class RecordingScorer(scoring.ShardScorer):
    """A ShardScorer that notes its node, GPU ids, device and threads, and takes its time."""

    record_dir = ""
    delay_s = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ctx = ray.get_runtime_context()
        rec = {
            "node": ctx.get_node_id(),
            "gpus": ctx.get_accelerator_ids()["GPU"],
            "device": self.device,
            "threads": torch.get_num_threads(),
        }
        Path(self.record_dir, f"{os.getpid()}.json").write_text(json.dumps(rec))

    def __call__(self, batch):
        time.sleep(self.delay_s)
        return super().__call__(batch)


def _archive(root: Path, n: int) -> list[str]:
    """``n`` synthetic 64 px texture images under ``root/texture/``."""
    import numpy as np
    from PIL import Image

    from tfa_ray.synth import make_image

    d = root / "texture"
    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(make_image("texture", 64, np.random.default_rng(i))).save(d / f"{i}.png")
    return sorted(str(p) for p in d.iterdir())


def test_scorer_pool_one_gpu_per_actor_survives_a_node_removed(
    gpu_cluster, tiny_model_dir, tmp_path
):
    """A pool of four scorer actors with one logical GPU each: every actor holds its own GPU,
    two of them on a node that goes away once the first shard is written. Ray retries the lost
    work (on restarted actors or the survivors): every input is in the output exactly once
    after the same run, without a rerun."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster, nodes = gpu_cluster
    doomed = cluster.add_node(num_cpus=4, num_gpus=2, object_store_memory=100 * MiB)
    cluster.wait_for_nodes()

    @ray.remote(num_cpus=0, num_gpus=1)
    class Hold:
        def ready(self) -> bool:
            return True

    holds = [  # node a's GPUs are taken: the actors start on node b and the doomed node
        Hold.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[0].node_id, soft=False)
        ).remote()
        for _ in range(2)
    ]
    ray.get([h.ready.remote() for h in holds])

    paths = _archive(tmp_path / "in", 24)
    record = tmp_path / "record"
    record.mkdir()
    written = tmp_path / "written"
    scorer = type("Slow", (RecordingScorer,), {"record_dir": str(record), "delay_s": 0.5})

    def write_and_note(batch, **kw):
        out = scoring.write_shard(batch, **kw)
        Path(written).touch()
        return out

    cfg = scoring.ScoreConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        run_id="node-lost",
        shard_size=2,
        concurrency=4,
        num_gpus_per_actor=1,
        num_cpus_per_actor=1.5,  # 2 threads; a node's 4 CPUs keep one for decoding
        device="cpu",
    )
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    stages = scoring.Stages(scorer=scorer, write=write_and_note)
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = scoring.score(cfg, resolver, echo=lambda _m: None, stages=stages)
        except Exception as e:  # noqa: BLE001 - examined below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 90

    def started() -> bool:  # a shard written, and all four actors up
        return written.exists() and len(list(record.glob("*.json"))) >= 4

    while not started() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started(), result
    first = [json.loads(p.read_text()) for p in record.glob("*.json")]
    assert len(first) == 4
    assert all(len(r["gpus"]) == 1 and r["device"] == "cpu" for r in first)
    assert len({(r["node"], r["gpus"][0]) for r in first}) == 4  # each its own GPU
    assert {r["node"] for r in first} == {nodes[1].node_id, doomed.node_id}
    assert all(r["threads"] == 2 for r in first)  # torch threads = the actor's CPUs
    for h in holds:
        ray.kill(h)
    assert t.is_alive()  # the node goes away mid-run
    cluster.remove_node(doomed)
    t.join(timeout=120)
    assert not t.is_alive(), "scoring hung after the node was removed"
    assert "error" not in result, result.get("error")
    # Whether Ray restarts the lost actors (on node a, whose GPUs were freed) or the survivors
    # finish the work depends on timing; either way no input is lost or doubled:
    summary = result["summary"]
    assert summary.total == summary.ok == len(paths)
    out = scoring.read_results(summary.run_dir, columns=["path", "status"]).to_pylist()
    assert sorted(r["path"] for r in out) == sorted(paths)  # each exactly once
    assert all(r["status"] == "ok" for r in out)
