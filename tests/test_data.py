"""Decoding of every supported format / mode, and the three dataset layouts."""

from __future__ import annotations

import io
import json
import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfa_ray import data
from tfa_ray.data import ImageDecodeError, decode_image, decode_mask

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)


def enc(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def png_header(width: int, height: int) -> bytes:
    """A PNG that only *claims* a size: header chunks, no pixel data worth the name."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_formats_are_exact(fmt: str) -> None:
    out = decode_image(enc(Image.fromarray(RGB), fmt))
    assert out.size == (32, 24)
    np.testing.assert_array_equal(rgb(out), RGB)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_grey_8bit_is_replicated(fmt: str) -> None:
    out = rgb(decode_image(enc(Image.fromarray(GREY), fmt)))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], GREY)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_grey_16bit_is_scaled_not_clipped(fmt: str) -> None:
    values = np.array([[0, 65535, 257 * 7, 32768, 1000, 60000]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = rgb(decode_image(enc(img, fmt)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 7, 128, 4, 233])
    assert (out[..., 0] == out[..., 2]).all()


def test_int32_and_float_grey() -> None:
    i32 = Image.fromarray(np.array([[0, 65535], [257 * 9, 30000]], dtype=np.int32))
    assert i32.mode == "I"
    np.testing.assert_array_equal(rgb(decode_image(enc(i32, "TIFF")))[..., 1], [[0, 255], [9, 117]])
    f32 = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32))
    assert f32.mode == "F"
    np.testing.assert_array_equal(
        rgb(decode_image(enc(f32, "TIFF")))[..., 0], [[0, 255], [128, 64]]
    )


def test_alpha_is_composited_on_black() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[0, 255, 128], [255, 255, 255]]
    out = rgb(decode_image(enc(Image.fromarray(rgba, "RGBA"), "PNG")))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 2], [100, 50, 25])
    la = Image.new("LA", (4, 4), (200, 128))
    np.testing.assert_array_equal(rgb(decode_image(enc(la, "PNG")))[1, 1], [100, 100, 100])


def test_palette_and_bilevel() -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    np.testing.assert_array_equal(rgb(decode_image(enc(pal, "PNG")))[0, 0], [255, 0, 0])
    # a transparent palette entry is composited on black like any alpha
    np.testing.assert_array_equal(
        rgb(decode_image(enc(pal, "PNG", transparency=1)))[0, 0], [0, 0, 0]
    )
    bilevel = Image.new("1", (4, 4), 1)
    np.testing.assert_array_equal(rgb(decode_image(enc(bilevel, "PNG")))[0, 0], [255, 255, 255])


def test_jpeg_grey_rgb_and_cmyk() -> None:
    grey = rgb(decode_image(enc(Image.new("L", (16, 16), 90), "JPEG")))
    assert np.abs(grey - 90).max() <= 2 and (grey[..., 0] == grey[..., 1]).all()
    colour = rgb(decode_image(enc(Image.new("RGB", (16, 16), (20, 140, 220)), "JPEG")))
    assert np.abs(colour - [20, 140, 220]).max() <= 4
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    red = rgb(decode_image(enc(cmyk, "JPEG")))[8, 8]
    assert red[0] > 230 and red[1] < 25 and red[2] < 25


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    img.paste((250, 250, 250), (0, 0, 10, 20))  # bright left edge
    out = decode_image(enc(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    arr = rgb(out)
    assert arr[:8].mean() > 200 and arr[-8:].mean() < 60  # the left edge is now at the top


def test_truncated_and_non_image_data_fail_clearly() -> None:
    png = enc(Image.fromarray(RGB), "PNG")
    jpeg = enc(Image.fromarray(RGB), "JPEG")
    cases = {
        b"": "empty",
        png[: len(png) // 2]: "truncated",
        jpeg[: len(jpeg) // 2]: "truncated",
        jpeg[:-20]: "truncated",
        b"plain text, certainly not an image\n" * 3: "not a recognised image",
        b"<html><body>404</body></html>": "not a recognised image",
    }
    for payload, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason):
            decode_image(payload)


def test_too_many_pixels_is_refused_before_decoding() -> None:
    small = enc(Image.fromarray(RGB), "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(small, max_pixels=100)
    assert decode_image(small, max_pixels=24 * 32).size == (32, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        # above Pillow's warning limit (89 MP): only the header exists, so a decode attempt
        # would say "truncated", not "too large"
        with pytest.raises(ImageDecodeError, match="too large.*max_pixels"):
            decode_image(png_header(10_000, 10_000))
        # above Pillow's hard limit (179 MP): its DecompressionBombError is converted
        for max_pixels in (None, 10**12):
            with pytest.raises(ImageDecodeError, match="too large"):
                decode_image(png_header(50_000, 50_000), max_pixels=max_pixels)
        with pytest.raises(ImageDecodeError, match="too large"):
            decode_image(png_header(50_000, 50_000))


def test_masks() -> None:
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 2:5] = 255
    np.testing.assert_array_equal(decode_mask(enc(Image.fromarray(m), "PNG")), m > 0)
    colour = np.zeros((6, 8, 3), np.uint8)
    colour[4, 4] = (0, 0, 1)  # any nonzero channel counts
    assert decode_mask(enc(Image.fromarray(colour), "PNG")).sum() == 1
    m16 = np.zeros((4, 4), np.uint16)
    m16[0, 0] = 1
    assert decode_mask(enc(Image.fromarray(m16), "PNG")).tolist()[0][:2] == [True, False]
    with pytest.raises(ImageDecodeError):
        decode_mask(b"junk")


def test_tensors() -> None:
    img = Image.fromarray(RGB)
    t = data.image_to_tensor(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    flat = data.image_to_tensor(Image.new("RGB", (50, 30), (255, 0, 51)), 8)
    torch.testing.assert_close(flat[:, 3, 3], torch.tensor([1.0, 0.0, 0.2]))
    square = RGB[:, :24]  # already at the model size: pixels pass through unchanged
    exact = data.image_to_tensor(Image.fromarray(square), 24)
    torch.testing.assert_close(exact, torch.from_numpy(square).permute(2, 0, 1).float() / 255)

    mask = np.zeros((30, 50), bool)
    mask[10:20, 10:40] = True
    mt = data.mask_to_tensor(mask, 10)
    assert mt.shape == (10, 10) and mt.dtype == torch.float32
    assert set(mt.unique().tolist()) == {0.0, 1.0}
    assert mt[5, 5] == 1 and mt[0, 0] == 0


# --------------------------------------------------------------------------------------
# layouts


def write_png(path: Path, arr: np.ndarray | None = None, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr is None:
        arr = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def rect_mask(box: tuple[int, int, int, int], size=(8, 8)) -> np.ndarray:
    m = np.zeros(size, np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = 255
    return m


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    cat = tmp_path / "mvtec" / "bottle"
    for name in ("010.png", "002.png", "001.PNG"):
        write_png(cat / "train/good" / name)
    (cat / "train/good/readme.txt").write_text("not an image")
    write_png(cat / "test/good/000.png")
    write_png(cat / "test/broken/000.png")
    write_png(cat / "test/broken/001.jpg")  # anomalous, no mask: allowed
    write_png(cat / "ground_truth/broken/000_mask.png", rect_mask((0, 2, 0, 3)))
    write_png(tmp_path / "mvtec/empty_cat/train/good/.hidden.png")  # no real images
    (tmp_path / "mvtec/notes").mkdir()
    return tmp_path / "mvtec"


def test_discover_mvtec(mvtec: Path) -> None:
    d = data.discover(str(mvtec), "bottle")
    cat = mvtec / "bottle"
    assert (d.category, d.layout, d.validation, d.defects_config) == ("bottle", "mvtec", [], None)
    assert d.train == [str(cat / "train/good" / n) for n in ("001.PNG", "002.png", "010.png")]
    by_path = {Path(s.path).relative_to(cat).as_posix(): s for s in d.test}
    assert set(by_path) == {"test/good/000.png", "test/broken/000.png", "test/broken/001.jpg"}
    good = by_path["test/good/000.png"]
    assert (good.label, good.defect_type, good.mask_paths) == (0, "good", ())
    broken = by_path["test/broken/000.png"]
    assert (broken.label, broken.defect_type) == (1, "broken")
    assert broken.mask_paths == (str(cat / "ground_truth/broken/000_mask.png"),)
    assert by_path["test/broken/001.jpg"].mask_paths == ()
    mask = data.load_mask(broken, 8)
    assert mask.sum() == 6 and mask[0, 0] == 1
    assert data.load_mask(good, 8).sum() == 0

    assert data.list_categories(str(mvtec)) == ["bottle", "empty_cat"]
    assert data.template_path(d) == str(cat / "train/good/001.PNG")
    assert data.template_path(d, "s3://b/t.png") == "s3://b/t.png"


def test_discover_errors(mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.discover(str(tmp_path / "nowhere"), "bottle")
    with pytest.raises(FileNotFoundError, match="screw"):
        data.discover(str(mvtec), "screw")
    with pytest.raises(ValueError, match="empty_cat/train/good"):
        data.discover(str(mvtec), "empty_cat")
    with pytest.raises(ValueError, match="pass a category"):
        data.discover(str(mvtec))  # a dataset root is not a folder of normal images
    with pytest.raises(ValueError, match="notes"):
        data.discover(str(mvtec), "notes")


def test_discover_loco(tmp_path: Path) -> None:
    cat = tmp_path / "loco" / "juice_bottle"
    for i in range(3):
        write_png(cat / f"train/good/{i:03d}.png")
    write_png(cat / "validation/good/000.png")
    write_png(cat / "test/good/000.png")
    write_png(cat / "test/logical_anomalies/000.png")
    write_png(cat / "test/structural_anomalies/000.png")
    write_png(cat / "ground_truth/logical_anomalies/000/000.png", rect_mask((0, 2, 0, 2)))
    write_png(cat / "ground_truth/logical_anomalies/000/001.png", rect_mask((4, 8, 4, 8)))
    write_png(cat / "ground_truth/structural_anomalies/000/000.png", rect_mask((1, 2, 1, 2)))
    config = [{"defect_name": "missing_cap", "pixel_value": 255, "saturation_threshold": 100}]
    (cat / "defects_config.json").write_text(json.dumps(config))

    d = data.discover(str(tmp_path / "loco"), "juice_bottle")
    assert d.layout == "loco"
    assert d.validation == [str(cat / "validation/good/000.png")]
    assert d.defects_config == config
    assert len(d.train) == 3 and len(d.test) == 3
    logical = next(s for s in d.test if s.defect_type == "logical_anomalies")
    assert [Path(p).relative_to(cat).as_posix() for p in logical.mask_paths] == [
        "ground_truth/logical_anomalies/000/000.png",
        "ground_truth/logical_anomalies/000/001.png",
    ]
    merged = data.load_mask(logical, 8)
    assert merged.sum() == 4 + 16  # both masks, OR-ed
    assert merged[0, 0] == 1 and merged[7, 7] == 1 and merged[3, 3] == 0


def test_discover_plain_folder(tmp_path: Path) -> None:
    folder = tmp_path / "line3"
    for name in ("b.jpg", "a.png", "c.bmp"):
        write_png(folder / name)
    write_png(folder / "sub" / "ignored.png")  # only the images directly in the folder
    for root, category in ((str(folder), None), (str(tmp_path), "line3")):
        d = data.discover(root, category)
        assert (d.category, d.layout, d.test, d.validation) == ("line3", "folder", [], [])
        assert [Path(p).name for p in d.train] == ["a.png", "b.jpg", "c.bmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no normal training images"):
        data.discover(str(tmp_path / "empty"))


def test_check_images_lists_every_bad_file(tmp_path: Path, caplog) -> None:
    good = [tmp_path / "ok1.png", tmp_path / "ok2.jpg"]
    for p in good:
        write_png(p)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    png = enc(Image.fromarray(RGB), "PNG")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    bad = ["empty.png", "text.png", "cut.png", "missing.png"]
    urls = [str(tmp_path / n) for n in ("ok1.png", *bad[:2], "ok2.jpg", *bad[2:])]

    with pytest.raises(data.BadImagesError) as err:
        data.check_images(urls)
    message = str(err.value)
    assert "4 of 6" in message
    for name, reason in zip(
        bad, ("empty", "not a recognised", "truncated", "no such"), strict=True
    ):
        line = next(x for x in message.splitlines() if name in x)
        assert reason in line
    assert [Path(u).name for u, _ in err.value.bad] == bad

    with caplog.at_level(logging.WARNING, logger="tfa_ray.data"):
        kept = data.check_images(urls, skip_bad=True)
    assert kept == [str(p) for p in good]
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1
    assert "4 of 6" in warnings_logged[0].getMessage()
    assert all(n in warnings_logged[0].getMessage() for n in bad)


def test_load_image(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", size=(20, 30))
    assert data.load_image(str(tmp_path / "a.png"), 16).shape == (3, 16, 16)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ImageDecodeError, match="bad.png"):
        data.load_image(str(tmp_path / "bad.png"), 16)


MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="real dataset not present")
def test_discover_real_magnetic_tile() -> None:
    d = data.discover(str(MAGNETIC_TILE))
    assert d.layout == "mvtec" and len(d.train) == 752
    assert sum(s.label == 0 for s in d.test) == 200
    anomalous = [s for s in d.test if s.label]
    assert len(anomalous) == 392 and all(len(s.mask_paths) == 1 for s in anomalous)
    assert data.load_image(d.train[0], 32).shape == (3, 32, 32)
