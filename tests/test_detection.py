"""A trained detector must detect: a tiny model trained for about a minute on procedural data
separates normal from defective images, and localises the defects, from its reconstruction
alone (test-tiny has no statistical evidence to hide behind).

The thresholds sit well below what the model reaches (image AUROC about 0.88-0.90, pixel
AUROC about 0.95-0.96 at the time of writing) and well above chance. Checked by breaking the
code: a flipped map sign fails the pixel bar (asserted below); keeping the input half instead
of the template half fails training outright (masked inputs no longer fill the token grid).
A dead TFAM (blocks skipped) still passes here, 0.88 / 0.95, because a reconstruction from the
template alone is itself a decent detector on these images; ``test_model.py`` catches it
structurally (``test_tfam_lets_the_input_reach_the_template_half``).
"""

import numpy as np
import pytest
import torch

from tfa_ray.config import get_preset
from tfa_ray.data import discover, load_image, load_mask
from tfa_ray.metrics import image_auroc, pixel_auroc
from tfa_ray.synth import make_dataset
from tfa_ray.training import fit

IMAGE_AUROC_MIN = 0.75
PIXEL_AUROC_MIN = 0.85


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("detect"))
    make_dataset(
        root, categories=("object",), n_train=40, n_test_good=12, n_test_defect=20, size=64, seed=5
    )
    data = discover(root, "object")
    result = fit(data, get_preset("test-tiny", train__epochs=25), echo=lambda s: None)
    det, preset = result.detector.eval(), result.preset
    size = preset.model.image_size
    images = torch.stack([load_image(s.path, size) for s in data.test])
    with torch.no_grad():
        maps = det.detect(images, preset.anomaly)[0]
    from tfa_ray.anomaly import image_score

    scores = image_score(maps, preset.anomaly).numpy()
    labels = np.array([s.label for s in data.test])
    masks = np.stack([load_mask(s, size).numpy() > 0.5 for s in data.test])
    return labels, scores, masks, maps.numpy()


def test_a_trained_model_separates_defective_from_normal_images(detection):
    labels, scores, _, _ = detection
    assert image_auroc(labels, scores) >= IMAGE_AUROC_MIN


def test_a_trained_model_localises_the_defects(detection):
    _, _, masks, maps = detection
    assert pixel_auroc(masks, maps) >= PIXEL_AUROC_MIN
    # and a flipped map sign is caught by the same bar
    assert pixel_auroc(masks, -maps) < PIXEL_AUROC_MIN


def selected_mix(root: str, category: str) -> tuple[float, float, float]:
    """The (reconstruction, statistics, kNN) shares the selection chose for one category."""
    from tfa_ray.selection import mix_of

    preset = get_preset(
        "test-tiny",
        train__epochs=2,
        model__gaussian_size=8,
        model__gaussian_channels=8,  # n >> p, as on real lines (PaDiM keeps a random subset)
        model__knn_memory=256,
        train__select_mix=True,
    )
    result = fit(discover(root, category), preset, echo=lambda s: None)
    return mix_of(result.preset.anomaly)


def test_selection_trusts_position_free_evidence_on_a_moving_object(tmp_path):
    """Defects at random places on an object whose pose varies: the per-position Gaussian's
    held-out normal maps are noise it never saw on its training images, so the selection
    weighs the position-free kNN memory above it; on an aligned texture, the reverse."""
    make_dataset(str(tmp_path / "moving"), ("object",), 60, 4, 4, size=64, seed=1, pose_jitter=0.15)
    make_dataset(str(tmp_path / "aligned"), ("texture",), 60, 4, 4, size=64, seed=1)
    _, stat, knn = selected_mix(str(tmp_path / "moving"), "object")
    assert knn > stat
    _, stat, knn = selected_mix(str(tmp_path / "aligned"), "texture")
    assert stat > knn
