"""Ray Train with data and checkpoints in S3 (moto's server on 127.0.0.1), through a failure."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from tfa_ray import storage, train_ray
from tfa_ray.config import get_preset, preset_to_json
from tfa_ray.synth import make_dataset


def _upload(local_root: str, url: str) -> int:
    count = 0
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local_root)
            with open(os.path.join(dirpath, name), "rb") as f:
                storage.write_bytes(storage.join(url, *rel.split(os.sep)), f.read())
            count += 1
    return count


def test_s3_data_and_checkpoints_survive_a_worker_failure(
    ray_cluster, s3_env, tmp_path, failing_train_loop
):
    """Data read from s3://, a checkpoint per epoch written to s3://; rank 0 dies after epoch 2
    and the restarted group resumes from the checkpoint it reads back from S3."""
    bucket = f"tfa-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.get_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    local = str(tmp_path / "synth")
    make_dataset(
        local, categories=("texture",), n_train=10, n_test_good=1, n_test_defect=1, size=64
    )
    assert _upload(local, f"s3://{bucket}/data") > 10

    preset = get_preset("test-tiny", train__epochs=3)
    settings = train_ray.RaySettings(storage_path=f"s3://{bucket}/checkpoints", max_failures=1)
    pkg, summary, history = train_ray.train_one(
        f"s3://{bucket}/data",
        "texture",
        preset_to_json(preset),
        settings,
        run_name="s3run",
        loop=failing_train_loop(2),
    )
    shutil.rmtree(os.path.dirname(pkg), ignore_errors=True)

    assert summary["resumed_from_epoch"] == 2
    assert [h["epoch"] for h in history] == [1, 2, 3]
    states = [p for p in fs.find(f"{bucket}/checkpoints/s3run") if p.endswith("/state.pt")]
    assert states, "no epoch checkpoint was written to S3"
    packages = [
        p for p in fs.find(f"{bucket}/checkpoints/s3run") if p.endswith("weights.safetensors")
    ]
    assert len(packages) == 1  # the final report's model package


def test_missing_checkpoint_bucket_is_one_clear_error(s3_env):
    settings = train_ray.RaySettings(storage_path=f"s3://no-such-{uuid.uuid4().hex[:8]}/ckpt")
    with pytest.raises(FileNotFoundError, match="checkpoint bucket not found"):
        train_ray._storage(settings)
