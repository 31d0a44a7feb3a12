"""The frozen backbone: real offline ImageNet weights, taps, freezing, weights files."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tfa_ray.backbones import (
    FEATURE_API,
    SEQUENTIAL_FALLBACK,
    FeatureExtractor,
    lite0_key_map,
    load_pretrained_weights,
)
from tfa_ray.config import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig, get_preset

EGYPTIAN_CAT = 285
PAPER_TAPS = ("maxpool", "layer1", "layer2", "layer3")


def _chelsea(size: int) -> torch.Tensor:
    """skimage's cat photo as a (1, 3, size, size) float RGB batch in [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1)
    img = img[None].float() / 255.0
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def _imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _cat_probability(weights: str) -> tuple[int, float]:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_pretrained_weights(model, BackboneConfig(weights=weights))
    with torch.no_grad():
        probs = model(_imagenet_normalise(_chelsea(224))).softmax(dim=-1)[0]
    return int(probs.argmax()), float(probs[EGYPTIAN_CAT])


# --- builtin EfficientNet-Lite0 ----------------------------------------------------------------


def test_builtin_weights_are_imagenet_pretrained() -> None:
    top1, p_cat = _cat_probability("builtin")
    assert top1 == EGYPTIAN_CAT
    assert p_cat > 0.5  # measured 0.80 with ImageNet mean/std

    torch.manual_seed(0)
    top1_random, p_cat_random = _cat_probability("random")
    assert top1_random != EGYPTIAN_CAT
    assert p_cat_random < 0.05


def test_lite0_key_map_is_one_to_one_and_explicit() -> None:
    src = [
        "_conv_stem.weight",
        "_blocks.0._depthwise_conv.weight",
        "_blocks.0._project_conv.weight",
        "_blocks.1._expand_conv.weight",
        "_blocks.1._bn2.running_var",
        "_blocks.2._bn0.bias",
        "_blocks.2._expand_conv.weight",
        "_fc.bias",
    ]
    mapping = lite0_key_map(src, stage_depths=[1, 2])
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.1._bn2.running_var"] == "blocks.1.0.bn3.running_var"
    assert mapping["_blocks.2._bn0.bias"] == "blocks.1.1.bn1.bias"
    assert mapping["_fc.bias"] == "classifier.bias"
    with pytest.raises(ValueError, match="unknown"):
        lite0_key_map(["_blocks.0._mystery.weight"], stage_depths=[1])


def test_builtin_only_fits_lite0() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        load_pretrained_weights(model, BackboneConfig(name="resnet18", weights="builtin"))


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor(BackboneConfig(), feature_size=64)


