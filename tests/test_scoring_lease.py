"""One run at a time per run id: the lease is created atomically (O_EXCL locally, a
conditional PUT on moto's S3), a second run refuses with one line or waits with ``--wait``,
a stale lease is taken over, and two runs with one run id still score every input once."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import ray
from PIL import Image

from tfa_ray import errors, scoring, storage
from tfa_ray.cli import main
from tfa_ray.scoring.lease import LEASE_FILE, RunInProgress, hold
from tfa_ray.synth import make_image


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image("texture", 64, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def _lease_rules(run_dir: str, endpoint: str | None = None) -> None:
    run = storage.resolve(run_dir, endpoint)
    first = hold(run, "night", ttl_s=30)
    try:
        with pytest.raises(RunInProgress, match=r"in progress on .* \(pid \d+, lease until"):
            hold(run, "night", ttl_s=30)
        threading.Timer(1.0, first.release).start()
        t0 = time.monotonic()
        second = hold(run, "night", wait=True, ttl_s=30, poll_s=0.2)
        assert time.monotonic() - t0 >= 0.9  # it waited for the first to end
        second.release()
    finally:
        first.release()
    assert not storage.exists(storage.join(run_dir, LEASE_FILE), endpoint)
    # a lease whose run died: past its expiry, taken over
    stale = {"run_id": "night", "host": "gone", "pid": 1, "token": "x", "expires": time.time() - 5}
    storage.write_bytes(storage.join(run_dir, LEASE_FILE), json.dumps(stale).encode(), endpoint)
    with hold(run, "night", ttl_s=30) as taken:
        held = json.loads(storage.read_bytes(storage.join(run_dir, LEASE_FILE), endpoint))
        assert held["token"] == taken.token and held["pid"] == os.getpid()
        assert held["expires"] > time.time()


def test_local_lease(tmp_path):
    _lease_rules(str(tmp_path / "run_id=night"))


def test_s3_lease(s3_env):
    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    storage.get_fs(f"s3://{bucket}")[0].mkdir(bucket)
    _lease_rules(f"s3://{bucket}/out/run_id=night", s3_env)


def test_lease_of_a_killed_process_on_this_host_is_stale(tmp_path):
    import socket
    import subprocess

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lease = {
        "run_id": "r",
        "host": socket.gethostname(),
        "pid": int(dead.stdout),
        "token": "x",
        "expires": time.time() + 600,
    }
    (tmp_path / LEASE_FILE).write_text(json.dumps(lease))
    with hold(
        storage.resolve(str(tmp_path)), "r"
    ) as taken:  # before its expiry: its process is gone
        assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == taken.token
    alive = dict(lease, pid=os.getppid())  # a live process on this host: respected
    (tmp_path / LEASE_FILE).write_text(json.dumps(alive))
    with pytest.raises(RunInProgress):
        hold(storage.resolve(str(tmp_path)), "r")


def test_lease_is_renewed(tmp_path):
    with hold(storage.resolve(str(tmp_path)), "r", ttl_s=0.8) as lease:
        time.sleep(1.5)  # longer than the TTL: renewed meanwhile, so not stale
        with pytest.raises(RunInProgress):
            hold(storage.resolve(str(tmp_path)), "r", ttl_s=0.8)
        assert lease.token in (tmp_path / LEASE_FILE).read_text()


def slow_write(batch, **kw):
    time.sleep(0.7)  # a slow object store: the second run starts while the first writes
    return scoring.write_shard(batch, **kw)


def test_two_runs_with_one_run_id(ray_cluster, tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "in" / "texture"
    root.mkdir(parents=True)
    paths = []
    for i in range(12):
        (root / f"{i}.png").write_bytes(_png(i))
        paths.append(str(root / f"{i}.png"))
    out = tmp_path / "out"
    cfg = scoring.ScoreConfig(
        input=str(tmp_path / "in"), output=str(out), run_id="twice", shard_size=2
    )
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    result: dict = {}

    def first() -> None:
        stages = scoring.Stages(write=slow_write)
        result["summary"] = scoring.score(cfg, resolver, echo=lambda _m: None, stages=stages)

    t = threading.Thread(target=first)
    t.start()
    lease = out / "run_id=twice" / LEASE_FILE
    deadline = time.monotonic() + 60
    while not lease.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.exists() and t.is_alive()
    args = [
        "score", "--input", str(tmp_path / "in"), "--output", str(out), "--run-id", "twice",
        "--shard-size", "2", "--model", f"texture={tiny_model_dir}",
    ]  # fmt: skip
    capsys.readouterr()
    assert main(args) == errors.EXIT_FAILED  # refused while the first runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'twice' is in progress on" in err[0] and "--wait" in err[0], err
    assert main([*args, "--wait"]) == errors.EXIT_OK  # waits, then finds it all done
    assert "already done" in capsys.readouterr().out
    t.join(timeout=120)
    assert result["summary"].total == 12 and result["summary"].ok == 12
    got = scoring.read_results(str(out / "run_id=twice"), columns=["path"]).column("path")
    assert sorted(got.to_pylist()) == sorted(paths)  # exactly once
    assert not lease.exists()
