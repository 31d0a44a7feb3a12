"""Ray Train workers: rank 0 alone prepares and validates, and every rank stops at the same
epoch (two gloo workers on CPUs); and one worker with ``use_gpu`` on a logical GPU, with the
simulated CUDA device active inside the worker process (tests/simcuda.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tfa_ray import train_ray
from tfa_ray.config import get_preset, preset_to_json
from tfa_ray.synth import make_dataset

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def tiny_root(tmp_path) -> str:
    root = str(tmp_path / "data")
    make_dataset(root, categories=("texture",), n_train=10, n_test_good=1, n_test_defect=2, size=64)
    return root


def spying_loop(out_dir: str, flat_rank0: bool = True):
    """The worker body, recording per rank how often it prepared and validated, the epochs it
    reported and the device it trained on. Validation is faked: flat on rank 0 (patience
    stops it), improving on any other rank (a rank deciding alone would go on)."""

    def loop(config: dict) -> None:
        import os

        import ray.train

        import tfa_ray.training as tr
        from tfa_ray.train_ray import worker_loop

        if os.environ.get("TFA_SIM_CUDA") == "1":  # this thread converts to the simulator
            import simcuda

            simcuda.activate_from_env()
        rank = ray.train.get_context().get_world_rank()
        seen = {"prepare": 0, "validate": 0, "epochs": [], "device": None}
        prepare, fit, report = tr.prepare, tr.fit, ray.train.report

        def counting_prepare(*args, **kwargs):
            seen["prepare"] += 1
            return prepare(*args, **kwargs)

        def fake_validate(*args, **kwargs):
            seen["validate"] += 1
            score = 0.5 if rank == 0 else 0.5 + seen["validate"]
            return score, {"val_image_auroc": score, "val_aupro": 0.5, "score_kind": "std"}, 1.0

        def recording_fit(*args, **kwargs):
            seen["device"] = str(kwargs.get("device"))
            return fit(*args, **kwargs)

        def recording_report(metrics, checkpoint=None, **kw):
            if "epoch" in metrics:
                seen["epochs"].append(int(metrics["epoch"]))
            return report(metrics, checkpoint=checkpoint, **kw)

        tr.prepare, tr.fit, ray.train.report = counting_prepare, recording_fit, recording_report
        if flat_rank0:
            tr.validate = fake_validate
        worker_loop(config)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)

    return loop


def test_two_workers_prepare_once_and_stop_together(tmp_path, tiny_root):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        preset = get_preset("test-tiny", train__epochs=8, train__patience=2, train__batch_size=4)
        settings = train_ray.RaySettings(
            num_workers=2, storage_path=str(tmp_path / "ckpt"), max_failures=0
        )
        pkg, summary, history = train_ray.train_one(
            tiny_root, "texture", preset_to_json(preset), settings, loop=spying_loop(str(tmp_path))
        )
    finally:
        ray.shutdown()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["prepare"] for r in ranks] == [1, 0]  # rank 1 received rank 0's features
    assert [r["validate"] for r in ranks] == [3, 0]
    # flat after epoch 1, patience 2: both stop after epoch 3 (rank 1 alone would go on)
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == [1, 2, 3]
    assert [h["epoch"] for h in history] == [1, 2, 3] and summary["world_size"] == 2
    assert os.path.isfile(os.path.join(pkg, "calibration.json"))


def test_one_gpu_worker_on_the_simulated_device(tmp_path, tiny_root):
    """``use_gpu`` on a logical GPU: the worker trains, selects, calibrates and evaluates on
    "cuda" (the simulator active in every worker process from its start); gloo, as NCCL needs
    a driver."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"TFA_SIM_CUDA": "1", "PYTHONPATH": path},
            "worker_process_setup_hook": "simcuda.activate_from_env",
        },
    )
    try:
        preset = get_preset(
            "test-tiny",
            train__epochs=2,
            model__num_templates=2,
            model__gaussian_size=4,
            model__gaussian_channels=8,
            model__residual_gaussian=True,
            model__knn_memory=16,
            train__try_statistics=("gaussian", "residual"),
        )
        settings = train_ray.RaySettings(
            num_workers=1,
            use_gpu=True,
            backend="gloo",
            storage_path=str(tmp_path / "ckpt"),
            max_failures=0,
        )
        pkg, summary, _ = train_ray.train_one(
            tiny_root,
            "texture",
            preset_to_json(preset),
            settings,
            loop=spying_loop(str(tmp_path), flat_rank0=False),
        )
    finally:
        ray.shutdown()
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["device"].startswith("cuda") and seen["epochs"] == [1, 2]
    assert 0.0 <= summary["test_metrics"]["image_auroc"] <= 1.0
    assert os.path.isfile(os.path.join(pkg, "weights.safetensors"))
