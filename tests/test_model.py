"""TFA-Net (Algorithm 1): shapes, sizes, the template path and masking."""

import dataclasses

import pytest
import torch

from tfa_ray.config import get_preset
from tfa_ray.model import (
    Attention,
    Detector,
    TFANet,
    count_parameters,
    dual_masks,
    sincos_pos_embed_2d,
)


def tiny_net(**kw) -> TFANet:
    cfg = dataclasses.replace(get_preset("test-tiny").model, **kw)
    return TFANet(cfg, channels=12)


def test_paper_preset_has_the_papers_sizes():
    cfg = get_preset("paper").model
    assert (cfg.patch_size, cfg.tfam_depth, cfg.tfam_dim, cfg.tfam_heads) == (4, 12, 768, 12)
    assert (cfg.fdrm_depth, cfg.fdrm_dim, cfg.fdrm_heads) == (8, 512, 16)
    net = TFANet(cfg, channels=1856)
    # The reference configuration comes to about 149 M trainable parameters without backbone.
    assert 148e6 < count_parameters(net) < 150e6
    assert net.num_tokens == (64 // 4) ** 2


def test_reconstruction_has_the_input_feature_shape_with_and_without_masking():
    net = tiny_net()
    phi = torch.randn(3, 12, 16, 16)
    e_t = net.embed(torch.randn(1, 12, 16, 16))
    assert net(phi, e_t).shape == phi.shape
    assert net(phi, e_t, mask_ratio=0.75).shape == phi.shape


def test_unpatchify_inverts_the_patch_layout():
    net = tiny_net()
    K, g, C = 2, 8, 12
    x = torch.randn(2, C, g * K, g * K)
    tokens = x.reshape(2, C, g, K, g, K).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, K * K * C)
    assert torch.equal(net.unpatchify(tokens), x)


def test_random_masking_keeps_the_right_number_of_distinct_tokens():
    net = tiny_net()
    e = torch.arange(64.0)[None, :, None].expand(2, 64, 4)
    kept = net.random_masking(e, 0.75)
    assert kept.shape == (2, 16, 4)
    for b in range(2):
        assert len(set(kept[b, :, 0].tolist())) == 16


