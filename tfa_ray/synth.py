"""Procedural data with exact masks: synthetic defects and small MVTec-layout datasets.

The demo and the tests need data that exists everywhere and whose ground truth is exact;
training needs generic synthetic anomalies to paste into held-out *normal* images, so model
selection never looks at the test set. Everything here is seeded and vectorised numpy / Pillow
drawing: a defect takes a few milliseconds at 256 px.
"""

from __future__ import annotations

import functools
import io
import zlib

import numpy as np
from PIL import Image, ImageDraw

from tfa_ray import storage

__all__ = ["CATEGORIES", "KINDS", "LARGE_KINDS", "make_dataset", "make_image", "paint_defect"]

KINDS = ("scratch", "blob", "cutpaste", "spot", "missing")
# Large, low-frequency defects (10-40 % of the image): uneven shading, stains, intensity
# shifts. Real lines have both kinds; selection on small defects alone cannot rank models
# for these. A prior about defects, not a look at any test set.
LARGE_KINDS = ("shading", "blotch")
CATEGORIES = ("texture", "object")

# Defect area as a fraction of the image (log-uniform); shapes add some spread around it.
_AREA_MIN, _AREA_MAX = 0.004, 0.03
_MIN_SIZE = 16


# --------------------------------------------------------------------------------------
# helpers


def _target_area(h: int, w: int, rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(_AREA_MIN), np.log(_AREA_MAX)))) * h * w


def _border_colour(img: np.ndarray) -> np.ndarray:
    """Median colour of the image border: the background of an object image, the mean
    colour of a texture."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    return np.median(border, axis=0)


def _pick_centre(
    img: np.ndarray, rng: np.random.Generator, half_h: float, half_w: float
) -> tuple[float, float]:
    """A centre that keeps a ``2*half_h x 2*half_w`` box inside the image, preferably on the
    foreground (pixels unlike the border colour): defects belong on the object, not the table."""
    h, w = img.shape[:2]
    y0, y1 = min(half_h, h / 2), max(h - half_h, h / 2)
    x0, x1 = min(half_w, w / 2), max(w - half_w, w / 2)
    step = max(1, min(h, w) // 96)
    small = img[::step, ::step].astype(np.int16)
    fg = np.abs(small - _border_colour(img)).sum(axis=2) > 45
    ys, xs = np.nonzero(fg)
    ys, xs = ys * step + step / 2, xs * step + step / 2
    ok = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
    if ok.sum() >= max(4, 0.02 * fg.size):
        i = rng.integers(ok.sum())
        return float(ys[ok][i]), float(xs[ok][i])
    return float(rng.uniform(y0, y1)), float(rng.uniform(x0, x1))


def _contrast_colour(local: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour clearly unlike the mean of ``local`` pixels (dark on bright, bright on dark)."""
    mean = float(local.reshape(-1, 3).mean()) if local.size else 128.0
    base = rng.uniform(10, 60) if mean > 120 else rng.uniform(190, 245)
    return np.clip(base + rng.uniform(-25, 25, size=3), 0, 255)


def _draw_mask(h: int, w: int, draw) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw(ImageDraw.Draw(img))
    return np.asarray(img) > 0


