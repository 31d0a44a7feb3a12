"""The Ray Data scoring pipeline: every input gives exactly one row, bad files become error
rows, and runs survive a killed actor and a killed driver."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
from PIL import Image
from shards import shard_row

from tfa_ray import scoring
from tfa_ray.synth import make_image

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# helpers


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _texture(seed: int, size: int = 64) -> np.ndarray:
    return make_image("texture", size, np.random.default_rng(seed))


def good_archive(root: Path, n: int, category: str = "texture") -> list[str]:
    d = root / category / "line-1"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = d / f"img{i:03d}.png"
        p.write_bytes(_png(_texture(i)))
        paths.append(str(p))
    return paths


def bad_archive(root: Path) -> dict[str, tuple[str, str | None, tuple[int, int] | None]]:
    """Every kind of awkward input; name -> (expected status, error substring, (w, h))."""
    t = root / "texture"
    t.mkdir(parents=True)
    rgb = _texture(1, 64)
    png = _png(rgb)
    jpg = _jpeg(Image.fromarray(_texture(2, 80)))
    files: dict[str, bytes] = {
        "good.png": png,
        "big_ok.jpg": _jpeg(Image.fromarray(_texture(3, 96)).resize((120, 90))),
        "zero.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "text.png": b"this is not an image, just text with an image extension\n",
        "sixteen.png": _png(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20),
        "rgba.png": _png(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        "palette.png": b"",
        "cmyk.jpg": _jpeg(Image.fromarray(rgb).convert("CMYK")),
        "grey.jpg": _jpeg(Image.fromarray(rgb).convert("L")),
        "bomb.png": _png(np.zeros((300, 300, 3), np.uint8)),
    }
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
    files["palette.png"] = buf.getvalue()
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): stored 70 x 50, shown 50 x 70
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = _jpeg(Image.fromarray(_texture(4, 70)).resize((70, 50)), exif=exif)
    for name, data in files.items():
        (t / name).write_bytes(data)
    os.symlink(t / "deleted-before-read.png", t / "unreadable.png")  # listed, cannot be read
    other = root / "nomodel"
    other.mkdir()
    (other / "x.png").write_bytes(png)
    ok = "ok"
    return {
        "texture/good.png": (ok, None, (64, 64)),
        "texture/big_ok.jpg": (ok, None, (120, 90)),
        "texture/zero.png": ("error", "empty", None),
        "texture/truncated.png": ("error", "cannot decode", None),
        "texture/truncated.jpg": ("error", "cannot decode", None),
        "texture/text.png": ("error", "not a recognised image", None),
        "texture/sixteen.png": (ok, None, (64, 48)),
        "texture/rgba.png": (ok, None, (64, 64)),
        "texture/palette.png": (ok, None, (64, 64)),
        "texture/cmyk.jpg": (ok, None, (64, 64)),
        "texture/grey.jpg": (ok, None, (64, 64)),
        "texture/rotated.jpg": (ok, None, (50, 70)),
        "texture/bomb.png": ("error", "too large", None),
        "texture/unreadable.png": ("error", "cannot read", None),
        "nomodel/x.png": ("error", "no usable model tfa-nomodel@champion", None),
    }


def rows_by_path(run_dir: str, root: Path | str) -> dict[str, dict]:
    rows = scoring.read_results(run_dir).to_pylist()
    out = {}
    for r in rows:
        rel = r["path"][len(str(root)) + 1 :]
        assert rel not in out, f"{rel} appears twice"
        out[rel] = r
    return out


# --------------------------------------------------------------------------------------
# unit tests (no Ray)


def test_category_pattern():
    rx = scoring.category_regex("{category}/**")
    assert rx.fullmatch("bolt/line-1/a.png")["category"] == "bolt"
    assert rx.fullmatch("a.png") is None
    rx = scoring.category_regex("site-*/{category}/…")
    assert rx.fullmatch("site-7/screw/2024/a.png")["category"] == "screw"
    assert rx.fullmatch("other/screw/a.png") is None
    with pytest.raises(ValueError, match="placeholder"):
        scoring.category_regex("**/*.png")


def test_manifests(tmp_path):
    import pyarrow as pa

    from tfa_ray.scoring.plan import assign_categories

    (tmp_path / "list.txt").write_text("# nightly\n/x/bolt/a.png\n\n/x/nut/b.png\n")
    root, entries = scoring.list_inputs(str(tmp_path / "list.txt"), root="/x")
    assert root == "/x" and [p for p, _ in entries] == ["/x/bolt/a.png", "/x/nut/b.png"]
    pairs = assign_categories(entries, root, None, "{category}/**")
    assert [c for _, c in pairs] == ["bolt", "nut"]
    pq.write_table(
        pa.table({"path": ["s3://b/k/1.png"], "category": ["cap"]}), tmp_path / "m.parquet"
    )
    _, entries = scoring.list_inputs(str(tmp_path / "m.parquet"))
    assert entries == [("s3://b/k/1.png", "cap")]


def test_relative_manifest_paths_are_joined_to_the_root(tmp_path):
    (tmp_path / "list.txt").write_text("bolt/a.png\n/abs/nut/b.png\ns3://b/c.png\n")
    root, entries = scoring.list_inputs(str(tmp_path / "list.txt"))
    assert root == str(tmp_path)
    assert [p for p, _ in entries] == [f"{tmp_path}/bolt/a.png", "/abs/nut/b.png", "s3://b/c.png"]
    root, entries = scoring.list_inputs(str(tmp_path / "list.txt"), root="s3://arch/day")
    assert entries[0][0] == "s3://arch/day/bolt/a.png"


def test_scorer_tries_a_failed_model_load_again(tiny_model_dir, tmp_path):
    """A failed load is not kept for the actor's lifetime: the shard's rows are transient errors
    and the next shard loads the model (the stages called directly, without Ray)."""
    paths = good_archive(tmp_path, 2)
    local = scoring.LocalResolver({"texture": tiny_model_dir})
    calls = []

    def flaky(category, alias="champion", version=None):
        calls.append(version)
        if len(calls) == 1:
            raise ConnectionError("registry blip")
        return local(category, alias, version)

    models = {"texture": {"name": "tfa-texture", "version": 3, "image_size": 64}}
    shard = shard_row(tmp_path / "shards", "texture", paths)
    batch = scoring.decode_shard(shard, models, None, None)
    scorer = scoring.ShardScorer(flaky, pinned={"texture": 3}, retry_after_s=0.0)
    first = json.loads(scorer(batch)["items"][0])
    assert [(it["status"], it["error_kind"]) for it in first] == [("error", "transient")] * 2
    assert "registry blip" in first[0]["error"]
    second = json.loads(scorer(batch)["items"][0])
    assert [it["status"] for it in second] == ["ok", "ok"] and calls == [3, 3]


# --------------------------------------------------------------------------------------
# pipeline tests


def test_bad_inputs_each_give_a_correct_row(ray_cluster, tiny_model_dir, tmp_path):
    from tfa_ray.package import is_anomalous

    root = tmp_path / "in"
    expected = bad_archive(root)
    cfg = scoring.ScoreConfig(
        input=str(root),
        output=str(tmp_path / "out"),
        run_id="bad",
        shard_size=5,
        batch_size=4,
        heatmaps=True,
        max_pixels=200 * 200,
    )
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    summary = scoring.score(cfg, resolver, echo=lambda _m: None)
    rows = rows_by_path(summary.run_dir, root)
    assert set(rows) == set(expected)
    for rel, (status, err, size) in expected.items():
        r = rows[rel]
        assert r["status"] == status, (rel, r["error"])
        assert r["run_id"] == "bad" and r["scored_at"] is not None
        if status == "ok":
            assert r["error"] is None
            assert r["category"] == "texture"
            assert (r["model_name"], r["model_version"]) == ("tfa-texture", 3)
            assert np.isfinite(r["score"]) and r["threshold"] > 0
            assert r["is_anomalous"] == is_anomalous(r["score"], r["threshold"])
            assert (r["width"], r["height"]) == size
            # stored at the model's map resolution, brought to the image's size on demand
            mask = Image.open(io.BytesIO(r["mask_png"]))
            heat = Image.open(io.BytesIO(r["heatmap_png"]))
            assert mask.size == heat.size == (64, 64) and heat.mode.startswith("I;16")
            full = scoring.decode_mask(r, image_size=True)
            assert full.shape == (size[1], size[0]) and full.dtype == bool
            assert scoring.decode_heatmap(r, image_size=True).shape == (size[1], size[0])
        else:
            assert err in r["error"], (rel, r["error"])
            assert r["error_kind"] == "permanent", rel  # nothing here is worth a rerun
            assert r["score"] is None and r["mask_png"] is None and r["heatmap_png"] is None
    assert summary.total == len(expected)
    # decoding ran in Ray tasks of its own, not fused into the scorer actor
    assert summary.processes["score"] == 1 and summary.processes["decode"] >= 1
    assert summary.processes["shared"] == 0
    assert summary.ok == sum(1 for s, _, _ in expected.values() if s == "ok")
    success = json.loads((Path(summary.run_dir) / "_SUCCESS").read_text())
    assert success["total"] == len(expected) and success["error"] == summary.error


def test_heatmaps_share_one_scale(ray_cluster, tiny_model_dir, tmp_path):
    """The same image scored twice, once brightened in a corner: the untouched pixels keep
    their heat-map values (no per-image min-max), and a copy gives identical bytes."""
    from tfa_ray.package import load_model

    root = tmp_path / "in" / "texture"
    root.mkdir(parents=True)
    img = _texture(7)
    (root / "a.png").write_bytes(_png(img))
    (root / "b.png").write_bytes(_png(img))
    summary = scoring.score(
        scoring.ScoreConfig(
            input=str(tmp_path / "in"), output=str(tmp_path / "out"), run_id="h", heatmaps=True
        ),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
    )
    rows = rows_by_path(summary.run_dir, tmp_path / "in")
    a, b = rows["texture/a.png"], rows["texture/b.png"]
    assert a["heatmap_png"] == b["heatmap_png"] and a["score"] == pytest.approx(b["score"])
    model = load_model(tiny_model_dir)
    maps, _ = model.predict(
        __import__("torch").from_numpy(img).permute(2, 0, 1)[None].float() / 255
    )
    want = np.clip(maps[0].numpy(), a["heatmap_low"], a["heatmap_high"])
    assert (want == maps[0].numpy()).mean() > 0.99  # the scale holds (almost) every value
    got = scoring.decode_heatmap(a)
    step = (a["heatmap_high"] - a["heatmap_low"]) / 65535
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max() + step  # float16 transport


class KillOnce(scoring.ShardScorer):
    """A scorer whose first call, in the whole cluster, kills its own actor process."""

    marker = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_scorer_actor_killed_mid_run(ray_cluster, tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    paths = good_archive(root, 24)
    marker = tmp_path / "killed-once"
    scorer = type("KillOnceHere", (KillOnce,), {"marker": str(marker)})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    summary = scoring.score(
        scoring.ScoreConfig(
            input=str(root), output=str(tmp_path / "out"), run_id="kill", shard_size=4
        ),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
        stages=scoring.Stages(scorer=scorer),
    )
    assert marker.exists(), "the fault was never injected"
    out = scoring.read_results(summary.run_dir, columns=["path", "status"]).to_pylist()
    assert sorted(r["path"] for r in out) == sorted(paths)  # each exactly once
    assert all(r["status"] == "ok" for r in out)


SLOW_JOB = """
import argparse, time
from tfa_ray import scoring

