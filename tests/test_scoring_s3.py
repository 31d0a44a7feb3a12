"""Scoring from s3:// to s3:// against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import uuid
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from tfa_ray import scoring, storage
from tfa_ray.synth import make_image


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_s3_to_s3(ray_cluster, tiny_model_dir, s3_env, capsys):
    bucket = f"archive-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.get_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    base = f"s3://{bucket}/2024-06-01"
    good = []
    for i in range(6):
        url = f"{base}/texture/cam{i % 2}/{i:03d}.png"
        storage.write_bytes(url, _png(make_image("texture", 64, np.random.default_rng(i))))
        good.append(url)
    storage.write_bytes(f"{base}/texture/cam0/zero.png", b"")
    storage.write_bytes(f"{base}/texture/cam0/notes.jpg", b"not a jpeg")
    # a manifest naming the archive plus one object that is gone by the time it is read
    manifest = [*good, f"{base}/texture/cam0/zero.png", f"{base}/texture/cam1/gone.png"]
    storage.write_bytes(f"{base}/manifest.txt", "\n".join(manifest).encode())

    summary = scoring.score(
        scoring.ScoreConfig(
            input=f"{base}/manifest.txt",
            root=base,
            output=f"s3://{bucket}/scores",
            run_id="s3run",
            shard_size=3,
        ),
        scoring.LocalResolver({"texture": tiny_model_dir}),
    )
    assert summary.total == 8 and summary.ok == 6 and summary.error == 2

    # read it back with pyarrow's own S3 client
    endpoint = urlsplit(s3_env)
    s3 = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme,
        region="us-east-1",
    )
    table = pq.read_table(f"{bucket}/scores/run_id=s3run", filesystem=s3)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(manifest)
    for url in good:
        assert rows[url]["status"] == "ok" and rows[url]["mask_png"] is not None
        assert Image.open(io.BytesIO(rows[url]["mask_png"])).size == (64, 64)
    assert "empty" in rows[f"{base}/texture/cam0/zero.png"]["error"]
    assert "cannot read" in rows[f"{base}/texture/cam1/gone.png"]["error"]
    success = json.loads(storage.read_bytes(f"s3://{bucket}/scores/run_id=s3run/_SUCCESS"))
    drift = success["drift"]["categories"]["texture"]  # computed from the rows on S3
    assert (drift["scored"], drift["errors"]) == (6, 2) and drift["psi"] is not None

    # prefix input (not a manifest): the category is the first component under the prefix
    summary = scoring.score(
        scoring.ScoreConfig(input=base, output=f"s3://{bucket}/scores", run_id="prefix"),
        scoring.LocalResolver({"texture": tiny_model_dir}),
    )
    assert summary.total == 8 and summary.ok == 6
    assert summary.per_category["texture"]["error"] == 2  # zero.png, notes.jpg
    assert "testing" not in capsys.readouterr().out  # no credentials in what was printed
