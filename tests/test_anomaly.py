"""Loss (Eq. 5-7), anomaly map (Eq. 8), image scores and calibration."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tfa_ray.anomaly import (
    anomaly_map,
    cosine_term,
    euclidean_term,
    gaussian_blur,
    image_score,
    reconstruction_loss,
)
from tfa_ray.calibration import Calibration, calibrate
from tfa_ray.config import AnomalyConfig


def test_loss_terms_match_the_equations():
    torch.manual_seed(0)
    phi, phi_hat = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    euc = torch.linalg.vector_norm(phi - phi_hat, dim=1)
    cos = 1 - (phi * phi_hat).sum(1) / (phi.norm(dim=1) * phi_hat.norm(dim=1))
    assert torch.allclose(euclidean_term(phi, phi_hat), euc, atol=1e-5)
    assert torch.allclose(cosine_term(phi, phi_hat), cos, atol=1e-5)
    loss, parts = reconstruction_loss(phi, phi_hat, AnomalyConfig(w_euc=1, w_cos=5))
    assert loss.item() == pytest.approx(euc.mean().item() + 5 * cos.mean().item(), rel=1e-5)
    assert parts["l_cos"] == pytest.approx(cos.mean().item(), rel=1e-5)


def test_perfect_reconstruction_has_zero_loss_and_map():
    phi = torch.randn(1, 8, 4, 4)
    loss, _ = reconstruction_loss(phi, phi.clone(), AnomalyConfig())
    assert loss.item() < 1e-4
    assert anomaly_map(phi, phi.clone(), 32, AnomalyConfig()).abs().max() < 1e-4


def test_gaussian_blur_matches_scipy_away_from_borders():
    x = torch.zeros(1, 64, 64)
    x[0, 32, 32] = 1.0
    ours = gaussian_blur(x, 4.0)[0].numpy()
    ref = gaussian_filter(x[0].numpy(), 4.0, mode="reflect", truncate=4.0)
    assert np.allclose(ours, ref, atol=1e-6)


def test_anomaly_map_is_euclidean_times_cosine_and_localises_the_change():
    phi = torch.randn(1, 16, 16, 16)
    phi_hat = phi.clone()
    phi_hat[:, :, 4:6, 10:12] = torch.randn(1, 16, 2, 2)
    cfg = AnomalyConfig(sigma=0.0)
    amap = anomaly_map(phi, phi_hat, 16, cfg)
    expected = euclidean_term(phi, phi_hat) * cosine_term(phi, phi_hat)
    assert torch.allclose(amap, expected, atol=1e-5)
    smooth = anomaly_map(phi, phi_hat, 64, AnomalyConfig(sigma=4.0))
    peak = np.unravel_index(int(smooth[0].argmax()), (64, 64))
    assert 14 <= peak[0] <= 26 and 38 <= peak[1] <= 50


def test_image_scores():
    maps = torch.zeros(2, 10, 10)
    maps[1, 0, :5] = 1.0
    assert torch.allclose(image_score(maps, AnomalyConfig(score="max")), torch.tensor([0.0, 1.0]))
    std = image_score(maps, AnomalyConfig(score="std"))
    assert std[0] == 0 and std[1] == pytest.approx(maps[1].flatten().std().item())
    top = image_score(maps, AnomalyConfig(score="topk", topk_fraction=0.1))
    assert top[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown image score"):
        image_score(maps, AnomalyConfig(score="median"))


def test_calibration_flags_at_most_the_target_fraction_of_normals():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=500)
    cal = calibrate(scores, rng.random((4, 8, 8)), target_fpr=0.01)
    flagged = (scores >= cal.threshold).mean()
    assert flagged <= 0.01 and flagged >= 0.008
    assert cal.score_mean == pytest.approx(scores.mean())
    assert cal.map_low < cal.map_high
    # Few images: the threshold sits just above the highest normal score.
    small = calibrate(np.array([0.1, 0.3, 0.2]), np.ones((1, 2, 2)), target_fpr=0.01)
    assert small.threshold > 0.3 and small.threshold == pytest.approx(0.3)
    assert Calibration.from_json(cal.to_json()) == cal
