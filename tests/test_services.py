"""End to end against real services on 127.0.0.1: an ``mlflow server`` process with its artifacts
in moto's S3, and a ``ray start --head`` cluster that trains through the Ray Jobs API.

Every process a test starts runs in its own session (process group) and is stopped in the
fixture's teardown: the group gets SIGTERM, then SIGKILL, and any process still naming the
test's private directory on its command line is killed too. Nothing here uses ``ray stop``:
it would stop every Ray cluster on the machine, including the ``ray.init()`` clusters of other
tests. Both tests are marked ``services``; they run by default (``-m "not services"`` skips).
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tfa_ray.synth import make_dataset

pytestmark = pytest.mark.services

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # console scripts of this interpreter (mlflow, ray, ...)
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
STARTUP_S = 120.0  # a server / cluster must answer within this (2 busy shared cores)
TRAIN_S = 200.0  # two test-tiny categories, one epoch each, including a fresh Ray cluster


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(name: str) -> list[str]:
    """The console script ``name`` of this interpreter (not whatever a PATH shim picks)."""
    path = os.path.join(BIN, name)
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-m", {"tfa-ray": "tfa_ray.cli"}.get(name, name)]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points at other services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _pids_naming(text: str) -> list[int]:
    """Processes (not this one) whose command line contains ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def _stop(proc: subprocess.Popen, marker: str, grace_s: float = 30.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started:
    SIGTERM to the leader (so it can shut its children down), then SIGKILL to its process
    group and to any process whose command line names ``marker`` (a per-test directory)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader: stragglers
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)
    deadline = time.monotonic() + 10
    while (left := _pids_naming(marker)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)


def _wait_http(url: str, proc: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - 127.0.0.1
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f}s:\n{_tail(log_path)}")


def _tiny_data(root: str) -> str:
    make_dataset(root, n_train=8, n_test_good=1, n_test_defect=2, size=64)
    return root


def _run(cmd: list[str], env: dict, cwd: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout its whole group is killed."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc, marker=cwd, grace_s=5)
        out, _ = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} ran past {timeout_s:.0f}s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


# --------------------------------------------------------------------------------------
# a real MLflow tracking server, artifacts proxied to moto's S3


@dataclass
class MlflowServer:
    url: str
    bucket: str
    s3_endpoint: str
    workdir: str


