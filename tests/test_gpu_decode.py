"""JPEGs decoded by the scorer on its device (nvjpeg on CUDA) give what the CPU decode tasks
give: the device path runs here with device="cpu" (torchvision decodes lists on CPU too), so
the code the GPU runs is the code tested; only the JPEG decoder itself differs on a GPU."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shards import shard_row

from tfa_ray import scoring
from tfa_ray.scoring.stages import decode_array, decode_jpegs, jpeg_header
from tfa_ray.synth import make_image

REPO = Path(__file__).resolve().parents[1]


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _texture(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(make_image("texture", max(w, h), np.random.default_rng(seed))).resize(
        (w, h)
    )


def _corrupt(data: bytes) -> bytes:
    """Header and EOI intact, a bogus marker inside the scan: the decoders refuse it."""
    at = data.index(b"\xff\xda") + 40
    return data[:at] + b"\xff\xc4" * 20 + data[at + 40 :]


def mixed_files() -> dict[str, bytes]:
    """JPEGs of several sizes and kinds, a PNG and broken files."""
    good = _jpeg(_texture(2, 80, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate on view: the device decoder ignores EXIF, so CPU decodes it
    png = io.BytesIO()
    _texture(5, 64, 64).save(png, format="PNG")
    return {
        "same.jpg": _jpeg(_texture(1, 64, 64)),  # already S x S: no resize
        "up.jpg": good,
        "down.jpg": _jpeg(_texture(3, 300, 200)),
        "grey.jpg": _jpeg(_texture(4, 90, 70).convert("L")),
        "cmyk.jpg": _jpeg(_texture(6, 64, 64).convert("CMYK")),
        "rotated.jpg": _jpeg(_texture(7, 70, 50), exif=exif),
        "progressive.jpg": _jpeg(_texture(8, 100, 100), progressive=True),
        "image.png": png.getvalue(),
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": _corrupt(good),
    }


# --------------------------------------------------------------------------------------
# unit tests: the header check and the device decode


def test_jpeg_header_sends_only_plain_jpegs_to_the_device():
    f = mixed_files()
    assert jpeg_header(f["same.jpg"], None) == (64, 64)
    assert jpeg_header(f["down.jpg"], None) == (300, 200)
    assert jpeg_header(f["grey.jpg"], None) == (90, 70)
    assert jpeg_header(f["progressive.jpg"], None) == (100, 100)
    assert jpeg_header(f["corrupt.jpg"], None) == (80, 80)  # only decoding can tell
    for name in ("cmyk.jpg", "rotated.jpg", "image.png", "truncated.jpg"):
        assert jpeg_header(f[name], None) is None, name
    assert jpeg_header(f["down.jpg"], max_pixels=300 * 200 - 1) is None  # CPU names the error
    assert jpeg_header(b"", None) is None and jpeg_header(b"\xff\xd8\xff\xd9", None) is None


def test_device_decode_matches_the_cpu_path():
    """Decoded + resized on the "device" vs Pillow decode + BILINEAR resize: the same libjpeg
    decode on CPU, and torch's antialiased bilinear in Pillow's two rounded passes differs by
    rounding only (measured: at most 1 level, mean <= 0.055)."""
    f = mixed_files()
    names = ["same.jpg", "up.jpg", "down.jpg", "grey.jpg", "progressive.jpg"]
    got = decode_jpegs([f[n] for n in names], 64, "cpu")
    for name, t in zip(names, got, strict=True):
        want, _ = decode_array(f[name], 64, None)
        assert t.dtype.is_floating_point is False and tuple(t.shape) == (3, 64, 64), name
        diff = np.abs(t.numpy().astype(int) - want.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.15, (name, diff.max(), diff.mean())
        if name == "same.jpg":
            assert diff.max() == 0  # no resize: the same libjpeg decode, bit for bit


def test_one_bad_jpeg_in_a_batch_is_one_error():
    f = mixed_files()
    batch = [f["up.jpg"], f["corrupt.jpg"], f["down.jpg"], f["truncated.jpg"], f["cmyk.jpg"]]
    out = decode_jpegs(batch, 64, "cpu")
    assert len(out) == len(batch)
    errors = [i for i, t in enumerate(out) if isinstance(t, str)]
    assert errors == [1, 3], out
    assert all(out[i].startswith("cannot decode") for i in errors)
    cmyk, _ = decode_array(f["cmyk.jpg"], 64, None)  # converted like the CPU path, or close
    assert np.abs(out[4].numpy().astype(int) - cmyk.astype(int)).max() <= 2
    assert decode_jpegs([], 64, "cpu") == []


# --------------------------------------------------------------------------------------
# the stages, called directly and through Ray Data


def _archive(root: Path) -> dict[str, bytes]:
    d = root / "texture"
    d.mkdir(parents=True)
    files = mixed_files()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def test_stages_with_device_decode_give_the_cpu_rows(tiny_model_dir, tmp_path):
    _archive(tmp_path)
    paths = sorted(str(p) for p in (tmp_path / "texture").iterdir())
    models = {"texture": {"name": "tfa-texture", "version": 3, "image_size": 64}}
    shard = shard_row(tmp_path / "shards", "texture", paths)
    scorer = scoring.ShardScorer(
        scoring.LocalResolver({"texture": tiny_model_dir}), batch_size=3, device="cpu"
    )
    off_batch = scoring.decode_shard(shard, models, None, None, gpu_decode=False)
    on_batch = scoring.decode_shard(shard, models, None, None, gpu_decode=True)
    off = json.loads(scorer(off_batch)["items"][0])
    on = json.loads(scorer(on_batch)["items"][0])
    # the decode stage left the plain JPEGs encoded (smaller than their pixels)
    left = [Path(it["path"]).name for it in json.loads(on_batch["items"][0]) if "encoded" in it]
    assert sorted(left) == ["corrupt.jpg", "down.jpg", "grey.jpg", "progressive.jpg"] + [
        "same.jpg",
        "up.jpg",
    ]
    assert len(on_batch["encoded"][0]) < len(off_batch["images"][0]) / 2
    assert off_batch["encoded"][0] == b""
    assert [it["path"] for it in on] == [it["path"] for it in off] == paths
    for a, b in zip(off, on, strict=True):
        name = Path(a["path"]).name
        assert (a["status"], a["error_kind"]) == (b["status"], b["error_kind"]), name
        assert (a.get("width"), a.get("height")) == (b.get("width"), b.get("height")), name
        assert "encoded" not in b
        if a["status"] == "ok":
            assert b["score"] == pytest.approx(a["score"], rel=0.01, abs=1e-4), name
    status = {Path(it["path"]).name: it["status"] for it in on}
    assert [n for n, s in status.items() if s == "error"] == ["corrupt.jpg", "truncated.jpg"]


def test_pipeline_with_gpu_decode_on_gives_the_same_scores(ray_cluster, tiny_model_dir, tmp_path):
    files = _archive(tmp_path / "in")
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    rows = {}
    for mode in ("off", "on"):
        cfg = scoring.ScoreConfig(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            run_id=mode,
            shard_size=4,
            batch_size=2,
            gpu_decode=mode,
        )
        summary = scoring.score(cfg, resolver, echo=lambda _m: None)
        assert summary.total == len(files)
        rows[mode] = {
            Path(r["path"]).name: r
            for r in scoring.read_results(
                summary.run_dir, columns=["path", "status", "score"]
            ).to_pylist()
        }
    assert len(rows["on"]) == len(rows["off"]) == len(files)
    for name, a in rows["off"].items():
        b = rows["on"][name]
        assert a["status"] == b["status"], name
        if a["status"] == "ok":
            assert b["score"] == pytest.approx(a["score"], rel=0.01, abs=1e-4), name
    assert sum(r["status"] == "error" for r in rows["on"].values()) == 2


def test_gpu_decode_mode():
    cfg = scoring.ScoreConfig(input="x", output="y")
    assert not cfg.decode_on_device()
    cfg.num_gpus_per_actor = 0.5
    assert cfg.decode_on_device()
    cfg.gpu_decode = "off"
    assert not cfg.decode_on_device()
    cfg.gpu_decode = "yes"
    with pytest.raises(ValueError, match="gpu_decode"):
        cfg.decode_on_device()
    p = argparse.ArgumentParser()
    scoring.add_score_arguments(p)
    base = ["--input", "x", "--output", "y", "--num-gpus-per-actor", "1"]
    assert scoring.config_from_args(p.parse_args(base))[0].decode_on_device()
    off = scoring.config_from_args(p.parse_args([*base, "--gpu-decode", "off"]))[0]
    assert off.gpu_decode == "off" and not off.decode_on_device()


# --------------------------------------------------------------------------------------
# the GPU check script on a machine without a GPU


def test_gpu_check_says_no_gpu_and_fails_fast():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), PYTHON=sys.executable)
    t = time.monotonic()
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 2
    assert "no CUDA GPU: gpu_check needs one" in res.stdout + res.stderr
    assert time.monotonic() - t < 30


def test_gpu_check_uses_python3_when_python_is_missing(tmp_path):
    """A machine with ``python3`` and no ``python``: the script runs ``python3`` (here past a
    stand-in nvidia-smi, up to torch's own check, which finds no GPU: exit 2 at once)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CUDA_VISIBLE_DEVICES": "",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    assert subprocess.run(["bash", "-c", "command -v python"], env=env).returncode != 0
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "torch.cuda.is_available() is False in python3" in res.stderr


def test_gpu_check_sections_fit_the_total():
    from benchmarks import gpu_check

    assert list(gpu_check.LIMITS) == list(gpu_check.SECTIONS)
    assert sum(gpu_check.LIMITS.values()) <= gpu_check.TOTAL_S < 8 * 60
    assert {"fit-cpu-small", "fit-gpu", "ray-train"} <= set(gpu_check.SECTIONS)


def test_gpu_check_helpers(tmp_path):
    """The GPU check's parts that need no GPU: its synthetic JPEGs go the device way, and its
    table lines up."""
    from benchmarks.gpu_check import format_table, write_jpegs

    paths = write_jpegs(str(tmp_path / "j"), 3, size=32, workers=1)
    datas = [Path(p).read_bytes() for p in paths]
    assert len(set(datas)) == 3  # distinct images
    assert [jpeg_header(d, None) for d in datas] == [(32, 32)] * 3
    assert write_jpegs(str(tmp_path / "j"), 3, size=32, workers=1) == paths  # reused
    table = format_table([("forward, batch 32", "1234 images/s", ""), ("x", "FAILED: oom", "n")])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].startswith("| measure") and "| FAILED: oom   |" in lines[3]
