"""One place that turns a URL into a filesystem.

Every module reads and writes through these helpers, so local paths, ``file://`` URLs and
``s3://`` URLs (real S3 or any S3-compatible endpoint such as MinIO or moto) behave the same.
Credentials come only from the usual AWS environment variables / profiles that botocore
reads; this module never logs them or puts them into error messages.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "clear_cache",
    "exists",
    "get_fs",
    "is_dir",
    "is_local",
    "is_s3",
    "join",
    "list_dirs",
    "list_files",
    "normalize",
    "put_file",
    "read_bytes",
    "require_bucket",
    "split_bucket",
    "remove",
    "write_bytes",
]

_LOCAL_PROTOCOLS = ("", "file", "local")
_S3_PROTOCOLS = ("s3", "s3a")


def _split(url: str) -> tuple[str, str]:
    """(protocol, rest) where protocol is '' for a plain local path."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        return protocol.lower(), rest
    return "", url


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return _split(url)[0] in _LOCAL_PROTOCOLS


def is_s3(url: str) -> bool:
    """True for ``s3://`` / ``s3a://`` URLs."""
    return _split(url)[0] in _S3_PROTOCOLS


def _endpoint(endpoint_url: str | None) -> str | None:
    # botocore honours AWS_ENDPOINT_URL itself in recent versions, but not every version that
    # s3fs may pull in does: pass it explicitly so both behave the same.
    return (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _safe_endpoint(endpoint: str | None) -> str:
    """The endpoint for messages, with any ``user:password@`` part removed."""
    if not endpoint:
        return "default AWS endpoint"
    parts = urlsplit(endpoint)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def get_fs(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (``bucket/key`` for S3).

    Filesystems come from fsspec's own instance cache (one per protocol + arguments, made
    again in a forked child), so connection pools are reused. S3 listing caches are switched
    off: nightly jobs must see files that other writers added.
    """
    protocol, rest = _split(url)
    if protocol in _LOCAL_PROTOCOLS:
        return LocalFileSystem(), (
            os.path.abspath(os.path.expanduser(rest)) if rest else os.getcwd()
        )
    if protocol in _S3_PROTOCOLS:
        import s3fs  # imported lazily: local-only users need no AWS stack

        endpoint = _endpoint(endpoint_url)
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        return s3fs.S3FileSystem(
            client_kwargs=client_kwargs, use_listings_cache=False
        ), rest.rstrip("/")
    kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
    return fsspec.filesystem(protocol, **kwargs), rest


def clear_cache() -> None:
    """Forget every cached filesystem instance (fsspec's instance cache, the only one), so the
    next call makes new clients that read credentials and endpoints afresh."""
    import sys

    from fsspec.registry import registry  # the filesystem classes fsspec has loaded

    classes = set(registry.values()) | {LocalFileSystem}
    if "s3fs" in sys.modules:
        classes.add(sys.modules["s3fs"].S3FileSystem)
    for cls in classes:
        cls.clear_instance_cache()


def _to_url(url: str, path: str) -> str:
    """A path returned by a filesystem, turned back into the form the caller used."""
    protocol, _ = _split(url)
    if protocol in _LOCAL_PROTOCOLS:
        return path
    return f"{protocol}://{path}"


def _where(url: str, endpoint_url: str | None = None) -> str:
    protocol, _ = _split(url)
    if protocol in _S3_PROTOCOLS:
        return f"{url} ({_safe_endpoint(_endpoint(endpoint_url))})"
    return url


def split_bucket(url: str) -> tuple[str, str]:
    """(bucket, key) of an object-store URL; ``ValueError`` naming the URL when it names no
    bucket (``s3://``, ``s3:///key``): such a URL would list, or write to, whatever bucket the
    credentials happen to reach."""
    protocol, rest = _split(url)
    bucket, _, key = rest.partition("/")
    if not bucket or bucket in (".", ".."):
        raise ValueError(f"{url!r} names no bucket: write {protocol}://BUCKET/PREFIX")
    return bucket, key


def require_bucket(url: str, endpoint_url: str | None = None) -> None:
    """Raise ``ValueError`` unless an object-store URL names a bucket that exists (local paths
    pass). tfa-ray never creates a bucket: a typo must not become a new bucket."""
    if _split(url)[0] not in _S3_PROTOCOLS:
        return
    bucket, _ = split_bucket(url)
    fs, _ = get_fs(url, endpoint_url)
    try:
        found = fs.exists(bucket)
    except PermissionError:  # listing buckets may be forbidden; a bucket we can reach is fine
        found = True
    if not found:
        raise ValueError(
            f"bucket {bucket!r} of {_where(url, endpoint_url)} does not exist: create it first "
            "(tfa-ray never creates buckets)"
        )


def normalize(url: str) -> str:
    """The canonical form that ``list_files`` / ``list_dirs`` return: an absolute plain path
    for local input, the URL without a trailing slash otherwise. Lets callers compare and strip
    prefixes of listed files."""
    protocol, rest = _split(url)
    if protocol in _LOCAL_PROTOCOLS:
        return os.path.abspath(os.path.expanduser(rest)) if rest else os.getcwd()
    return f"{protocol}://{rest.rstrip('/')}"


def join(url: str, *parts: str) -> str:
    """Join path parts with ``/``, keeping the scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    out = url
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        if not out:
            out = part
        elif out.endswith("/"):
            out = out + part
        else:
            out = out + "/" + part
    return out


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    """The whole file; ``FileNotFoundError`` naming the URL if it is missing."""
    fs, path = get_fs(url, endpoint_url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {_where(url, endpoint_url)}") from e
    except IsADirectoryError as e:
        raise IsADirectoryError(f"is a directory, not a file: {url}") from e


def write_bytes(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write a whole file. Local writes go to a temp file that is renamed into place, so a
    reader never sees half a file; S3 PUTs are atomic already."""
    fs, path = get_fs(url, endpoint_url)
    if isinstance(fs, LocalFileSystem):
        with _replacing(path) as tmp:  # mode 0o666 minus umask, like a plain open()
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                f.write(data)
        return
    try:
        fs.pipe_file(path, data)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot write {_where(url, endpoint_url)}: {e}") from e


def put_file(local_path: str, url: str, endpoint_url: str | None = None) -> None:
    """Copy a local file to ``url`` atomically: locally a temp name renamed into place, on S3
    one upload (an object appears whole or not at all)."""
    fs, path = get_fs(url, endpoint_url)
    if isinstance(fs, LocalFileSystem):
        with _replacing(path) as tmp:
            fs.put_file(local_path, tmp)
        return
    fs.put_file(local_path, path)


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[str]:
    """A hidden temp name beside local ``path`` (listings skip it), renamed onto ``path`` when
    the block succeeds and removed when it fails: readers see the old file or the new one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove(url: str, endpoint_url: str | None = None) -> None:
    """Delete a file if it exists."""
    fs, path = get_fs(url, endpoint_url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def exists(url: str, endpoint_url: str | None = None) -> bool:
    """True if a file or directory (S3: object or non-empty prefix / bucket) exists."""
    fs, path = get_fs(url, endpoint_url)
    return bool(fs.exists(path))


def is_dir(url: str, endpoint_url: str | None = None) -> bool:
    """True for a directory (S3: a bucket or a prefix with objects under it)."""
    fs, path = get_fs(url, endpoint_url)
    return bool(fs.isdir(path))


def _missing(url: str, endpoint_url: str | None) -> FileNotFoundError:
    if _split(url)[0] in _S3_PROTOCOLS:
        return FileNotFoundError(
            f"no such bucket or prefix: {_where(url, endpoint_url)} "
            "(check the URL, the endpoint and the credentials)"
        )
    return FileNotFoundError(f"no such directory: {url}")


def _hidden(path: str, root: str) -> bool:
    """Hidden files (``.DS_Store``, ``._x.png`` resource forks, ``.tmp-*`` partial writes) and
    anything under a hidden directory below ``root`` are never data."""
    rel = path[len(root) :].lstrip("/")
    return any(part.startswith(".") for part in rel.split("/"))


def list_files(
    url: str,
    suffixes: tuple[str, ...] | None = None,
    recursive: bool = True,
    endpoint_url: str | None = None,
) -> list[str]:
    """Sorted files under a directory / prefix, filtered by suffix (case-insensitive).

    Returns plain paths for local input (also for ``file://``) and full URLs for the others.
    Hidden files are skipped. A URL that names a single file gives ``[url]`` (if its suffix
    matches). A missing directory, bucket or prefix raises ``FileNotFoundError`` naming the URL.
    """
    fs, path = get_fs(url, endpoint_url)
    want = tuple(s.lower() for s in suffixes) if suffixes else None
    local = isinstance(fs, LocalFileSystem)
    if local:
        if os.path.isfile(path):
            found = [path]
        elif not os.path.isdir(path):
            raise _missing(url, endpoint_url)
        elif recursive:
            found = [
                os.path.join(d, name).replace(os.sep, "/")
                for d, _, names in os.walk(path, followlinks=True)
                for name in names
            ]
        else:
            with os.scandir(path) as it:
                found = [e.path for e in it if e.is_file()]
    else:
        try:
            if recursive:
                found = list(fs.find(path, withdirs=False))
            else:
                found = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "file"]
        except FileNotFoundError:
            found = []
        if not found:
            if not fs.exists(path):
                raise _missing(url, endpoint_url) from None
            if fs.isfile(path):
                found = [path]
    root = path.rstrip("/")
    files = [
        p
        for p in found
        if (p == path or not _hidden(p, root))
        and (want is None or p.lower().endswith(want))
        and not p.endswith("/")
    ]
    return sorted(_to_url(url, p) for p in files)


def list_dirs(url: str, endpoint_url: str | None = None) -> list[str]:
    """Sorted immediate sub-directories (S3: common prefixes), as URLs like ``list_files``."""
    fs, path = get_fs(url, endpoint_url)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(path):
            raise _missing(url, endpoint_url)
        with os.scandir(path) as it:
            dirs = [e.path for e in it if e.is_dir() and not e.name.startswith(".")]
        return sorted(dirs)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise _missing(url, endpoint_url) from None
    dirs = [
        e["name"].rstrip("/")
        for e in entries
        if e["type"] == "directory" and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
    ]
    return sorted(_to_url(url, d) for d in dirs)