def _s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=DUMMY_AWS["AWS_DEFAULT_REGION"],
        aws_access_key_id=DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def mlflow_server(s3_server, tmp_path) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1: sqlite backend store, ``--artifacts-destination`` in a
    fresh moto bucket (clients upload and download through the server's artifact proxy)."""
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    _s3_client(s3_server).create_bucket(Bucket=bucket)
    workdir = tmp_path / "server"
    workdir.mkdir()
    port = _free_port()
    env = _clean_env(MLFLOW_S3_ENDPOINT_URL=s3_server, AWS_ENDPOINT_URL=s3_server, **DUMMY_AWS)
    cmd = [
        *_script("mlflow"),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination", f"s3://{bucket}/mlartifacts",
    ]  # fmt: skip
    log_path = str(workdir / "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc, log_path, STARTUP_S)
        yield MlflowServer(url, bucket, s3_server, str(workdir))
    finally:
        _stop(proc, marker=str(workdir))


LOAD_CHAMPION = r"""
import json, os, sys

import mlflow
import pandas as pd
import torch

from tfa_ray import registry
from tfa_ray.data import decode_image, image_to_tensor
from tfa_ray.package import load_model

image, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
pyfunc = mlflow.pyfunc.load_model("models:/tfa-texture@champion", dst_path=dst)
out = pyfunc.predict(pd.DataFrame({"image": [image]}))
name, version, pkg = registry.resolve_model("texture")
model = load_model(pkg)
with open(image, "rb") as f:
    x = image_to_tensor(decode_image(f.read()), model.image_size)
with torch.no_grad():
    _, scores = model.predict(x[None])
print("RESULT " + json.dumps({
    "status": out["status"].tolist(),
    "pyfunc_score": float(out["score"][0]),
    "threshold": float(out["threshold"][0]),
    "mask_png": bytes(out["mask"][0][:8]).hex(),
    "name": name,
    "version": version,
    "fast_score": float(scores[0]),
}))
"""


def test_mlflow_server_with_s3_artifacts(mlflow_server, tmp_path):
    """Train two categories through a real tracking server, promote one, and load the champion
    back in a fresh process: through ``mlflow.pyfunc`` and through tfa-ray's resolver."""
    srv = mlflow_server
    data = _tiny_data(str(tmp_path / "data"))
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    # The client gets no S3 endpoint or credentials: artifacts can only travel via the server.
    env = _clean_env(
        MLFLOW_TRACKING_URI=srv.url,
        TFA_RAY_MODEL_CACHE=str(client_dir / "cache"),
    )
    tfa = _script("tfa-ray")
    train = _run(
        [
            *tfa, "train", "--data", data, "--categories", "all",
            "--preset", "test-tiny", "--epochs", "1",
            "--storage-path", str(client_dir / "ckpt"),
        ],
        env, str(client_dir), TRAIN_S,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-6000:]
    assert "2 of 2 categories trained" in train.stdout, train.stdout[-6000:]
    for cat in ("texture", "object"):
        assert f"tfa-{cat} v1" in train.stdout, train.stdout[-6000:]

    promote = _run([*tfa, "promote", "texture"], env, str(client_dir), 60)
    assert promote.returncode == 0, promote.stdout
    assert "tfa-texture@champion -> version 1" in promote.stdout

    # the artifacts are in the bucket, and nowhere on local disk
    s3 = _s3_client(srv.s3_endpoint)
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=srv.bucket, Prefix="mlartifacts/"
        )
        for obj in page.get("Contents", [])
    ]
    weights = [k for k in keys if k.endswith("/package/weights.safetensors")]
    assert len(weights) == 2, keys
    assert sum(k.endswith("/MLmodel") for k in keys) >= 2, keys
    for where in (client_dir, srv.workdir):
        assert not glob.glob(os.path.join(where, "ml*s", "**", "*.safetensors"), recursive=True)

    image = sorted(glob.glob(os.path.join(data, "texture", "test", "*", "*.png")))[-1]
    load = _run(
        [sys.executable, "-c", LOAD_CHAMPION, image, str(client_dir / "pyfunc")],
        env, str(client_dir), 120,
    )  # fmt: skip
    assert load.returncode == 0, load.stdout[-6000:]
    line = next(ln for ln in load.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    assert res["status"] == ["ok"]
    assert (res["name"], res["version"]) == ("tfa-texture", 1)
    assert res["mask_png"] == b"\x89PNG\r\n\x1a\n".hex()
    assert res["pyfunc_score"] == pytest.approx(res["fast_score"], rel=1e-5, abs=1e-7)
    assert res["threshold"] > 0


# --------------------------------------------------------------------------------------
# a `ray start --head` cluster and the Ray Jobs API


@dataclass
class RayHead:
    dashboard: str
    temp_dir: str


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """``ray start --head --block`` with its own temp dir and ports, 2 CPUs, dashboard on
    127.0.0.1. Stopped by SIGTERM to the blocking ``ray start`` process (which shuts its node
    down), never by ``ray stop``."""
    # short: Ray's unix sockets live under the temp dir and paths are limited to ~107 bytes
    temp_dir = tempfile.mkdtemp(prefix="tfa-rh-", dir="/tmp")
    dash = _free_port()
    cmd = [
        *_script("ray"),
        "start", "--head", "--block",
        f"--port={_free_port()}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2", "--num-gpus=0",
        "--object-store-memory=200000000",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    env = _clean_env(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the node at once
        # Ray rewrites --node-ip-address=127.0.0.1 to the machine's address unless it runs as
        # a single-node (loopback) cluster, which this switch selects.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Loopback only, so no token: the Jobs client here then needs no credentials (Ray
        # enables token auth by default and reads the token from the user's home otherwise).
        RAY_AUTH_MODE="disabled",
    )
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=temp_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_http(f"{url}/api/version", proc, log_path, STARTUP_S)
        yield RayHead(url, temp_dir)
    finally:
        _stop(proc, marker=temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_trains_and_registers(ray_head, tmp_path):
    """``jobs/train.py`` submitted through the Jobs API with the repository as working_dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tfa_ray import registry

    data = _tiny_data(str(tmp_path / "data"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    entrypoint = shlex.join(
        [
            sys.executable, "jobs/train.py", "--data", data, "--categories", "all",
            "--preset", "test-tiny", "--epochs", "1", "--storage-path", str(tmp_path / "ckpt"),
        ]
    )  # fmt: skip
    runtime_env = {
        "working_dir": REPO,
        "excludes": [".git", "**/__pycache__", "*.db", "mlruns", "runs", "demo", "*.egg-info"],
        "env_vars": {
            "MLFLOW_TRACKING_URI": uri,
            "TFA_RAY_MODEL_CACHE": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1",
        },
    }
    deadline = time.monotonic() + STARTUP_S
    while True:  # the job agent may come up a little after the dashboard
        try:
            client = JobSubmissionClient(ray_head.dashboard)
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except (RuntimeError, ConnectionError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"job submission failed: {e}") from e
            time.sleep(1.0)

    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + TRAIN_S
    status = client.get_job_status(job_id)
    while status not in terminal and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if status not in terminal:
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-6000:]}"
    # lines the job's driver prints itself (workers' lines reach the job log asynchronously)
    for cat in ("texture", "object"):
        assert f"[{cat}] test split:" in logs, logs[-6000:]
        assert f"tfa-{cat} v1" in logs, logs[-6000:]
    assert "2 of 2 categories trained" in logs, logs[-6000:]

    rows = {r["name"]: r for r in registry.list_models(uri=uri)}
    assert set(rows) == {"tfa-texture", "tfa-object"}, rows
    for row in rows.values():
        assert str(row["latest"]) == "1" and str(row["candidate"]) == "1", row