def test_lite0_features_shape_and_channels(lite0: FeatureExtractor) -> None:
    assert lite0.tap_channels == (24, 40, 112)
    assert lite0.out_channels == 176
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    out = lite0(x)
    assert out.shape == (2, 176, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_lite0_taps_match_the_classifier_network(lite0: FeatureExtractor) -> None:
    """The first 24 channels are blocks.1 of the same normalised image at stride 4 (no resize)."""
    x = _chelsea(256)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_pretrained_weights(ref, BackboneConfig())
    seen: list[torch.Tensor] = []
    ref.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        ref.forward_features(_imagenet_normalise(x))
    torch.testing.assert_close(lite0(x)[:, :24], seen[0], rtol=1e-4, atol=1e-4)


def test_backbone_is_frozen_and_stays_in_eval(lite0: FeatureExtractor) -> None:
    assert not any(p.requires_grad for p in lite0.parameters())

    parent = nn.ModuleDict({"backbone": lite0, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not lite0.training
    assert not any(m.training for m in lite0.modules())

    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.enable_grad():
        a = lite0(x)
        b = lite0(x)
    assert a.grad_fn is None and not a.requires_grad
    assert torch.equal(a, b)
    assert a.shape == (1, 176, 64, 64)


def test_unknown_tap_is_a_clear_error() -> None:
    cfg = BackboneConfig(taps=("blocks.1", "block.9"), weights="random")
    with pytest.raises(ValueError, match=r"unknown tap 'block\.9'.*blocks") as info:
        FeatureExtractor(cfg, feature_size=16)
    assert "tf_efficientnet_lite0" in str(info.value)


# --- weights files: the paper backbone ---------------------------------------------------------


@pytest.fixture(scope="module")
def wrn50_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(1234)
    state = timm.create_model("wide_resnet50_2", pretrained=False).state_dict()
    root = tmp_path_factory.mktemp("weights")
    files = {"safetensors": root / "wrn50.safetensors", "pt": root / "wrn50.pt"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    torch.save({"state_dict": state, "epoch": 3}, files["pt"])  # nested, like a checkpoint
    return files


def _paper_cfg(weights: str) -> BackboneConfig:
    return BackboneConfig(name="wide_resnet50_2", taps=PAPER_TAPS, weights=weights)


def _assert_weights_equal(fe: FeatureExtractor, path: Path) -> None:
    saved = load_file(str(path))
    ours = fe.model.state_dict()
    assert ours.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(ours[name], value), name


def test_wrn50_from_safetensors_file(wrn50_files: dict[str, Path]) -> None:
    fe = FeatureExtractor(_paper_cfg(str(wrn50_files["safetensors"])), feature_size=64)
    _assert_weights_equal(fe, wrn50_files["safetensors"])
    assert fe.tap_channels == (64, 256, 512, 1024)
    assert fe.out_channels == 1856

    layer4_calls: list[int] = []
    fe.model.layer4.register_forward_hook(lambda m, i, o: layer4_calls.append(1))
    out = fe(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)))
    assert out.shape == (1, 1856, 64, 64)
    assert layer4_calls == []  # stopped after layer3: layer4 is never computed


def test_wrn50_from_torch_save_checkpoint(wrn50_files: dict[str, Path]) -> None:
    fe = FeatureExtractor(_paper_cfg(str(wrn50_files["pt"])), feature_size=64)
    _assert_weights_equal(fe, wrn50_files["safetensors"])
    assert fe.out_channels == 1856


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere-wrn50.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere-wrn50.safetensors"):
        FeatureExtractor(_paper_cfg(str(missing)), feature_size=64)


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="resnet18.pt") as info:
        FeatureExtractor(_paper_cfg(str(path)), feature_size=64)
    assert "mismatch" in str(info.value)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        FeatureExtractor(_paper_cfg(str(path)), feature_size=64)


def test_wrn50_from_s3(
    wrn50_files: dict[str, Path], s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3 = pytest.importorskip("boto3")
    from tfa_ray import storage

    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(var, value)
    storage.clear_cache()
    bucket = "backbone-weights"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(wrn50_files["safetensors"]), bucket, "models/wrn50.safetensors")
    try:
        fe = FeatureExtractor(_paper_cfg(f"s3://{bucket}/models/wrn50.safetensors"), 64)
        _assert_weights_equal(fe, wrn50_files["safetensors"])
        with pytest.raises(FileNotFoundError, match="s3://backbone-weights/models/nope.pt"):
            FeatureExtractor(_paper_cfg(f"s3://{bucket}/models/nope.pt"), 64)
    finally:
        storage.clear_cache()


def test_antialiased_taps_average_what_a_plain_resize_samples() -> None:
    """At a 3x shrink (stride-4 tap of a 384-pixel input to 32 x 32), the antialiased resize is
    close to the 3 x 3 area mean of the tap; the plain bilinear one picks single positions."""
    x = _chelsea(384)
    tap = FeatureExtractor(BackboneConfig(taps=("blocks.1",)), feature_size=96)(x)
    area = F.avg_pool2d(tap, 3)
    plain = FeatureExtractor(BackboneConfig(taps=("blocks.1",)), feature_size=32)(x)
    smooth = FeatureExtractor(BackboneConfig(taps=("blocks.1",), antialias=True), 32)(x)
    assert plain.shape == smooth.shape == area.shape == (1, 24, 32, 32)
    err_plain = (plain - area).abs().mean().item()
    err_smooth = (smooth - area).abs().mean().item()
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)
    # an input already at the feature size is passed through untouched either way
    same = FeatureExtractor(BackboneConfig(taps=("blocks.1",), antialias=True), 96)(x)
    torch.testing.assert_close(same, tap)


def test_per_image_norm_removes_exposure_and_gain_only() -> None:
    """The same scene shot darker and flatter (x -> 0.5 x + 0.1) gives the same features with
    ``per_image_norm`` and different ones without; a local change still shows."""
    x = _chelsea(128)
    dim = 0.5 * x + 0.1
    cfg = BackboneConfig(taps=("blocks.1", "blocks.2"))
    plain = FeatureExtractor(cfg, 16)
    normed = FeatureExtractor(dataclasses.replace(cfg, per_image_norm=True), 16)
    scale = normed(x).abs().mean().item()
    assert (normed(dim) - normed(x)).abs().mean().item() < 1e-3 * scale
    assert (plain(dim) - plain(x)).abs().mean().item() > 0.1 * plain(x).abs().mean().item()
    patched = x.clone()
    patched[..., 32:64, 32:64] = 1 - patched[..., 32:64, 32:64]
    diff = (normed(patched) - normed(x)).abs().mean(dim=1)[0]  # (16, 16)
    assert diff[4:8, 4:8].mean() > 5 * diff[12:, 12:].mean()