def test_masking_changes_the_output_and_zero_ratio_is_deterministic():
    torch.manual_seed(0)
    net = tiny_net().eval()
    phi = torch.randn(1, 12, 16, 16)
    e_t = net.embed(torch.randn(1, 12, 16, 16))
    with torch.no_grad():
        a, b = net(phi, e_t), net(phi, e_t)
        c = net(phi, e_t, mask_ratio=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _identity_tfam(net: TFANet) -> TFANet:
    """Zero every TFAM block's residual branches: each block is then the identity, so no token
    sees another, and what comes out of TFAM is exactly the half the net keeps."""
    for block in net.tfam:
        for layer in (block.attn.proj, block.mlp[2]):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return net


def test_the_template_half_is_kept_and_the_input_half_discarded():
    """With a TFAM that lets no token see another, the output is a function of the template
    tokens alone: keeping the input half instead would make it follow the input and ignore the
    template (this test fails for that bug)."""
    torch.manual_seed(0)
    net = _identity_tfam(tiny_net()).eval()
    e_t1 = net.embed(torch.randn(1, 12, 16, 16))
    e_t2 = net.embed(torch.randn(1, 12, 16, 16))
    phi1, phi2 = torch.randn(1, 12, 16, 16), torch.randn(1, 12, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net(phi1, e_t1), net(phi2, e_t1), atol=1e-6)  # input: no effect
        assert not torch.allclose(net(phi1, e_t1), net(phi1, e_t2), atol=1e-3)  # template: does


def test_tfam_lets_the_input_reach_the_template_half():
    """With a working TFAM the kept template tokens attend to the input tokens: a dead TFAM (or
    one whose attention ignores the input half) fails this."""
    torch.manual_seed(0)
    net = tiny_net().eval()
    e_t = net.embed(torch.randn(1, 12, 16, 16))
    with torch.no_grad():
        out1 = net(torch.randn(1, 12, 16, 16), e_t)
        out2 = net(torch.randn(1, 12, 16, 16), e_t)
    assert not torch.allclose(out1, out2)


def test_linear_attention_matches_its_definition():
    torch.manual_seed(0)
    attn = Attention(16, 2, "linear")
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = fq @ fk.transpose(-1, -2)  # (B, H, T, T), non-negative, no softmax
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    expected = attn.proj(expected.transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        Attention(16, 2, "cosine")


def test_dual_masks_are_complementary_halves_and_per_image_visible_tokens_work():
    halves = dual_masks(3, 64, torch.device("cpu"))
    assert halves.shape == (2, 3, 32)
    for b in range(3):
        assert sorted(torch.cat([halves[0, b], halves[1, b]]).tolist()) == list(range(64))
    net = tiny_net().eval()
    phi = torch.randn(3, 12, 16, 16)
    e_t = net.embed(torch.randn(1, 12, 16, 16))
    with torch.no_grad():
        per_image = net(phi, e_t, visible=halves[0])
        one = net(phi[1:2], e_t, visible=halves[0, 1])
    assert torch.allclose(per_image[1:2], one, atol=1e-5)


def test_each_input_is_paired_with_its_nearest_template():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("test-tiny").model, num_templates=3)
    det = Detector(cfg, torch.rand(3, 3, 64, 64)).eval()
    with torch.no_grad():
        phi = det.bank.phi + 0.01 * torch.randn_like(det.bank.phi)
        assert det.nearest_template(phi[[2, 0, 1]]).tolist() == [2, 0, 1]
        # in training an input that is a template is paired with another one, never itself
        # training features are cached in float16: a template still counts as itself
        paired = det.nearest_template(det.bank.phi.half().float(), exclude_self=True)
        assert (paired != torch.arange(3)).all()
        e = det.template_embeddings()
        assert torch.equal(det.paired_templates(phi[[1]]), e[[1]])


def test_positions_are_fixed_and_distinct():
    pos = sincos_pos_embed_2d(32, 8)
    assert pos.shape == (64, 32)
    assert torch.cdist(pos, pos).add(torch.eye(64)).min() > 1e-3
    with pytest.raises(AssertionError):
        sincos_pos_embed_2d(30, 8)


def test_detector_backbone_is_frozen_and_template_embedding_cached():
    preset = get_preset("test-tiny")
    det = Detector(preset.model, torch.rand(3, 64, 64))
    trainable = {n for n, p in det.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("net.") for n in trainable)
    det.train()
    assert not det.backbone.training
    det.eval()
    with torch.no_grad():
        e1 = det.template_embeddings()
        e2 = det.template_embeddings()
    assert e1 is e2  # computed once per model at inference
    phi, phi_hat = det(torch.rand(2, 3, 64, 64))
    assert phi.shape == phi_hat.shape == (2, det.backbone.out_channels, 16, 16)


def test_template_is_normalised_like_inputs():
    """The template's features equal the features of the same image passed as an input."""
    preset = get_preset("test-tiny")
    img = torch.rand(3, 64, 64)
    det = Detector(preset.model, img).eval()
    det.set_feature_stats(
        torch.randn(det.backbone.out_channels), torch.rand(det.backbone.out_channels) + 0.5
    )
    with torch.no_grad():
        assert torch.allclose(det.features(img[None]), det.bank.phi, atol=1e-5)


def test_complementary_masking_never_uses_a_positions_own_input_token():
    torch.manual_seed(0)
    net = tiny_net().eval()
    K = net.cfg.patch_size
    phi = torch.randn(1, 12, 16, 16)
    e_t = net.embed(torch.randn(1, 12, 16, 16))
    changed = phi.clone()
    changed[:, :, 2 * K : 3 * K, 5 * K : 6 * K] += 10.0  # token (2, 5) only
    with torch.no_grad():
        a = net.forward_complementary(phi, e_t, passes=4)
        b = net.forward_complementary(changed, e_t, passes=4)
        plain_a, plain_b = net(phi, e_t), net(changed, e_t)
    region = (slice(None), slice(None), slice(2 * K, 3 * K), slice(5 * K, 6 * K))
    assert torch.allclose(a[region], b[region], atol=1e-5)
    assert not torch.allclose(a, b)  # other positions do see it
    assert not torch.allclose(plain_a[region], plain_b[region])  # the paper's pass would
    groups = net.token_groups(4)
    assert sorted(groups.flatten().tolist()) == list(range(net.num_tokens))


def test_block_masking_never_uses_the_positions_own_block():
    """A large anomaly (a whole 4 x 4-token block changed) does not reach its own
    reconstruction with the blocks layout; with the lattice layout its own neighbours do."""
    torch.manual_seed(0)
    net = tiny_net().eval()  # 8 x 8 tokens; 4 passes = four 4 x 4-token blocks
    K = net.cfg.patch_size
    phi = torch.randn(1, 12, 16, 16)
    e_t = net.embed(torch.randn(1, 12, 16, 16))
    changed = phi.clone()
    changed[:, :, : 4 * K, : 4 * K] += 10.0  # the top-left block
    region = (slice(None), slice(None), slice(0, 4 * K), slice(0, 4 * K))
    with torch.no_grad():
        a = net.forward_complementary(phi, e_t, passes=4, layout="blocks")
        b = net.forward_complementary(changed, e_t, passes=4, layout="blocks")
        la = net.forward_complementary(phi, e_t, passes=4, layout="lattice")
        lb = net.forward_complementary(changed, e_t, passes=4, layout="lattice")
    assert torch.allclose(a[region], b[region], atol=1e-5)
    assert not torch.allclose(a, b)  # the other blocks do see it
    assert not torch.allclose(la[region], lb[region])
    blocks = net.token_groups(4, "blocks")
    assert blocks[0].tolist() == [r * 8 + c for r in range(4) for c in range(4)]
    with pytest.raises(ValueError, match="layout"):
        net.token_groups(4, "stripes")


def test_bf16_precision_on_cpu_is_engaged_and_close_to_fp32(tiny_model_dir):
    from tfa_ray.package import load_model

    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    x = torch.rand(4, 3, model.image_size, model.image_size)
    model.precision = "fp32"
    maps32, scores32 = model.predict(x)
    model.precision = "bf16"
    maps16, scores16 = model.predict(x)
    assert maps16.dtype == torch.float32  # maps are computed in fp32 from the bf16 features
    rel = ((maps16 - maps32).abs().mean() / maps32.abs().mean()).item()
    assert 0 < rel < 0.05, rel  # autocast really ran in bf16, and stayed close
    assert torch.allclose(scores16, scores32, rtol=0.05)
    model.precision = "fp16"
    with pytest.raises(ValueError, match="precision"):
        model.predict(x)


def test_gpu_preset_is_the_paper_network_plus_the_kept_changes():
    paper, gpu = get_preset("paper").model, get_preset("gpu").model
    same = ("image_size", "feature_size", "patch_size", "tfam_depth", "tfam_dim")
    same += ("tfam_heads", "fdrm_depth", "fdrm_dim", "fdrm_heads", "mask_ratio", "mask_mode")
    assert all(getattr(paper, f) == getattr(gpu, f) for f in same)
    # the same backbone and taps; only the per-image normalisation in front of it is added
    assert dataclasses.replace(gpu.backbone, per_image_norm=False) == paper.backbone
    assert gpu.backbone.per_image_norm and not paper.backbone.per_image_norm
    assert (paper.num_templates, paper.gaussian_size, paper.input_dropout) == (1, 0, 0.0)
    assert gpu.num_templates > 1 and gpu.gaussian_size > 0 and gpu.input_dropout > 0
