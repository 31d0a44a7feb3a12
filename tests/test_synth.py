"""Synthetic defects (exact masks) and the procedural MVTec-layout dataset."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfa_ray import data, synth


@functools.cache
def _images(h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    nut = np.asarray(Image.fromarray(synth.make_image("object", 256, rng)).resize((w, h)))
    cloth = np.asarray(Image.fromarray(synth.make_image("texture", 256, rng)).resize((w, h)))
    return {
        "object": nut,
        "texture": cloth,
        "noise": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "flat-dark": np.full((h, w, 3), 5, np.uint8),
        "flat-white": np.full((h, w, 3), 255, np.uint8),
    }


@pytest.mark.parametrize("shape", [(32, 32), (200, 300), (300, 200), (256, 256)])
@pytest.mark.parametrize("kind", synth.KINDS)
def test_every_kind_paints_exactly_inside_its_mask(kind: str, shape: tuple[int, int]) -> None:
    h, w = shape
    for name, img in _images(h, w).items():
        for seed in range(2):
            before = img.copy()
            out, mask = synth.paint_defect(img, np.random.default_rng(seed), kind)
            assert np.array_equal(img, before), "the input must not be modified"
            assert out.shape == img.shape and out.dtype == np.uint8
            assert mask.shape == (h, w) and mask.dtype == bool
            changed = np.any(out != img, axis=2)
            # exact ground truth: changed pixels == mask, nothing outside touched
            assert np.array_equal(changed, mask), (name, seed)
            assert np.array_equal(out[~mask], img[~mask])
            area = mask.mean()
            assert 0.001 <= area <= 0.06, (name, seed, area)
            # clearly visible: a real change in the mean, not a 1-level nudge
            diff = np.abs(out[mask].astype(int) - img[mask].astype(int)).max(axis=1)
            assert diff.mean() >= 20, (name, seed, diff.mean())


def test_paint_defect_is_seeded_and_random_kind_works() -> None:
    img = _images(64, 64)["texture"]
    a = synth.paint_defect(img, np.random.default_rng(3))
    b = synth.paint_defect(img, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    masks = {synth.paint_defect(img, np.random.default_rng(s))[1].tobytes() for s in range(6)}
    assert len(masks) == 6


def test_paint_defect_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        synth.paint_defect(np.zeros((32, 32, 3), np.uint8), rng, "crack")
    with pytest.raises(ValueError, match="uint8"):
        synth.paint_defect(np.zeros((32, 32), np.uint8), rng)
    with pytest.raises(ValueError, match="small"):
        synth.paint_defect(np.zeros((8, 8, 3), np.uint8), rng)


def test_paint_defect_is_fast() -> None:
    img = _images(256, 256)["object"]
    rng = np.random.default_rng(0)
    synth.paint_defect(img, rng)
    start = time.perf_counter()
    for kind in synth.KINDS * 4:
        synth.paint_defect(img, rng, kind)
    per_defect = (time.perf_counter() - start) / 20
    assert per_defect < 0.05, f"{per_defect * 1000:.1f} ms per defect"  # a few ms, with slack


SMALL = dict(n_train=4, n_test_good=2, n_test_defect=6, size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_make_dataset_layout_and_masks(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    assert synth.make_dataset(str(root), **SMALL) == ["texture", "object"]
    assert data.list_categories(str(root)) == ["object", "texture"]
    for category in ("texture", "object"):
        d = data.discover(str(root), category)
        assert d.layout == "mvtec"
        assert [Path(p).name for p in d.train] == ["000.png", "001.png", "002.png", "003.png"]
        good = [s for s in d.test if s.label == 0]
        bad = [s for s in d.test if s.label == 1]
        assert len(good) == 2 and len(bad) == 6
        assert {s.defect_type for s in bad} == set(synth.KINDS)
        for s in bad:
            assert len(s.mask_paths) == 1
            assert Path(s.mask_paths[0]).name == Path(s.path).stem + "_mask.png"
            raw = np.asarray(Image.open(s.mask_paths[0]))
            assert raw.shape == (64, 64) and set(np.unique(raw)) == {0, 255}
            assert 0.001 <= (raw > 0).mean() <= 0.06
        img = np.asarray(Image.open(d.train[0]))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 10


def test_make_dataset_defects_lie_inside_the_masks(tmp_path: Path) -> None:
    """A defect image differs from normal images mostly inside its mask: the mean deviation
    from the per-pixel median of the normal training images is far higher there."""
    root = tmp_path / "ds"
    synth.make_dataset(str(root), ("object",), n_train=8, n_test_good=0, n_test_defect=5, size=64)
    d = data.discover(str(root), "object")
    normal = np.median(np.stack([np.asarray(Image.open(p)).astype(float) for p in d.train]), axis=0)
    for s in d.test:
        img = np.asarray(Image.open(s.path)).astype(float)
        mask = np.asarray(Image.open(s.mask_paths[0])) > 0
        dev = np.abs(img - normal).max(axis=2)
        assert dev[mask].mean() > 2 * dev[~mask].mean() + 5, s.defect_type


def test_make_dataset_is_deterministic(tmp_path: Path) -> None:
    synth.make_dataset(str(tmp_path / "a"), **SMALL)
    synth.make_dataset(str(tmp_path / "b"), **SMALL)
    synth.make_dataset(str(tmp_path / "c"), **SMALL, seed=1)
    synth.make_dataset(str(tmp_path / "d"), ("object",), **SMALL)
    a, b, c, d = (_files(tmp_path / x) for x in "abcd")
    assert len(a) == 2 * (4 + 2 + 6 + 6)
    assert a == b  # byte-identical
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith("train/good/000.png"))
    # a category does not depend on which other categories are generated with it
    assert d == {k: v for k, v in a.items() if k.startswith("object/")}
    # different random instances, same kind of picture
    t0, t1 = (np.asarray(Image.open(tmp_path / f"a/texture/train/good/00{i}.png")) for i in (0, 1))
    assert not np.array_equal(t0, t1)
    assert abs(t0.mean() - t1.mean()) < 10 and abs(t0.std() - t1.std()) < 8


def test_make_dataset_rejects_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic category"):
        synth.make_dataset(str(tmp_path), ("carpet",))
    assert not any(tmp_path.iterdir())
