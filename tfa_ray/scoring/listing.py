"""The night's input as a stream of bounded batches: a prefix listed in parallel, or a manifest
read a batch at a time. Nothing here holds every path at once, so the driver's memory does not
grow with the input (the plan sorts and deduplicates them out of core, see ``manifest``).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from tfa_ray import storage
from tfa_ray.data import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = (".txt", ".lst", ".list", ".manifest", ".csv", ".parquet")
BATCH = 16384  # paths per yielded batch (as Python strings: a few MiB)
LIST_THREADS = 16  # sub-prefixes listed at once (object stores answer one page at a time)

Entry = tuple[str, str | None]  # (path, category from the manifest or None)


def is_manifest(source: storage.Location) -> bool:
    return source.url.lower().endswith(MANIFEST_SUFFIXES) and not source.is_dir()


def _is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/")


def normalize_path(path: str) -> str:
    """One spelling per file: ``./``, ``..`` and repeated slashes resolved (``a//./b.png`` ->
    ``a/b.png``), local paths absolute and without ``file://``. ``..`` never climbs above the
    bucket / filesystem root, so what it reaches can be compared with the input root."""
    if storage.is_local(path):
        return storage.normalize(path)
    scheme, rest = path.split("://", 1)
    rest = posixpath.normpath("/" + re.sub("/+", "/", rest)).lstrip("/")
    return f"{scheme}://{rest}"


def inside(path: str, root: str) -> bool:
    """Whether a normalised ``path`` lies under the normalised ``root``."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _wanted(path: str, root: str, suffixes: tuple[str, ...]) -> bool:
    rel = path[len(root) :].lstrip("/")
    hidden = any(part.startswith(".") for part in rel.split("/"))
    return not hidden and path.lower().endswith(suffixes) and not path.endswith("/")


def _batched(items: Iterator, size: int = BATCH) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_prefix(
    prefix: storage.Location,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    threads: int = LIST_THREADS,
) -> Iterator[list[str]]:
    """Files under a prefix, in batches and in no particular order (the plan sorts them).

    Local: one ``os.walk``. Object stores: each top-level sub-prefix is listed by its own
    ``find`` in a thread pool, at most ``2 * threads`` listings held at once."""
    want = tuple(s.lower() for s in suffixes)
    url, fs, path = prefix.url, prefix.fs, prefix.path
    root = path.rstrip("/")
    if prefix.local and os.path.isdir(path):
        walk = (
            os.path.join(d, name).replace(os.sep, "/")
            for d, _, names in os.walk(path, followlinks=True)
            for name in names
        )
        yield from _batched(p for p in walk if _wanted(p, root, want))
        return
    try:
        top = fs.ls(path, detail=True)
    except FileNotFoundError:
        top = []
    if not top:  # a single file, or a missing prefix: storage names the problem
        yield prefix.list_files(suffixes)
        return
    to_url = (lambda p: p) if prefix.local else (lambda p: f"{url.split('://')[0]}://{p}")
    files = [e["name"] for e in top if e["type"] == "file"]
    yield from _batched(to_url(p) for p in files if _wanted(p, root, want))
    dirs = [e["name"].rstrip("/") for e in top if e["type"] == "directory"]
    dirs = [d for d in dirs if not d.rsplit("/", 1)[-1].startswith(".")]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for d in dirs:
            pending.append(pool.submit(fs.find, d, withdirs=False))
            while len(pending) >= 2 * threads:
                found = pending.popleft().result()
                yield from _batched(to_url(p) for p in found if _wanted(p, root, want))
        while pending:
            found = pending.popleft().result()
            yield from _batched(to_url(p) for p in found if _wanted(p, root, want))


def _iter_manifest(manifest: storage.Location) -> Iterator[list[Entry]]:
    url = manifest.url
    with manifest.open() as f:
        if url.lower().endswith(".parquet"):
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "path" not in names:
                raise ValueError(f"manifest {url} has no 'path' column (columns: {names})")
            cols = ["path", "category"] if "category" in names else ["path"]
            for b in pf.iter_batches(batch_size=BATCH, columns=cols):
                paths = b.column("path").to_pylist()
                cats = b.column("category").to_pylist() if len(cols) == 2 else [None] * len(paths)
                yield [(str(p), c) for p, c in zip(paths, cats, strict=True) if p]
            return
        import io

        lines = io.TextIOWrapper(f, encoding="utf-8-sig")
        entries = ((ln.strip(), None) for ln in lines)
        yield from _batched(e for e in entries if e[0] and not e[0].startswith("#"))


def iter_inputs(
    source: storage.Location, root: str | None = None
) -> tuple[str, Iterator[list[Entry]]]:
    """(root, batches of (path, category from the manifest or None)) for a prefix or a manifest.

    A manifest's relative paths are joined to ``root`` (default: the manifest's directory);
    every path is normalised (:func:`normalize_path`), so ``./a.png`` and ``a.png`` are one
    file. Whether a path stays inside ``root`` is the plan's question (``..`` may leave it)."""
    if is_manifest(source):
        base = normalize_path(root or storage.normalize(source.url).rsplit("/", 1)[0])
        prefix = base.rstrip("/") + "/"

        def joined() -> Iterator[list[Entry]]:
            for batch in _iter_manifest(source):
                yield [
                    (normalize_path(p if _is_absolute(p) else prefix + p.lstrip("/")), c)
                    for p, c in batch
                ]

        return base, joined()
    batches = iter_prefix(source, IMAGE_SUFFIXES)
    return storage.normalize(root or source.url), ([(p, None) for p in b] for b in batches)


def list_inputs(
    input_url: str, endpoint_url: str | None = None, root: str | None = None
) -> tuple[str, list[Entry]]:
    """:func:`iter_inputs` of a URL, as one list (small inputs and tests; prefixes come
    sorted)."""
    source = storage.resolve(input_url, endpoint_url)
    root_url, batches = iter_inputs(source, root)
    entries = [e for b in batches for e in b]
    if not is_manifest(source):
        entries.sort()
    return root_url, entries
