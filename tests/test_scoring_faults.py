"""Transient faults never become permanent results: S3 throttling behind a proxy, and an MLflow
registry that is unreachable when a night's run is planned. The run plus at most one rerun with
the same run id ends with every valid image ``ok``, exactly once; undecodable files stay final
error rows."""

from __future__ import annotations

import io
import random
import threading
import uuid

import numpy as np
import pytest
from PIL import Image
from test_services import mlflow_server  # noqa: F401 - the fixture, shared

from tfa_ray import scoring, storage
from tfa_ray.retry import RetryPolicy
from tfa_ray.synth import make_image


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image("texture", 64, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def _rows(run_dir: str) -> dict[str, dict]:
    cols = ["path", "status", "error", "error_kind", "model_version"]
    rows = scoring.read_results(run_dir, columns=cols).to_pylist()  # straight from moto
    out = {r["path"]: r for r in rows}
    assert len(out) == len(rows), "a path appears twice"
    return out


def test_s3_throttling_and_a_read_that_outlasts_the_retries(
    ray_cluster, tiny_model_dir, s3_env, fault_proxy
):
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    storage.get_fs(f"s3://{bucket}")[0].mkdir(bucket)
    base = f"s3://{bucket}/day/texture"
    good = [f"{base}/img{i:03d}.png" for i in range(10)]
    for i, url in enumerate(good):
        storage.write_bytes(url, _png(i))
    broken = f"{base}/text.png"
    storage.write_bytes(broken, b"not an image")

    proxy = fault_proxy(s3_env)
    rng, lock = random.Random(0), threading.Lock()
    stuck = f"/{bucket}/day/texture/img003.png"
    outage = [True]  # during the first run, one object answers SlowDown to every GET

    def fail(method: str, path: str) -> str | None:
        if outage[0] and method == "GET" and path.split("?")[0] == stuck:
            return "slowdown"
        with lock:
            return "slowdown" if rng.random() < 0.3 else None

    proxy.fail = fail
    cfg = scoring.ScoreConfig(
        input=f"s3://{bucket}/day",
        output=f"s3://{bucket}/scores",
        run_id="flaky",
        shard_size=4,
        endpoint_url=proxy.url,
    )
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    first = scoring.score(cfg, resolver, echo=lambda _m: None)
    assert proxy.counts["slowdown"] > 20 and proxy.counts["forwarded"] > 20
    rows = _rows(first.run_dir)
    assert sorted(rows) == sorted([*good, broken])
    assert rows[f"s3:/{stuck}"]["error_kind"] == "transient"
    assert "cannot read" in rows[f"s3:/{stuck}"]["error"]
    assert rows[broken]["error_kind"] == "permanent"
    assert first.transient >= 1 and first.ok <= len(good) - 1

    outage[0] = False  # S3 still throttles 30 % of requests; the stuck object is back
    second = scoring.score(cfg, resolver, echo=lambda _m: None)
    assert 0 < second.shards_skipped < second.shards  # only shards with transient rows again
    rows = _rows(second.run_dir)
    assert sorted(rows) == sorted([*good, broken])  # every input exactly once
    assert all(rows[u]["status"] == "ok" for u in good)
    assert rows[broken]["status"] == "error" and rows[broken]["error_kind"] == "permanent"
    assert (second.ok, second.error, second.transient) == (len(good), 1, 0)
    markers = storage.list_files(f"s3://{bucket}/scores", (".json",), endpoint_url=s3_env)
    assert [m for m in markers if "/_retry/" in m] == []  # no shard left to retry


@pytest.mark.services  # an `mlflow server` process
def test_registry_unreachable_while_planning_then_back(
    ray_cluster,
    tiny_model_dir,
    mlflow_server,  # noqa: F811 - the imported fixture
    fault_proxy,
    tmp_path,
    monkeypatch,
):
    from tfa_ray import registry, tracking

    proxy = fault_proxy(mlflow_server.url)
    monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries, not MLflow's 7
    mv = tracking.log_training(
        tiny_model_dir, "texture", params={"preset": "test-tiny"}, history=[], uri=proxy.url
    )
    registry.promote("texture", mv.version, uri=proxy.url)
    root = tmp_path / "in" / "texture"
    root.mkdir(parents=True)
    paths = []
    for i in range(5):
        (root / f"{i}.png").write_bytes(_png(i))
        paths.append(str(root / f"{i}.png"))
    (root / "bad.png").write_bytes(b"junk")

    proxy.fail = lambda method, path: "unavailable"  # the registry is down at 2 a.m.
    cfg = scoring.ScoreConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), run_id="night", shard_size=2
    )
    resolver = scoring.RegistryResolver(proxy.url, retry=RetryPolicy(attempts=2, base_s=0.05))
    first = scoring.score(cfg, resolver, echo=lambda _m: None)
    assert proxy.counts["unavailable"] >= 2  # looked up, and retried
    assert "transient" in first.models["texture"] and first.models["texture"]["transient"]
    rows = _rows(first.run_dir)
    assert len(rows) == 6 and all(r["status"] == "error" for r in rows.values())
    assert all(r["error_kind"] == "transient" for r in rows.values())

    proxy.fail = lambda method, path: None  # back
    second = scoring.score(cfg, resolver, echo=lambda _m: None)
    assert second.models["texture"]["version"] == mv.version
    rows = _rows(second.run_dir)
    assert sorted(rows) == sorted([*paths, str(root / "bad.png")])  # exactly once
    assert all(rows[p]["status"] == "ok" and rows[p]["model_version"] == mv.version for p in paths)
    assert rows[str(root / "bad.png")]["error_kind"] == "permanent"
    assert (second.ok, second.error, second.transient) == (5, 1, 0)