# --- the paper's hub weights -------------------------------------------------------------------


def test_paper_hub_weights_are_torchvision_imagenet(monkeypatch) -> None:
    """weights="hub" asks timm for wide_resnet50_2.tv_in1k (torchvision's ImageNet weights, as
    the paper, PaDiM and PatchCore), not timm's default racm_in1k; no network: the download is
    replaced by a record of what it was asked for."""
    asked: list[dict] = []
    monkeypatch.setattr(timm.models, "load_pretrained", lambda m: asked.append(m.pretrained_cfg))
    cfg = get_preset("paper").model.backbone
    assert cfg.name == "wide_resnet50_2.tv_in1k" and cfg.weights == "hub"
    gpu = get_preset("gpu").model.backbone
    assert (gpu.name, gpu.weights) == (cfg.name, cfg.weights)
    FeatureExtractor(cfg, feature_size=8)
    assert [c["tag"] for c in asked] == ["tv_in1k"]
    assert asked[0]["url"].endswith("/wide_resnet50_2-95faca4d.pth")  # torchvision's file
    assert asked[0]["mean"] == IMAGENET_MEAN and asked[0]["std"] == IMAGENET_STD


# --- taps through timm's feature API ---------------------------------------------------------


def _hook_taps(model: nn.Module, taps: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The taps as forward hooks on a full forward pass read them (the previous extractor)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[t].register_forward_hook(lambda m, i, o, t=t: seen.setdefault(t, o)) for t in taps
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [seen[t] for t in taps]


@functools.cache
def _wrn50_random(taps=PAPER_TAPS) -> FeatureExtractor:
    """A randomly initialised WRN50-2 (built once per taps: ~70M parameters to initialise)."""
    torch.manual_seed(7)
    return FeatureExtractor(BackboneConfig(name="wide_resnet50_2", taps=taps, weights="random"), 16)


@pytest.mark.parametrize(
    "make, mode",
    [
        (lambda: FeatureExtractor(BackboneConfig(), 16), FEATURE_API),
        (lambda: FeatureExtractor(get_preset("cpu-small").model.backbone, 16), FEATURE_API),
        (lambda: _wrn50_random(("layer1", "layer2", "layer3")), FEATURE_API),
        (_wrn50_random, SEQUENTIAL_FALLBACK),  # "maxpool" is no feature-API stage
    ],
    ids=["lite0", "lite0-cpu-small", "wrn50-stages", "wrn50-paper"],
)
def test_taps_equal_the_hook_version(make, mode) -> None:
    fe = make()
    assert fe.tap_mode == mode
    x = _imagenet_normalise(_chelsea(96))
    got, want = fe._collect(x), _hook_taps(fe.model, fe.taps, x)
    for tap, a, b in zip(fe.taps, got, want, strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-6, tap


def test_taps_out_of_order_and_repeated() -> None:
    fe = FeatureExtractor(BackboneConfig(taps=("blocks.4", "blocks.1", "blocks.4")), 8)
    assert fe.tap_mode == FEATURE_API and fe.tap_channels == (112, 24, 112)
    x = _imagenet_normalise(_chelsea(64))
    for a, b in zip(fe._collect(x), _hook_taps(fe.model, fe.taps, x), strict=True):
        assert torch.equal(a, b)


def test_a_nested_tap_neither_path_reaches_is_a_clear_error() -> None:
    cfg = BackboneConfig(taps=("blocks.1.0.conv_dw",), weights="random")
    with pytest.raises(ValueError, match="feature API or a top-level module"):
        FeatureExtractor(cfg, 8)


@pytest.mark.parametrize("make", [lambda: FeatureExtractor(BackboneConfig(), 8), _wrn50_random])
def test_backbone_compiles_without_graph_breaks(make) -> None:
    """fullgraph=True: any graph break (an exception that stops the network, a hook) fails."""
    fe = make()
    x = _chelsea(64)
    compiled = torch.compile(fe, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fe(x), rtol=0, atol=1e-6)
