"""A finished training is never lost to a registry outage: with the MLflow server killed
during training, the package is kept beside the checkpoints, the job ends with one line that
names it and the command that registers it; ``tfa-ray register`` registers it (metrics and
history included) once the server is back, and a rerun of the job registers its kept package
instead of training again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from test_services import STARTUP_S, _clean_env, _free_port, _script, _stop, _wait_http

from tfa_ray import train_ray
from tfa_ray.cli import main
from tfa_ray.config import get_preset
from tfa_ray.synth import make_dataset


class Server:
    """``mlflow server`` on 127.0.0.1 (sqlite + local artifacts) that can be killed and
    started again on the same port and stores."""

    def __init__(self, workdir: Path):
        self.workdir, self.port = workdir, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            *_script("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.workdir}/mlflow.db",
            "--serve-artifacts", "--artifacts-destination", str(self.workdir / "artifacts"),
        ]  # fmt: skip
        log_path = str(self.workdir / "server.log")
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                cmd, env=_clean_env(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        _wait_http(f"{self.url}/health", self.proc, log_path, STARTUP_S)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # no goodbye: the registry is just gone
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, marker=str(self.workdir))


def killing_loop(marker: str):
    """The worker loop, which first says training has started (the test then kills MLflow)."""

    def loop(config: dict) -> None:
        Path(marker).touch()
        train_ray.worker_loop(config)

    return loop


def never_train(config: dict) -> None:
    raise RuntimeError("the rerun trained again instead of registering the kept package")


@pytest.mark.services  # an `mlflow server` process, killed and started again
def test_mlflow_killed_during_training(ray_cluster, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "server"
    workdir.mkdir()
    server = Server(workdir)
    server.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not 4.5 min
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(tmp_path / "cache"))
        monkeypatch.chdir(tmp_path)
        data = str(tmp_path / "data")
        make_dataset(data, n_train=8, n_test_good=2, n_test_defect=2, size=64)
        preset = get_preset("test-tiny", train__epochs=1)
        settings = train_ray.RaySettings(storage_path=str(tmp_path / "ckpt"))
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers: no tests/
        marker = tmp_path / "training-started"
        killer = threading.Thread(
            target=lambda: (_wait_for(marker), server.kill()), name="kill-mlflow"
        )
        killer.start()
        lines: list[str] = []
        outcomes = train_ray.train_categories(
            data, ["texture", "object"], "test-tiny", preset, settings,
            max_concurrent=1, echo=lines.append, loop=killing_loop(str(marker)),
        )  # fmt: skip
        killer.join(60)
        kept = {}
        for o in outcomes:
            assert not o.ok and "\n" not in o.error, o.error
            assert o.error.startswith("registration failed (") and "kept at" in o.error
            pkg = o.error.split("kept at ", 1)[1].split(":", 1)[0]
            assert os.path.isfile(os.path.join(pkg, "weights.safetensors")), pkg
            assert pkg.startswith(str(tmp_path / "ckpt" / "packages"))
            command = f"tfa-ray register --package {pkg} --category {o.category}"
            assert f"register it with `{command}`" in o.error
            kept[o.category] = pkg
        assert sum(f"[{c}] error: registration failed" in ln for ln in lines for c in kept) == 2

        server.start()  # the registry is back
        assert main(["register", "--package", kept["texture"], "--category", "texture"]) == 0
        client = MlflowClient(server.url)
        (found,) = client.search_model_versions("name='tfa-texture'")
        mv = client.get_model_version("tfa-texture", found.version)
        run = client.get_run(mv.run_id)
        assert "image_auroc" in run.data.metrics and "train_loss" in run.data.metrics
        assert "candidate" in mv.aliases

        lines.clear()
        (again,) = train_ray.train_categories(
            data, ["object"], "test-tiny", preset, settings, echo=lines.append, loop=never_train
        )
        assert again.ok, again.error  # registered, not retrained
        assert any("found this job's trained package" in ln for ln in lines), lines
        (mv,) = client.search_model_versions("name='tfa-object'")
        assert int(mv.version) == again.version == 1
        assert "image_auroc" in client.get_run(mv.run_id).data.metrics
    finally:
        server.stop()


def _wait_for(path: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
