"""storage.py on local paths, file:// URLs and a real (moto) S3 server."""

from __future__ import annotations

import os
import uuid

import pytest

from tfa_ray import data, storage, synth

SECRET = "dummy-secret-key-for-tests"


def test_join_keeps_scheme() -> None:
    assert storage.join("s3://bucket/x/", "y", "/z.png") == "s3://bucket/x/y/z.png"
    assert storage.join("s3://bucket", "a/b") == "s3://bucket/a/b"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.join("/tmp/a", "b", "", "c") == "/tmp/a/b/c"
    assert storage.join("rel", "x") == "rel/x"


def test_local_write_read_list(tmp_path) -> None:
    root = str(tmp_path / "root")
    storage.write_bytes(storage.join(root, "b", "2.png"), b"two")  # creates parents
    storage.write_bytes(storage.join(root, "a.PNG"), b"one")
    storage.write_bytes(storage.join(root, "b", "c", "3.jpg"), b"three")
    storage.write_bytes(storage.join(root, "notes.txt"), b"text")
    storage.write_bytes(storage.join(root, ".DS_Store"), b"junk")
    storage.write_bytes(storage.join(root, "b", "._2.png"), b"resource fork")

    assert storage.read_bytes(storage.join(root, "b", "2.png")) == b"two"
    assert storage.exists(storage.join(root, "a.PNG"))
    assert not storage.exists(storage.join(root, "nope.png"))
    assert storage.is_dir(storage.join(root, "b"))

    everything = storage.list_files(root)
    assert everything == sorted(everything)
    assert {os.path.relpath(p, root) for p in everything} == {
        "a.PNG",
        "b/2.png",
        "b/c/3.jpg",
        "notes.txt",
    }
    images = storage.list_files(root, suffixes=(".png", ".jpg"))
    assert [os.path.relpath(p, root) for p in images] == ["a.PNG", "b/2.png", "b/c/3.jpg"]
    flat = storage.list_files(root, suffixes=(".png",), recursive=False)
    assert [os.path.relpath(p, root) for p in flat] == ["a.PNG"]
    assert [os.path.basename(d) for d in storage.list_dirs(root)] == ["b"]


def test_write_is_atomic_and_cleans_up(tmp_path) -> None:
    url = str(tmp_path / "f.bin")
    storage.write_bytes(url, b"old")
    storage.write_bytes(url, b"new")
    assert storage.read_bytes(url) == b"new"
    with pytest.raises(TypeError):
        storage.write_bytes(url, "not bytes")  # type: ignore[arg-type]
    assert storage.read_bytes(url) == b"new"  # the failed write left the old file intact
    assert os.listdir(tmp_path) == ["f.bin"]  # and no temp file behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask  # readable like a plain open()


def test_file_urls(tmp_path) -> None:
    url = "file://" + str(tmp_path)
    storage.write_bytes(storage.join(url, "x", "1.png"), b"png")
    assert (tmp_path / "x" / "1.png").read_bytes() == b"png"
    assert storage.read_bytes(storage.join(url, "x", "1.png")) == b"png"
    assert storage.list_files(url) == [str(tmp_path / "x" / "1.png")]  # plain paths back
    assert storage.exists(url + "/x")


def test_missing_local_paths_name_the_url(tmp_path) -> None:
    missing = str(tmp_path / "no" / "such")
    with pytest.raises(FileNotFoundError, match="no/such"):
        storage.list_files(missing)
    with pytest.raises(FileNotFoundError, match="no/such"):
        storage.list_dirs(missing)
    with pytest.raises(FileNotFoundError, match="x.png"):
        storage.read_bytes(str(tmp_path / "x.png"))


# --------------------------------------------------------------------------------------
# S3 through a real moto server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Dummy credentials and the endpoint in the environment, nothing from the host's AWS
    configuration; yields a client to create buckets with."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage.clear_cache()
    yield boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    storage.clear_cache()


