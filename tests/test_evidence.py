"""Statistical evidence (per-position Gaussian, coreset kNN), map normalisation, fusion, the
hard-mined loss and the large synthetic defects."""

import dataclasses

import numpy as np
import pytest
import torch

from tfa_ray import synth
from tfa_ray.anomaly import hard_mined_mean, reconstruction_loss
from tfa_ray.config import AnomalyConfig, get_preset
from tfa_ray.evidence import GaussianEvidence, KNNEvidence, MapNorm, greedy_coreset
from tfa_ray.model import Detector
from tfa_ray.training import token_weights


def test_gaussian_is_the_mahalanobis_distance_of_each_position():
    torch.manual_seed(0)
    C, S = 6, 4
    mix = torch.randn(C, C)
    normals = torch.randn(400, S * S, C) @ mix + torch.arange(S * S)[None, :, None] * 0.5
    phi = normals.permute(0, 2, 1).reshape(400, C, S, S)
    g = GaussianEvidence(C, S, shrinkage=0.0).fit([phi[:200], phi[200:]])
    x = torch.randn(2, C, S, S) * 3
    d = g(x)
    p = 5
    sample = normals[:, p].double()
    mean = sample.mean(0)
    cov = torch.cov(sample.T, correction=0)
    diff = x[:, :, p // S, p % S].double() - mean
    expected = torch.einsum("bc,cd,bd->b", diff, torch.linalg.inv(cov), diff).sqrt()
    assert torch.allclose(d[:, p // S, p % S].double(), expected, rtol=1e-3)
    # a deviation of ordinary Euclidean size, but along the direction normals never vary in,
    # scores far above normal ones (the Euclidean distance would not tell them apart)
    evals, evecs = torch.linalg.eigh(torch.cov(normals[:, 6].T))
    shifted = phi[:1].clone()
    shifted[0, :, 1, 2] = normals[:, 6].mean(0) + evecs[:, 0] * evals[-1].sqrt()
    assert g(shifted)[0, 1, 2] > 5 * g(phi[:50]).mean()


def test_gaussian_channel_subset_is_seeded_and_shrinkage_keeps_it_invertible():
    g1, g2 = GaussianEvidence(20, 2, channels=5), GaussianEvidence(20, 2, channels=5)
    assert torch.equal(g1.channel_index, g2.channel_index) and len(g1.channel_index) == 5
    few = torch.randn(3, 20, 2, 2)  # 3 samples cannot determine a 5 x 5 covariance
    g1.fit([few])
    assert torch.isfinite(g1(torch.randn(1, 20, 2, 2))).all()
    with pytest.raises(ValueError, match="two"):
        GaussianEvidence(20, 2).fit([torch.randn(1, 20, 2, 2)])


def test_knn_distance_is_zero_on_the_bank_and_grows_away_from_it():
    torch.manual_seed(0)
    phi = torch.randn(8, 4, 4, 4)
    knn = KNNEvidence(4, 4, memory=10_000, local=1).fit([phi])  # the bank keeps every patch
    assert knn(phi[:2]).abs().max() < 1e-3
    assert (knn(phi[:2] + 10.0) > 5.0).all()


def test_knn_memory_samples_batch_by_batch_and_keeps_its_size():
    torch.manual_seed(0)
    phi = torch.randn(50, 4, 4, 4)  # 800 patches
    patches = phi.flatten(2).transpose(1, 2).reshape(-1, 4)
    batches = (phi[i : i + 10] for i in range(0, 50, 10))
    knn = KNNEvidence(4, 4, memory=64, local=1).fit(batches, candidates=200, total=800)
    assert knn.bank.shape == (64, 4)
    assert (knn.bank[:, None] == patches[None]).all(dim=2).any(dim=1).all()  # real patches only
    assert len(torch.unique(knn.bank, dim=0)) == 64
    # fewer patches than the memory holds: all of them, repeated up to the buffer's size
    few = KNNEvidence(4, 2, memory=64, local=1).fit([torch.randn(2, 4, 2, 2)])
    assert few.bank.shape == (64, 4) and len(torch.unique(few.bank, dim=0)) == 8


def test_greedy_coreset_picks_the_farthest_points_first():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 5.0], [0.05, 0.05]])
    assert greedy_coreset(x, 3, start=0).tolist() == [0, 2, 3]


def test_map_norm_puts_normal_median_at_zero_and_its_quantile_at_one():
    normal = torch.arange(1000.0).reshape(10, 10, 10)
    norm = MapNorm(q=0.9).fit(normal)
    assert norm(torch.tensor([499.5, 899.1])).tolist() == pytest.approx([0.0, 1.0], abs=1e-3)


