"""End-to-end tests of quant_pruning_weights_sqnr.py on real and tiny models, offline."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from models import registry
from models.layers import weight_layers
from plot_weights_sqnr import main as plot_main
from quant_pruning_weights_sqnr import main

BITS = list(range(2, 9))
METRIC_KEYS = {
    "shape", "numel", "sample_kurtosis", "quant_sqnr", "quant_mse", "quant_sparsity", "quant_step_size",
    "pruning_sqnr", "pruning_mse", "pruning_sqnr_corrected", "pruning_mse_corrected",
}  # fmt: skip


def run(*args: str):
    return CliRunner().invoke(main, ["--no-progress", "--device", "cpu", *args])


def strict_json(path: Path) -> dict:
    """Parse standard JSON only: NaN/Infinity tokens raise."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def independent_metrics(weight: np.ndarray, n_bits: int, step_size: float) -> dict[str, float]:
    """The study's metrics recomputed in numpy from the reported step size."""
    w = weight.astype(np.float64).ravel()
    q = np.clip(np.round(w / step_size), -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1)
    quant_mse = np.mean((w - q * step_size) ** 2)
    quant_sparsity = np.mean(q == 0)

    def pruning_mse(keep_ratio: float) -> float:
        n_pruned = math.floor((1 - keep_ratio) * w.size + 0.5)
        return float(np.sum(np.sort(w**2)[:n_pruned]) / w.size)

    power = np.mean(w**2)
    return {
        "quant_sqnr": 10 * np.log10(power / quant_mse),
        "quant_sparsity": quant_sparsity,
        "pruning_sqnr": 10 * np.log10(power / pruning_mse(n_bits / 16)),
        "pruning_sqnr_corrected": 10 * np.log10(power / pruning_mse((1 - quant_sparsity) * n_bits / 16)),
    }