def _bucket(client) -> str:
    name = f"tfa-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def test_s3_dataset_roundtrip(s3_env, tmp_path) -> None:
    bucket = _bucket(s3_env)
    root = f"s3://{bucket}/datasets/synth"
    kwargs = dict(categories=("object",), n_train=3, n_test_good=1, n_test_defect=2, size=32)
    synth.make_dataset(root, **kwargs)
    local = str(tmp_path / "local")
    synth.make_dataset(local, **kwargs)

    listed = storage.list_files(root, suffixes=(".png",))
    assert len(listed) == 3 + 1 + 2 + 2  # train, test good, test defects, masks
    assert all(u.startswith(f"s3://{bucket}/datasets/synth/object/") for u in listed)
    assert listed == sorted(listed)
    # seen by a plain boto3 listing too: the files really are in the bucket
    keys = [o["Key"] for o in s3_env.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(f"s3://{bucket}/{k}" for k in keys) == listed

    d = data.discover(root, "object")
    assert d.layout == "mvtec"
    assert d.train == [f"{root}/object/train/good/{i:03d}.png" for i in range(3)]
    assert len(d.test) == 3
    assert sum(s.label for s in d.test) == 2
    for s in d.test:
        assert s.path.startswith("s3://")
        assert len(s.mask_paths) == s.label
    assert data.list_categories(root) == ["object"]

    # the same bytes as the local copy (read through s3fs, the endpoint from the env)
    url = d.train[0]
    assert storage.read_bytes(url) == (tmp_path / "local/object/train/good/000.png").read_bytes()
    assert data.load_image(url, 16).shape == (3, 16, 16)
    assert storage.exists(url) and not storage.exists(url + ".missing")

    # a later writer's file shows up (no stale listing cache)
    s3_env.put_object(Bucket=bucket, Key="datasets/synth/object/train/good/999.png", Body=b"x")
    assert len(storage.list_files(f"{root}/object/train/good")) == 4


def test_s3_endpoint_from_argument(s3_env, s3_server, monkeypatch) -> None:
    bucket = _bucket(s3_env)
    s3_env.put_object(Bucket=bucket, Key="a/b.png", Body=b"abc")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.clear_cache()
    assert storage.list_files(f"s3://{bucket}/a", endpoint_url=s3_server) == [
        f"s3://{bucket}/a/b.png"
    ]
    assert storage.read_bytes(f"s3://{bucket}/a/b.png", endpoint_url=s3_server) == b"abc"
    fs1, path = storage.get_fs(f"s3://{bucket}/a", endpoint_url=s3_server)
    fs2, _ = storage.get_fs(f"s3://{bucket}/other", endpoint_url=s3_server)
    assert fs1 is fs2 and path == f"{bucket}/a"  # cached per (protocol, endpoint)


def test_clear_cache_picks_up_new_credentials(s3_env, s3_server, monkeypatch, fault_proxy):
    """Cached filesystems keep their credentials; ``clear_cache`` (fsspec's instance cache, the
    only one) makes the next call sign with the ones the environment has now."""
    bucket = _bucket(s3_env)
    s3_env.put_object(Bucket=bucket, Key="k.png", Body=b"abc")
    proxy = fault_proxy(s3_server)
    url = f"s3://{bucket}/k.png"
    assert storage.read_bytes(url, proxy.url) == b"abc"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert storage.read_bytes(url, proxy.url) == b"abc"
    assert proxy.keys == {"dummy-access-key"}  # still the cached client
    storage.clear_cache()
    assert storage.read_bytes(url, proxy.url) == b"abc"
    assert proxy.keys == {"dummy-access-key", "rotated"}


def test_s3_missing_bucket_and_prefix(s3_env) -> None:
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/data"
    with pytest.raises(FileNotFoundError) as err:
        storage.list_files(missing)
    assert missing in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        data.discover(missing, "cat")
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        storage.read_bytes(missing + "/x.png")

    bucket = _bucket(s3_env)
    s3_env.put_object(Bucket=bucket, Key="present/x.png", Body=b"x")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/absent"):
        storage.list_files(f"s3://{bucket}/absent")
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/absent"):
        storage.list_dirs(f"s3://{bucket}/absent")


def test_location_is_resolved_once_and_travels(s3_env, s3_server, monkeypatch, tmp_path) -> None:
    """A location resolved once serves every file below it without resolving again, and
    pickles (what Ray ships to a stage) to the same filesystem: fsspec rebuilds an s3fs
    filesystem from its options once per process, endpoint included."""
    import pickle

    import fsspec.core

    bucket = _bucket(s3_env)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.clear_cache()
    run = storage.resolve(f"s3://{bucket}/out/", endpoint_url=s3_server)
    made: list[str] = []
    real = fsspec.core.url_to_fs
    monkeypatch.setattr(
        fsspec.core, "url_to_fs", lambda url, **kw: made.append(url) or real(url, **kw)
    )
    run.join("a", "b.json").write_bytes(b"{}")
    assert run.at(f"s3a://{bucket}/out/a/b.json").read_bytes() == b"{}"
    assert run.list_files((".json",)) == [f"s3://{bucket}/out/a/b.json"]
    back = pickle.loads(pickle.dumps(run))
    assert back.fs is run.fs and back.path == f"{bucket}/out"
    assert back.join("a/b.json").read_bytes() == b"{}"  # the endpoint travelled, not the env
    assert made == []
    local = run.at(str(tmp_path / "x"))  # another kind of store: resolved, with the endpoint
    assert made == [str(tmp_path / "x")] and local.local and local.endpoint_url == s3_server
    with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/out/none \(http://127"):
        run.join("none").read_bytes()  # messages name the URL and the endpoint
