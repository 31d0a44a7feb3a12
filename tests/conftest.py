"""Shared pytest fixtures: real local services the tests talk to."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL.

    Tests set dummy credentials and ``AWS_ENDPOINT_URL`` themselves (monkeypatch) and use a
    fresh bucket name each, so they never see each other's objects.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One small local Ray cluster (2 CPUs) for the whole session; yields its GCS address.

    Started with dummy AWS credentials in the environment (only if none are set) so that Ray
    workers, which inherit the environment at start, can talk to the moto S3 server.
    Subprocess drivers join it with ``RAY_ADDRESS=<address>``.
    """
    import os

    import ray

    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A test-tiny model package trained on synthetic 'texture' images (a few seconds)."""
    from tfa_ray.config import get_preset
    from tfa_ray.data import discover
    from tfa_ray.package import save_model
    from tfa_ray.synth import make_dataset
    from tfa_ray.training import fit

    root = tmp_path_factory.mktemp("tiny-model")
    data = root / "data"
    make_dataset(
        str(data), categories=("texture",), n_train=12, n_test_good=1, n_test_defect=1, size=64
    )
    result = fit(
        discover(str(data), "texture"),
        get_preset("test-tiny"),
        device="cpu",
        echo=lambda _msg: None,
    )
    out = str(root / "model")
    save_model(
        out,
        result.detector,
        result.preset,
        result.calibration,
        {"category": "texture", "version": 3},
    )
    return out
