"""The single-category training loop, the model package and the CLI, on tiny synthetic data."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tfa_ray import cli
from tfa_ray.choices import InferenceChoice
from tfa_ray.config import get_preset
from tfa_ray.data import BadImagesError, discover
from tfa_ray.evaluation import evaluate_model
from tfa_ray.package import load_model, save_model
from tfa_ray.selection import split_normals, split_train_val
from tfa_ray.synth import make_dataset
from tfa_ray.training import learning_rate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_dataset(
        str(root),
        categories=("texture",),
        n_train=24,
        n_test_good=6,
        n_test_defect=8,
        size=96,
        seed=3,
    )
    return str(root)


@pytest.fixture(scope="module")
def trained(synth_root):
    data = discover(synth_root, "texture")
    preset = get_preset(
        "test-tiny",
        train__epochs=3,
        anomaly__score="auto",
        train__try_test_mask_passes=(4,),
        train__try_test_mask_blocks=(4,),
        model__num_templates=2,
        model__gaussian_size=8,
        model__gaussian_channels=16,
        model__residual_gaussian=True,
        anomaly__w_reconstruction=0.5,
        train__try_statistics=("gaussian", "residual"),
        model__knn_memory=64,
        anomaly__w_knn=0.5,
        train__try_image_evidence=("statistics",),
    )
    from tfa_ray.training import fit

    epochs = []
    result = fit(data, preset, on_epoch_end=epochs.append, echo=lambda s: None)
    return data, preset, result, epochs


def test_split_is_seeded_disjoint_and_complete():
    paths = [f"img{i:03d}.png" for i in range(50)]
    train, val = split_train_val(paths, 0.1, seed=0)
    assert len(val) == 5 and not set(train) & set(val)
    assert sorted(train + val) == paths
    assert split_train_val(paths, 0.1, seed=0) == (train, val)
    assert split_train_val(paths, 0.1, seed=1) != (train, val)


def test_three_way_split_keeps_calibration_apart_from_selection():
    paths = [f"img{i:03d}.png" for i in range(60)]
    train, val, calib = split_normals(paths, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(calib)) == (48, 6, 6)
    assert sorted(train + val + calib) == paths
    assert not (set(train) & set(val) or set(train) & set(calib) or set(val) & set(calib))
    assert split_normals(paths, 0.1, 0.1, seed=0) == (train, val, calib)
    assert split_normals(paths, 0.1, 0.0, seed=0)[2] == []  # no calibration split
    with pytest.raises(ValueError, match="at least 3"):
        split_normals(paths[:2], 0.1, 0.1, seed=0)


def test_learning_rate_warms_up_and_anneals():
    assert learning_rate(1e-3, 0.0) < 1e-4
    assert learning_rate(1e-3, 0.05) == pytest.approx(1e-3)
    assert learning_rate(1e-3, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_fit_trains_selects_on_normal_images_and_calibrates(trained):
    data, preset, result, epochs = trained
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert 1 <= result.best_epoch <= 3
    best = result.history[result.best_epoch - 1]["selection"]
    assert best == max(e["selection"] for e in result.history)
    best_inference = result.selection_score
    assert result.preset.anomaly.score in ("std", "max", "topk")  # "auto" resolved
    assert result.preset.model.test_mask_passes in (0, 4)
    assert result.preset.model.test_mask_layout in ("lattice", "blocks")
    assert result.preset.anomaly.w_reconstruction in (0.0, 0.5, 1.0)
    assert result.preset.anomaly.statistics in ("gaussian", "residual")
    assert result.preset.anomaly.image_evidence in ("map", "statistics")
    # every (test passes, statistics, image evidence) was tried on the selection split, the
    # best kept
    tried = 3 * 2 * 2
    assert len(result.selection) == tried and max(result.selection.values()) == best_inference
    assert result.detector.cfg == result.preset.model
    assert result.num_val >= 1 and result.num_calib >= 1
    assert result.num_train + result.num_val + result.num_calib == len(data.train)
    cal = result.calibration.at("fp32")
    assert set(result.calibration) == {"fp32", "bf16", "fp16"}  # one entry per precision
    assert cal.num_images == result.num_calib and cal.threshold > 0
    assert cal.supported_fpr == pytest.approx(1 / (result.num_calib + 1))
    # The template is the first normal training image by sorted name (the paper's choice).
    assert result.template_path == sorted(data.train)[0]


def test_package_round_trip_gives_identical_scores(trained, tmp_path):
    data, preset, result, _ = trained
    url = str(tmp_path / "model")
    save_model(url, result.detector, result.preset, result.calibration, {"category": "texture"})
    model = load_model(url)
    images = torch.rand(2, 3, 64, 64)
    result.detector.eval()
    with torch.no_grad():
        expected, expected_scores = result.detector.detect(images, result.preset.anomaly)
    maps, scores = model.predict(images)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert torch.allclose(scores, expected_scores, atol=1e-5)
    assert torch.equal(model.detector.knn.bank, result.detector.knn.bank)
    # the residual Gaussian fitted in selection travels with the package, whichever was chosen
    residual = dataclasses.replace(result.preset.anomaly, statistics="residual", w_reconstruction=0)
    with torch.no_grad():
        expected = result.detector.detect(images, residual)[0]
        got = model.detector.detect(images, residual)[0]
    assert torch.allclose(got, expected, atol=1e-5) and expected.abs().sum() > 0
    assert model.calibrations == result.calibration
    assert model.meta["category"] == "texture"


def test_selection_returns_a_record_that_the_package_keeps(trained, tmp_path):
    """What the selection chose is a frozen record: it configures the preset and the detector,
    travels in the package (selection.json), and a package without one still loads."""
    _, preset, result, _ = trained
    choice = result.choice
    assert isinstance(choice, InferenceChoice)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.score = "max"
    assert choice.apply(preset) == result.preset  # the packaged preset is the record applied
    assert result.detector.cfg == result.preset.model
    assert choice.selection_score == result.selection_score == max(dict(choice.tried).values())
    assert abs(sum(choice.mix) - 1) < 1e-9 and choice.score == result.preset.anomaly.score
    url = str(tmp_path / "model")
    save_model(url, result.detector, result.preset, result.calibration, {}, choice)
    assert load_model(url).choice == choice
    (tmp_path / "model" / "selection.json").unlink()  # as written before the record existed
    old = load_model(url)
    assert old.choice is None and old.preset == result.preset


def test_load_model_refuses_an_incomplete_package(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(str(tmp_path))


def test_evaluation_on_the_test_split(trained, tmp_path):
    data, _, result, _ = trained
    from tfa_ray.package import TFAModel

    model = TFAModel(result.detector, result.preset, result.calibration)
    ev = evaluate_model(model, data, maps_dir=str(tmp_path / "maps"), num_maps=4)
    assert set(ev.metrics) >= {"image_auroc", "pixel_auroc", "aupro", "f1_max"}
    assert all(0.0 <= ev.metrics[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "aupro"))
    assert len(list((tmp_path / "maps").iterdir())) == 4
    assert len(ev.scores) == len(data.test) and np.isfinite(ev.scores).all()
    flagged = ev.scores >= model.calibration.threshold  # fp32 on the CPU
    assert ev.metrics["fpr_at_threshold"] == flagged[ev.labels == 0].mean()
    assert ev.metrics["recall_at_threshold"] == flagged[ev.labels == 1].mean()


def test_bad_training_image_stops_training_with_every_bad_file_listed(synth_root, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(f"{synth_root}/texture", root / "texture")
    good = root / "texture" / "train" / "good"
    (good / "zz_empty.png").write_bytes(b"")
    (good / "zz_text.png").write_text("not an image")
    data = discover(str(root), "texture")
    from tfa_ray.training import fit

    preset = get_preset("test-tiny", train__epochs=1)
    with pytest.raises(BadImagesError) as err:
        fit(data, preset, echo=lambda s: None)
    assert "zz_empty.png" in str(err.value) and "zz_text.png" in str(err.value)
    result = fit(data, preset, skip_bad=True, echo=lambda s: None)
    assert result.num_train + result.num_val + result.num_calib == len(data.train) - 2


def test_cli_synth_train_evaluate(tmp_path, capsys):
    root, model_dir = tmp_path / "data", tmp_path / "model"
    assert cli.main(["synth", "--output", str(root)]) == 0
    argv = [
        "train",
        "--data",
        str(root),
        "--category",
        "object",
        "--preset",
        "test-tiny",
        "--epochs",
        "1",
        "--output",
        str(model_dir),
    ]
    assert cli.main(argv) == 0
    out_json = tmp_path / "metrics.json"
    argv = ["evaluate", "--model", str(model_dir), "--data", str(root), "--json", str(out_json)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "aupro" in printed
    metrics = json.loads(out_json.read_text())
    assert set(metrics) >= {"image_auroc", "pixel_auroc", "aupro", "f1_max"}


def test_cli_reports_a_missing_category_as_one_clear_error(tmp_path, capsys):
    make_dataset(
        str(tmp_path), categories=("texture",), n_train=4, n_test_good=1, n_test_defect=1, size=32
    )
    argv = [
        "train",
        "--data",
        str(tmp_path),
        "--category",
        "nope",
        "--preset",
        "test-tiny",
        "--output",
        str(tmp_path / "m"),
    ]
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_evaluation_on_a_loco_layout_reports_auspro(trained, synth_root, tmp_path):
    """MVTec LOCO: masks are folders of per-defect PNGs whose grey value names the defect."""
    import shutil

    from PIL import Image

    from tfa_ray.package import TFAModel

    _, _, result, _ = trained
    src, cat = f"{synth_root}/texture", tmp_path / "loco" / "texture"
    shutil.copytree(f"{src}/train/good", cat / "train" / "good")
    shutil.copytree(f"{src}/test/good", cat / "validation" / "good")
    shutil.copytree(f"{src}/test/good", cat / "test" / "good")
    defects = sorted(p for p in Path(src, "test").iterdir() if p.name != "good")
    (cat / "test" / "structural_anomalies").mkdir(parents=True)
    n = 0
    for d in defects:
        for img in sorted(d.glob("*.png")):
            stem = f"{n:03d}"
            shutil.copy(img, cat / "test" / "structural_anomalies" / f"{stem}.png")
            mask = np.array(Image.open(f"{src}/ground_truth/{d.name}/{img.stem}_mask.png"))
            gt_dir = cat / "ground_truth" / "structural_anomalies" / stem
            gt_dir.mkdir(parents=True)
            Image.fromarray(np.where(mask > 0, 200, 0).astype(np.uint8)).save(gt_dir / "000.png")
            n += 1
    config = [
        {
            "defect_name": "spot",
            "pixel_value": 200,
            "saturation_threshold": 0.5,
            "relative_saturation": True,
        }
    ]
    (cat / "defects_config.json").write_text(json.dumps(config))

    data = discover(str(tmp_path / "loco"), "texture")
    assert data.layout == "loco" and data.defects_config == config
    model = TFAModel(result.detector, result.preset, result.calibration)
    metrics = evaluate_model(model, data).metrics
    assert 0.0 <= metrics["auspro"] <= 1.0
    assert 0.0 <= metrics["aupro"] <= 1.0
