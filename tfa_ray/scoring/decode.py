"""Stage 1 of a scoring run: read + decode + resize, in CPU tasks, one shard per call; never
raises. Every input path leaves as one item (path, status, error, error_kind, size); a bad
input becomes an error item. ``read_binary_files`` is deliberately not used: it fails the whole
read on one unreadable object.

With device decoding, plain JPEGs are only read and their header checked here; their encoded
bytes travel to the scorer, which decodes them on its GPU (:func:`decode_jpegs`)."""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from tfa_ray import storage
from tfa_ray.data import ImageDecodeError, decode_image
from tfa_ray.retry import is_transient
from tfa_ray.scoring.contract import OK, PERMANENT, TRANSIENT
from tfa_ray.scoring.listing import inside
from tfa_ray.scoring.manifest import read_shard_paths
from tfa_ray.scoring.shard import cell, mark_error, to_npy

log = logging.getLogger(__name__)

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
    image: storage.Location,
    size: int,
    max_pixels: int | None,
    gpu_decode: bool = False,
) -> tuple[np.ndarray | bytes | None, dict[str, Any]]:
    """(S x S RGB uint8 as (3, S, S), item), or with ``gpu_decode`` for a JPEG the device can
    decode (:func:`jpeg_header`) its encoded bytes and an item marked ``encoded``, or (None,
    error item)."""
    item: dict[str, Any] = {"path": image.url}
    try:
        data = image.read_bytes()
    except Exception as e:  # noqa: BLE001 - unreadable object: an error row
        kind = TRANSIENT if is_transient(e) else PERMANENT  # gone / a directory: final
        return None, mark_error(item, f"cannot read: {type(e).__name__}: {e}", kind)
    header = jpeg_header(data, max_pixels) if gpu_decode else None
    if header is not None:
        item["width"], item["height"] = header
        item.update(status=OK, error=None, error_kind=None, encoded=len(data))
        return data, item
    try:
        arr, (item["width"], item["height"]) = decode_array(data, size, max_pixels)
    except ImageDecodeError as e:
        return None, mark_error(item, f"cannot decode: {e}", PERMANENT)
    except Exception as e:  # noqa: BLE001
        return None, mark_error(item, f"cannot decode: {type(e).__name__}: {e}", PERMANENT)
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


def _at(where: storage.Location | None, url: str) -> storage.Location:
    """``url`` on the run's filesystem ``where`` (None: resolved on its own, for callers of a
    single stage)."""
    return where.at(url) if where is not None else storage.resolve(url)


def shard_paths(batch: dict[str, Any], run: storage.Location | None) -> list[str]:
    """The shard's paths, read from the plan's manifest file in the run directory ``run`` (the
    driver's rows name the shard only, so its memory does not grow with the paths)."""
    category = cell(batch, "category") or None
    shard = int(cell(batch, "shard"))
    return read_shard_paths(_at(run, cell(batch, "manifest")), category, shard)


def decode_shard(
    batch: dict[str, Any],
    models: dict[str, Any],
    max_pixels: int | None,
    source: storage.Location | None,
    gpu_decode: bool = False,
    root: str | None = None,
    run: storage.Location | None = None,
) -> dict[str, list]:
    """One shard row in, one row out: ``images`` (n, 3, S, S) uint8 as .npy bytes, ``encoded``
    (with ``gpu_decode``: the JPEGs left for the scorer's device, concatenated) and ``items``
    (JSON: path, status, error, error_kind, width, height per input path; ``encoded``: the
    byte count of an item left encoded; the other ok items are the rows of ``images``).

    The images are read on the input's filesystem ``source``, the manifest on the run's
    ``run``: resolved once by the driver, they arrive with the task."""
    file, category = cell(batch, "file"), cell(batch, "category") or None
    paths = shard_paths(batch, run)
    model = models.get(category) if category else None
    items: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    encoded: list[bytes] = []
    size = int(model.get("image_size", 0)) if model else 0
    for path in paths:
        if category is None and root and not inside(path, root):
            msg = f"path is outside the input root {root} (--allow-outside-root to score it)"
            items.append(mark_error({"path": path}, msg, PERMANENT))
        elif category is None:
            msg = "path does not match the category pattern (no category)"
            items.append(mark_error({"path": path}, msg, PERMANENT))
        elif model is None or "error" in model:
            msg = model["error"] if model else f"no model for category {category!r}"
            kind = TRANSIENT if model and model.get("transient") else PERMANENT
            items.append(mark_error({"path": path}, msg, kind))
        else:
            arr, item = read_and_decode(_at(source, path), size, max_pixels, gpu_decode)
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
        "images": [to_npy(stack)],
        "encoded": [b"".join(encoded)],
        "decode_pid": [os.getpid()],
    }
