"""Inputs stay inside what the user named: manifest paths normalised (one row per file), paths
that escape the input root refused as error rows, and ``s3://`` URLs that name no bucket or a
bucket that does not exist refused before anything is listed or created."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from tfa_ray import scoring, storage
from tfa_ray.cli import main
from tfa_ray.scoring.listing import normalize_path
from tfa_ray.synth import make_image


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_image("texture", 64, np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def test_normalize_path():
    assert normalize_path("s3://b/day/./texture//a.png") == "s3://b/day/texture/a.png"
    assert normalize_path("s3://b/day/x/../../../other/a.png") == "s3://other/a.png"
    assert normalize_path("file:///tmp/x/./y/../a.png") == "/tmp/x/a.png"


def _archive(tmp_path) -> tuple[str, list[str], str]:
    """An input root with three images, an image outside it, and a manifest that names the
    images several ways plus escapes (relative ``..``, absolute elsewhere)."""
    root = tmp_path / "night"
    for i in range(3):
        (root / "texture").mkdir(parents=True, exist_ok=True)
        (root / "texture" / f"{i}.png").write_bytes(_png(i))
    elsewhere = tmp_path / "elsewhere" / "texture"
    elsewhere.mkdir(parents=True)
    (elsewhere / "secret.png").write_bytes(_png(9))
    lines = [
        "texture/0.png",
        "./texture/0.png",
        "texture//0.png",
        "texture/./1.png",
        f"{root}/texture/2.png",
        f"{root}/texture/../texture/2.png",
        "texture/../../elsewhere/texture/secret.png",  # escapes the root
        str(elsewhere / "secret.png"),  # absolute, elsewhere: the same file
        "./.././night/../elsewhere/texture/secret.png",  # and again
    ]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    inside = [str(root / "texture" / f"{i}.png") for i in range(3)]
    return str(root / "list.txt"), inside, str(elsewhere / "secret.png")


def test_manifest_duplicates_and_escapes(ray_cluster, tiny_model_dir, tmp_path):
    manifest, inside, outside = _archive(tmp_path)
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    summary = scoring.score(
        scoring.ScoreConfig(input=manifest, output=str(tmp_path / "out"), run_id="a"),
        resolver,
        echo=lambda _m: None,
    )
    rows = scoring.read_results(summary.run_dir).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows) == 4  # one row per distinct file
    assert sorted(by_path) == sorted([*inside, outside])
    assert all(by_path[p]["status"] == "ok" for p in inside)
    refused = by_path[outside]
    assert refused["status"] == "error" and refused["error_kind"] == "permanent"
    assert "outside the input root" in refused["error"] and refused["score"] is None
    assert {r["category"] for r in rows} <= {"texture", None}

    allowed = scoring.score(  # with --category the escaping file is scored when allowed
        scoring.ScoreConfig(
            input=manifest,
            output=str(tmp_path / "out"),
            run_id="b",
            category="texture",
            allow_outside_root=True,
        ),
        resolver,
        echo=lambda _m: None,
    )
    assert (allowed.total, allowed.ok) == (4, 4)


def test_categories_are_never_dot_or_dotdot(tmp_path):
    from tfa_ray.scoring.plan import assign_categories

    root = str(tmp_path)
    entries = [(f"{root}/bolt/a.png", "."), (f"{root}/bolt/b.png", ".."), (f"{root}/x.png", None)]
    pairs = assign_categories(entries, root, None, "{category}/**")
    assert [c for _, c in pairs] == ["bolt", "bolt", None]  # bad hints ignored, pattern used
    pairs = assign_categories([("/elsewhere/tmp/a.png", None)], root, None, "{category}/**")
    assert pairs == [("/elsewhere/tmp/a.png", None)]  # not "elsewhere", not "tmp"


def _buckets(endpoint: str) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return {b["Name"] for b in s3.list_buckets().get("Buckets", [])}


def test_s3_urls_must_name_an_existing_bucket(s3_env, tmp_path, capsys):
    bucket = f"in-{uuid.uuid4().hex[:8]}"
    storage.get_fs(f"s3://{bucket}")[0].mkdir(bucket)
    storage.write_bytes(f"s3://{bucket}/day/texture/0.png", _png(0))
    typo = f"typo-{uuid.uuid4().hex[:8]}"
    before = _buckets(s3_env)
    cases = [
        (["--input", "s3://", "--output", str(tmp_path / "o")], "names no bucket"),
        (["--input", f"s3://{bucket}/day", "--output", "s3://"], "names no bucket"),
        (["--input", f"s3://{bucket}/day", "--output", "s3:///out"], "names no bucket"),
        (["--input", f"s3://{bucket}/day", "--output", f"s3://{typo}/out"], "does not exist"),
    ]
    for args, why in cases:
        capsys.readouterr()
        rc = main(["score", *args, "--category", "texture", "--model", "texture=/nowhere"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, err
        assert len(err) == 1 and why in err[0], err
    assert _buckets(s3_env) == before  # nothing created: not `typo`, not `out`
    assert not storage.exists(str(tmp_path / "o"))


@pytest.mark.parametrize("url", ["s3://", "s3:///key"])
def test_split_bucket_refuses(url):
    with pytest.raises(ValueError, match="names no bucket"):
        storage.split_bucket(url)