def _blob_points(
    cy: float, cx: float, a: float, b: float, rng: np.random.Generator, rough: float = 0.18
) -> list[tuple[float, float]]:
    """An irregular, rotated ellipse outline (a closed polygon)."""
    t = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
    r = (
        1.0
        + rough
        * sum(rng.uniform(-1, 1) * np.sin(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        / 1.7
    )
    phi = rng.uniform(0, np.pi)
    x, y = a * r * np.cos(t), b * r * np.sin(t)
    xr = cx + x * np.cos(phi) - y * np.sin(phi)
    yr = cy + x * np.sin(phi) + y * np.cos(phi)
    return list(zip(xr.tolist(), yr.tolist(), strict=True))


def _ellipse_axes(area: float, rng: np.random.Generator, min_ratio: float) -> tuple[float, float]:
    ratio = rng.uniform(min_ratio, 1.0)
    a = max(1.0, np.sqrt(area / (np.pi * ratio)))
    return a, max(1.0, a * ratio)


def _box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


# --------------------------------------------------------------------------------------
# defect painters: each returns (region, image with the region repainted)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    side = min(h, w)
    width = max(1, int(round(side / rng.uniform(70, 120))))
    out = img.copy()
    region = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.3, 0.6) * side
        cy, cx = _pick_centre(img, rng, length / 2, length / 2)
        theta = rng.uniform(0, np.pi)
        d = np.array([np.cos(theta), np.sin(theta)]) * length / 2
        n = np.array([-d[1], d[0]]) * rng.uniform(-0.6, 0.6)
        p0, p2 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
        p1 = np.array([cx, cy]) + n
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        pts = np.clip(pts, [0, 0], [w - 1, h - 1])
        line = [(float(x), float(y)) for x, y in pts]
        m = _draw_mask(
            h, w, lambda dr, line=line: dr.line(line, fill=255, width=width, joint="curve")
        )
        colour = _contrast_colour(img[m], rng)
        shade = rng.normal(0, 6, size=(int(m.sum()), 1))
        out[m] = np.clip(colour + shade, 0, 255).astype(np.uint8)
        region |= m
    return region, out


def _blob(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    a, b = _ellipse_axes(_target_area(h, w, rng), rng, 0.4)
    cy, cx = _pick_centre(img, rng, a * 1.2, a * 1.2)
    pts = _blob_points(cy, cx, a, b, rng)
    region = _draw_mask(h, w, lambda dr: dr.polygon(pts, fill=255))
    out = img.copy()
    ys, xs = _box(region)
    colour = _contrast_colour(img[region], rng)
    bh, bw = ys.stop - ys.start, xs.stop - xs.start
    coarse = rng.normal(0, 1, size=(bh // 4 + 2, bw // 4 + 2))
    coarse = np.kron(coarse, np.ones((4, 4)))[:bh, :bw, None]
    tex = colour + 22 * coarse + rng.normal(0, 10, size=(bh, bw, 1))
    mixed = 0.25 * img[ys, xs] + 0.75 * tex
    sub = region[ys, xs]
    out[ys, xs][sub] = np.clip(mixed[sub], 0, 255).astype(np.uint8)
    return region, out


def _spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    a, b = _ellipse_axes(_target_area(h, w, rng) * 0.6, rng, 0.6)
    cy, cx = _pick_centre(img, rng, a, a)
    pts = _blob_points(cy, cx, a, b, rng, rough=0.05)
    region = _draw_mask(h, w, lambda dr: dr.polygon(pts, fill=255))
    ys, xs = _box(region)
    yy, xx = np.mgrid[ys, xs]
    dist = np.hypot((yy + 0.5 - cy) / a, (xx + 0.5 - cx) / a)
    alpha = np.clip(0.95 - 0.4 * dist, 0.55, 0.95)[..., None]
    # a tinted stain: one dominant channel so it reads as a colour, not only as brightness
    colour = _contrast_colour(img[region], rng)
    c = int(rng.integers(3))
    colour[c] = 255 - colour[c] * 0.5
    mixed = (1 - alpha) * img[ys, xs] + alpha * colour
    out = img.copy()
    sub = region[ys, xs]
    out[ys, xs][sub] = np.clip(mixed[sub], 0, 255).astype(np.uint8)
    return region, out


def _cutpaste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    area = _target_area(h, w, rng)
    ratio = rng.uniform(0.3, 1.0)
    ph, pw = np.sqrt(area * ratio), np.sqrt(area / ratio)
    if rng.random() < 0.5:
        ph, pw = pw, ph
    ph = int(np.clip(round(ph), 2, h // 3))
    pw = int(np.clip(round(pw), 2, w // 3))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = Image.fromarray(img[sy : sy + ph, sx : sx + pw])
    pmask = Image.new("L", (pw, ph), 255)
    if rng.random() < 0.5:
        angle = float(rng.uniform(-45, 45))
        patch = patch.rotate(angle, Image.Resampling.BILINEAR, expand=True)
        pmask = pmask.rotate(angle, Image.Resampling.NEAREST, expand=True)
    p = np.asarray(patch).astype(np.float64)
    m = np.asarray(pmask) > 127
    qh, qw = m.shape
    qh, qw = min(qh, h), min(qw, w)
    p, m = p[:qh, :qw], m[:qh, :qw]
    # colour jitter, clearly brighter or darker, so the paste is visible on a stationary texture
    factor = rng.uniform(0.55, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.6)
    p = p.mean() + (p - p.mean()) * rng.uniform(0.8, 1.3) + (factor - 1) * p.mean()
    p = p + rng.uniform(-12, 12, size=3)
    cy, cx = _pick_centre(img, rng, qh / 2, qw / 2)
    ty = int(np.clip(round(cy - qh / 2), 0, h - qh))
    tx = int(np.clip(round(cx - qw / 2), 0, w - qw))
    target = img[ty : ty + qh, tx : tx + qw].astype(np.float64)
    if np.abs(p[m] - target[m]).mean() < 25:  # e.g. dark background pasted on dark background
        p = p + (-45 if p[m].mean() > 127 else 45)
    region = np.zeros((h, w), bool)
    region[ty : ty + qh, tx : tx + qw] = m
    out = img.copy()
    out[ty : ty + qh, tx : tx + qw][m] = np.clip(p[m], 0, 255).astype(np.uint8)
    return region, out


def _missing(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    a, b = _ellipse_axes(_target_area(h, w, rng), rng, 0.35)
    bg = _border_colour(img)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(6):  # the candidate where filling with background changes the most
        cy, cx = _pick_centre(img, rng, a * 1.2, a * 1.2)
        pts = _blob_points(cy, cx, a, b, rng, rough=0.25)
        region = _draw_mask(h, w, lambda dr, pts=pts: dr.polygon(pts, fill=255))
        gain = float(np.abs(img[region].astype(np.float64) - bg).mean()) if region.any() else 0
        if best is None or gain > best[0]:
            best = (gain, region)
    gain, region = best
    fill = bg.astype(np.float64)
    if gain < 25:  # on plain background: show a darker / brighter hole instead
        fill = fill + (-50 if fill.mean() > 127 else 50)
    out = img.copy()
    noise = rng.normal(0, 2.5, size=(int(region.sum()), 3))
    out[region] = np.clip(fill + noise, 0, 255).astype(np.uint8)
    return region, out


def _smooth_field(h: int, w: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: a ``cells`` x ``cells`` grid of noise, upsampled."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return (field - field.min()) / max(float(field.max() - field.min()), 1e-6)


def _large_region(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft, irregular region of 10-40 % of the image: (bool region, weight in [0, 1])."""
    area = rng.uniform(0.10, 0.40)
    a, b = _ellipse_axes(area * h * w, rng, 0.4)
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    theta = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u = ((xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)) / a
    v = (-(xs - cx) * np.sin(theta) + (ys - cy) * np.cos(theta)) / b
    r = np.sqrt(u**2 + v**2) * (0.75 + 0.5 * _smooth_field(h, w, rng, 4))  # irregular rim
    weight = np.clip((1.15 - r) / 0.3, 0, 1)  # soft edge
    return weight > 0.2, weight


def _shading(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uneven illumination: a brightness ramp across a large soft region."""
    h, w = img.shape[:2]
    region, weight = _large_region(h, w, rng)
    theta = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xs / w - 0.5) * np.cos(theta) + (ys / h - 0.5) * np.sin(theta)
    amp = rng.uniform(25, 60) * rng.choice([-1.0, 1.0])
    delta = amp * (0.75 + 0.5 * ramp) * weight * region
    out = np.clip(img + delta[..., None], 0, 255).astype(np.uint8)
    return region, out


def _blotch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stain: a large region whose intensity and contrast shift with a low-frequency pattern."""
    h, w = img.shape[:2]
    region, weight = _large_region(h, w, rng)
    pattern = 0.5 + _smooth_field(h, w, rng, int(rng.integers(3, 7)))
    shift = rng.uniform(20, 50) * rng.choice([-1.0, 1.0])
    contrast = rng.uniform(0.6, 1.4)
    mean = img[region].mean(axis=0) if region.any() else img.reshape(-1, 3).mean(axis=0)
    changed = mean + (img - mean) * contrast + shift * pattern[..., None]
    alpha = (weight * region)[..., None]
    out = np.clip(alpha * changed + (1 - alpha) * img, 0, 255).astype(np.uint8)
    return region, out


_PAINTERS = {
    "scratch": _scratch,
    "blob": _blob,
    "cutpaste": _cutpaste,
    "spot": _spot,
    "missing": _missing,
    "shading": _shading,
    "blotch": _blotch,
}


def paint_defect(
    image: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic defect; returns (new image, bool ``HxW`` mask).

    The mask is exact: it is the set of changed pixels, and every pixel in it is changed (a
    pixel whose new colour happened to equal the old one is nudged). ``kind`` is one of
    :data:`KINDS` or :data:`LARGE_KINDS` (random from ``KINDS`` if None). Works on any
    ``(H, W, 3)`` uint8 image of 16 px or more.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    if min(img.shape[:2]) < _MIN_SIZE:
        raise ValueError(f"image too small for a defect: {img.shape[:2]} (min {_MIN_SIZE} px)")
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind not in _PAINTERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {KINDS + LARGE_KINDS}")
    region, out = _PAINTERS[kind](img, rng)
    if not region.any():  # cannot happen with the sizes above; keep the contract regardless
        region[img.shape[0] // 2, img.shape[1] // 2] = True
    same = region & np.all(out == img, axis=2)
    if same.any():
        v = img[same].astype(np.int16)
        out[same] = np.where(v > 127, v - 48, v + 48).astype(np.uint8)
    return out, region


# --------------------------------------------------------------------------------------
# procedural normal images


@functools.lru_cache(maxsize=8)
def _texture_filter(size: int) -> np.ndarray:
    """A fixed spectrum: woven cross-hatch (two oriented band-passes) plus soft low-frequency
    mottling. Random phases through it give a stationary texture: same statistics in every
    image, a different instance each time."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f0, s = 1.0 / 9.0, 0.012
    weave = np.exp(-((np.abs(fx) - f0) ** 2 + (fy / 2.5) ** 2) / (2 * s**2))
    weave += np.exp(-((np.abs(fy) - f0) ** 2 + (fx / 2.5) ** 2) / (2 * s**2))
    mottle = 0.35 / (1 + (np.hypot(fx, fy) / 0.02) ** 2)
    return weave + mottle


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft2(rng.standard_normal((size, size), dtype=np.float32))
    v = np.fft.irfft2(spec * _texture_filter(size), s=(size, size)).astype(np.float32)
    v /= v.std() + 1e-12
    base = np.array([150.0, 124.0, 92.0], np.float32)
    scale = np.array([32.0, 28.0, 22.0], np.float32)
    img = base + v[..., None] * scale + _noise(rng, (size, size, 3), 3.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    return yy, xx


def _object(size: int, rng: np.random.Generator, pose_jitter: float = 0.03) -> np.ndarray:
    """A hex nut on a plain dark table: chamfered corners, threaded hole, top-left light;
    random jitter of position (``pose_jitter`` of the image size), rotation and brightness
    between images. A small jitter is a fixtured part; 0.15 is an object whose pose varies."""
    yy, xx = _grid(size)
    cx = size / 2 + rng.uniform(-pose_jitter, pose_jitter) * size
    cy = size / 2 + rng.uniform(-pose_jitter, pose_jitter) * size
    theta = np.deg2rad(rng.uniform(-10, 10) * max(1.0, pose_jitter / 0.03))
    bright = rng.uniform(0.92, 1.08)
    apothem = 0.30 * size
    px, py = xx - np.float32(cx), yy - np.float32(cy)
    d = np.zeros_like(px)
    for k in range(3):  # hexagon = intersection of three slabs
        a = theta + k * np.pi / 3
        np.maximum(d, np.abs(px * np.float32(np.cos(a)) + py * np.float32(np.sin(a))), out=d)
    px_per = np.float32(size / 256.0)
    hexagon = np.clip((apothem - d) / px_per + 0.5, 0, 1)
    rr = np.hypot(px, py)
    hole_r = 0.42 * apothem
    hole = np.clip((hole_r - rr) / px_per + 0.5, 0, 1)
    chamfer = np.clip((rr - 0.98 * apothem) / px_per + 0.5, 0, 1)
    ring = ((rr > hole_r) & (rr < 1.3 * hole_r)).astype(np.float32)
    thread = 1 - ring * (0.25 + 0.12 * np.sin(rr * np.float32(2 * np.pi / (3.0 * px_per))))
    shade = 1 + (-px - py) * np.float32(0.28 / (np.sqrt(2) * apothem))
    metal = np.float32(170 * bright) * shade * (1 - 0.28 * chamfer) * thread
    alpha = hexagon * (1 - hole)
    face = (metal * alpha)[..., None] * np.array([1.0, 0.98, 0.92], np.float32)
    bg = np.array([38.0, 40.0, 46.0], np.float32)
    img = bg * (1 - alpha)[..., None] + face + _noise(rng, (size, size, 3), 2.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


_GENERATORS = {"texture": _texture, "object": _object}


def make_image(
    category: str, size: int, rng: np.random.Generator, pose_jitter: float | None = None
) -> np.ndarray:
    """One normal ``(size, size, 3)`` uint8 image of a synthetic category; ``pose_jitter``
    (objects only) widens the position jitter from its default 0.03 of the image size."""
    if category not in _GENERATORS:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {CATEGORIES}")
    if pose_jitter is not None and category == "object":
        return _object(size, rng, pose_jitter)
    return _GENERATORS[category](size, rng)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: several times faster than the default, same pixels, still deterministic
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def make_dataset(
    root: str,
    categories: tuple[str, ...] = CATEGORIES,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_defect: int = 24,
    size: int = 256,
    seed: int = 0,
    pose_jitter: float | None = None,
) -> list[str]:
    """Write an MVTec AD layout dataset under ``root`` (local or ``s3://``); returns the
    category names.

    Test defects cycle through :data:`KINDS` and each gets an exact 0/255 mask in
    ``ground_truth/<kind>/<stem>_mask.png``. Every image has its own seed derived from
    (seed, category, split, index), so the same call writes byte-identical files and a
    category's images do not depend on which other categories are generated. ``pose_jitter``:
    see :func:`make_image`.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    for category in categories:
        if category not in _GENERATORS:
            raise ValueError(f"unknown synthetic category {category!r}; choose from {CATEGORIES}")
    for category in categories:
        cat_seed = zlib.crc32(category.encode())

        def rng_for(split: int, i: int, cat_seed: int = cat_seed) -> np.random.Generator:
            return np.random.default_rng([seed, cat_seed, split, i])

        cat = storage.join(root, category)
        for i in range(n_train):
            img = make_image(category, size, rng_for(0, i), pose_jitter)
            storage.write_bytes(storage.join(cat, "train", "good", f"{i:03d}.png"), _png(img))
        for i in range(n_test_good):
            img = make_image(category, size, rng_for(1, i), pose_jitter)
            storage.write_bytes(storage.join(cat, "test", "good", f"{i:03d}.png"), _png(img))
        counts = dict.fromkeys(KINDS, 0)
        for i in range(n_test_defect):
            rng = rng_for(2, i)
            kind = KINDS[i % len(KINDS)]
            img, mask = paint_defect(make_image(category, size, rng, pose_jitter), rng, kind)
            stem = f"{counts[kind]:03d}"
            counts[kind] += 1
            storage.write_bytes(storage.join(cat, "test", kind, f"{stem}.png"), _png(img))
            mask_png = _png((mask * 255).astype(np.uint8))
            storage.write_bytes(
                storage.join(cat, "ground_truth", kind, f"{stem}_mask.png"), mask_png
            )
    return list(categories)
