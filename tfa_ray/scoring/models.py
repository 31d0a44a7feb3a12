"""Which model scores a category: resolvers turn ``(category, alias[, version])`` into
``(registered name, version, package URL)``.

A run resolves every category once when it plans and pins the versions it found; the scorer
actors resolve again with that version, so a promotion during a run (or between a crash and its
rerun) never mixes two models in one run. Resolvers are picklable: they travel to the actors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from tfa_ray import storage
from tfa_ray.retry import RetryPolicy

# (category, alias, version=None) -> (registered name, version, package URL)
Resolver = Callable[..., tuple[str, int, str]]


class LocalResolver:
    """Categories -> model packages from a fixed ``{category: dir}`` mapping (tests, and
    scoring with unregistered models); the version is taken from ``meta.json`` if present."""

    def __init__(self, packages: dict[str, str], prefix: str = "tfa-"):
        self.packages = dict(packages)
        self.prefix = prefix

    def __call__(
        self, category: str, alias: str = "champion", version: int | None = None
    ) -> tuple[str, int, str]:
        if category not in self.packages:
            raise LookupError(f"no model {self.prefix}{category}@{alias}")
        url = self.packages[category]
        try:
            meta = json.loads(storage.read_bytes(storage.join(url, "meta.json")))
            found = int(meta.get("version", 1))
        except (FileNotFoundError, ValueError):
            found = 1
        if version is not None and version != found:
            raise LookupError(f"{url} holds version {found} of {category!r}, not {version}")
        return f"{self.prefix}{category}", found, url


class RegistryResolver:
    """Looks models up in the MLflow registry (:func:`tfa_ray.registry.resolve_model`, which
    retries with backoff). Carries the tracking URI and the model cache directory to the
    actors, which resolve and download on their own node."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        prefix: str = "tfa-",
        retry: RetryPolicy | None = None,
    ):
        from tfa_ray.registry import cache_root
        from tfa_ray.registry import tracking_uri as _tracking_uri

        self.tracking_uri = _tracking_uri(tracking_uri)
        self.prefix = prefix
        self.retry = retry or RetryPolicy()
        self.cache_dir = cache_root()  # the driver's setting: workers' environment is older

    def __call__(
        self, category: str, alias: str = "champion", version: int | None = None
    ) -> tuple[str, int, str]:
        from tfa_ray.registry import resolve_model  # lazily: registry pulls in MLflow

        os.environ["TFA_RAY_MODEL_CACHE"] = self.cache_dir
        return resolve_model(
            category, alias, self.prefix, uri=self.tracking_uri, version=version, retry=self.retry
        )