def test_fusion_weights_each_normalised_map():
    cfg = dataclasses.replace(get_preset("test-tiny").model, gaussian_size=4, gaussian_channels=8)
    det = Detector(cfg)
    det.reconstruction_norm.fit(torch.tensor([0.0, 1.0, 2.0]))  # median 1
    det.gaussian_norm.fit(torch.tensor([10.0, 20.0, 30.0]))  # median 20
    maps = {"reconstruction": torch.full((1, 2, 2), 3.0), "gaussian": torch.full((1, 2, 2), 20.0)}
    a = AnomalyConfig(w_reconstruction=0.5)
    rec = det.reconstruction_norm(maps["reconstruction"])
    assert torch.allclose(det.fuse(maps, a), 0.5 * rec)  # the Gaussian sits at its median
    only_gauss = det.fuse(maps, AnomalyConfig(w_reconstruction=0.0))
    assert torch.allclose(only_gauss, torch.zeros(1, 2, 2))
    plain = Detector(get_preset("test-tiny").model)  # no Gaussian: the paper's map, unscaled
    assert plain.fuse({"reconstruction": maps["reconstruction"]}, a) is maps["reconstruction"]


def test_knn_map_weighs_in_and_the_image_score_can_come_from_the_statistics_alone():
    cfg = dataclasses.replace(
        get_preset("test-tiny").model, gaussian_size=4, gaussian_channels=8, knn_memory=16
    )
    det = Detector(cfg)
    for norm, normal in zip(
        (det.reconstruction_norm, det.gaussian_norm, det.knn_norm),
        ([0.0, 1.0, 2.0], [10.0, 20.0, 30.0], [0.0, 4.0, 8.0]),
        strict=True,
    ):
        norm.fit(torch.tensor(normal))
    spike = torch.zeros(1, 4, 4)
    spike[0, 1, 2] = 5.0
    maps = {
        "reconstruction": spike + 1.0,  # a local peak
        "gaussian": torch.full((1, 4, 4), 25.0),  # high everywhere, flat
        "knn": spike * 2 + 4.0,
    }
    normed = {k: det.map_norms()[k](m) for k, m in maps.items()}
    thirds = AnomalyConfig(w_reconstruction=0.5, w_knn=0.5)
    assert det.fused_kinds(thirds) == ("reconstruction", "gaussian", "knn")
    fused, scores = det.decide(maps, thirds)
    assert torch.allclose(fused, sum(normed.values()) / 3)
    assert torch.allclose(scores, fused.flatten(1).std(dim=1))
    # the verdict from the Gaussian alone: flat, so no spread, though the map has a peak
    by_stats = dataclasses.replace(thirds, image_evidence="statistics")
    fused_s, scores_s = det.decide(maps, by_stats)
    assert torch.equal(fused_s, fused) and scores_s.abs().max() < 1e-6 < scores.min()
    by_max = dataclasses.replace(by_stats, score="max")
    assert torch.allclose(det.decide(maps, by_max)[1], normed["gaussian"].amax(dim=(1, 2)))
    # w_rec 1 with the image score from the statistics still reads the statistical map
    rec_only = dataclasses.replace(by_stats, w_reconstruction=1.0, w_knn=0.0)
    assert det.fused_kinds(rec_only) == ("reconstruction", "gaussian")


