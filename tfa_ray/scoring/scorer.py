"""Stage 2 of a scoring run: the scorer actors (``map_batches`` with a callable class).

An actor keeps each category's model loaded and scores the shards it is handed, several per
call: while one shard's batches run through the model, a prefetch thread parses the next
shard's items and pixels into pinned host memory. Pixels cross to the device as uint8 (a
quarter of the bytes of floats) and become floats there; maps and scores stay on the device
until the shard is done and come back in one copy, so the device is never waited on between
batches."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tfa_ray.package_check import PackageError, check_package
from tfa_ray.scoring.cache import DEFAULT_MAX_BYTES, ModelCache, model_nbytes
from tfa_ray.scoring.contract import OK, PERMANENT, TRANSIENT
from tfa_ray.scoring.decode import decode_jpegs
from tfa_ray.scoring.models import Resolver
from tfa_ray.scoring.shard import cell, from_npy, mark_error, to_npy

log = logging.getLogger(__name__)

# Images per forward pass when the run does not say: a GPU needs large batches to be busy, a
# CPU gains nothing past a few images and holds their activations in memory.
DEFAULT_BATCH_SIZE = {"cuda": 64, "cpu": 16}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LoadFailure(str):
    """The message of a failed model load; ``kind`` says whether a rerun may fix it."""

    kind: str = TRANSIENT


class ShardScorer:
    """Callable class for ``map_batches``: scores the shards of a batch, one row each.

    Each actor loads the model of each category it meets once and keeps it while it fits the
    model cache (``model_cache_bytes``, least recently used out first; the template's embedding
    is computed at load). A failed load is not kept for the actor's lifetime: the shard's rows
    become error rows (transient, or permanent for a broken package) and the load is tried
    again after ``retry_after_s`` (the resolver itself already retried with backoff). Torch
    gets as many threads as the CPUs Ray gave the actor (``num_threads`` overrides): a GPU
    actor's CPU work uses them too.
    """

    decode_jpegs = staticmethod(decode_jpegs)  # the device decoder (benchmarks stand it in)

    def __init__(
        self,
        resolver: Resolver,
        alias: str = "champion",
        batch_size: int | None = None,
        device: str | None = None,
        num_threads: int | None = None,
        precision: str = "auto",
        pinned: dict[str, int] | None = None,
        retry_after_s: float = 30.0,
        model_cache_bytes: int = DEFAULT_MAX_BYTES,
    ):
        import torch

        from tfa_ray.ray_env import assigned_cpus

        self.torch = torch
        self.resolver = resolver
        self.alias = alias
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kind = torch.device(self.device).type
        self.batch_size = max(1, int(batch_size or DEFAULT_BATCH_SIZE.get(kind, 16)))
        self.pin_memory = kind == "cuda"  # page-locked host buffers: asynchronous copies
        threads = num_threads or assigned_cpus()  # None: called outside Ray, leave torch be
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.precision = precision
        self.pinned = dict(pinned or {})  # category -> the version the run's plan resolved
        self.retry_after_s = retry_after_s
        self.models = ModelCache(model_cache_bytes, size=lambda entry: model_nbytes(entry[2]))
        self.failed: dict[str, tuple[float, LoadFailure]] = {}  # category -> (time, failure)
        self.prefetch = ThreadPoolExecutor(1, thread_name_prefix="tfa-prefetch")

    def load(self, category: str) -> tuple[str, int, Any]:
        """(name, version, TFAModel) for the category's pinned version; raises on failure."""
        from tfa_ray.package import load_model

        name, version, url = self.resolver(category, self.alias, version=self.pinned.get(category))
        try:
            check_package(url)
            model = load_model(url, device=self.device)
        except OSError:
            raise  # I/O: may pass, transient
        except Exception as e:  # noqa: BLE001 - the package itself is broken: permanent
            raise PackageError(f"model {name} v{version} is unusable: {e}") from e
        model.precision = self.precision
        with self.torch.no_grad():
            model.detector.template_embedding()  # template features: once per actor
        log.info("scorer loaded %s v%s for %s", name, version, category)
        return name, int(version), model

    def _model(self, category: str) -> tuple[str, int, Any] | LoadFailure:
        """The loaded model, or the message of a failed load (its ``kind``: permanent for a
        broken package, :class:`PackageError`; transient for the rest: I/O, the registry)."""
        entry = self.models.get(category)
        if entry is not None:
            return entry
        failed = self.failed.get(category)
        if failed and time.monotonic() - failed[0] < self.retry_after_s:
            return failed[1]
        try:
            entry = self.load(category)
            self.models.put(category, entry)
            self.failed.pop(category, None)
            return entry
        except Exception as e:  # noqa: BLE001 - the shard's rows become error rows
            msg = f"cannot load model for category {category!r}: {type(e).__name__}: {e}"
            failure = LoadFailure(msg)
            failure.kind = PERMANENT if isinstance(e, PackageError) else TRANSIENT
            self.failed[category] = (time.monotonic(), failure)
            return failure

    def _host(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        """Row ``i``'s host-side work (the prefetch thread's): items parsed, CPU-decoded pixels
        as a (pinned) uint8 tensor, the JPEGs left encoded cut out of their blob."""
        torch = self.torch
        items = json.loads(cell(batch, "items", i))
        images = torch.from_numpy(from_npy(cell(batch, "images", i)))
        if self.pin_memory and images.numel():
            images = images.pin_memory()
        blob, offset, datas = cell(batch, "encoded", i), 0, []
        for it in items:
            if it["status"] == OK and "encoded" in it:
                n = int(it.pop("encoded"))
                datas.append((it, blob[offset : offset + n]))
                offset += n
        return {"items": items, "images": images, "encoded": datas}

    def _pixels(self, host: dict[str, Any]):
        """The ok items' pixels in order, (n, 3, S, S) uint8 on the device: the CPU-decoded rows
        copied over in one asynchronous transfer, and the JPEGs left encoded decoded here on the
        device, ``batch_size`` at a time; one that cannot be decoded becomes an error row."""
        torch = self.torch
        items, images, encoded = host["items"], host["images"], host["encoded"]
        cpu = images.to(self.device, non_blocking=self.pin_memory)
        if not encoded:
            return cpu
        size = images.shape[-1]
        datas = [d for _, d in encoded]
        on_device: list[Any] = []
        for i in range(0, len(datas), self.batch_size):
            on_device += self.decode_jpegs(datas[i : i + self.batch_size], size, self.device)
        decoded = {id(it): t for (it, _), t in zip(encoded, on_device, strict=True)}
        rows, out = iter(cpu), []
        for it in items:
            if it["status"] != OK:
                continue
            t = decoded[id(it)] if id(it) in decoded else next(rows)
            if isinstance(t, str):  # as the CPU path's error row: no size
                it.pop("width", None), it.pop("height", None)
                mark_error(it, t, PERMANENT)
                continue
            out.append(t)
        if not out:
            return torch.zeros((0, 3, size, size), dtype=torch.uint8, device=self.device)
        return torch.stack(out)

    def _score(self, category: str | None, host: dict[str, Any]):
        """(items with scores, model info, maps as float16 (n, S, S)) for one shard."""
        from tfa_ray.calibration import heatmap_scale, is_anomalous

        torch = self.torch
        items = host["items"]
        ok = [it for it in items if it["status"] == OK]
        entry = self._model(category) if ok else None
        maps = np.zeros((0, 1, 1), np.float16)
        if entry is None:
            return items, {}, maps
        if isinstance(entry, LoadFailure):
            for it in ok:
                mark_error(it, entry, entry.kind)
            return items, {}, maps
        name, version, model = entry
        cal = model.calibration
        info = {
            "model_name": name,
            "model_version": version,
            "threshold": cal.threshold,
            "pixel_threshold": cal.pixel_threshold,
            **dict(zip(("heatmap_low", "heatmap_high"), heatmap_scale(cal), strict=True)),
        }
        pixels = self._pixels(host)  # device decode errors: error rows
        ok = [it for it in items if it["status"] == OK]
        out_maps, out_scores = [], []
        for i in range(0, len(pixels), self.batch_size):
            x = pixels[i : i + self.batch_size].float().div_(255.0)  # on the device
            if x.shape[-1] != model.image_size:  # package overwritten in place
                x = torch.nn.functional.interpolate(
                    x, size=(model.image_size,) * 2, mode="bilinear", antialias=True
                )
            m, s = model.predict(x)
            out_maps.append(m.to(torch.float16))
            out_scores.append(s.float())
        if out_maps:  # one copy back per shard, after the last batch was queued
            maps = torch.cat(out_maps).cpu().numpy()
            scores = torch.cat(out_scores).cpu().numpy().astype(np.float64)
            now = _dt.datetime.now(_dt.UTC).isoformat()
            for it, sc in zip(ok, scores, strict=True):
                it.update(
                    score=float(sc), is_anomalous=is_anomalous(sc, cal.threshold), scored_at=now
                )
        return items, info, maps

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {
            k: [] for k in ("file", "category", "items", "model", "maps", "decode_pid", "score_pid")
        }
        n = len(batch["file"])
        pending = self.prefetch.submit(self._host, batch, 0) if n else None
        for i in range(n):
            host = pending.result()
            if i + 1 < n:  # the next shard's host work overlaps this shard's forward passes
                pending = self.prefetch.submit(self._host, batch, i + 1)
            category = cell(batch, "category", i) or None
            items, info, maps = self._score(category, host)
            out["file"].append(cell(batch, "file", i))
            out["category"].append(category or "")
            out["items"].append(json.dumps(items))
            out["model"].append(json.dumps(info))
            out["maps"].append(to_npy(maps))
            out["decode_pid"].append(int(cell(batch, "decode_pid", i)))
            out["score_pid"].append(os.getpid())
        out["score_rss_mb"] = [_peak_rss_mb()] * n
        return out
