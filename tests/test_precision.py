"""One precision from calibration to scoring: a package calibrated on the CPU holds one
calibration per precision a scorer may compute at, each computed at that precision; a scorer
under bf16 compares with the bf16 threshold, and drift reads the bf16 normal scores."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from shards import shard_row

from tfa_ray import drift, scoring, storage
from tfa_ray.calibration import Calibration, Calibrations
from tfa_ray.config import get_preset
from tfa_ray.data import discover
from tfa_ray.package import load_model, precision_key, save_model
from tfa_ray.scoring.contract import run_dir_url, shard_file, to_table
from tfa_ray.selection import split_normals
from tfa_ray.synth import make_dataset

OFF = 100.0  # what the wrong entries are moved by: a scorer reading one of them cannot pass


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A test-tiny package fitted on the CPU with 18 calibration images, and those images."""
    from tfa_ray.training import fit

    root = tmp_path_factory.mktemp("precision")
    make_dataset(str(root / "data"), ("texture",), n_train=60, n_test_good=1, n_test_defect=1,
                 size=64)  # fmt: skip
    data = discover(str(root / "data"), "texture")
    preset = get_preset("test-tiny")
    train = dataclasses.replace(preset.train, calib_fraction=0.3)
    preset = dataclasses.replace(preset, train=train)
    result = fit(data, preset, device="cpu", echo=lambda _m: None)
    url = save_model(str(root / "model"), result.detector, result.preset, result.calibration)
    tcfg = result.preset.train
    calib = split_normals(sorted(data.train), tcfg.val_fraction, tcfg.calib_fraction, tcfg.seed)[2]
    assert len(calib) == result.num_calib
    return url, result.calibration, calib


def test_each_precision_is_calibrated_at_itself(calibrated):
    _, cals, calib = calibrated
    assert set(cals) == {"fp32", "bf16", "fp16"}
    assert all(cals.at(p).num_images == len(calib) for p in cals)
    # computed at each precision, not copied: bf16 scores differ from fp32 ones
    fp32, bf16 = (np.array(cals.at(p).normal_scores) for p in ("fp32", "bf16"))
    assert not np.array_equal(fp32, bf16)
    assert np.allclose(fp32, bf16, rtol=0.1)  # same model, same images
    assert precision_key("bf16", "cpu") == "bf16" and precision_key("auto", "cpu") == "fp32"


def _shift(cal: Calibration, by: float) -> Calibration:
    return dataclasses.replace(
        cal, threshold=cal.threshold + by, normal_scores=tuple(s + by for s in cal.normal_scores)
    )


def _score(url: str, paths: list[str], precision: str) -> tuple[list[dict], dict]:
    """The scorer's batch path (decode, then the scorer, without Ray): (items, model info)."""
    models = {"texture": {"name": "tfa-texture", "version": 1, "image_size": 64}}
    shard = shard_row(url + "-shards", "texture", paths)
    batch = scoring.decode_shard(shard, models, None, None)
    scorer = scoring.ShardScorer(scoring.LocalResolver({"texture": url}), precision=precision)
    out = scorer(batch)
    return json.loads(out["items"][0]), json.loads(out["model"][0])


def _drift_of(run_dir: str, items: list[dict], info: dict, calibrations: dict) -> dict:
    """Rows as the writer leaves them, and the run's drift entry for the category."""
    n = len(items)
    cols = {
        "path": [it["path"] for it in items],
        "category": ["texture"] * n,
        "model_name": ["tfa-texture"] * n,
        "model_version": [1] * n,
        "score": [it["score"] for it in items],
        "threshold": [info["threshold"]] * n,
        "is_anomalous": [it["is_anomalous"] for it in items],
        "status": [it["status"] for it in items],
        "run_id": ["r"] * n,
    }
    buf = io.BytesIO()
    pq.write_table(to_table(cols), buf)
    storage.write_bytes(storage.join(run_dir, shard_file("texture", 0)), buf.getvalue())
    models = {"texture": {"name": "tfa-texture", "version": 1}}
    return drift.run_drift(run_dir, models, calibrations)["categories"]["texture"]


