"""The plan of a run: list the input once, give every path a category, resolve each category's
model, cut deterministic shards; on a rerun, read the plan back and find what is left to do.

The plan is written to ``<run>/_plan.json`` once, so shards never change between a run and
its reruns. Only model resolutions that failed *transiently* (registry unreachable, download
failed) are tried again on a rerun; the plan is then rewritten with what they resolve to.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import re
from typing import Any

import pyarrow.parquet as pq

from tfa_ray import storage
from tfa_ray.data import IMAGE_SUFFIXES
from tfa_ray.retry import is_transient
from tfa_ray.scoring.config import ScoreConfig
from tfa_ray.scoring.contract import PLAN_FILE, RETRY_DIR, retry_marker, shard_file
from tfa_ray.scoring.models import Resolver

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".lst", ".list", ".manifest", ".csv", ".parquet")


# --------------------------------------------------------------------------------------
# listing and categories


def category_regex(pattern: str) -> re.Pattern[str]:
    """A path pattern relative to the input root -> regex with a ``category`` group.

    ``{category}`` is one path component, ``*`` any characters within one component, ``**``,
    ``...`` and ``…`` any characters across components; everything else is literal. The
    pattern must match the whole relative path, so ``{category}/**`` takes the first
    component and ``line-*/{category}/**`` the second.
    """
    if "{category}" not in pattern:
        raise ValueError(f"category pattern {pattern!r} has no {{category}} placeholder")
    tokens = re.split(r"(\{category\}|\*\*|\.\.\.|…|\*)", pattern)
    out = []
    for tok in tokens:
        if tok == "{category}":
            out.append("(?P<category>[^/]+)")
        elif tok in ("**", "...", "…"):
            out.append(".*")
        elif tok == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(tok))
    return re.compile("".join(out))


def _is_manifest(url: str, endpoint_url: str | None) -> bool:
    return url.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_dir(url, endpoint_url)


def _read_manifest(url: str, endpoint_url: str | None) -> list[tuple[str, str | None]]:
    data = storage.read_bytes(url, endpoint_url)
    if url.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        if "path" not in table.column_names:
            raise ValueError(f"manifest {url} has no 'path' column (columns: {table.column_names})")
        paths = table.column("path").to_pylist()
        cats = (
            table.column("category").to_pylist()
            if "category" in table.column_names
            else [None] * len(paths)
        )
        return [(str(p), c) for p, c in zip(paths, cats, strict=True) if p]
    lines = data.decode("utf-8-sig").splitlines()
    return [(ln.strip(), None) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _is_absolute(path: str) -> bool:
    return "://" in path or path.startswith("/")


def list_inputs(
    input_url: str, endpoint_url: str | None = None, root: str | None = None
) -> tuple[str, list[tuple[str, str | None]]]:
    """(root, [(path, category from the manifest or None)]) for a prefix or a manifest.

    A manifest's relative paths are joined to ``root`` (default: the manifest's directory)."""
    if _is_manifest(input_url, endpoint_url):
        base = storage.normalize(root or storage.normalize(input_url).rsplit("/", 1)[0])
        entries = [
            (p if _is_absolute(p) else storage.join(base, p), c)
            for p, c in _read_manifest(input_url, endpoint_url)
        ]
        return base, entries
    files = storage.list_files(input_url, IMAGE_SUFFIXES, endpoint_url=endpoint_url)
    return storage.normalize(root or input_url), [(f, None) for f in files]


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    if path.startswith(root):
        return path[len(root) :]
    return path.split("://", 1)[-1].lstrip("/")


def assign_categories(
    entries: list[tuple[str, str | None]], root: str, category: str | None, pattern: str
) -> list[tuple[str, str | None]]:
    """(path, category or None when the path does not match the pattern)."""
    rx = category_regex(pattern)
    out = []
    for path, hint in entries:
        if category:
            out.append((path, category))
        elif hint:
            out.append((path, hint))
        else:
            m = rx.fullmatch(_relative(path, root))
            out.append((path, m.group("category") if m else None))
    return out


# --------------------------------------------------------------------------------------
# the plan


def resolve_category(cfg: ScoreConfig, category: str, resolver: Resolver) -> dict[str, Any]:
    """The plan's model entry for a category: name, version, image size; or the error, with
    ``transient`` telling whether a rerun should try again."""
    from tfa_ray.config import preset_from_json

    try:
        name, version, url = resolver(category, cfg.alias)
        preset = preset_from_json(storage.read_bytes(storage.join(url, "config.json")).decode())
        return {"name": name, "version": int(version), "image_size": preset.model.image_size}
    except Exception as e:  # noqa: BLE001 - a missing model only fails its own rows
        return {
            "error": f"no usable model {cfg.prefix}{category}@{cfg.alias} for category "
            f"{category!r}: {type(e).__name__}: {e}",
            "transient": is_transient(e),
        }


def make_plan(cfg: ScoreConfig, run_id: str, resolver: Resolver) -> dict[str, Any]:
    """List the input, assign categories, resolve each category's model once, cut shards."""
    root, entries = list_inputs(cfg.input, cfg.endpoint_url, cfg.root)
    if not entries:
        raise ValueError(f"no input images under {cfg.input}")
    pairs = assign_categories(entries, root, cfg.category, cfg.category_pattern)
    seen: set[str] = set()
    by_cat: dict[str | None, list[str]] = {}
    for path, cat in pairs:
        if path in seen:  # a manifest that names a file twice still gives one row
            continue
        seen.add(path)
        by_cat.setdefault(cat, []).append(path)
    models = {cat: resolve_category(cfg, cat, resolver) for cat in sorted(c for c in by_cat if c)}
    shards = []
    size = max(1, int(cfg.shard_size))
    for cat in sorted(by_cat, key=lambda c: (c is None, c or "")):
        paths = sorted(by_cat[cat])
        for i in range(0, len(paths), size):
            shards.append(
                {"file": shard_file(cat, i // size), "category": cat, "paths": paths[i : i + size]}
            )
    return {
        "run_id": run_id,
        "input": cfg.input,
        "created": _dt.datetime.now(_dt.UTC).isoformat(),
        "category_pattern": None if cfg.category else cfg.category_pattern,
        "alias": cfg.alias,
        "models": models,
        "num_paths": len(seen),
        "shards": shards,
    }


def load_or_make_plan(cfg: ScoreConfig, run_id: str, run_dir: str, resolver: Resolver) -> dict:
    """The run's plan: read back (models that failed transiently resolved again) or made."""
    plan_url = storage.join(run_dir, PLAN_FILE)
    if not storage.exists(plan_url, cfg.endpoint_url):
        plan = make_plan(cfg, run_id, resolver)
        storage.write_bytes(plan_url, json.dumps(plan).encode(), cfg.endpoint_url)
        return plan
    plan = json.loads(storage.read_bytes(plan_url, cfg.endpoint_url))
    if plan.get("input") != cfg.input:
        raise ValueError(
            f"run {run_id!r} already exists for input {plan.get('input')!r}, not "
            f"{cfg.input!r}: use another --run-id"
        )
    log.info("resuming run %s: plan with %d shards", run_id, len(plan["shards"]))
    retry = [c for c, m in plan["models"].items() if m.get("transient")]
    if retry:
        for cat in retry:
            plan["models"][cat] = resolve_category(cfg, cat, resolver)
        storage.write_bytes(plan_url, json.dumps(plan).encode(), cfg.endpoint_url)
    return plan


def _listed(url: str, suffix: str, endpoint_url: str | None) -> set[str]:
    """Files under ``url`` with ``suffix``, relative to ``url`` (none if it does not exist)."""
    try:
        files = storage.list_files(url, (suffix,), endpoint_url=endpoint_url)
    except FileNotFoundError:
        return set()
    base = storage.normalize(url).rstrip("/") + "/"
    return {f[len(base) :] for f in files if f.startswith(base)}


def pending_shards(plan: dict, run_dir: str, endpoint_url: str | None) -> list[dict]:
    """The shards still to score: no file yet, or a file with transient error rows."""
    written = _listed(run_dir, ".parquet", endpoint_url)
    retry = {
        f"{RETRY_DIR}/{m}" for m in _listed(storage.join(run_dir, RETRY_DIR), ".json", endpoint_url)
    }
    return [
        s for s in plan["shards"] if s["file"] not in written or retry_marker(s["file"]) in retry
    ]
