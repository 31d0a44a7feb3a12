"""Drift: flag rate against target and scores against the calibration normals; the trend report
over the last finished runs of an output root (local and S3). No Ray: runs are written the way
a finished run leaves them (Parquet shards in the output schema, a ``_SUCCESS``)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from tfa_ray import drift, report, storage
from tfa_ray.calibration import Calibration, calibrate
from tfa_ray.scoring import drift as scoring_drift
from tfa_ray.scoring.contract import SUCCESS_FILE, run_dir_url, shard_file, to_table

REF = np.random.default_rng(0).normal(1.0, 0.2, size=75)  # the calibration normals' scores


def _calibration(ref=REF, target_fpr: float = 0.01) -> Calibration:
    return calibrate(ref, np.ones((1, 4, 4)), target_fpr=target_fpr)


def _drift(scores, cal: Calibration | None, flagged: int | None = None, errors: int = 0) -> dict:
    ref = cal.normal_scores if cal else ()
    acc = scoring_drift._Accumulator(np.asarray(ref), drift.DriftRules())
    scores = np.asarray(scores)
    if flagged is None:
        flagged = int((scores >= cal.threshold).sum())
    for chunk in np.array_split(scores, 3):  # in batches, as rows stream in
        acc.add(chunk, 0, 0)
    acc.flagged, acc.errors = flagged, errors
    return drift.category_drift(acc, cal, "tfa-x v1", "" if cal else "no model")


def test_calibration_records_its_normal_scores_and_older_ones_load():
    cal = _calibration()
    assert len(cal.normal_scores) == 75
    assert np.allclose(sorted(cal.normal_scores), np.sort(REF), rtol=1e-5)
    assert Calibration.from_json(cal.to_json()) == cal
    old = json.loads(cal.to_json())
    del old["normal_scores"], old["supported_fpr"]
    assert Calibration.from_json(json.dumps(old)).normal_scores == ()


def test_ks_matches_scipy_also_with_ties():
    rng = np.random.default_rng(1)
    cases = [
        (rng.normal(size=300), rng.normal(size=75)),
        (rng.normal(0.5, 1, 2000), rng.normal(size=75)),
        (rng.integers(0, 5, 200).astype(float), rng.integers(0, 5, 40).astype(float)),
    ]
    for sample, ref in cases:
        want = stats.ks_2samp(sample, ref, method="asymp")
        d = drift.ks_statistic(sample, ref)
        assert d == pytest.approx(want.statistic)
        assert drift.ks_p_value(d, sample.size, ref.size) == pytest.approx(want.pvalue)


def test_same_distribution_is_quiet():
    cal = _calibration()
    same = _drift(cal.normal_scores, cal)  # the calibration images themselves
    assert same["psi"] == pytest.approx(0.0, abs=1e-12) and same["ks"] == 0.0
    assert same["shift"] == "none" and same["status"] == "ok" and not same["warnings"]
    fresh = _drift(np.random.default_rng(2).normal(1.0, 0.2, 2000), cal)  # new parts, same line
    assert fresh["psi"] < 0.1 and fresh["ks_p"] > 0.01
    assert fresh["status"] == "ok" and fresh["flag_rate_high"] is False


def test_shift_by_one_std_warns():
    cal = _calibration()
    got = _drift(np.random.default_rng(3).normal(1.2, 0.2, 2000), cal, flagged=20)
    assert got["psi"] > 0.25 and got["ks_p"] < 1e-3 and got["shift"] == "shifted"
    assert got["status"] == "warning" and len(got["warnings"]) == 1
    assert (
        "shifted up" in got["warnings"][0] and "line changed or many defects" in got["warnings"][0]
    )
    assert got["median_score"] > got["reference_median"]


def test_flag_rate_far_above_target_warns():
    cal = _calibration(np.random.default_rng(4).normal(1.0, 0.2, size=300))  # supports 1 %
    normal = np.resize(cal.normal_scores, 1200)  # the normals' own distribution
    at_target = _drift(normal, cal, flagged=12)
    assert at_target["flag_rate"] == 0.01 and at_target["status"] == "ok"
    high = _drift(normal, cal, flagged=96)
    assert high["flag_rate_high"] and high["status"] == "warning"
    assert high["warnings"] == ["flag rate 8.0 % vs target 1 %: line changed or many defects"]
    # 1 of 20 is 5x the target but no evidence of anything: the binomial test keeps it quiet
    assert not _drift(normal[:20], cal, flagged=1)["flag_rate_high"]


def test_target_below_what_calibration_supports_is_not_the_yardstick():
    cal = _calibration(target_fpr=0.001)  # 75 images demonstrate 1/76, not 0.1 %
    assert cal.supported_fpr == pytest.approx(1 / 76)
    got = _drift(np.full(1000, 1.0), cal, flagged=10)  # 10x the target, below 1/76
    assert got["expected_fpr"] == pytest.approx(1 / 76) and not got["flag_rate_high"]
    assert drift.flag_rate_check(10, 1000, 0.001, 0.0)["flag_rate_high"]


def test_older_calibration_or_no_model_is_unavailable_not_an_error():
    fields = json.loads(_calibration().to_json())
    del fields["normal_scores"]
    old = Calibration.from_json(json.dumps(fields))
    got = _drift(np.full(100, 1.0), old, flagged=30)
    assert got["shift"] == "unavailable" and "no normal scores" in got["note"]
    assert got["flag_rate_high"] and got["status"] == "warning"  # the flag rate still counts
    none = _drift(np.full(5, 1.0), None, flagged=0)
    assert none["status"] == "unavailable" and none["note"] == "no model"


# --------------------------------------------------------------------------------------
# runs as a finished run leaves them


def _write_run(root: str, run_id: str, finished: str, shift: float, endpoint=None) -> str:
    """A finished run: ok rows of two categories (scores shifted by ``shift`` std of the
    normals) and one error row, and its ``_SUCCESS`` with the drift section."""
    cal = _calibration()
    run_dir = run_dir_url(root, run_id)
    rng = np.random.default_rng(abs(hash(run_id)) % 2**32)
    per_category = {}
    for cat in ("bottle", "texture"):
        scores = rng.normal(1.0 + shift * 0.2, 0.2, 200).tolist()
        n = len(scores) + 1
        cols = {
            "path": [f"{root}/in/{cat}/{i}.png" for i in range(n)],
            "category": [cat] * n,
            "model_name": [f"tfa-{cat}"] * n,
            "model_version": [1] * n,
            "score": [*scores, None],
            "threshold": [cal.threshold] * n,
            "is_anomalous": [s >= cal.threshold for s in scores] + [None],
            "status": ["ok"] * len(scores) + ["error"],
            "error": [None] * len(scores) + ["truncated"],
            "run_id": [run_id] * n,
        }
        buf = io.BytesIO()
        pq.write_table(to_table(cols), buf)
        storage.write_bytes(storage.join(run_dir, shard_file(cat, 0)), buf.getvalue(), endpoint)
        ok = len(scores)
        anomalous = sum(cols["is_anomalous"][:ok])
        per_category[cat] = {"total": n, "ok": ok, "error": 1, "anomalous": anomalous}
    models = {c: {"name": f"tfa-{c}", "version": 1} for c in per_category}
    section = drift.run_drift(run_dir, models, dict.fromkeys(models, cal), endpoint)
    success = {
        "run_id": run_id,
        "finished": finished,
        "per_category": per_category,
        "total": sum(c["total"] for c in per_category.values()),
        "anomalous": sum(c["anomalous"] for c in per_category.values()),
        "drift": section,
    }
    storage.write_bytes(storage.join(run_dir, SUCCESS_FILE), json.dumps(success).encode(), endpoint)
    return run_dir


def _runs(root: str, endpoint=None) -> None:
    # run ids do not sort like their finishing times: the report orders by "finished"
    _write_run(root, "c-oldest", "2026-11-01T02:00:00+00:00", 0.0, endpoint)
    _write_run(root, "b-second", "2026-11-02T02:00:00+00:00", 0.0, endpoint)
    _write_run(root, "z-third", "2026-11-03T02:00:00+00:00", 0.5, endpoint)
    _write_run(root, "a-latest", "2026-11-04T02:00:00+00:00", 1.5, endpoint)
    unfinished = run_dir_url(root, "zz-running")
    storage.write_bytes(storage.join(unfinished, "_plan.json"), b"{}", endpoint)


def test_run_drift_reads_rows_and_counts_errors_apart(tmp_path):
    run_dir = _write_run(str(tmp_path), "r", "2026-11-01T00:00:00+00:00", 1.5)
    section = json.loads(storage.read_bytes(storage.join(run_dir, SUCCESS_FILE)))["drift"]
    assert section["rules"]["psi_shifted"] == 0.25
    got = section["categories"]["texture"]
    assert (got["scored"], got["errors"], got["model"]) == (200, 1, "tfa-texture v1")
    assert got["flag_rate"] == got["flagged"] / 200 and got["flag_rate_high"]
    assert got["shift"] == "shifted" and got["status"] == "warning"


def _check_trend(text: str) -> None:
    runs = re.findall(r'<tr class="run"><td class="l">([^<]+)</td>', text)
    assert runs == ["b-second", "z-third", "a-latest"]  # the last 3 finished, oldest first
    for cat in ("bottle", "texture"):
        block = re.search(
            rf'<div class="trend-category" data-category="{cat}">(.*?)</div></div>', text, re.S
        )
        assert block and block.group(1).count('class="trend-chart"') == 4
        assert block.group(1).count("<circle") == 4 * 3  # a point per run per chart
    # the report below the trend is the latest run's: its drift rows warn
    assert re.search(r'<tr class="warning" data-category="texture">', text)
    assert "line changed or many defects" in text


def test_trend_report_of_the_last_runs(tmp_path):
    from tfa_ray.cli import main

    root = str(tmp_path / "out")
    _runs(root)
    assert [r["run_id"] for r in drift.finished_runs(root, 10)] == [
        "c-oldest",
        "b-second",
        "z-third",
        "a-latest",
    ]
    assert (
        main(["report", "--results", root, "--last", "3", "--output", str(tmp_path / "t.html")])
        == 0
    )
    _check_trend((tmp_path / "t.html").read_text())
    assert main(["report", "--results", str(tmp_path), "--last", "3", "--output", "x.html"]) == 2


def test_trend_report_on_s3(s3_env):
    root = "s3://drift-trend/out"
    storage.get_fs(root)[0].mkdir("drift-trend")
    _runs(root)
    _check_trend(report.build_report(root, last=3))


def test_drift_failure_is_recorded_not_raised(tmp_path):
    """The run is verified when drift is computed: a failure there must not fail it."""

    def resolver(category, alias="champion", version=None):
        raise LookupError("registry down")

    models = {"texture": {"name": "tfa-texture", "version": 1}}
    assert drift.load_calibrations(models, resolver, "champion")["texture"].startswith(
        "calibration unavailable: LookupError: registry down"
    )
    got = drift.drift_section(str(tmp_path / "missing"), models, resolver, "champion")
    assert got["categories"] == {} and got["error"]
    rows, note = report._drift_rows({"drift": got})
    assert rows == [] and note == got["error"]