def test_bf16_scorer_uses_the_bf16_calibration_and_drift_stays_quiet(calibrated, tmp_path):
    url, cals, calib = calibrated
    # the fp32 and fp16 entries moved far off: a scorer or a drift check that reads either
    # instead of bf16 flags nothing, or sees every score far below its reference
    moved = Calibrations({p: _shift(c, OFF) if p != "bf16" else c for p, c in cals.entries.items()})
    pkg = str(tmp_path / "pkg")
    model = load_model(url)
    save_model(pkg, model.detector, model.preset, moved, {"version": 1})

    items, info = _score(pkg, calib, "bf16")
    assert [it["status"] for it in items] == ["ok"] * len(calib)
    assert info["threshold"] == cals.at("bf16").threshold
    scores = np.array([it["score"] for it in items])
    # the calibration images scored again at bf16 give the bf16 normal scores back
    assert np.allclose(np.sort(scores), cals.at("bf16").normal_scores, rtol=1e-3, atol=1e-5)

    resolver = scoring.LocalResolver({"texture": pkg})
    loaded = drift.load_calibrations({"texture": {"version": 1}}, resolver, "champion")
    got = _drift_of(run_dir_url(str(tmp_path / "out"), "r"), items, info, loaded)
    assert got["precision"] == "bf16" and "precision_note" not in got
    assert got["status"] == "ok" and got["shift"] != "shifted", got
    # the same rows against the (moved) fp32 entry: drift fires, so the check above has teeth
    wrong = _drift_of(run_dir_url(str(tmp_path / "out2"), "r"), items, info,
                      {"texture": moved.at("fp32")})  # fmt: skip
    assert wrong["shift"] == "shifted" and wrong["status"] == "warning"

    # fp32 scoring of the same package compares with the fp32 entry
    _, info32 = _score(pkg, calib[:1], "fp32")
    assert info32["threshold"] == moved.at("fp32").threshold


def test_old_single_calibration_loads_as_fp32_and_others_fall_back(calibrated, tmp_path, caplog):
    url, cals, calib = calibrated
    pkg = str(tmp_path / "old")
    model = load_model(url)
    save_model(pkg, model.detector, model.preset, cals)
    old = cals.at("fp32").to_json()  # a package from before: one unkeyed calibration
    storage.write_bytes(storage.join(pkg, "calibration.json"), old.encode())
    with caplog.at_level(logging.INFO, logger="tfa_ray.calibration"):
        loaded = load_model(pkg)
    assert "bf16 and fp16 fall back to it" in caplog.text
    assert loaded.calibrations.legacy and set(loaded.calibrations) == {"fp32"}
    assert loaded.calibrations.at("bf16") == cals.at("fp32")
    loaded.precision = "bf16"
    assert loaded.calibration == cals.at("fp32")
    items, info = _score(pkg, calib[:2], "bf16")
    assert [it["status"] for it in items] == ["ok", "ok"]
    assert info["threshold"] == cals.at("fp32").threshold
    # drift of an old package: compared with its one entry
    loaded_cals = drift.load_calibrations(
        {"texture": {"version": 1}}, scoring.LocalResolver({"texture": pkg}), "champion"
    )
    got = _drift_of(run_dir_url(str(tmp_path / "out"), "r"), items, info, loaded_cals)
    assert got["precision"] == "fp32"


def test_calibrations_round_trip_and_refuse_unknown_precisions(calibrated):
    _, cals, _ = calibrated
    assert Calibrations.from_json(cals.to_json()) == cals
    assert json.loads(cals.to_json())["precisions"].keys() == {"fp32", "bf16", "fp16"}
    assert cals.precision_of(cals.at("fp16").threshold) in ("fp16", "bf16", "fp32")
    with pytest.raises(ValueError, match="fp32 entry"):
        Calibrations({"bf16": cals.at("bf16")})
    with pytest.raises(ValueError, match="unknown precisions"):
        Calibrations({"fp32": cals.at("fp32"), "int8": cals.at("fp32")})
    with pytest.raises(ValueError, match="precision must be one of"):
        cals.at("auto")


def test_fp16_convolutions_on_a_cpu_round_like_a_gpu():
    """Under the fp16 calibration context on a CPU, a convolution takes fp16-rounded operands,
    accumulates in fp32 (as cuDNN's fp16 convolutions do) and returns fp16, without the CPU's
    slow fp16 reference kernel; everything else stays under fp16 autocast."""
    import torch
    import torch.nn.functional as F

    from tfa_ray.package import autocast_at

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 8, 16, 16, generator=g), torch.randn(4, 8, 3, 3, generator=g), None
    with autocast_at("fp16", "cpu"):
        got = F.conv2d(x, w, b, padding=1)
        lin = F.linear(x.flatten(1)[:, :8], w.flatten(1)[:, :8])
    want = F.conv2d(x.half().float(), w.half().float(), None, padding=1).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert lin.dtype == torch.float16  # autocast itself still on
    with torch.autocast("cpu", dtype=torch.float16):
        slow = F.conv2d(x, w, None, padding=1)  # the CPU's own fp16 kernel: within fp16 rounding
    torch.testing.assert_close(got.float(), slow.float(), rtol=2e-2, atol=2e-2)
    with autocast_at("fp32", "cpu"):
        assert F.conv2d(x, w, padding=1).dtype == torch.float32
