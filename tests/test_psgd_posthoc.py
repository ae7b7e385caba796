"""Post-hoc evaluation of PSGD models: `evaluate --act-range bn:N`, the CIFAR models' eval transform, `weight-histograms`
and `psgd-compare` (studies/psgd_histograms.py, studies/psgd_comparison.py), on a tiny residual net and 16 px digits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_act_range import TinyResidualNet
from torch import nn
from train_helpers import private_registry, write_digits_dataset

from main import cli
from studies.psgd_histograms import histogram_figure

COMMON = ["--architecture", "tiny_res", "--no-pretrained", "--num-workers", "0", "--no-progress-bar", "--seed", "3",
          "--image-size", "16", "--batch-size", "8"]  # fmt: skip


def _tiny_res(pretrained: bool) -> TinyResidualNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return TinyResidualNet()


def _tiny_no_bn(pretrained: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    with private_registry({"tiny_res": _tiny_res, "tiny_no_bn": _tiny_no_bn}):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("digits"), per_class_train=6, per_class_val=2, image_size=16)


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output


def _assert_one_line_error(args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and message in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def _train(digits: Path, out: Path, *extra: str) -> Path:
    _invoke(["train-compressed", *COMMON, "--images-dir", str(digits), "--no-weight-quant", "--no-reestimate-bn-stats",
             "--max-epochs", "1", "--learning-rate", "0.05", "--learning-rate-schedule", "constant",
             "--save-checkpoint-dir", str(out), *extra])  # fmt: skip
    return out / "last.pt"


def test_cifar_models_evaluate_with_the_cifar_normalisation() -> None:
    from models import eval_transform

    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mean = np.array([129.3, 124.1, 112.4]) / 255
    std = np.array([68.2, 65.4, 70.4]) / 255
    expected = ((image / 255.0 - mean) / std).transpose(2, 0, 1)
    for name in ("resnet32_cifar", "vgg16_bn_cifar"):
        np.testing.assert_allclose(eval_transform(name)(Image.fromarray(image)).numpy(), expected, rtol=0, atol=1e-5)
    assert eval_transform("resnet32_cifar")(Image.fromarray(image).resize((64, 48))).shape == (3, 32, 32)


def test_crop_augmentation_shifts_the_validation_view_without_flips() -> None:
    """``FolderAugmentation.CROP`` (the digits set-up): a ``size`` crop of the image resized as for validation
    (``round(size * 256 / 224)``), at a random place, never mirrored; checked against every crop of the PIL resize."""
    from training.data import FolderAugmentation, train_transform
    from utils.images import IMAGENET_MEAN, IMAGENET_STD

    size, resized = 16, round(16 * 256 / 224)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(20, 20, 3), dtype=np.uint8))
    view = np.asarray(image.resize((resized, resized), Image.BILINEAR), dtype=np.float64) / 255.0
    view = ((view - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    crops = {(top, left): view[:, top:top + size, left:left + size]
             for top in range(resized - size + 1) for left in range(resized - size + 1)}  # fmt: skip
    transform, places = train_transform(size, FolderAugmentation.CROP), set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image).double().numpy()
        errors = {place: np.abs(out - crop).max() for place, crop in crops.items()}
        place = min(errors, key=errors.get)
        assert errors[place] < 1e-5 and all(np.abs(out[:, :, ::-1] - crop).max() > 0.5 for crop in crops.values())
        places.add(place)
    assert len(places) > 3


def test_evaluate_with_batch_norm_ranges(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    _invoke(["evaluate", *COMMON, "--images-dir", str(digits), "--no-weight-quant", "--act-quant", "--n-bits-act", "8",
             "--quant-setup", "all", "--act-range", "bn:6", "--no-reestimate-bn-stats", "--output-json", str(out)])
    layers = json.loads(out.read_text())["layers"]
    assert layers["conv0"]["act_bits"] is None  # the image: no batch norm before it
    assert {name: layer["act_bits"] for name, layer in layers.items() if name != "conv0"} == dict.fromkeys(
        ["conv1", "conv2", "conv3", "conv4", "down.0", "fc"], 8)
    assert json.loads(out.read_text())["options"]["quant"]["act_range"] == "bn:6"


def test_act_range_bad_inputs_are_one_line_errors(digits: Path, tmp_path: Path) -> None:
    base = ["evaluate", *COMMON, "--images-dir", str(digits), "--no-weight-quant", "--no-reestimate-bn-stats"]
    cases = [
        (base + ["--act-quant", "--act-range", "bn:"], 2, "is neither calibrate nor bn:N"),
        (base + ["--act-quant", "--act-range", "bn:-2"], 2, "is neither calibrate nor bn:N"),
        (base + ["--act-range", "bn:6"], 1, "--act-range bn:6 only acts with --act-quant"),
        (["evaluate", *COMMON, "--architecture", "tiny_no_bn", "--images-dir", str(digits), "--no-weight-quant",
          "--act-quant", "--act-range", "bn:6"], 1, "--act-range bn:6: Sequential has no batch norm"),
    ]  # fmt: skip
    for args, code, message in cases:
        _assert_one_line_error(args, code, message)


@pytest.mark.slow
def test_weight_histograms_mark_the_tracked_psgd_grid(digits: Path, tmp_path: Path) -> None:
    plain = _train(digits, tmp_path / "plain")
    psgd = _train(digits, tmp_path / "psgd", "--init-checkpoint", str(plain), "--psgd-target", "grid", "--psgd-bits", "2")
    checkpoint = torch.load(psgd, map_location="cpu", weights_only=True)
    plain_state = torch.load(plain, map_location="cpu", weights_only=True)["model"]
    fig, targets = histogram_figure(psgd, plain, ["conv0", "conv2", "fc"])
    for row, (name, bits) in enumerate([("conv0", 8), ("conv2", 2), ("fc", 8)]):  # first and last at 8 below 4 bits
        state = checkpoint["method"]["psgd"][f"{name}.weight"]
        level_max = 2 ** (bits - 1) - 1
        delta = max(abs(float(state["low"])), float(state["high"])) / level_max
        expected = delta * np.arange(-level_max, level_max + 1)
        np.testing.assert_allclose(targets[name]["psgd"], expected, rtol=1e-6)
        drawn = sorted(line.get_xdata()[0] for line in fig.axes[2 * row + 1].get_lines())
        np.testing.assert_allclose(drawn, expected, rtol=1e-6)
        plain_weight = plain_state[f"{name}.weight"].double()  # the plain panel: the same grid from its own range
        plain_delta = max(abs(min(float(plain_weight.min()), 0.0)), max(float(plain_weight.max()), 0.0)) / level_max
        np.testing.assert_allclose(targets[name]["plain"], plain_delta * np.arange(-level_max, level_max + 1), rtol=1e-6)
    output = _invoke(["weight-histograms", "--psgd-checkpoint", str(psgd), "--plain-checkpoint", str(plain),
                      "--layers", "conv1,fc", "--output-dir", str(tmp_path / "figs"), "--name", "hist"])  # fmt: skip
    assert "hist.png" in output
    assert (tmp_path / "figs" / "hist.png").stat().st_size > 0 and (tmp_path / "figs" / "hist.pdf").stat().st_size > 0
    _assert_one_line_error(["weight-histograms", "--psgd-checkpoint", str(psgd), "--plain-checkpoint", str(plain),
                            "--layers", "conv9", "--output-dir", str(tmp_path / "figs")], 1,
                           "not a layer PSGD scaled: conv9")  # fmt: skip
    _assert_one_line_error(["weight-histograms", "--psgd-checkpoint", str(plain), "--plain-checkpoint", str(plain),
                            "--output-dir", str(tmp_path / "figs")], 1, "was trained without --psgd-target")  # fmt: skip


def _sqnr(weight: np.ndarray, approximation: np.ndarray) -> float:
    return 10 * np.log10(np.mean(weight**2) / np.mean((weight - approximation) ** 2))


@pytest.mark.slow
def test_psgd_compare_reports_post_hoc_accuracy_and_weight_sqnr(digits: Path, tmp_path: Path) -> None:
    start = _train(digits, tmp_path / "start")
    out = tmp_path / "compare"
    _invoke(["psgd-compare", "--architecture", "tiny_res", "--float-checkpoint", str(start), "--output-dir", str(out),
             "--images-dir", str(digits), "--image-size", "16", "--bits", "2,4", "--epochs", "1", "--batch-size", "8",
             "--learning-rate", "0.01", "--no-progress-bar", "--seed", "3", "--augmentation", "crop"])  # fmt: skip
    assert json.loads((out / "comparison.json").read_text())["settings"]["augmentation"] == "crop"
    summary, layers = pd.read_csv(out / "comparison.csv"), pd.read_csv(out / "layers.csv")
    assert len(summary) == 12 and set(summary["arm"]) == {"psgd_grid", "plain_quant", "start_quant", "psgd_zero",
                                                         "plain_prune", "start_prune"}  # fmt: skip
    assert (out / "comparison.md").read_text().count("\n") == 14 and json.loads((out / "comparison.json").read_text())
    for bits in (2, 4):
        grid = torch.load(out / "runs" / f"grid{bits}" / "last.pt", weights_only=True)["model"]["conv2.weight"]
        w = grid.double().numpy().ravel()
        step = np.abs(w).max() / (2 ** (bits - 1) - 1)
        quantized = np.clip(np.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step
        row = layers[(layers.bits == bits) & (layers.arm == "psgd_grid") & (layers.layer == "conv2")]
        assert float(row.sqnr_db.iloc[0]) == pytest.approx(_sqnr(w, quantized), rel=1e-6)
        # the grid distance: mean |w - Q(w)| / step on the same grid (its extra level -2^(b-1) is never nearest)
        assert float(row.grid_distance.iloc[0]) == pytest.approx(np.mean(np.abs(w - quantized)) / step, rel=1e-9)
        arm = (layers.bits == bits) & (layers.arm == "psgd_grid")
        mean_distance = summary[(summary.bits == bits) & (summary.arm == "psgd_grid")].mean_grid_distance.iloc[0]
        assert mean_distance == pytest.approx(layers[arm].grid_distance.mean(), rel=1e-12)
        zero = torch.load(out / "runs" / "zero" / "last.pt", weights_only=True)["model"]["conv2.weight"]
        w = zero.double().numpy().ravel()
        pruned = w.copy()
        pruned[np.argsort(np.abs(w))[: round((1 - bits / 16) * w.size)]] = 0
        row = layers[(layers.bits == bits) & (layers.arm == "psgd_zero") & (layers.layer == "conv2")]
        assert float(row.sqnr_db.iloc[0]) == pytest.approx(_sqnr(w, pruned), rel=1e-6)
    # a distance for the quantized arms only, between 0 (on the grid) and 1/2
    quantized_arms = layers.arm.isin(["psgd_grid", "plain_quant", "start_quant"])
    assert layers[quantized_arms].grid_distance.between(0, 0.5).all()
    assert layers[~quantized_arms].grid_distance.isna().all()
    # the float start scored as the evaluate command scores it
    start_row = summary[(summary.bits == 4) & (summary.arm == "start_quant")].iloc[0]
    result = tmp_path / "eval.json"
    _invoke(["evaluate", *COMMON, "--images-dir", str(digits), "--init-checkpoint", str(start), "--n-bits", "4",
             "--weight-quant-method", "current_minmax", "--quant-setup", "all", "--no-reestimate-bn-stats",
             "--output-json", str(result)])  # fmt: skip
    assert start_row.posthoc_top1 == pytest.approx(json.loads(result.read_text())["top1"])
    # the grid runs also on their tracked grid (evaluate --weight-quant-method psgd_grid), the other arms not
    assert summary[summary.arm != "psgd_grid"].tracked_grid_top1.isna().all()
    grid_row = summary[(summary.bits == 4) & (summary.arm == "psgd_grid")].iloc[0]
    _invoke(["evaluate", *COMMON, "--images-dir", str(digits), "--init-checkpoint", str(out / "runs" / "grid4"),
             "--n-bits", "4", "--weight-quant-method", "psgd_grid", "--quant-setup", "all", "--no-reestimate-bn-stats",
             "--output-json", str(result)])  # fmt: skip
    assert grid_row.tracked_grid_top1 == pytest.approx(json.loads(result.read_text())["top1"])


@pytest.mark.slow
def test_evaluate_on_the_tracked_psgd_grid(digits: Path, tmp_path: Path) -> None:
    from models.quantized import compressed_layers
    from training.builders import build_compressed_model
    from training.config import TrainConfig

    plain = _train(digits, tmp_path / "plain")
    psgd = _train(digits, tmp_path / "psgd", "--init-checkpoint", str(plain), "--psgd-target", "grid", "--psgd-bits", "2")
    checkpoint = torch.load(psgd, map_location="cpu", weights_only=True)
    config = TrainConfig.from_options(architecture="tiny_res", pretrained=False, images_dir=str(digits), image_size=16,
                                      n_bits=2, weight_quant_method="psgd_grid", quant_setup="LSQ_paper", seed=3)
    model = build_compressed_model(config, num_classes=10, init_checkpoint=psgd)
    layers = compressed_layers(model)
    assert set(layers) == {"conv0", "conv1", "conv2", "conv3", "conv4", "down.0", "fc"}
    for name, layer in layers.items():
        bits = 8 if name in ("conv0", "fc") else 2  # the first and last layer at 8 bits below 4, as PSGD scaled them
        state = checkpoint["method"]["psgd"][f"{name}.weight"]
        level_max = 2 ** (bits - 1) - 1
        step = max(-float(state["low"]), float(state["high"])) / level_max
        weight = checkpoint["model"][f"{name}.weight"].double().numpy()
        expected = np.clip(np.round(weight / step), -level_max, level_max) * step
        evaluated = layer.effective_weight().detach().double().numpy()
        np.testing.assert_allclose(evaluated, expected, rtol=1e-6, atol=1e-9 * step)
        assert layer.weight_quantizer.n_bits == bits
        assert len(np.unique(np.round(evaluated / step))) <= 2 * level_max + 1
    out = tmp_path / "eval.json"
    base = ["evaluate", *COMMON, "--images-dir", str(digits), "--no-reestimate-bn-stats", "--weight-quant-method",
            "psgd_grid"]  # fmt: skip
    _invoke([*base, "--init-checkpoint", str(psgd), "--n-bits", "2", "--quant-setup", "LSQ_paper", "--output-json",
             str(out)])  # fmt: skip
    assert {name: layer["weight_bits"] for name, layer in json.loads(out.read_text())["layers"].items()} == {
        "conv0": 8, "conv1": 2, "conv2": 2, "conv3": 2, "conv4": 2, "down.0": 2, "fc": 8}  # fmt: skip
    cases = [
        (base + ["--n-bits", "2"], "psgd_grid needs --init-checkpoint of a --psgd-target grid run"),
        (base + ["--init-checkpoint", str(psgd), "--n-bits", "2", "--per-channel"], "is per tensor and symmetric"),
        (base + ["--init-checkpoint", str(plain), "--n-bits", "2"], "was not trained with --psgd-target grid"),
        (base + ["--init-checkpoint", str(psgd), "--n-bits", "3"], "was trained for the 2-bit grid, not --n-bits 3"),
        (base + ["--init-checkpoint", str(psgd), "--n-bits", "2", "--quant-setup", "all"],
         "conv0 has 2 weight bits, PSGD trained it for 8"),
        (["train-compressed", *COMMON, "--images-dir", str(digits), "--init-checkpoint", str(psgd), "--n-bits", "2",
          "--weight-quant-method", "psgd_grid", "--save-checkpoint-dir", str(tmp_path / "qat")],
         "psgd_grid is for evaluate (post hoc), not for training"),
    ]  # fmt: skip
    for args, message in cases:
        _assert_one_line_error(args, 1, message)