def slow_write(batch, **kw):
    time.sleep(1.0)  # a slow object store: the kill lands while shards are being written
    return scoring.write_shard(batch, **kw)

p = argparse.ArgumentParser()
scoring.add_score_arguments(p)
cfg, resolver = scoring.config_from_args(p.parse_args())
scoring.score(cfg, resolver, stages=scoring.Stages(write=slow_write))
"""


def _run_job(args: list[str], env: dict, slow: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_JOB] if slow else [
        sys.executable, str(REPO / "jobs" / "score.py")
    ]  # fmt: skip
    return subprocess.Popen(
        [*cmd, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_driver_killed_then_rerun_resumes(ray_cluster, tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    paths = good_archive(root, 40)
    out = tmp_path / "out"
    run_dir = out / "run_id=nightly"
    args = [
        "--input", str(root), "--output", str(out), "--run-id", "nightly",
        "--shard-size", "4", "--model", f"texture={tiny_model_dir}",
    ]  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = _run_job(args, env, slow=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(run_dir.glob("category=*/part-*.parquet"))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"driver ended early:\n{proc.stdout.read()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)  # tasks of the dead driver may still land (atomically) or be cancelled
    parts = list(run_dir.glob("category=*/part-*.parquet"))
    assert 2 <= len(parts) < 10, "the kill should land mid-run"
    assert not (run_dir / "_SUCCESS").exists()
    for p in parts:  # whatever was written is complete
        assert pq.read_metadata(p).num_rows == 4

    proc = _run_job([*args, "--json", str(tmp_path / "summary.json")], env)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["shards_skipped"] >= 2 and summary["total"] == 40
    assert "resuming" in output
    got = scoring.read_results(str(run_dir), columns=["path"]).column("path").to_pylist()
    assert sorted(got) == sorted(paths)
    assert (run_dir / "_SUCCESS").exists()


def test_rerun_of_finished_run_scores_nothing(ray_cluster, tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    good_archive(root, 3)
    cfg = scoring.ScoreConfig(input=str(root), output=str(tmp_path / "out"), run_id="twice")
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    first = scoring.score(cfg, resolver, echo=lambda _m: None)
    second = scoring.score(cfg, resolver, echo=lambda _m: None)
    assert second.shards_skipped == second.shards == first.shards and second.total == 3
    other = scoring.ScoreConfig(input=str(tmp_path), output=str(tmp_path / "out"), run_id="twice")
    with pytest.raises(ValueError, match="already exists"):
        scoring.score(other, resolver, echo=lambda _m: None)


# --------------------------------------------------------------------------------------
# the command line, and the real MLflow registry


def test_cli_score_and_report(ray_cluster, tiny_model_dir, tmp_path, capsys):
    from tfa_ray.cli import main

    root = tmp_path / "in"
    good_archive(root, 3)
    (root / "texture" / "bad.png").write_bytes(b"nope")
    out = tmp_path / "out"
    rc = main(
        [
            "score", "--input", str(root), "--output", str(out), "--run-id", "cli",
            "--model", f"texture={tiny_model_dir}", "--batch-size", "2", "--heatmaps",
            "--report", str(tmp_path / "run.html"),
        ]
    )  # fmt: skip
    assert rc == 3  # finished, with an error row (bad.png): a scheduler can alert
    captured = capsys.readouterr()
    printed = captured.out
    assert "4 images, 3 ok, 1 errors" in printed
    # a console a person can read: one progress line, the log file named at the end
    assert re.search(r"scored 4/4 images, [\d.]+ images/s, ETA 0s", printed)
    assert "Progress bars" not in printed + captured.err and "%|" not in printed + captured.err
    log_file = re.search(r"^logs: (\S+)", printed, re.M).group(1)
    assert "shard category=texture/part-00000.parquet written: 4 rows" in Path(log_file).read_text()
    assert (tmp_path / "run.html").read_text().count("data:image/png;base64,") == 3
    rc = main(["report", "--results", str(out), "--output", str(tmp_path / "all.html")])
    assert rc == 0 and "texture" in (tmp_path / "all.html").read_text()
    assert main(["score", "--input", str(tmp_path / "missing"), "--output", str(out)]) == 2


def test_models_come_from_the_mlflow_registry(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    from tfa_ray import registry, tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TFA_RAY_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # ./mlruns artifacts land here
    mv = tracking.log_training(
        tiny_model_dir, "texture", params={"preset": "test-tiny"}, history=[], uri=uri
    )
    registry.promote("texture", mv.version, uri=uri)
    root = tmp_path / "in"
    paths = good_archive(root, 3)
    good_archive(root, 1, category="cable")  # registered nowhere
    summary = scoring.score(
        scoring.ScoreConfig(input=str(root), output=str(tmp_path / "out"), run_id="reg"),
        scoring.RegistryResolver(uri),
        echo=lambda _m: None,
    )
    rows = {r["path"]: r for r in scoring.read_results(summary.run_dir).to_pylist()}
    assert len(rows) == 4
    for p in paths:
        assert rows[p]["status"] == "ok"
        assert (rows[p]["model_name"], rows[p]["model_version"]) == ("tfa-texture", mv.version)
    cable = next(r for r in rows.values() if r["category"] == "cable")
    assert cable["status"] == "error" and "tfa-cable@champion" in cable["error"]

    # A run pins the versions it was planned with: a promotion between a crash and the rerun
    # must not mix two models in one run. Simulate the crash by removing the texture shard.
    mv2 = tracking.log_training(
        tiny_model_dir, "texture", params={"preset": "test-tiny"}, history=[], uri=uri
    )
    registry.promote("texture", mv2.version, uri=uri)
    assert mv2.version != mv.version
    out_dir = Path(summary.run_dir)
    (out_dir / "_SUCCESS").unlink()
    for f in (out_dir / "category=texture").glob("*.parquet"):
        f.unlink()
    rerun = scoring.score(
        scoring.ScoreConfig(input=str(root), output=str(tmp_path / "out"), run_id="reg"),
        scoring.RegistryResolver(uri),
        echo=lambda _m: None,
    )
    assert rerun.shards_skipped == 1  # the cable shard was kept
    rows = {r["path"]: r for r in scoring.read_results(rerun.run_dir).to_pylist()}
    assert len(rows) == 4
    for p in paths:
        assert (rows[p]["status"], rows[p]["model_version"]) == ("ok", mv.version)
    fresh = scoring.score(
        scoring.ScoreConfig(input=str(root), output=str(tmp_path / "out"), run_id="new"),
        scoring.RegistryResolver(uri),
        echo=lambda _m: None,
    )
    rows = {r["path"]: r for r in scoring.read_results(fresh.run_dir).to_pylist()}
    assert {rows[p]["model_version"] for p in paths} == {mv2.version}


def test_metrics_recomputed_from_the_parquet_match_evaluate(ray_cluster, tiny_model_dir, tmp_path):
    """Image / pixel AUROC and AUPRO from the stored scores and 16-bit heat maps agree with
    ``evaluate`` on the float maps (8-bit maps clipped at the 99.9th normal percentile did not)."""
    from tfa_ray.data import discover, load_mask
    from tfa_ray.evaluation import evaluate_model
    from tfa_ray.metrics import evaluate
    from tfa_ray.package import load_model
    from tfa_ray.synth import make_dataset

    make_dataset(
        str(tmp_path / "d"), ("texture",), n_train=2, n_test_good=6, n_test_defect=10, size=64
    )
    data = discover(str(tmp_path / "d"), "texture")
    model = load_model(tiny_model_dir)
    reference = evaluate_model(model, data).metrics
    (tmp_path / "test.txt").write_text("\n".join(s.path for s in data.test))
    summary = scoring.score(
        scoring.ScoreConfig(
            input=str(tmp_path / "test.txt"),
            output=str(tmp_path / "out"),
            category="texture",
            heatmaps=True,
            run_id="m",
        ),
        scoring.LocalResolver({"texture": tiny_model_dir}),
        echo=lambda _m: None,
    )
    rows = {r["path"]: r for r in scoring.read_results(summary.run_dir).to_pylist()}
    labels = np.array([s.label for s in data.test])
    scores = np.array([rows[s.path]["score"] for s in data.test])
    maps = np.stack([scoring.decode_heatmap(rows[s.path]) for s in data.test])
    masks = np.stack([load_mask(s, model.image_size).numpy() > 0.5 for s in data.test])
    recomputed = evaluate(labels, scores, masks, maps)
    print({k: (reference[k], recomputed[k]) for k in ("image_auroc", "pixel_auroc", "aupro")})
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert recomputed[k] == pytest.approx(reference[k], abs=0.01), k
