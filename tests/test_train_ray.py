"""Ray Train orchestration on a small local Ray cluster (2 CPUs), test-tiny preset, tiny data."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tfa_ray import registry, train_ray
from tfa_ray.calibration import Calibrations
from tfa_ray.config import get_preset, preset_to_json
from tfa_ray.synth import make_dataset


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "synth")
    make_dataset(root, n_train=10, n_test_good=3, n_test_defect=4, size=64)
    return root


def test_shard_batch():
    import torch

    from tfa_ray.training import shard_batch

    b = torch.arange(7)
    parts = [shard_batch(b, r, 2).tolist() for r in range(2)]
    assert parts == [[0, 2, 4, 6], [1, 3, 5]]
    assert [shard_batch(torch.tensor([5]), r, 2).tolist() for r in range(2)] == [[5], [5]]


def test_failure_injection_resumes_from_checkpoint(
    ray_cluster, tiny_root, tmp_path, failing_train_loop
):
    """Rank 0 exits after epoch 2 of 3; the restarted group resumes after epoch 2."""
    preset = get_preset("test-tiny", train__epochs=3)
    settings = train_ray.RaySettings(storage_path=str(tmp_path / "ckpt"), max_failures=1)
    pkg, summary, history = train_ray.train_one(
        tiny_root, "texture", preset_to_json(preset), settings, loop=failing_train_loop(2)
    )
    assert summary["resumed_from_epoch"] == 2  # not restarted from zero
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert sorted(os.listdir(pkg)) == sorted(
        [
            "weights.safetensors",
            "config.json",
            "template.png",
            "calibration.json",
            "meta.json",
            "selection.json",
        ]
    )
    # checkpoints: the last few only, none with a second copy of the net; the best weights once
    (run,) = (tmp_path / "ckpt").iterdir()
    states = sorted(run.glob("checkpoint_*/state.pt"))
    assert 1 <= len(states) <= train_ray.CHECKPOINTS_KEPT
    for f in states:
        state = torch.load(f, map_location="cpu", weights_only=True)
        assert "best_state" not in state and "optimizer" in state
    best = list((run / "best").iterdir())
    assert [p.name for p in best] == [f"epoch-{summary['best_epoch']:05d}.safetensors"]


def test_categories_concurrently_tracked_and_registered(
    ray_cluster, tiny_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bad = os.path.join(tiny_root, "empty")
    os.makedirs(os.path.join(bad, "train", "good"), exist_ok=True)
    preset = get_preset("test-tiny", train__epochs=1)
    settings = train_ray.RaySettings(storage_path=str(tmp_path / "ckpt"))
    outcomes = train_ray.train_categories(
        tiny_root,
        ["texture", "object", "empty", "missing"],
        "test-tiny",
        preset,
        settings,
        outputs={"texture": str(tmp_path / "out" / "texture")},
        promote_if_better="image_auroc",
    )
    by = {o.category: o for o in outcomes}
    assert by["texture"].ok and by["object"].ok, [o.error for o in outcomes]
    assert not by["empty"].ok and "no normal training images" in by["empty"].error
    assert not by["missing"].ok and "not found" in by["missing"].error
    assert "\n" not in by["empty"].error + by["missing"].error
    assert os.path.isfile(tmp_path / "out" / "texture" / "weights.safetensors")
    for cat in ("texture", "object"):
        o = by[cat]
        assert (o.name, o.version) == (f"tfa-{cat}", 1)
        assert set(o.metrics) >= {"image_auroc", "pixel_auroc", "aupro", "f1_max"}
        name, version, path = registry.resolve_model(cat)  # the gate made it champion
        assert (name, version) == (f"tfa-{cat}", 1)
        run = registry.client().get_run(registry.show_model(name)[0]["run"].split("/")[-1])
        assert run.data.params["preset"] == "test-tiny"
        assert run.data.params["data_uri"] == tiny_root
        assert {"train_loss", "val_loss", "wall_time_s", "image_auroc"} <= set(run.data.metrics)
    table = train_ray.summary_table(outcomes)
    assert "FAILED" in table and "tfa-texture v1" in table


def test_ddp_two_workers_match_one_worker(ray_cluster, tmp_path):
    """Two DDP workers train the same model as one worker, up to float summation order.

    Random token masking is off (mask_ratio 0): each worker draws masks for its own shard, so
    with masking the runs legitimately differ. Without it a step is deterministic, and the data
    makes DDP exact: 9 normal images, 1 held out, batch size 4, so every step is a global batch
    of 4 split 2 + 2. DDP averages equal-sized shard means, which is the 1-worker batch mean:
    gradients, AdamW steps, weights, losses and calibration agree to round-off (measured: under
    1e-7 on weights and relative on losses). The logged train_loss is the mean over the workers
    (each worker's own is its shard's only: 18.64 vs 18.53 here before train_ray averaged it).

    Tolerances: 1e-5 absolute on weights, a hundredth of one AdamW step (about lr = 1e-3 per
    weight; a wrong gradient, e.g. one worker's shard alone, moves weights by about that step);
    1e-5 relative on losses and the threshold. The attention key bias is
    left out: softmax ignores a constant added to every key, so its gradient is exactly zero and
    AdamW's normalised step on the round-off left in it is arbitrary (seen: up to 3e-5).
    """
    from safetensors.torch import load_file

    root = str(tmp_path / "data")
    make_dataset(root, categories=("texture",), n_train=9, n_test_good=1, n_test_defect=1, size=64)
    preset = get_preset(
        "test-tiny",
        train__epochs=2,
        train__batch_size=4,
        model__mask_ratio=0.0,
        train__calib_fraction=0.0,  # one held-out image: batches of 4 split 2 + 2
    )
    runs = []
    for workers in (1, 2):
        settings = train_ray.RaySettings(
            num_workers=workers, storage_path=str(tmp_path / f"ckpt{workers}"), max_failures=0
        )
        pkg, summary, history = train_ray.train_one(
            root, "texture", preset_to_json(preset), settings
        )
        with open(os.path.join(pkg, "calibration.json")) as f:
            threshold = Calibrations.from_json(f.read()).at("fp32").threshold
        weights = load_file(os.path.join(pkg, "weights.safetensors"))
        shutil.rmtree(os.path.dirname(pkg), ignore_errors=True)  # train_one's temporary dir
        runs.append((weights, summary, history, threshold))

    (w1, s1, h1, t1), (w2, s2, h2, t2) = runs
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["num_train"] == s2["num_train"] == 8
    assert [h["epoch"] for h in h1] == [h["epoch"] for h in h2] == [1, 2]
    for a, b in zip(h1, h2, strict=True):
        for key in ("train_loss", "val_loss", "selection"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a[key], b[key])
    assert t2 == pytest.approx(t1, rel=1e-5)
    assert w1.keys() == w2.keys()
    diffs = {}
    for k in w1:
        a, b = w1[k].float(), w2[k].float()
        if k.endswith("attn.qkv.bias"):  # [query | key | value]: drop the key part
            d = a.numel() // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        diffs[k] = (a - b).abs().max().item()
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
