"""The GPU code paths on a simulated CUDA device (tests/simcuda.py): first the simulator
itself (it refuses what a GPU refuses and lets through what a GPU lets through), then what
ships, at test sizes: fitting the cpu-small and gpu preset shapes, the package, evaluation and
the scorer's batch path, all with ``torch.cuda.is_available()`` true and the model on "cuda"."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shards import shard_row
from simcuda import SimCudaTensor

from tfa_ray.config import get_preset
from tfa_ray.synth import make_dataset

# --------------------------------------------------------------------------------------
# the simulator


def test_simulated_tensors_report_cuda_and_keep_their_data(sim_cuda):
    assert torch.cuda.is_available()
    x = torch.arange(6.0).reshape(2, 3).cuda()
    assert isinstance(x, SimCudaTensor) and x.is_cuda and x.device == torch.device("cuda", 0)
    for y in (
        torch.zeros(3, device="cuda"),
        torch.ones(2).to("cuda"),
        torch.ones(2).to(device=torch.device("cuda")),
        torch.ones(2).to(x),
        x * 2 + torch.tensor(1.0),  # a 0-dim CPU tensor may meet a CUDA one
        x.float().half(),
        x[torch.tensor([1])],  # CUDA tensors take CPU indices
        x[:, torch.tensor([0, 2])],
        x[x > 2],
    ):
        assert y.is_cuda, y
    back = x.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu"
    assert type(x.to("cpu")) is torch.Tensor
    np.testing.assert_array_equal(back.numpy(), np.arange(6.0).reshape(2, 3))
    back[0, 0] = 99.0  # a copy, as from a GPU
    assert float(x[0, 0]) == 0.0 and x.sum().item() == 15.0


def test_simulated_tensors_refuse_what_cuda_refuses(sim_cuda):
    x = torch.ones(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([x, torch.ones(2, 3)])
    with pytest.raises(RuntimeError, match="same device"):
        torch.quantile(x.flatten(), torch.tensor([0.5, 0.9]))  # q made on the CPU
    with pytest.raises(RuntimeError, match="same device"):
        torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * x
    with pytest.raises(RuntimeError, match="generator"):
        torch.randn(2, 3, device="cuda", generator=torch.Generator())
    with pytest.raises(RuntimeError, match="indices should be"):
        torch.ones(3, 4)[:, torch.tensor([0, 1]).cuda()]  # a CPU tensor, CUDA indices
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    with pytest.raises(TypeError, match="numpy"):
        np.asarray(x)


def test_modules_train_on_the_simulated_device(sim_cuda):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    net.to("cuda")
    assert all(p.is_cuda and isinstance(p, torch.nn.Parameter) for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    x, y = torch.randn(64, 4).cuda(), torch.randn(64, 1).cuda()
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (net(x).float() - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad.is_cuda for p in net.parameters())
    with pytest.raises(RuntimeError, match="same device"):
        net(torch.randn(2, 4))  # a CPU batch into a CUDA model
    net.cpu()
    assert all(type(p) is torch.nn.Parameter for p in net.parameters())
    assert net(torch.randn(2, 4)).device.type == "cpu"


def test_the_simulator_is_gone_after_the_fixture():
    assert not torch.cuda.is_available() or torch.cuda.device_count() > 0
    assert not isinstance(torch.ones(1), SimCudaTensor)


# --------------------------------------------------------------------------------------
# what ships, on the simulated device


def small(name: str):
    """The preset's shape (its evidence, templates, selection trials) at test sizes, on the
    tiny test backbone; cpu-small keeps its own backbone taps at 64 pixels."""
    preset = get_preset(name)
    tiny = get_preset("test-tiny").model
    backbone = preset.model.backbone if name == "cpu-small" else tiny.backbone
    model = dataclasses.replace(
        preset.model,
        backbone=dataclasses.replace(backbone, per_image_norm=True),
        image_size=64,
        feature_size=16,
        patch_size=2,
        tfam_depth=1,
        tfam_dim=32,
        tfam_heads=2,
        fdrm_depth=1,
        fdrm_dim=32,
        fdrm_heads=2,
        num_templates=2,
        gaussian_size=8,
        gaussian_channels=16,
        knn_memory=32,
    )
    train = dataclasses.replace(preset.train, epochs=2, time_budget_s=0.0, batch_size=4, patience=0)
    return dataclasses.replace(preset, model=model, train=train)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sim-data")
    make_dataset(
        str(root), categories=("texture",), n_train=14, n_test_good=2, n_test_defect=3, size=64
    )
    return str(root)


@pytest.mark.parametrize("name", ["cpu-small", "gpu"])
def test_presets_fit_save_load_and_evaluate_on_cuda(sim_cuda, synth, tmp_path, name):
    from tfa_ray.data import discover
    from tfa_ray.evaluation import evaluate_model
    from tfa_ray.package import load_model, save_model
    from tfa_ray.training import fit

    data = discover(synth, "texture")
    preset = small(name)
    lines: list[str] = []
    result = fit(data, preset, echo=lines.append)  # device: "auto", which is cuda here
    assert any("selection" in ln for ln in lines)
    det = result.detector
    assert all(not t.is_cuda for t in det.state_dict().values())  # results back on the CPU
    assert result.detector.gaussian is not None and result.detector.knn is not None
    assert result.detector.residual_gaussian is not None
    assert float(det.knn.bank.abs().sum()) > 0 and float(det.gaussian_norm.high) > 0
    for precision in ("fp32", "bf16", "fp16"):  # calibrated at each, on the device
        assert np.isfinite(result.calibration.at(precision).threshold), precision
    if name == "gpu":  # the test-time masking trials ran
        assert any("passes=4/lattice" in k for k in result.selection)

    out = str(tmp_path / "pkg")
    save_model(out, det, result.preset, result.calibration, {"category": "texture"})
    model = load_model(out, device="cuda")
    assert model.detector.template.is_cuda
    ev = evaluate_model(model, data)
    assert 0.0 <= ev.metrics["image_auroc"] <= 1.0 and len(ev.scores) == len(data.test)
    assert np.isfinite(ev.scores).all()


def test_scorer_batch_path_on_cuda(sim_cuda, tiny_model_dir, tmp_path, monkeypatch):
    """The actor's batch path on the device: CPU-decoded pixels and, with the decoder itself
    stubbed (nvjpeg needs a GPU), the device-decode path; the same scores as on the CPU."""
    from PIL import Image

    from tfa_ray import scoring
    from tfa_ray.scoring import stages
    from tfa_ray.synth import make_image

    d = tmp_path / "texture"
    d.mkdir()
    for i in range(3):
        img = Image.fromarray(make_image("texture", 64, np.random.default_rng(i)))
        img.save(d / f"{i}.jpg", quality=95)
    paths = sorted(str(p) for p in d.iterdir())
    models = {"texture": {"name": "tfa-texture", "version": 3, "image_size": 64}}
    shard = shard_row(tmp_path / "shards", "texture", paths)
    resolver = scoring.LocalResolver({"texture": tiny_model_dir})
    scores = {}
    for device in ("cpu", "cuda"):  # fp32 on both: the same numbers
        scorer = scoring.ShardScorer(resolver, batch_size=2, device=device, precision="fp32")
        out = scorer(scoring.decode_shard(shard, models, None, None, gpu_decode=False))
        items = json.loads(out["items"][0])
        assert [it["status"] for it in items] == ["ok"] * 3
        scores[device] = [it["score"] for it in items]
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-4, atol=1e-6)

    real = stages.decode_jpegs
    seen = []

    def decode_on_device(datas, size, device):  # the CPU decode, its tensors on the device
        seen.append(device)
        decoded = real(datas, size, "cpu")
        return [t.to(device) if isinstance(t, torch.Tensor) else t for t in decoded]

    monkeypatch.setattr(scoring.ShardScorer, "decode_jpegs", staticmethod(decode_on_device))
    scorer = scoring.ShardScorer(resolver, batch_size=2)  # cuda (available), bf16 (sm_90)
    assert scorer.device == "cuda"
    out = scorer(scoring.decode_shard(shard, models, None, None, gpu_decode=True))
    items = json.loads(out["items"][0])
    assert seen and [it["status"] for it in items] == ["ok"] * 3
    np.testing.assert_allclose([it["score"] for it in items], scores["cpu"], rtol=2e-2, atol=1e-4)
    assert Path(items[0]["path"]).name == "0.jpg"


def test_evaluate_cli_runs_on_the_gpu_when_present(sim_cuda, tiny_model_dir, synth, tmp_path):
    """``tfa-ray evaluate`` picks the GPU like training does (``--device auto``, the default)
    and keeps ``--device cpu``; the metrics are the same either way (fp32 vs bf16 aside)."""
    from tfa_ray import cli, evaluation, package

    devices = []
    real = package.load_model

    def spy(url, device="cpu"):
        model = real(url, device=device)
        devices.append(model.detector.template.device.type)
        return model

    metrics = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(package, "load_model", spy)
        for flag in ([], ["--device", "cpu"]):
            out = tmp_path / f"m{len(flag)}.json"
            argv = ["evaluate", "--model", tiny_model_dir, "--data", synth, "--json", str(out)]
            assert cli.main(argv + flag) == 0
            metrics[tuple(flag)] = json.loads(out.read_text())
    assert devices == ["cuda", "cpu"]
    a, b = metrics[()], metrics[("--device", "cpu")]
    assert a["image_auroc"] == pytest.approx(b["image_auroc"], abs=0.2)
    assert evaluation.pick_device("auto").type == "cuda"


def test_evaluate_device_without_a_gpu():
    from tfa_ray.evaluation import pick_device

    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")


def test_feature_cache_standardises_in_place_and_loads_batches(sim_cuda):
    """The host cache: standardised chunk by chunk in place (no fp32 copy of the set), and
    batches gathered through the pinned staging buffer onto the device."""
    from tfa_ray.features import CHUNK, BatchLoader, feature_statistics, standardize_

    g = torch.Generator().manual_seed(0)
    phi = (torch.randn(CHUNK * 2 + 5, 6, 4, 4, generator=g) * 3 + 1).half()
    mean, std = feature_statistics(phi)
    want = ((phi.float() - mean[:, None, None]) / std[:, None, None]).half()
    ptr = phi.data_ptr()
    out = standardize_(phi, mean, std)
    assert out.data_ptr() == ptr and torch.equal(out, want)
    m2, s2 = feature_statistics(out)
    assert m2.abs().max() < 1e-2 and (s2 - 1).abs().max() < 1e-2

    load = BatchLoader(out, torch.device("cuda"))
    for rows in (torch.tensor([3, 1, 130]), torch.tensor([7, 0])):
        x = load(rows)
        assert x.is_cuda and x.dtype == torch.float32
        assert torch.equal(x.cpu(), out[rows].float())
    assert load.staging is not None and load.staging.shape[0] == 3  # reused, not regrown