def best_dense_sqnr(weight: np.ndarray, n_bits: int, n_thresholds: int) -> float:
    """Best SQNR over a dense grid of clipping thresholds, each fully evaluated."""
    w = weight.astype(np.float64).ravel()
    q_max = 2 ** (n_bits - 1) - 1
    best_mse = np.inf
    for fractions in np.array_split(np.linspace(1 / n_thresholds, 1, n_thresholds), max(1, w.size * n_thresholds // 2**24)):
        steps = fractions[:, None] * np.abs(w).max() / q_max
        x_hat = np.clip(np.round(w / steps), -q_max - 1, q_max) * steps
        best_mse = min(best_mse, ((w - x_hat) ** 2).mean(axis=1).min())
    return float(10 * np.log10(np.mean(w**2) / best_mse))


@pytest.fixture(scope="module")
def lite0_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("lite0")
    result = run("--models", "efficientnet_lite0", "--output-dir", str(output_dir))
    assert result.exit_code == 0, result.output
    return output_dir


@pytest.mark.slow
def test_efficientnet_lite0_files_and_table(lite0_results: Path) -> None:
    weights = dict(registry.load_model("efficientnet_lite0").named_parameters())
    for n_bits in BITS:
        data = strict_json(lite0_results / f"efficientnet_lite0_{n_bits}_bits_mse.json")
        assert data["complete"] and data["n_bits"] == n_bits and data["sparsity"] == 1 - n_bits / 16
        assert len(data["layers"]) == 50
        for name, metrics in data["layers"].items():
            assert set(metrics) == METRIC_KEYS
            assert metrics["shape"] == list(weights[f"{name}.weight"].shape)
    table = pd.read_csv(lite0_results / "weights_sqnr_mse.csv")
    assert len(table) == 50 * len(BITS)
    assert table.groupby("n_bits").size().to_dict() == {b: 50 for b in BITS}


@pytest.mark.parametrize("layer", ["_conv_stem", "_blocks.3._depthwise_conv", "_blocks.9._project_conv", "_fc"])
@pytest.mark.slow
def test_efficientnet_lite0_numbers_match_independent_computation(lite0_results: Path, layer: str) -> None:
    weight = dict(registry.load_model("efficientnet_lite0").named_parameters())[f"{layer}.weight"].detach().numpy()
    for n_bits in (2, 4, 8):
        metrics = strict_json(lite0_results / f"efficientnet_lite0_{n_bits}_bits_mse.json")["layers"][layer]
        expected = independent_metrics(weight, n_bits, metrics["quant_step_size"])
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        assert metrics["quant_sqnr"] >= best_dense_sqnr(weight, n_bits, 1000 if weight.size < 10**5 else 100) - 0.01


@pytest.mark.slow
def test_never_below_the_papers_100_candidate_search(lite0_results: Path) -> None:
    """The coarse grid holds the paper's candidates T = i/100 max|w|: no tensor may come out worse."""
    weights = {name: module.weight.detach().numpy() for name, module in weight_layers(registry.load_model("efficientnet_lite0"))}
    for n_bits in BITS:
        layers = strict_json(lite0_results / f"efficientnet_lite0_{n_bits}_bits_mse.json")["layers"]
        for name, weight in weights.items():
            if weight.size <= 50_000:
                assert layers[name]["quant_sqnr"] >= best_dense_sqnr(weight, n_bits, 100) - 1e-9, (name, n_bits)


@pytest.mark.slow
def test_quantization_beats_pruning_on_real_weights_at_moderate_compression(lite0_results: Path) -> None:
    """The paper's finding (Fig. 3) on the bundled model: at 4+ bits quantization wins on most tensors."""
    table = pd.read_csv(lite0_results / "weights_sqnr_mse.csv")
    wins = (table.quant_sqnr > table.pruning_sqnr).groupby(table.n_bits).mean()
    assert (wins[wins.index >= 4] > 0.9).all(), wins.to_dict()


@pytest.mark.slow
def test_rerun_skips_complete_files_and_recomputes_truncated_ones(
    lite0_results: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for path in lite0_results.glob("*.json"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")}
    truncated = tmp_path / "efficientnet_lite0_4_bits_mse.json"
    original = strict_json(truncated)
    truncated.write_text(truncated.read_text()[:500])

    result = run("--models", "efficientnet_lite0", "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    after = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {truncated.name}
    assert strict_json(truncated) == original
    assert not list(tmp_path.glob(".*.tmp"))
    recomputed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recomputing")]
    assert recomputed == [f"recomputing {truncated}: truncated or corrupt (not a JSON object)"]


@pytest.mark.slow
def test_plot_script_on_real_results(lite0_results: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(plot_main, ["--input-dir", str(lite0_results), "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("weights_sqnr_scatter.png", "weights_sqnr_scatter.pdf", "weights_sqnr_summary.csv"):
        assert (tmp_path / name).stat().st_size > 0


class TinyNet(nn.Module):
    """Every layer type the study reads, with heavy-tailed weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 4, 3)
        self.conv2d = nn.Conv2d(4, 6, 3)
        self.conv3d = nn.Conv3d(2, 3, 1)
        self.deconv = nn.ConvTranspose2d(6, 5, 2)
        self.linear = nn.Linear(10, 7)
        self.bias_free = nn.Linear(7, 2, bias=False)


@pytest.fixture
def tiny_model(monkeypatch: pytest.MonkeyPatch) -> TinyNet:
    """Register ``tiny`` in a private copy of the registry; its 'pretrained' weights are Student-t."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def build(pretrained: bool) -> TinyNet:
        model = TinyNet()
        generator = torch.Generator().manual_seed(0)
        if pretrained:
            for parameter in model.parameters():
                noise = torch.distributions.StudentT(3.0).sample(parameter.shape)
                parameter.data = noise * torch.rand((), generator=generator)
        return model

    registry.register_model("tiny", task="classification")(build)
    return registry.load_model("tiny")


@pytest.mark.parametrize(("estimator", "per_channel"), [("mse", False), ("minmax", True), ("MSE", True)])
def test_tiny_model_every_layer_type(tiny_model: TinyNet, tmp_path: Path, estimator: str, per_channel: bool) -> None:
    args = ["--models", "tiny", "--bits", "3,5", "--range-estimator", estimator, "--output-dir", str(tmp_path)]
    result = run(*args, *(["--per-channel"] if per_channel else []))
    assert result.exit_code == 0, result.output
    suffix = f"{estimator.lower()}{'_per_channel' if per_channel else ''}"
    expected_layers = {"conv1d", "conv2d", "conv3d", "deconv", "linear", "bias_free"}
    for n_bits in (3, 5):
        data = strict_json(tmp_path / f"tiny_{n_bits}_bits_{suffix}.json")
        assert set(data["layers"]) == expected_layers
        for name, metrics in data["layers"].items():
            weight = getattr(tiny_model, name).weight.detach()
            steps = metrics["quant_step_size"]
            if per_channel:
                axis = 1 if name == "deconv" else 0
                assert len(steps) == weight.shape[axis]
                rows = weight.movedim(axis, 0).reshape(weight.shape[axis], -1)
                if estimator == "minmax":
                    np.testing.assert_allclose(steps, rows.abs().amax(1).double() / (2 ** (n_bits - 1) - 1))
            else:
                assert metrics["quant_sqnr"] == pytest.approx(
                    independent_metrics(weight.numpy(), n_bits, steps)["quant_sqnr"], rel=1e-9
                )


@pytest.mark.slow
def test_cached_torchvision_weights_are_studied_by_default(
    torch_home: Path, no_network: list[str], tmp_path: Path
) -> None:
    """The default model list takes every zoo model whose weights are in the local cache."""
    model = registry.load_model("squeezenet1_1", pretrained=False)
    cache = torch_home / "hub" / "checkpoints" / Path(registry.model_weights("squeezenet1_1").url).name
    cache.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cache)

    result = run("--bits", "4", "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    names = "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, squeezenet1_1"
    assert f"studied 4 model(s) at bits 4: {names}" in result.output
    data = strict_json(tmp_path / "out" / "squeezenet1_1_4_bits_mse.json")
    assert data["weights"] == "pretrained" and len(data["layers"]) == 26
    assert no_network == []


@pytest.mark.slow
def test_model_without_weights_is_skipped_with_one_line(
    torch_home: Path, no_network: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = run("--models", "efficientnet_lite0,resnet18", "--bits", "8", "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "skipped 1 model(s) without weights: resnet18" in result.output
    skip_lines = [r.getMessage() for r in caplog.records if "resnet18" in r.getMessage() and r.levelname == "WARNING"]
    assert len(skip_lines) == 1 and "\n" not in skip_lines[0]
    assert not (tmp_path / "resnet18_8_bits_mse.json").exists()

    only_missing = run("--models", "resnet18", "--output-dir", str(tmp_path / "none"))
    assert only_missing.exit_code == 1
    assert "no model could be studied" in only_missing.output


@pytest.mark.slow
def test_random_init_is_explicit(tmp_path: Path) -> None:
    result = run("--models", "efficientnet_lite0", "--bits", "8", "--random-init", "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert strict_json(tmp_path / "efficientnet_lite0_8_bits_mse.json")["weights"] == "random"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "not_a_model"], "unknown model 'not_a_model'"),
        (["--models", "resnet181"], "did you mean resnet18"),
        (["--models", "raft_large"], "'raft_large' is a torchvision optical-flow model outside the zoo"),
        (["--models", "quantized_resnet18"], "quantized (INT8 inference) model outside the zoo"),
        (["--bits", "8-2"], "the range '8-2' must be ascending: use 2-8"),
        (["--bits", "2,6-4"], "the range '6-4' must be ascending: use 4-6"),
        (["--bits", "1"], "1 is outside 2..16"),
        (["--bits", "17"], "17 is outside 2..16"),
        (["--bits", "2,,4"], "not a comma-separated list"),
        (["--bits", "four"], "not a comma-separated list"),
        (["--range-estimator", "percentile"], "'percentile' is not one of"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    ],
)
def test_bad_input_is_a_click_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_unwritable_output_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run("--models", "efficientnet_lite0", "--output-dir", str(blocker / "sub"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write to output directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_output_dir(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        result = run("--models", "efficientnet_lite0", "--output-dir", str(tmp_path / "out"))
    finally:
        tmp_path.chmod(0o700)
    assert result.exit_code == 1 and "cannot write to output directory" in result.output


@pytest.mark.slow
def test_table_gathers_every_result_of_the_setting(tiny_model: TinyNet, tmp_path: Path) -> None:
    """Models studied by separate runs into one directory all land in its table; other settings do not."""
    for args in (["--models", "tiny"], ["--models", "efficientnet_lite0"], ["--models", "tiny", "--per-channel"]):
        assert run(*args, "--bits", "3", "--output-dir", str(tmp_path)).exit_code == 0
    table = pd.read_csv(tmp_path / "weights_sqnr_mse.csv")
    assert table.groupby("model").size().to_dict() == {"efficientnet_lite0": 50, "tiny": 6}
    assert len(pd.read_csv(tmp_path / "weights_sqnr_mse_per_channel.csv")) == 6


class Killed(RuntimeError):
    """Stands for the process being killed."""


@pytest.mark.slow
def test_each_bit_width_is_written_as_it_completes_and_a_rerun_resumes(
    tiny_model: TinyNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed during bit-width 5 leaves bits 3 and 4 on disk; the rerun computes only 5 and 6."""
    from studies import weight_sqnr

    original = weight_sqnr.group_metrics
    studied: list[int] = []

    def group_metrics(prepared, n_bits, *args, **kwargs):
        studied.append(n_bits)
        if n_bits == 5 and kill:
            raise Killed
        return original(prepared, n_bits, *args, **kwargs)

    monkeypatch.setattr(weight_sqnr, "group_metrics", group_metrics)
    kill = True
    killed = run("--models", "tiny", "--bits", "3-6", "--output-dir", str(tmp_path))
    assert isinstance(killed.exception, Killed)
    assert sorted(path.name for path in tmp_path.glob("*.json")) == ["tiny_3_bits_mse.json", "tiny_4_bits_mse.json"]
    assert not list(tmp_path.glob(".*.tmp"))
    before = {path.name: path.read_bytes() for path in tmp_path.glob("*.json")}

    kill, studied = False, []
    result = run("--models", "tiny", "--bits", "3-6", "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert set(studied) == {5, 6}  # the completed bit-widths are not recomputed
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert len(pd.read_csv(tmp_path / "weights_sqnr_mse.csv")) == 4 * 6  # 4 bit-widths x 6 layers

    # The same numbers as one uninterrupted run.
    fresh = tmp_path / "fresh"
    assert run("--models", "tiny", "--bits", "3-6", "--output-dir", str(fresh)).exit_code == 0
    for n_bits in range(3, 7):
        name = f"tiny_{n_bits}_bits_mse.json"
        assert strict_json(tmp_path / name) == strict_json(fresh / name)
