"""Dataset layouts over local paths and ``s3://`` URLs; image and mask decoding.

Three layouts are understood (see DESIGN.md, "Data"): MVTec AD, MVTec LOCO AD and a plain
folder of normal images. Decoding is strict on purpose: every image is fully decoded, turned
into 8-bit RGB the same way whatever its format, and any problem (empty, truncated, not an
image, absurdly large) becomes an :class:`ImageDecodeError` that names the reason, so the
scoring pipeline can turn it into an error row and training can refuse bad data up front.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tfa_ray import storage

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "BadImagesError",
    "CategoryData",
    "ImageDecodeError",
    "Sample",
    "check_images",
    "decode_image",
    "decode_mask",
    "discover",
    "image_to_tensor",
    "list_categories",
    "load_image",
    "load_mask",
    "mask_to_tensor",
    "template_path",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Pillow's own default limit (about 89.5 MP, a 9459 x 9459 image): far above any line camera.
MAX_PIXELS = 89_478_485


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


class BadImagesError(ValueError):
    """Some images of a set cannot be used; ``bad`` holds ``(url, reason)`` for every one."""

    def __init__(self, bad: list[tuple[str, str]], total: int):
        self.bad = list(bad)
        lines = "\n".join(f"  {url}: {reason}" for url, reason in self.bad)
        super().__init__(f"{len(self.bad)} of {total} images cannot be used:\n{lines}")


# --------------------------------------------------------------------------------------
# decoding


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open, size-check, fully decode and EXIF-orient; every failure is an ImageDecodeError.

    The pixel count is checked from the header, before any pixel is decoded, so a
    decompression bomb never gets inflated. Pillow's own bomb warning is silenced here (the
    check above replaces it) and its hard error (at twice ``Image.MAX_IMAGE_PIXELS``, which
    still applies with ``max_pixels=None``) is converted.
    """
    if not data:
        raise ImageDecodeError("empty data (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels is more than "
                    f"max_pixels={max_pixels} (not decoded: possible decompression bomb)"
                )
            img.load()  # full decode now, so truncated files fail here and not later
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large (possible decompression bomb): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"not a recognised image ({len(data)} bytes; expected PNG, JPEG, BMP or TIFF)"
        ) from e
    except (OSError, SyntaxError, EOFError, ValueError, IndexError, KeyError) as e:
        # Pillow reports truncated / corrupt streams as OSError ("image file is truncated"),
        # SyntaxError ("broken PNG file"), EOFError or ValueError depending on the format.
        raise ImageDecodeError(f"truncated or corrupt image data ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image, not a crash
        raise ImageDecodeError(f"cannot decode image ({type(e).__name__}: {e})") from e
    return _exif_orient(img)


def _exif_orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so pixels match what every image viewer shows.

    Broken EXIF metadata does not make the pixels unusable: it is ignored."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001
        logger.debug("ignoring unreadable EXIF orientation: %s", e)
    return img


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grey to 8 bit by a fixed linear scale (never clipping, never per-image
    min-max, so brightness still means the same thing across images).

    ``I;16*``: the full 16-bit range maps to 0..255. ``I`` / ``F`` have no declared range:
    float data in [0, 1] is taken as normalised, data within 0..255 as 8-bit, within 0..65535
    as 16-bit; anything else is scaled by its own min / max as a last resort.
    """
    if mode.startswith("I;16"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif lo >= 0.0 and hi <= 65535.0:
        a = a * (255.0 / 65535.0)
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    arr = np.asarray(rgba.convert("RGBA"), dtype=np.uint16)
    rgb = (arr[..., :3] * arr[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_black(img)
    try:
        return img.convert("RGB")  # P, CMYK, YCbCr, RGBX, HSV, ...
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"unsupported image mode {mode!r}: {e}") from e


def decode_image(data: bytes, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Bytes of a PNG / JPEG / BMP / TIFF file to a fully decoded 8-bit RGB image.

    Grey is replicated to three channels; 16-bit and 32-bit grey are scaled linearly to 8
    bits (not clipped); palette and CMYK images are converted; an alpha channel is dropped by
    compositing onto black (transparent pixels become black, as an opaque camera would never
    see them anyway). EXIF orientation is applied. Raises :class:`ImageDecodeError` for empty,
    non-image, truncated or corrupt data, and for images with more than ``max_pixels`` pixels
    (checked before decoding; ``None`` leaves only Pillow's hard limit).
    """
    img = _open(data, max_pixels)
    try:
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(f"cannot convert {img.mode} image to RGB: {e}") from e


def decode_mask(data: bytes, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask as bool ``HxW``: any nonzero pixel (in any colour channel) is defect.

    Alpha is ignored; palette masks are judged by their colours, not their indices.
    """
    img = _open(data, max_pixels)
    mode = img.mode
    if mode in ("RGBA", "RGBa", "RGBX"):
        arr = np.asarray(img)[..., :3]
    elif mode in ("LA", "La"):
        arr = np.asarray(img)[..., 0]
    elif mode in ("P", "PA"):
        arr = np.asarray(img.convert("RGB"))
    elif mode in ("1", "L", "RGB", "I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("RGB"))
    arr = np.nan_to_num(arr) if arr.dtype.kind == "f" else arr
    return arr != 0 if arr.ndim == 2 else np.any(arr != 0, axis=2)


def decode_mask_values(data: bytes, size: int, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A MVTec LOCO mask's raw grey values (each defect type has its own ``pixel_value``),
    ``size x size``, resized with nearest neighbour so no value is invented."""
    img = _open(data, max_pixels)
    if img.mode not in ("L", "I") and not img.mode.startswith("I;16"):
        img = img.convert("L")
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST)).astype(np.int64)


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image to float32 ``(3, size, size)`` in [0, 1], resized bilinearly with Pillow's
    antialiasing. No mean / std normalisation: the backbone does that, for inputs and the
    template alike."""
    import torch  # lazily: the scoring driver plans without loading torch

    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div_(255.0)


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bool / 0-1 ``HxW`` mask to float32 ``(size, size)`` in {0, 1}, nearest-neighbour resize
    (interpolating a mask would invent fractional labels)."""
    import torch  # lazily: the scoring driver plans without loading torch

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    img = Image.fromarray(((m != 0) * 255).astype(np.uint8), "L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127).float()


# --------------------------------------------------------------------------------------
# samples and layouts


@dataclass(frozen=True)
class Sample:
    """One test image; ``label`` 0 is normal, 1 anomalous. LOCO can have several masks per
    image (one per defect); they are merged when loaded."""

    path: str
    label: int
    defect_type: str
    mask_paths: tuple[str, ...] = ()


@dataclass
class CategoryData:
    """Everything known about one category's files; ``layout`` is mvtec, loco or folder."""

    category: str
    layout: str
    train: list[str]
    validation: list[str]
    test: list[Sample]
    defects_config: list[dict] | None = None


def _basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def _stem(url: str) -> str:
    return posixpath.splitext(_basename(url))[0]


def _images(url: str) -> list[str]:
    return storage.list_files(url, IMAGE_SUFFIXES, recursive=False)


def _mask_index(gt_type_dir: str) -> tuple[dict[str, list[str]], bool]:
    """stem -> mask files for one defect type, and whether LOCO-style mask folders were seen.

    MVTec AD: ``<stem>_mask.png`` (or ``<stem>.png``); LOCO: ``<stem>/000.png, 001.png, ...``.
    """
    masks: dict[str, list[str]] = {}
    loco = False
    prefix = storage.normalize(gt_type_dir) + "/"
    for f in storage.list_files(gt_type_dir, IMAGE_SUFFIXES, recursive=True):
        rel = f[len(prefix) :] if f.startswith(prefix) else _basename(f)
        parts = rel.split("/")
        if len(parts) == 1:
            stem = _stem(parts[0])
            stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
            masks.setdefault(stem, []).append(f)
        elif len(parts) == 2:
            loco = True
            masks.setdefault(parts[0], []).append(f)
    return {k: sorted(v) for k, v in masks.items()}, loco


def discover(root: str, category: str | None = None) -> CategoryData:
    """Find the training, validation and test files of one category.

    ``root/category`` (or ``root`` itself when ``category`` is None) is read as MVTec AD or
    MVTec LOCO AD when it has a ``train/`` folder, else as a plain folder of normal images
    (the images directly in it: everything is training data, no test set).
    """
    if not storage.exists(root):
        raise FileNotFoundError(f"dataset root not found: {root}")
    root = storage.normalize(root)  # the form listed files come back in
    cat_url = storage.join(root, category) if category else root
    name = category or _basename(cat_url) or "default"
    if category and not storage.is_dir(cat_url):
        raise FileNotFoundError(f"category folder not found: {cat_url}")

    train_dir = storage.join(cat_url, "train")
    if not storage.is_dir(train_dir):
        train = _images(cat_url)
        if not train:
            cats = list_categories(cat_url)
            if cats:
                raise ValueError(
                    f"{cat_url} is a dataset root with categories {cats}: pass a category"
                )
            raise ValueError(
                f"{cat_url}: no normal training images (expected a train/good folder or "
                f"image files {', '.join(IMAGE_SUFFIXES)} directly in the folder)"
            )
        return CategoryData(name, "folder", sorted(train, key=_basename), [], [], None)

    good_dir = storage.join(train_dir, "good")
    train = _images(good_dir) if storage.is_dir(good_dir) else []
    if not train:
        raise ValueError(f"{good_dir}: no normal training images found")
    train = sorted(train, key=_basename)

    val_dir = storage.join(cat_url, "validation", "good")
    validation = sorted(_images(val_dir), key=_basename) if storage.is_dir(val_dir) else []

    config_url = storage.join(cat_url, "defects_config.json")
    defects_config = None
    if storage.exists(config_url):
        defects_config = json.loads(storage.read_bytes(config_url).decode("utf-8"))
        if not isinstance(defects_config, list):
            raise ValueError(f"{config_url}: expected a JSON list of defect descriptions")

    test: list[Sample] = []
    loco = bool(validation) or defects_config is not None
    test_dir = storage.join(cat_url, "test")
    gt_dir = storage.join(cat_url, "ground_truth")
    has_gt = storage.is_dir(gt_dir)
    if storage.is_dir(test_dir):
        for type_dir in storage.list_dirs(test_dir):
            defect_type = _basename(type_dir)
            label = 0 if defect_type == "good" else 1
            masks: dict[str, list[str]] = {}
            gt_type_dir = storage.join(gt_dir, defect_type)
            if label and has_gt and storage.is_dir(gt_type_dir):
                masks, loco_masks = _mask_index(gt_type_dir)
                loco = loco or loco_masks
            for path in sorted(_images(type_dir), key=_basename):
                mask_paths = tuple(masks.get(_stem(path), ())) if label else ()
                test.append(Sample(path, label, defect_type, mask_paths))
    return CategoryData(name, "loco" if loco else "mvtec", train, validation, test, defects_config)


def list_categories(root: str) -> list[str]:
    """Names of the sub-folders of ``root`` that hold ``train/good`` (MVTec-style datasets)."""
    return sorted(
        _basename(d)
        for d in storage.list_dirs(root)
        if storage.is_dir(storage.join(d, "train", "good"))
    )


def template_path(data: CategoryData, override: str | None = None) -> str:
    """The template image: the first normal training image by sorted name (the paper's
    choice), unless the user names one."""
    if override:
        return override
    if not data.train:
        raise ValueError(f"category {data.category!r} has no training images for a template")
    return min(data.train, key=lambda p: (_basename(p), p))


# --------------------------------------------------------------------------------------
# loading


def check_images(
    urls: list[str], skip_bad: bool = False, max_pixels: int | None = MAX_PIXELS
) -> list[str]:
    """Decode every image once, before training spends time on them.

    Returns the good URLs in input order. All bad files are collected first, so one run
    reports every problem: ``skip_bad=False`` raises :class:`BadImagesError` listing them,
    ``skip_bad=True`` logs one warning with the count and the list and drops them.
    """
    good: list[str] = []
    bad: list[tuple[str, str]] = []
    for url in urls:
        try:
            decode_image(storage.read_bytes(url), max_pixels=max_pixels)
        except (ImageDecodeError, OSError) as e:  # OSError: missing / unreadable file
            bad.append((url, str(e)))
        else:
            good.append(url)
    if bad:
        err = BadImagesError(bad, len(urls))
        if not skip_bad:
            raise err
        logger.warning("skipping bad images: %s", err)
    return good


def load_image(url: str, size: int, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """Read, decode and resize one image to ``(3, size, size)``; errors name the URL."""
    data = storage.read_bytes(url)
    try:
        img = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{url}: {e}") from e
    return image_to_tensor(img, size)


def load_mask(sample: Sample, size: int) -> torch.Tensor:
    """The merged (logical OR) ground-truth mask of a sample at ``(size, size)``; zeros when
    the sample has no mask files (normal images, or anomalous ones without annotation)."""
    import torch  # lazily: the scoring driver plans without loading torch

    out = torch.zeros(size, size, dtype=torch.float32)
    for url in sample.mask_paths:
        try:
            mask = decode_mask(storage.read_bytes(url))
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{url}: {e}") from e
        out = torch.maximum(out, mask_to_tensor(mask, size))
    return out