def test_residual_gaussian_ignores_what_the_reconstruction_explains():
    """Normal images vary in the amplitude of one pattern; a reconstruction that reproduces
    that pattern leaves only noise in the residual. An image at an unseen amplitude is normal
    to the residual Gaussian (not to the Gaussian of the features); a local bump the
    reconstruction does not reproduce is anomalous to both."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        get_preset("test-tiny").model, gaussian_size=4, gaussian_channels=8, residual_gaussian=True
    )
    det = Detector(cfg).eval()
    C, h = det.feature_mean.numel(), cfg.feature_size
    pattern = torch.randn(1, C, h, h)

    def images(amplitudes):
        a = torch.as_tensor(amplitudes, dtype=torch.float32).view(-1, 1, 1, 1)
        return a * pattern + 0.1 * torch.randn(len(a), C, h, h)

    def reconstruct(x):  # the pattern at the input's amplitude (a least-squares fit)
        a = (x * pattern).sum(dim=(1, 2, 3), keepdim=True) / pattern.pow(2).sum()
        return a * pattern

    det.reconstruct = reconstruct
    phi = images(torch.rand(64) + 0.5)
    det.gaussian.fit([phi])
    det.fit_residual_gaussian(phi, batch_size=16)

    strong = images([6.0])  # the normal pattern, 6x stronger than ever seen
    bump = images([1.0])
    bump[:, :, :4, :4] += 3.0  # one region off, not reproduced
    a = AnomalyConfig()
    normal_ev, strong_ev, bump_ev = (det.evidence(x, a) for x in (phi[:16], strong, bump))
    top = {k: float(m.max()) for k, m in normal_ev.items()}
    assert float(strong_ev["gaussian"].max()) > 3 * top["gaussian"]
    assert float(strong_ev["residual"].max()) < 1.5 * top["residual"]
    assert float(bump_ev["residual"].max()) > 3 * top["residual"]
    with pytest.raises(ValueError, match="no 'residual'"):
        plain = Detector(dataclasses.replace(cfg, residual_gaussian=False))
        plain.fuse(bump_ev, AnomalyConfig(w_reconstruction=0.0, statistics="residual"))


def test_hard_mining_scales_the_easiest_points_down():
    term = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    assert hard_mined_mean(term, 0.0) == term.mean()
    # the 3 easiest count 0.1: (0.1 * 6 + 14) / (0.3 + 2)
    assert hard_mined_mean(term, 0.6) == pytest.approx((0.1 * 6 + 14) / 2.3)
    phi = torch.randn(2, 4, 3, 3)
    weight = torch.zeros(2, 3, 3)
    weight[:, 0, 0] = 1
    bad = phi.clone()
    bad[:, :, 1:, 1:] = 0  # wrong only where the weight is 0
    loss, _ = reconstruction_loss(phi, bad, AnomalyConfig(), weight)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_token_weights_mark_the_hidden_tokens():
    visible = torch.tensor([[0, 3]])
    w = token_weights(visible, grid=2, patch=2)
    assert w.shape == (1, 4, 4)
    assert w[0, :2, :2].eq(0).all() and w[0, 2:, 2:].eq(0).all()
    assert w[0, :2, 2:].eq(1).all() and w[0, 2:, :2].eq(1).all()


@pytest.mark.parametrize("kind", synth.LARGE_KINDS)
def test_large_synthetic_defects_cover_a_tenth_to_a_half_of_the_image(kind):
    rng = np.random.default_rng(0)
    img = synth.make_image("texture", 128, rng)
    areas = []
    for seed in range(6):
        out, mask = synth.paint_defect(img, np.random.default_rng(seed), kind)
        assert (out != img).any(axis=2)[mask].all()  # every masked pixel changed
        assert not (out != img).any(axis=2)[~mask].any()  # nothing outside the mask
        areas.append(mask.mean())
    assert 0.05 < min(areas) and max(areas) < 0.5


def test_template_bank_starts_with_the_papers_template_and_fills_up_when_images_are_few():
    from tfa_ray.training import pick_templates

    paths = ["a.png", "b.png", "c.png"]
    phi = torch.tensor([0.0, 10.0, 0.1]).view(3, 1, 1, 1).expand(3, 2, 2, 2).clone()
    assert pick_templates("c.png", paths, phi, 1) == ["c.png"]
    assert pick_templates("a.png", paths, phi, 2) == ["a.png", "b.png"]  # the farthest next
    bank = pick_templates("a.png", paths, phi, 5)
    assert len(bank) == 5 and bank[0] == "a.png" and set(bank) == set(paths)


def test_an_evidence_mix_is_exactly_the_fused_map_it_names():
    """with_mix writes shares (rec, stat, knn) into the fusion weights; fuse gives back the
    weighted mean of the normalised maps with exactly those shares (kNN-only included)."""
    from tfa_ray.selection import mix_of, with_mix

    cfg = dataclasses.replace(
        get_preset("test-tiny").model, gaussian_size=4, gaussian_channels=8, knn_memory=16
    )
    det = Detector(cfg)
    g = torch.Generator().manual_seed(0)
    maps = {k: torch.rand(2, 4, 4, generator=g) for k in ("reconstruction", "gaussian", "knn")}
    for mix in [(0.07, 0.0, 0.93), (0.2, 0.6, 0.2), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]:
        fusion = with_mix(AnomalyConfig(), mix)
        assert mix_of(fusion) == pytest.approx(mix, abs=1e-3)
        expected = sum(w * maps[k] for w, k in zip(mix, maps, strict=True))
        assert torch.allclose(det.fuse(maps, fusion), expected, atol=2e-3)
