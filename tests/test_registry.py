"""MLflow registry: package logging, pyfunc from code, aliases, resolve_model, look-ups.

Runs against a throw-away sqlite tracking store; packages are built from an untrained tiny
detector (random backbone weights), so no test here trains anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tfa_ray import registry
from tfa_ray.calibration import Calibration
from tfa_ray.config import get_preset
from tfa_ray.model import Detector
from tfa_ray.package import load_model, save_model
from tfa_ray.tracking import RegisteredVersion, log_training


def tiny_package(path: str, seed: int = 0, threshold: float = 0.5) -> str:
    preset = get_preset("test-tiny")
    backbone = dataclasses.replace(preset.model.backbone, weights="random")
    preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, backbone=backbone))
    torch.manual_seed(seed)
    size = preset.model.image_size
    detector = Detector(preset.model, torch.rand(3, size, size)).eval()
    cal = Calibration(
        threshold=threshold,
        target_fpr=0.01,
        score_mean=0.1,
        score_std=0.05,
        num_images=4,
        map_low=0.0,
        map_high=1.0,
        pixel_threshold=0.5,
    )
    return save_model(path, detector, preset, cal, {"category": "x"})


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds)."""
    tmp = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("TFA_RAY_MODEL_CACHE", str(tmp / "cache"))
        mp.chdir(tmp)  # artifacts (./mlruns) land in the temporary directory
        yield uri


def _log(tmp_path, category: str, metric: float, seed: int = 0) -> RegisteredVersion:
    pkg = tiny_package(str(tmp_path / f"pkg-{category}-{seed}"), seed=seed)
    return log_training(
        pkg,
        category,
        params={"preset": "test-tiny", "data_uri": f"/data/{category}"},
        history=[
            {"epoch": 1, "train_loss": 2.0, "val_loss": 2.5},
            {"epoch": 2, "train_loss": 1.5, "val_loss": 2.0},
        ],
        metrics={"image_auroc": metric, "pixel_auroc": 0.9, "aupro": 0.8, "f1_max": 0.7},
        summary={"wall_time_s": 3.0},
    )


def test_tracking_uri_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert registry.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:secret@127.0.0.1:1")
    with pytest.raises(registry.RegistryError) as e:
        registry.check_tracking(timeout_s=1)
    assert "unreachable" in str(e.value) and "secret" not in str(e.value)


def test_log_register_resolve_promote(tracking, tmp_path):
    v1 = _log(tmp_path, "bottle", 0.8)
    assert (v1.name, v1.version, v1.aliases) == ("tfa-bottle", 1, ["candidate"])
    with pytest.raises(LookupError, match="champion"):
        registry.resolve_model("bottle")
    with pytest.raises(LookupError):
        registry.resolve_model("nosuch")

    # gate: the first champion is always promoted
    ok, why = registry.promote_if_better("bottle", "image_auroc")
    assert ok, why
    name, version, path = registry.resolve_model("bottle")
    assert (name, version) == ("tfa-bottle", 1)
    assert sorted(os.listdir(path)) == sorted(
        ["weights.safetensors", "config.json", "template.png", "calibration.json", "meta.json"]
    )
    model = load_model(path)
    assert model.calibration.threshold == 0.5

    # repeated calls are cheap: same directory, no second download
    registry._CACHE.clear()  # memory cache gone: the disk cache still answers
    assert registry.resolve_model("bottle")[2] == path

    # a worse candidate does not pass the gate; a better one does
    v2 = _log(tmp_path, "bottle", 0.7, seed=1)
    assert v2.version == 2
    ok, why = registry.promote_if_better("bottle", "image_auroc")
    assert not ok and "not promoted" in why
    assert registry.resolve_model("bottle")[1] == 1
    assert registry.resolve_model("bottle", alias="candidate")[1] == 2
    v3 = _log(tmp_path, "bottle", 0.8, seed=2)
    ok, _ = registry.promote_if_better("bottle", "image_auroc")
    assert ok and registry.resolve_model("bottle")[1] == v3.version == 3

    # manual promotion of any version, and errors for missing ones
    assert registry.promote("bottle", version=2) == 2
    assert registry.resolve_model("bottle")[1] == 2
    with pytest.raises(LookupError, match="no version 9"):
        registry.promote("bottle", version=9)
    champion_dir = registry.resolve_model("bottle")[2]
    assert registry.resolve_uri("models:/tfa-bottle@champion") == champion_dir
    v3_dir = registry.resolve_uri("models:/tfa-bottle/3")
    assert v3_dir.endswith(os.path.join(f"3-{v3.run_id}", "package"))
    assert registry.resolve_uri("/some/dir") == "/some/dir"

    _log(tmp_path, "tile", 0.6)
    rows = [r for r in registry.list_models() if r["name"] in ("tfa-bottle", "tfa-tile")]
    assert [r["name"] for r in rows] == ["tfa-bottle", "tfa-tile"]
    assert rows[0]["latest"] == 3 and rows[0]["champion"] == 2 and rows[0]["threshold"] == 0.5
    assert rows[0]["image_auroc"] == pytest.approx(0.7)
    assert rows[1]["champion"] is None and rows[1]["candidate"] == 1
    shown = registry.show_model("tfa-bottle")
    assert [r["version"] for r in shown] == [3, 2, 1]
    assert shown[1]["aliases"] == ["champion"] and shown[0]["aliases"] == ["candidate"]
    assert shown[0]["data_uri"] == "/data/bottle" and shown[0]["run"].startswith("runs:/")
    with pytest.raises(LookupError):
        registry.show_model("tfa-nosuch")

    # the run carries per-epoch losses with their steps
    c = registry.client()
    hist = c.get_metric_history(v1.run_id, "val_loss")
    assert [(m.step, m.value) for m in hist] == [(1, 2.5), (2, 2.0)]


