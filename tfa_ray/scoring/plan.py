"""The plan of a run: list the input once, give every path a category, resolve each category's
model, cut deterministic shards; on a rerun, read the plan back and find what is left to do.

The plan is a small JSON header ``<run>/_plan.json`` (models, counts, the manifest files) and
the path manifest under ``<run>/_plan/`` (``manifest``), written once, header last: a header
that exists names a complete manifest, so shards never change between a run and its reruns.
Only model resolutions that failed *transiently* (registry unreachable, download failed) are
tried again on a rerun; the header is then rewritten with what they resolve to.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tfa_ray import storage
from tfa_ray.package_check import PackageError, check_package
from tfa_ray.retry import is_transient
from tfa_ray.scoring.config import ScoreConfig
from tfa_ray.scoring.contract import PLAN_FILE, RETRY_DIR, retry_marker
from tfa_ray.scoring.listing import Entry, inside, iter_inputs
from tfa_ray.scoring.manifest import PLAN_DIR, ManifestConfig, read_shards, write_manifest
from tfa_ray.scoring.models import Resolver

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# categories


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


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    if path.startswith(root):
        return path[len(root) :]
    return path.split("://", 1)[-1].lstrip("/")


def valid_category(name: str | None) -> bool:
    """A category is one plain path component: never empty, ``.``, ``..`` or with a slash."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def assign_categories(
    entries: list[tuple[str, str | None]],
    root: str,
    category: str | None,
    pattern: str,
    allow_outside: bool = False,
) -> list[tuple[str, str | None]]:
    """(path, category or None when the path does not match the pattern, names no valid
    category, or lies outside ``root`` without ``allow_outside``: an error row each)."""
    rx = category_regex(pattern)
    out = []
    for path, hint in entries:
        hint = hint if valid_category(hint) else None
        if not allow_outside and not inside(path, root):
            out.append((path, None))
        elif category:
            out.append((path, category))
        elif hint:
            out.append((path, hint))
        else:
            m = rx.fullmatch(_relative(path, root))
            found = m.group("category") if m else None
            out.append((path, found if valid_category(found) else None))
    return out


# --------------------------------------------------------------------------------------
# models


def resolve_category(cfg: ScoreConfig, category: str, resolver: Resolver) -> dict[str, Any]:
    """The plan's model entry for a category: name, version, image size; or the error, with
    ``transient`` telling whether a rerun should try again (a package that fails
    :func:`~tfa_ray.package_check.check_package` never: its message names model and version)."""
    from tfa_ray.config import preset_from_json

    name, version = f"{cfg.prefix}{category}", None
    try:
        name, version, url = resolver(category, cfg.alias)
        package = storage.resolve(url)
        check_package(package)  # a broken package fails its rows permanently, named, here
        preset = preset_from_json(package.join("config.json").read_bytes().decode())
        return {"name": name, "version": int(version), "image_size": preset.model.image_size}
    except PackageError as e:
        return {
            "error": f"model {name} v{version} for category {category!r} is unusable: {e}",
            "transient": False,
        }
    except Exception as e:  # noqa: BLE001 - a missing model only fails its own rows
        return {
            "error": f"no usable model {cfg.prefix}{category}@{cfg.alias} for category "
            f"{category!r}: {type(e).__name__}: {e}",
            "transient": is_transient(e),
        }


# --------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """The header of a run's plan; its shards stream from the manifest files."""

    header: dict[str, Any]
    run: storage.Location  # the run directory

    @property
    def run_id(self) -> str:
        return self.header["run_id"]

    @property
    def models(self) -> dict[str, Any]:
        return self.header["models"]

    @property
    def num_paths(self) -> int:
        return int(self.header["num_paths"])

    @property
    def num_shards(self) -> int:
        return int(self.header["num_shards"])

    def manifests(self) -> list[storage.Location]:
        return [self.run.join(f) for f in self.header["manifest"]]

    def manifest_urls(self) -> list[str]:
        return [m.url for m in self.manifests()]

    def shards(self) -> Iterator[dict[str, Any]]:
        """Every shard (file, category, shard, rows, manifest url), one manifest at a time."""
        for manifest in self.manifests():
            for s in read_shards(manifest):
                yield dict(s, manifest=manifest.url)


