"""`tfa-ray demo --quick`: synthetic data -> Ray Train -> MLflow registry -> promote -> Ray Data
scoring -> report -> ground-truth summary, end to end on the local machine."""

from __future__ import annotations

import re

import pytest

from tfa_ray import scoring


@pytest.mark.slow
def test_demo_quick_end_to_end(ray_cluster, tmp_path, monkeypatch, capsys):
    from tfa_ray.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-demo")  # restored after the test
    monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for cat in ("texture", "object"):
        assert f"tfa-{cat} v1 promoted to champion" in out, out[-4000:]
        row = re.search(
            rf"^{cat}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M
        )
        assert row, out[-2000:]
        total, ok, err = (int(row.group(i)) for i in (1, 2, 3))
        assert (total, ok, err) == (11, 8, 3)  # 3 good + 5 defective test images, 3 broken
        assert 0.0 <= float(row.group(6)) <= 1.0 and 0.0 <= float(row.group(7)) <= 1.0
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2
    runs = list((tmp_path / "demo" / "scores").glob("run_id=*/_SUCCESS"))
    assert len(runs) == 1
    rows = scoring.read_results(str(runs[0].parent), columns=["model_name"]).to_pylist()
    assert {r["model_name"] for r in rows} >= {"tfa-texture", "tfa-object"}
