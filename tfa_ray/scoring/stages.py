"""The three Ray Data stages, one shard (one row) per call, as Ray's batch-inference examples
write them:

* :func:`decode_shard` -- a function (CPU tasks): read + decode + resize; never raises.
* :class:`ShardScorer` -- a callable class (actor pool): loads each category's model once per
  actor, scores the shard.
* :func:`write_shard` -- a function (CPU tasks): encode masks / heat maps, write the shard's
  Parquet file atomically under its planned name (in :mod:`~tfa_ray.scoring.writer`).

Every input path leaves the decode stage as one item (path, status, error, error_kind, size);
a bad input becomes an error item, never an exception. ``read_binary_files`` is deliberately
not used: it fails the whole read on one unreadable object.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import time
import warnings
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from tfa_ray import storage
from tfa_ray.data import ImageDecodeError, decode_image
from tfa_ray.package_check import PackageError, check_package
from tfa_ray.retry import is_transient
from tfa_ray.scoring.cache import DEFAULT_MAX_BYTES, ModelCache, model_nbytes
from tfa_ray.scoring.contract import OK, PERMANENT, TRANSIENT
from tfa_ray.scoring.listing import inside
from tfa_ray.scoring.manifest import read_shard_paths
from tfa_ray.scoring.models import Resolver
from tfa_ray.scoring.writer import _error, _first, _from_npy, shard_table, write_shard  # noqa: F401 - stage 3, re-exported

log = logging.getLogger(__name__)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# stage 1: read + decode + resize (CPU tasks; never raises)


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_array(
    data: bytes, size: int, max_pixels: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """The CPU decode: (S x S RGB uint8 as (3, S, S), (width, height)); raises on bad data."""
    img = decode_image(data, max_pixels=max_pixels)
    width_height = img.size
    if img.size != (size, size):  # exactly what data.image_to_tensor does, kept as uint8
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), width_height


def jpeg_header(data: bytes, max_pixels: int | None) -> tuple[int, int] | None:
    """(width, height) when the scorer may decode these bytes on its device and get what the
    CPU path gets; None sends them the CPU way, which stays the judge of every odd file.

    Read from the header only (no pixel is decoded): a JPEG (magic FF D8 FF) in YCbCr or grey,
    without an EXIF rotation (the device decoder does not apply it), within ``max_pixels``,
    ending in its EOI marker (a truncated file becomes the CPU path's error row, as ever)."""
    if not data.startswith(JPEG_MAGIC) or b"\xff\xd9" not in data[-64:]:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: parses the markers up to the scan
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):
                return None
    except Exception:  # noqa: BLE001 - whatever is wrong, the CPU path names it
        return None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        return None
    return width, height


def read_and_decode(
    path: str,
    size: int,
    max_pixels: int | None,
    endpoint_url: str | None,
    gpu_decode: bool = False,
) -> tuple[np.ndarray | bytes | None, dict[str, Any]]:
    """(S x S RGB uint8 as (3, S, S), item), or with ``gpu_decode`` for a JPEG the device can
    decode (:func:`jpeg_header`) its encoded bytes and an item marked ``encoded``, or (None,
    error item)."""
    item: dict[str, Any] = {"path": path}
    try:
        data = storage.read_bytes(path, endpoint_url)
    except Exception as e:  # noqa: BLE001 - unreadable object: an error row
        kind = TRANSIENT if is_transient(e) else PERMANENT  # gone / a directory: final
        return None, _error(item, f"cannot read: {type(e).__name__}: {e}", kind)
    header = jpeg_header(data, max_pixels) if gpu_decode else None
    if header is not None:
        item["width"], item["height"] = header
        item.update(status=OK, error=None, error_kind=None, encoded=len(data))
        return data, item
    try:
        arr, (item["width"], item["height"]) = decode_array(data, size, max_pixels)
    except ImageDecodeError as e:
        return None, _error(item, f"cannot decode: {e}", PERMANENT)
    except Exception as e:  # noqa: BLE001
        return None, _error(item, f"cannot decode: {type(e).__name__}: {e}", PERMANENT)
    item.update(status=OK, error=None, error_kind=None)
    return arr, item