def test_a_recreated_registry_never_serves_the_old_cached_package(tmp_path, monkeypatch):
    """Same tracking URI, same name, same version number, different model (a rerun demo
    whose registry was deleted and made again): the cache must not hand back the files an
    earlier registry's version 1 left there."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    tiny_package(str(cache / digest / "tfa-cache" / "1" / "package"), threshold=0.5)  # earlier
    pkg = tiny_package(str(tmp_path / "pkg"), threshold=0.7)
    v = log_training(pkg, "cache", params={}, history=[], metrics={}, summary={})
    registry.promote("cache", version=v.version)
    name, version, path = registry.resolve_model("cache")
    assert (name, version) == ("tfa-cache", 1)
    assert load_model(path).calibration.threshold == 0.7
    assert load_model(registry.resolve_uri("models:/tfa-cache/1")).calibration.threshold == 0.7


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_pyfunc_from_code_in_another_process(tracking, tmp_path):
    v = _log(tmp_path, "cable", 0.8)
    registry.promote("cable")
    name, version, path = registry.resolve_model("cable")
    # nothing pickled anywhere in the logged models
    logged = [f for _, _, files in os.walk(os.path.join(os.getcwd(), "mlruns")) for f in files]
    assert "weights.safetensors" in logged and "tfa_pyfunc.py" in logged
    assert not [f for f in logged if f.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    img = tmp_path / "img.png"
    img.write_bytes(_png(np.zeros((80, 90, 3), np.uint8)))
    script = f"""
import mlflow, pandas as pd
m = mlflow.pyfunc.load_model("models:/tfa-cable@champion")
out = m.predict(pd.DataFrame({{"image": [{str(img)!r}, open({str(img)!r}, "rb").read(), b"junk"]}}))
print(out[["score", "threshold", "is_anomalous", "status"]].to_json(orient="records"))
assert list(out.status) == ["ok", "ok", "error"], out
assert out["mask"][0][:4] == b"\\x89PNG"
assert out.score[0] == out.score[1]
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]

    # in-process too: the same wrapper output as the fast loader
    import mlflow

    pyf = mlflow.pyfunc.load_model(f"models:/tfa-cable/{v.version}")
    out = pyf.predict(pd.DataFrame({"image": [str(img)]}))
    from tfa_ray.data import load_image

    fast = load_model(path)
    _, scores = fast.predict(load_image(str(img), fast.image_size)[None])
    assert out.score[0] == pytest.approx(float(scores[0]), rel=1e-5)


def test_models_list_reads_every_page(tracking):
    c = registry.client()
    for i in range(5):
        c.create_registered_model(f"tfa-paged{i}")
    names = [r["name"] for r in registry.list_models(prefix="tfa-paged", page_size=2)]
    assert names == [f"tfa-paged{i}" for i in range(5)]


def test_unreachable_registry_is_retried_then_not_a_lookup_error(monkeypatch):
    """A registry that does not answer is a transient RegistryError (retried with backoff), never
    the LookupError that means 'no such model'."""
    import socket

    from tfa_ray.retry import RetryPolicy, is_transient

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    calls = []
    real = registry._version_for_alias
    monkeypatch.setattr(registry, "_version_for_alias", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(registry.RegistryError) as e:
        registry.resolve_model(
            "bottle", uri=f"http://127.0.0.1:{port}", retry=RetryPolicy(attempts=3, base_s=0.01)
        )
    assert len(calls) == 3 and is_transient(e.value)