def _category_tables(
    batches: Iterator[list[Entry]],
    root: str,
    category: str | None,
    pattern: str,
    allow_outside: bool,
) -> Iterator[pa.Table]:
    for batch in batches:
        pairs = assign_categories(batch, root, category, pattern, allow_outside)
        yield pa.table(
            {"path": [p for p, _ in pairs], "category": [c for _, c in pairs]},
            schema=pa.schema([("path", pa.string()), ("category", pa.string())]),
        )


def make_plan(
    cfg: ScoreConfig,
    run_id: str,
    run: storage.Location,
    resolver: Resolver,
    manifest: ManifestConfig | None = None,
    source: storage.Location | None = None,
) -> Plan:
    """List the input (``source``, default ``cfg.input`` on the run's filesystem), assign
    categories, write the manifest, resolve each category's model."""
    root, batches = iter_inputs(source or run.at(cfg.input), cfg.root)
    tables = _category_tables(
        batches, root, cfg.category, cfg.category_pattern, cfg.allow_outside_root
    )
    stats = write_manifest(tables, run, cfg.shard_size, manifest)
    if not stats.num_paths:
        raise ValueError(f"no input images under {cfg.input}")
    cats = sorted(c for c in stats.categories if c)
    header = {
        "run_id": run_id,
        "input": cfg.input,
        "root": None if cfg.allow_outside_root else root,  # paths outside it: error rows
        "created": _dt.datetime.now(_dt.UTC).isoformat(),
        "category_pattern": None if cfg.category else cfg.category_pattern,
        "alias": cfg.alias,
        "models": {c: resolve_category(cfg, c, resolver) for c in cats},
        "num_paths": stats.num_paths,
        "num_shards": sum(c["shards"] for c in stats.categories.values()),
        "shard_size": max(1, int(cfg.shard_size)),
        "categories": [[c, n["paths"], n["shards"]] for c, n in stats.categories.items()],
        "manifest": stats.files,
    }
    return Plan(header, run)


def _write_header(plan: Plan) -> None:
    plan.run.join(PLAN_FILE).write_bytes(json.dumps(plan.header).encode())


def load_or_make_plan(
    cfg: ScoreConfig,
    run_id: str,
    run: storage.Location,
    resolver: Resolver,
    manifest: ManifestConfig | None = None,
    source: storage.Location | None = None,
) -> Plan:
    """The plan of the run directory ``run``: read back (models that failed transiently
    resolved again) or made (from ``source``, see :func:`make_plan`)."""
    plan_file = run.join(PLAN_FILE)
    if not plan_file.exists():
        plan = make_plan(cfg, run_id, run, resolver, manifest, source)
        _write_header(plan)  # last: the commit point of the plan
        return plan
    header = json.loads(plan_file.read_bytes())
    if header.get("input") != cfg.input:
        raise ValueError(
            f"run {run_id!r} already exists for input {header.get('input')!r}, not "
            f"{cfg.input!r}: use another --run-id"
        )
    if "manifest" not in header:
        raise ValueError(f"run {run_id!r} has a plan of an older format: use another --run-id")
    plan = Plan(header, run)
    log.info("resuming run %s: plan with %d shards", run_id, plan.num_shards)
    retry = [c for c, m in plan.models.items() if m.get("transient")]
    if retry:
        for cat in retry:
            plan.models[cat] = resolve_category(cfg, cat, resolver)
        _write_header(plan)
    return plan


def listed(where: storage.Location, suffix: str) -> set[str]:
    """Files under ``where`` with ``suffix``, relative to it (none if it does not exist); the
    plan's own manifest is not among them. One entry per shard, not per path."""
    try:
        files = where.list_files((suffix,))
    except FileNotFoundError:
        return set()
    base = storage.normalize(where.url).rstrip("/") + "/"
    rel = (f[len(base) :] for f in files if f.startswith(base))
    return {f for f in rel if not f.startswith(PLAN_DIR + "/")}


def pending_shards(plan: Plan) -> list[dict]:
    """The shards still to score: no file yet, or a file with transient error rows."""
    written = listed(plan.run, ".parquet")
    retry = {f"{RETRY_DIR}/{m}" for m in listed(plan.run.join(RETRY_DIR), ".json")}
    return [
        s for s in plan.shards() if s["file"] not in written or retry_marker(s["file"]) in retry
    ]
