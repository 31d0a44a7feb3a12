"""One place that turns a URL into a filesystem.

Every module reads and writes through here, so local paths, ``file://`` URLs and ``s3://``
URLs (real S3 or any S3-compatible endpoint such as MinIO or moto) behave the same. A run
resolves each of its URLs once (:func:`resolve`, the S3 endpoint applied there) and hands the
:class:`Location` down; the functions that take a URL are for one-off reads and writes.
Credentials come only from the usual AWS environment variables / profiles that botocore
reads; this module never logs them or puts them into error messages.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import fsspec.core
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "Location",
    "clear_cache",
    "exists",
    "get_fs",
    "is_dir",
    "is_local",
    "is_s3",
    "join",
    "list_dirs",
    "list_files",
    "locate",
    "normalize",
    "put_file",
    "read_bytes",
    "require_bucket",
    "resolve",
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


def _options(protocol: str, endpoint_url: str | None) -> dict:
    """fsspec's storage options for a protocol: the S3 endpoint (listing caches off: nightly jobs
    must see files that other writers added); ``endpoint_url`` as given for other stores."""
    if protocol in _LOCAL_PROTOCOLS:
        return {}
    if protocol in _S3_PROTOCOLS:
        endpoint = _endpoint(endpoint_url)
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        return {"client_kwargs": client_kwargs, "use_listings_cache": False}
    return {"endpoint_url": endpoint_url} if endpoint_url else {}


def _family(protocol: str) -> str:
    """Protocols one filesystem serves alike (``file`` and plain paths; ``s3`` and ``s3a``)."""
    if protocol in _LOCAL_PROTOCOLS:
        return "file"
    return "s3" if protocol in _S3_PROTOCOLS else protocol


def _path_in(fs: fsspec.AbstractFileSystem, url: str) -> str:
    """The path of ``url`` inside ``fs``: local paths absolute with ``~`` and ``..`` resolved,
    ``bucket/key`` on S3."""
    protocol, rest = _split(url)
    if protocol in _LOCAL_PROTOCOLS:
        return os.path.abspath(os.path.expanduser(rest)) if rest else os.getcwd()
    return type(fs)._strip_protocol(url)


def resolve(url: str, endpoint_url: str | None = None) -> Location:
    """The one place a URL becomes a filesystem (``fsspec.core.url_to_fs``, the S3 endpoint
    applied there): a run resolves its locations once and hands them down.

    Filesystems come from fsspec's own instance cache (one per protocol + options and process,
    made again in a forked child), so connection pools are reused; s3fs is imported only for
    S3 URLs (local-only users need no AWS stack)."""
    fs, _ = fsspec.core.url_to_fs(url, **_options(_split(url)[0], endpoint_url))
    return Location(url, fs, _path_in(fs, url), endpoint_url)


def locate(where: str | Location, endpoint_url: str | None = None) -> Location:
    """A :class:`Location` as it is, a URL resolved: for entry points that take either."""
    return where if isinstance(where, Location) else resolve(where, endpoint_url)


def get_fs(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (``bucket/key`` for S3): :func:`resolve`
    as a pair, for one-off callers."""
    loc = resolve(url, endpoint_url)
    return loc.fs, loc.path


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


def _hidden(path: str, root: str) -> bool:
    """Hidden files (``.DS_Store``, ``._x.png`` resource forks, ``.tmp-*`` partial writes) and
    anything under a hidden directory below ``root`` are never data."""
    rel = path[len(root) :].lstrip("/")
    return any(part.startswith(".") for part in rel.split("/"))


