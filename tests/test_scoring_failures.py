"""Failures a person can read: a full or read-only output volume ends the run with one line
naming the cause and the file, the traceback is in the log file, the exit code says "did not
finish", and a rerun with the same run id finishes with every input exactly once."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfa_ray import errors, scoring
from tfa_ray.synth import make_image

REPO = Path(__file__).resolve().parents[1]

FAULTS = {"full": (errno.ENOSPC, OSError), "read-only": (errno.EROFS, OSError)}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image("texture", 64, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


# The run is its own driver process (a Ray job of its own, as a nightly run is): a worker that
# Ray interrupted when the first run aborted is never handed to the rerun.
FAULT_JOB = """
import os, sys
from tfa_ray import scoring, storage
from tfa_ray.cli import main
from tfa_ray.scoring import driver

def faulty_write(batch, **kw):
    # write_shard, but while <output>/FAULT exists every shard after the first fails the way
    # a full (ENOSPC) or read-only (EROFS) volume fails a write
    flag = os.path.join(os.path.dirname(kw["run"].url), "FAULT")
    file = str(batch["file"][0])
    if os.path.exists(flag) and not file.endswith("part-00000.parquet"):
        code = int(open(flag).read())
        raise OSError(code, os.strerror(code), storage.join(kw["run"].url, file))
    return scoring.write_shard(batch, **kw)

stages = driver.Stages
driver.Stages = lambda: stages(write=faulty_write)
sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], ray_address: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", FAULT_JOB, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_output_volume_fails_mid_run(
    ray_cluster, tiny_model_dir, tmp_path, capsys, monkeypatch, fault
):
    root = tmp_path / "in" / "texture"
    root.mkdir(parents=True)
    paths = []
    for i in range(8):
        (root / f"{i}.png").write_bytes(_png(i))
        paths.append(str(root / f"{i}.png"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "FAULT").write_text(str(FAULTS[fault][0]))
    log_file = tmp_path / "score.log"
    args = [
        "--log-file", str(log_file), "score", "--input", str(tmp_path / "in"),
        "--output", str(out), "--run-id", "night", "--shard-size", "2",
        "--model", f"texture={tiny_model_dir}",
    ]  # fmt: skip
    proc = _run(args, ray_cluster)
    assert proc.returncode == errors.EXIT_FAILED, proc.stderr[-3000:]
    err = proc.stderr
    line = [ln for ln in err.splitlines() if ln.startswith("tfa-ray score: error:")]
    assert len(line) == 1, err
    assert os.strerror(FAULTS[fault][0]) in line[0] and "run_id=night/category=texture" in line[0]
    assert "Traceback" not in err and "UDF failed" not in line[0]
    text = log_file.read_text()
    assert "Traceback" in text and os.strerror(FAULTS[fault][0]) in text  # written before close

    (out / "FAULT").unlink()  # the volume has room again
    proc = _run(args, ray_cluster)
    assert proc.returncode == errors.EXIT_OK, proc.stderr[-3000:]
    got = scoring.read_results(str(out / "run_id=night"), columns=["path", "status"]).to_pylist()
    assert sorted(r["path"] for r in got) == sorted(paths)  # exactly once
    assert all(r["status"] == "ok" for r in got)


def test_one_line_names_the_root_cause():
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/out/x.parquet")
        except OSError as e:
            raise RuntimeError("UDF failed to process a data block\n" + "tb line\n" * 100) from e
    except RuntimeError as outer:
        line = errors.one_line(outer)
    assert line == "PermissionError: [Errno 13] Permission denied: '/out/x.parquet'"
    assert errors.one_line(ValueError("bad --input")) == "bad --input"