def decode_jpegs(datas: list[bytes], size: int, device: Any) -> list[Any]:
    """JPEG bytes -> one (3, S, S) uint8 tensor on ``device`` per input, or the message of why
    it cannot be decoded (an error row); never raises for bad data.

    One batched ``torchvision.io.decode_jpeg`` (nvjpeg on CUDA); if that fails, each image
    alone, then the CPU path (Pillow) for those that still fail. Resized like the CPU path:
    bilinear with antialiasing (Pillow's BILINEAR), width then height, rounded to uint8."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(chunk: list[bytes]) -> list[torch.Tensor]:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in chunk]
        with warnings.catch_warnings():  # deprecated in torchvision 0.29 for TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)

    decoded: list[Any]
    try:
        decoded = list(run(datas)) if datas else []
    except Exception as e:  # noqa: BLE001 - one bad file: find it, image by image
        log.info("batched JPEG decode of %d images failed (%s): one by one", len(datas), e)
        decoded = []
        for d in datas:
            try:
                decoded.append(run([d])[0])
            except Exception:  # noqa: BLE001
                decoded.append(None)
    out: list[Any] = []
    for d, t in zip(datas, decoded, strict=True):
        if t is not None and t.ndim == 3 and t.shape[0] == 3:
            out.append(t)
            continue
        try:  # the CPU path decides: decoded there, or its error message
            arr, _ = decode_array(d, size, None)  # max_pixels was checked on the header
            out.append(torch.from_numpy(arr).to(device))
        except ImageDecodeError as e:
            out.append(f"cannot decode: {e}")
        except Exception as e:  # noqa: BLE001
            out.append(f"cannot decode: {type(e).__name__}: {e}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(out):
        if not isinstance(t, str) and tuple(t.shape[1:]) != (size, size):
            groups.setdefault(tuple(t.shape), []).append(i)
    for idx in groups.values():  # images of one size are resized in one call
        x = torch.stack([out[i] for i in idx]).float()
        # Pillow's order: width, then height, each pass rounded to uint8 (one 2-D pass instead
        # differs from Pillow by one level at ~15% of pixels, these two at ~1%)
        for shape in ((x.shape[2], size), (size, size)):
            if tuple(x.shape[2:]) != shape:
                x = (
                    torch.nn.functional.interpolate(
                        x, size=shape, mode="bilinear", align_corners=False, antialias=True
                    )
                    .round_()
                    .clamp_(0, 255)
                )
        for i, y in zip(idx, x.to(torch.uint8), strict=True):
            out[i] = y
    return out


def shard_paths(batch: dict[str, Any], endpoint_url: str | None) -> list[str]:
    """The shard's paths: a JSON list in the row, or read from the plan's manifest file (the
    driver's rows name the shard only, so its memory does not grow with the paths)."""
    if "paths" in batch:
        return json.loads(_first(batch, "paths"))
    category = _first(batch, "category") or None
    shard = int(_first(batch, "shard"))
    return read_shard_paths(_first(batch, "manifest"), category, shard, endpoint_url)


def decode_shard(
    batch: dict[str, Any],
    models: dict[str, Any],
    max_pixels: int | None,
    endpoint_url: str | None,
    gpu_decode: bool = False,
    root: str | None = None,
) -> dict[str, list]:
    """One shard row in, one row out: ``images`` (n, 3, S, S) uint8 as .npy bytes, ``encoded``
    (with ``gpu_decode``: the JPEGs left for the scorer's device, concatenated) and ``items``
    (JSON: path, status, error, error_kind, width, height per input path; ``encoded``: the
    byte count of an item left encoded; the other ok items are the rows of ``images``)."""
    file, category = _first(batch, "file"), _first(batch, "category") or None
    paths = shard_paths(batch, endpoint_url)
    model = models.get(category) if category else None
    items: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    encoded: list[bytes] = []
    size = int(model.get("image_size", 0)) if model else 0
    for path in paths:
        if category is None and root and not inside(path, root):
            msg = f"path is outside the input root {root} (--allow-outside-root to score it)"
            items.append(_error({"path": path}, msg, PERMANENT))
        elif category is None:
            msg = "path does not match the category pattern (no category)"
            items.append(_error({"path": path}, msg, PERMANENT))
        elif model is None or "error" in model:
            msg = model["error"] if model else f"no model for category {category!r}"
            kind = TRANSIENT if model and model.get("transient") else PERMANENT
            items.append(_error({"path": path}, msg, kind))
        else:
            arr, item = read_and_decode(path, size, max_pixels, endpoint_url, gpu_decode)
            items.append(item)
            if isinstance(arr, bytes):
                encoded.append(arr)
            elif arr is not None:
                arrays.append(arr)
    stack = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
    return {
        "file": [file],
        "category": [category or ""],
        "items": [json.dumps(items)],
        "images": [_npy(stack)],
        "encoded": [b"".join(encoded)],
        "decode_pid": [os.getpid()],
    }


# --------------------------------------------------------------------------------------
# stage 2: score (actor pool)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LoadFailure(str):
    """The message of a failed model load; ``kind`` says whether a rerun may fix it."""

    kind: str = TRANSIENT


class ShardScorer:
    """Callable class for ``map_batches``: scores one shard per call.

    Each actor loads the model of each category it meets once and keeps it while it fits the
    model cache (``model_cache_bytes``, least recently used out first; the template's embedding
    is computed at load). A failed load is not kept for the actor's lifetime: the shard's rows
    become error rows (transient, or permanent for a broken package) and the load is tried
    again after ``retry_after_s`` (the
    resolver itself already retried with backoff). Torch gets as many threads as the CPUs Ray
    gave the actor (``num_threads`` overrides): a GPU actor's CPU work uses them too.
    """

    def __init__(
        self,
        resolver: Resolver,
        alias: str = "champion",
        batch_size: int = 16,
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
        self.batch_size = max(1, int(batch_size))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = num_threads or assigned_cpus()  # None: called outside Ray, leave torch be
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.precision = precision
        self.pinned = dict(pinned or {})  # category -> the version the run's plan resolved
        self.retry_after_s = retry_after_s
        self.models = ModelCache(model_cache_bytes, size=lambda entry: model_nbytes(entry[2]))
        self.failed: dict[str, tuple[float, LoadFailure]] = {}  # category -> (time, failure)

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

    def _decoded(self, items: list[dict[str, Any]], images: np.ndarray, batch: dict[str, Any]):
        """The ok items' pixels in order, (n, 3, S, S) uint8: the rows of ``images`` (decoded on
        CPU) and the JPEGs the decode stage left encoded, decoded here on the scorer's device,
        ``batch_size`` at a time; one that cannot be decoded becomes an error row."""
        torch = self.torch
        pending = [it for it in items if it["status"] == OK and "encoded" in it]
        if not pending:
            return torch.from_numpy(images)
        blob, offset, datas = _first(batch, "encoded"), 0, []
        for it in pending:
            n = int(it.pop("encoded"))
            datas.append(blob[offset : offset + n])
            offset += n
        size = images.shape[-1]
        on_device: list[Any] = []
        for i in range(0, len(datas), self.batch_size):
            on_device += decode_jpegs(datas[i : i + self.batch_size], size, self.device)
        gpu, cpu = iter(on_device), iter(torch.from_numpy(images))
        left_encoded = {id(it) for it in pending}
        out = []
        for it in items:
            if it["status"] != OK:
                continue
            if id(it) in left_encoded:
                t = next(gpu)
                if isinstance(t, str):  # as the CPU path's error row: no size
                    it.pop("width", None), it.pop("height", None)
                    _error(it, t, PERMANENT)
                    continue
                out.append(t)
            else:
                out.append(next(cpu).to(self.device))
        if not out:
            return torch.zeros((0, 3, size, size), dtype=torch.uint8)
        return torch.stack(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from tfa_ray.package import heatmap_scale, is_anomalous

        category = _first(batch, "category") or None
        items = json.loads(_first(batch, "items"))
        images = _from_npy(_first(batch, "images"))
        ok = [it for it in items if it["status"] == OK]
        model_info: dict[str, Any] = {}
        maps = np.zeros((0, 1, 1), np.float16)
        entry = self._model(category) if ok else None
        if isinstance(entry, LoadFailure):
            for it in ok:
                _error(it, entry, entry.kind)
        elif entry is not None:
            name, version, model = entry
            cal = model.calibration
            model_info = {
                "model_name": name,
                "model_version": version,
                "threshold": cal.threshold,
                "pixel_threshold": cal.pixel_threshold,
                **dict(zip(("heatmap_low", "heatmap_high"), heatmap_scale(cal), strict=True)),
            }
            pixels = self._decoded(items, images, batch)  # device decode errors: error rows
            ok = [it for it in items if it["status"] == OK]
            out_maps, scores = [], []
            for i in range(0, len(pixels), self.batch_size):
                x = pixels[i : i + self.batch_size].float().div_(255.0)
                if x.shape[-1] != model.image_size:  # package overwritten in place
                    x = self.torch.nn.functional.interpolate(
                        x, size=(model.image_size,) * 2, mode="bilinear", antialias=True
                    )
                m, s = model.predict(x)
                out_maps.append(m.float().cpu().numpy().astype(np.float16))
                scores.append(s.float().cpu().numpy())
            maps = np.concatenate(out_maps) if out_maps else maps
            now = _dt.datetime.now(_dt.UTC).isoformat()
            all_scores = np.concatenate(scores) if scores else np.zeros(0)
            for it, sc in zip(ok, all_scores.astype(np.float64), strict=True):
                it.update(
                    score=float(sc), is_anomalous=is_anomalous(sc, cal.threshold), scored_at=now
                )
        return {
            "file": [_first(batch, "file")],
            "category": [category or ""],
            "items": [json.dumps(items)],
            "model": [json.dumps(model_info)],
            "maps": [_npy(maps)],
            "decode_pid": [int(_first(batch, "decode_pid"))],
            "score_pid": [os.getpid()],
            "score_rss_mb": [_peak_rss_mb()],
        }