@dataclass(frozen=True)
class Location:
    """A URL and the filesystem that serves it, resolved once (:func:`resolve`) and handed down
    instead of a URL and an endpoint. :meth:`join` and :meth:`at` reach other files on the same
    filesystem without resolving again. Pickles: Ray tasks and actors get the filesystem's
    options and fsspec rebuilds it once per process (its instance cache)."""

    url: str  # as the caller wrote it: messages, and the URLs that listings return
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str  # inside ``fs``: an absolute local path, ``bucket/key`` on S3
    endpoint_url: str | None = None  # as resolved with (None: the environment's)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> Location:
        """A location below this one (:func:`join`), on the same filesystem."""
        return self.at(join(self.url, *parts))

    def at(self, url: str) -> Location:
        """``url`` on this filesystem; resolved anew (same endpoint) only when another kind of
        store serves it (a manifest may name files anywhere)."""
        if _family(_split(url)[0]) != _family(_split(self.url)[0]):
            return resolve(url, self.endpoint_url)
        return Location(url, self.fs, _path_in(self.fs, url), self.endpoint_url)

    def where(self) -> str:
        """The URL for messages, with the S3 endpoint it reaches (never credentials)."""
        return _where(self.url, self.endpoint_url)

    def require_bucket(self) -> None:
        """Raise ``ValueError`` unless an object-store URL names a bucket that exists (local
        paths pass). tfa-ray never creates a bucket: a typo must not become a new bucket."""
        if _split(self.url)[0] not in _S3_PROTOCOLS:
            return
        bucket, _ = split_bucket(self.url)
        try:
            found = self.fs.exists(bucket)
        except PermissionError:  # listing buckets may be forbidden; one we can reach is fine
            found = True
        if not found:
            raise ValueError(
                f"bucket {bucket!r} of {self.where()} does not exist: create it first "
                "(tfa-ray never creates buckets)"
            )

    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        """The whole file; ``FileNotFoundError`` naming the URL if it is missing."""
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no such file: {self.where()}") from e
        except IsADirectoryError as e:
            raise IsADirectoryError(f"is a directory, not a file: {self.url}") from e

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file. Local writes go to a temp file that is renamed into place, so a
        reader never sees half a file; S3 PUTs are atomic already."""
        if self.local:
            with _replacing(self.path) as tmp:  # mode 0o666 minus umask, like a plain open()
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                with os.fdopen(os.open(tmp, flags, 0o666), "wb") as f:
                    f.write(data)
            return
        try:
            self.fs.pipe_file(self.path, data)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot write {self.where()}: {e}") from e

    def put_file(self, local_path: str) -> None:
        """Copy a local file here atomically: locally a temp name renamed into place, on S3
        one upload (an object appears whole or not at all)."""
        if self.local:
            with _replacing(self.path) as tmp:
                self.fs.put_file(local_path, tmp)
            return
        self.fs.put_file(local_path, self.path)

    def remove(self) -> None:
        """Delete the file if it exists."""
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def exists(self) -> bool:
        """True if a file or directory (S3: object or non-empty prefix / bucket) exists."""
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        """True for a directory (S3: a bucket or a prefix with objects under it)."""
        return bool(self.fs.isdir(self.path))

    def _missing(self) -> FileNotFoundError:
        if _split(self.url)[0] in _S3_PROTOCOLS:
            return FileNotFoundError(
                f"no such bucket or prefix: {self.where()} "
                "(check the URL, the endpoint and the credentials)"
            )
        return FileNotFoundError(f"no such directory: {self.url}")

    def list_files(
        self, suffixes: tuple[str, ...] | None = None, recursive: bool = True
    ) -> list[str]:
        """Sorted files under this directory / prefix, filtered by suffix (case-insensitive).

        Returns plain paths for local input (also for ``file://``) and full URLs for the
        others. Hidden files are skipped. A location that is a single file gives ``[url]`` (if
        its suffix matches). A missing directory, bucket or prefix raises ``FileNotFoundError``
        naming the URL."""
        fs, path = self.fs, self.path
        want = tuple(s.lower() for s in suffixes) if suffixes else None
        if self.local:
            if os.path.isfile(path):
                found = [path]
            elif not os.path.isdir(path):
                raise self._missing()
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
                    raise self._missing() from None
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
        return sorted(_to_url(self.url, p) for p in files)

    def list_dirs(self) -> list[str]:
        """Sorted immediate sub-directories (S3: common prefixes), as URLs like ``list_files``."""
        if self.local:
            if not os.path.isdir(self.path):
                raise self._missing()
            with os.scandir(self.path) as it:
                dirs = [e.path for e in it if e.is_dir() and not e.name.startswith(".")]
            return sorted(dirs)
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            raise self._missing() from None
        dirs = [
            e["name"].rstrip("/")
            for e in entries
            if e["type"] == "directory"
            and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
        ]
        return sorted(_to_url(self.url, d) for d in dirs)


# One-off calls by URL: each resolves its URL (a run resolves once and uses Location's methods).


def require_bucket(url: str, endpoint_url: str | None = None) -> None:
    """:meth:`Location.require_bucket` of ``url``."""
    resolve(url, endpoint_url).require_bucket()


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    """:meth:`Location.read_bytes` of ``url``."""
    return resolve(url, endpoint_url).read_bytes()


def write_bytes(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """:meth:`Location.write_bytes` of ``url``."""
    resolve(url, endpoint_url).write_bytes(data)


def put_file(local_path: str, url: str, endpoint_url: str | None = None) -> None:
    """:meth:`Location.put_file` of ``url``."""
    resolve(url, endpoint_url).put_file(local_path)


def remove(url: str, endpoint_url: str | None = None) -> None:
    """:meth:`Location.remove` of ``url``."""
    resolve(url, endpoint_url).remove()


def exists(url: str, endpoint_url: str | None = None) -> bool:
    """:meth:`Location.exists` of ``url``."""
    return resolve(url, endpoint_url).exists()


def is_dir(url: str, endpoint_url: str | None = None) -> bool:
    """:meth:`Location.is_dir` of ``url``."""
    return resolve(url, endpoint_url).is_dir()


def list_files(
    url: str,
    suffixes: tuple[str, ...] | None = None,
    recursive: bool = True,
    endpoint_url: str | None = None,
) -> list[str]:
    """:meth:`Location.list_files` of ``url``."""
    return resolve(url, endpoint_url).list_files(suffixes, recursive)


def list_dirs(url: str, endpoint_url: str | None = None) -> list[str]:
    """:meth:`Location.list_dirs` of ``url``."""
    return resolve(url, endpoint_url).list_dirs()
