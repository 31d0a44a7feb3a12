"""A broken model is reported as broken, for good, by name and version: a truncated
``weights.safetensors``, a ``calibration.json`` with a string threshold or a ``config.json``
with unknown fields make permanent error rows (found at planning), the run exits with the
"finished with error rows" code; a damaged copy in the local download cache is fetched again."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from shards import shard_row

from tfa_ray import errors, scoring
from tfa_ray.cli import main
from tfa_ray.package_check import PackageError, check_calibration, check_package
from tfa_ray.synth import make_image


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image("texture", 64, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def _truncate(path: str, keep: float = 0.6) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _broken_copies(tiny_model_dir: str, tmp_path) -> dict[str, str]:
    out = {}
    for name in ("trunc", "badcal", "badcfg", "good"):
        out[name] = str(tmp_path / "models" / name)
        shutil.copytree(tiny_model_dir, out[name])
    _truncate(os.path.join(out["trunc"], "weights.safetensors"))
    cal_path = os.path.join(out["badcal"], "calibration.json")
    cal = json.load(open(cal_path))
    cal["precisions"]["bf16"]["threshold"] = "0.5 (tuned)"  # one precision's entry broken
    json.dump(cal, open(cal_path, "w"))
    cfg_path = os.path.join(out["badcfg"], "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["from_the_future"] = 1
    json.dump(cfg, open(cfg_path, "w"))
    return out


def test_check_package(tiny_model_dir, tmp_path):
    models = _broken_copies(tiny_model_dir, tmp_path)
    check_package(models["good"])
    for name, why in [
        ("trunc", "weights.safetensors is truncated"),
        ("badcal", "threshold is not a number"),
        ("badcfg", "from_the_future"),
    ]:
        with pytest.raises(PackageError, match=why):
            check_package(models[name])
    flat = json.load(open(os.path.join(tiny_model_dir, "calibration.json")))["precisions"]["fp32"]
    check_calibration({"fp32": flat, "bf16": dict(flat, threshold=0.7)})  # keyed by precision
    with pytest.raises(PackageError, match=r"\['bf16'\]: threshold"):
        check_calibration({"fp32": flat, "bf16": dict(flat, threshold=None)})
    with pytest.raises(PackageError, match="normal_scores"):
        check_calibration(dict(flat, normal_scores=[0.1, "x"]))


def test_broken_models_give_permanent_rows_naming_them(
    ray_cluster, tiny_model_dir, tmp_path, capsys
):
    models = _broken_copies(tiny_model_dir, tmp_path)
    root = tmp_path / "in"
    for name in models:
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(_png(i))
    out = tmp_path / "out"
    args = ["score", "--input", str(root), "--output", str(out), "--run-id", "n"]
    args += [x for name, url in models.items() for x in ("--model", f"{name}={url}")]
    capsys.readouterr()
    assert main(args) == errors.EXIT_ERROR_ROWS
    printed = capsys.readouterr().out
    rows = scoring.read_results(str(out / "run_id=n")).to_pylist()
    assert len(rows) == 8
    for r in rows:
        if r["category"] == "good":
            assert r["status"] == "ok"
            continue
        assert r["status"] == "error" and r["error_kind"] == "permanent", r
        assert f"model tfa-{r['category']} v3" in r["error"] and "unusable" in r["error"]
    reasons = {
        "trunc": "weights.safetensors is truncated",
        "badcal": "threshold is not a number",
        "badcfg": "from_the_future",
    }
    for name, why in reasons.items():
        lines = [ln for ln in printed.splitlines() if ln.strip().startswith(f"{name}:")]
        assert len(lines) == 1 and why in lines[0] and f"tfa-{name} v3" in lines[0], printed
    # a rerun does not try them again: nothing is transient
    assert main(args) == errors.EXIT_ERROR_ROWS
    assert "already done" in capsys.readouterr().out


def test_scorer_load_failure_of_a_broken_package_is_permanent(tiny_model_dir, tmp_path):
    """Broken after planning (or a load check misses it): the scorer's rows are permanent."""
    models = _broken_copies(tiny_model_dir, tmp_path)
    good = scoring.LocalResolver({"texture": models["good"]})
    (tmp_path / "a.png").write_bytes(_png(0))
    plan = {"texture": {"name": "tfa-texture", "version": 3, "image_size": 64}}
    shard = shard_row(tmp_path / "shards", "texture", [str(tmp_path / "a.png")])
    batch = scoring.decode_shard(shard, plan, None, None)
    scorer = scoring.ShardScorer(scoring.LocalResolver({"texture": models["trunc"]}))
    (item,) = json.loads(scorer(batch)["items"][0])
    assert item["error_kind"] == "permanent" and "tfa-texture v3" in item["error"]
    (item,) = json.loads(scoring.ShardScorer(good)(batch)["items"][0])
    assert item["status"] == "ok"


def test_damaged_cached_download_is_fetched_again(tiny_model_dir, tmp_path, monkeypatch):
    from tfa_ray import registry, tracking
    from tfa_ray.package import load_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # artifacts (./mlruns) land in the temporary directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    mv = tracking.log_training(
        tiny_model_dir, "texture", params={"preset": "test-tiny"}, history=[], uri=uri
    )
    _, version, pkg = registry.resolve_model("texture", "candidate", uri=uri)
    assert version == int(mv.version)
    weights = os.path.join(pkg, "weights.safetensors")
    size = os.path.getsize(weights)
    _truncate(weights)  # the disk damaged the cached copy; the registry's is fine
    _, _, again = registry.resolve_model("texture", "candidate", uri=uri)
    assert os.path.getsize(os.path.join(again, "weights.safetensors")) == size
    load_model(again)  # loads: it was fetched again
    with open(os.path.join(again, "calibration.json"), "ab") as f:
        f.write(b" ")  # same files, one byte more: also not what was downloaded
    _, _, third = registry.resolve_model("texture", "candidate", uri=uri)
    check_package(third)
    assert open(os.path.join(third, "calibration.json"), "rb").read().endswith(b"}")
