"""The weight study against 1xN block pruning (--pruning-structure 1xN:<N>), checked against numpy."""
from __future__ import annotations

import fnmatch
import json
import math
from fractions import Fraction
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from studies.result_files import (
    PruningStructureType,
    other_settings_hint,
    parse_pruning_structure,
    result_file_name,
    result_glob,
    table_file_name,
)
from studies.weight_sqnr import check_result_file, result_config, study_model, study_tensor
from utils.io import write_json

BITS = list(range(2, 9))


def numpy_block_pruning_mse(weight: np.ndarray, block_size: int, sparsity: Fraction) -> float:
    """Enumerate the 1xN blocks (N output channels x 1 input channel x kernel), zero the floor(p B) lowest-L1 ones."""
    w = weight.astype(np.float64).reshape(weight.shape[0], weight.shape[1], -1)
    blocks = []  # (score, position, energy)
    for r, start in enumerate(range(0, w.shape[0], block_size)):
        for j in range(w.shape[1]):
            block = w[start : start + block_size, j, :]
            blocks.append((np.abs(block).sum(), r * w.shape[1] + j, (block**2).sum()))
    count = math.floor(sparsity * len(blocks))
    return sum(energy for _, _, energy in sorted(blocks)[:count]) / w.size


def numpy_kernel_pruning_mse(weight: np.ndarray, sparsity: Fraction) -> float:
    """Per-kernel pruning of a 1x1 conv: every kernel is one weight, floor(p n) smallest |w| zeroed."""
    w = weight.astype(np.float64).ravel()
    return float(np.sort(w**2)[: math.floor(sparsity * w.size)].sum() / w.size)


def sparsity_of(n_bits: int) -> Fraction:
    return 1 - Fraction(n_bits, 16)


@pytest.mark.slow
def test_block_pruning_mse_equals_enumerated_blocks():
    """10 output channels in blocks of 4 (the last block has 2): MSE, SQNR and corrected MSE match numpy."""
    torch.manual_seed(0)
    weight = torch.randn(10, 6, 3, 3) * torch.rand(10, 6, 1, 1)  # blocks of different norms
    results = study_tensor(weight, BITS, block_size=4)
    w = weight.numpy()
    power = np.mean(w.astype(np.float64) ** 2)
    for n_bits in BITS:
        metrics = results[n_bits]
        expected = numpy_block_pruning_mse(w, 4, sparsity_of(n_bits))
        assert metrics["pruning_mse"] == pytest.approx(expected, rel=1e-12)
        assert metrics["pruning_sqnr"] == pytest.approx(10 * math.log10(power / expected), rel=1e-12)
        corrected = 1 - (1 - Fraction(metrics["quant_sparsity"]).limit_denominator(w.size)) * Fraction(n_bits, 16)
        assert metrics["pruning_mse_corrected"] == pytest.approx(numpy_block_pruning_mse(w, 4, corrected), rel=1e-12)
    # the quantization side is the unstructured study's
    unstructured = study_tensor(weight, BITS)
    assert all(results[b]["quant_sqnr"] == unstructured[b]["quant_sqnr"] for b in BITS)
    assert any(results[b]["pruning_mse"] != unstructured[b]["pruning_mse"] for b in BITS)


@pytest.mark.slow
def test_n1_on_1x1_conv_is_kernel_pruning_and_matches_unstructured_at_whole_counts():
    """N = 1 on a 1x1 conv prunes single weights: floor(p n) of them; with 32 weights p n = 2 b is whole,
    so it equals the unstructured column too."""
    torch.manual_seed(1)
    odd = torch.randn(7, 5, 1, 1)  # 35 weights: p n not whole for most b
    results = study_tensor(odd, BITS, block_size=1)
    for n_bits in BITS:
        expected = numpy_kernel_pruning_mse(odd.numpy(), sparsity_of(n_bits))
        assert results[n_bits]["pruning_mse"] == pytest.approx(expected, rel=1e-12)
    even = torch.randn(8, 4, 1, 1)
    blocks, single = study_tensor(even, BITS, block_size=1), study_tensor(even, BITS)
    for n_bits in BITS:
        assert blocks[n_bits]["pruning_mse"] == pytest.approx(single[n_bits]["pruning_mse"], rel=1e-12)


def test_tensors_without_blocks_get_null_pruning_values():
    """Depthwise (1 output channel per group) and too few output channels: null pruning, quantization kept;
    a transposed conv is blocked along its output channels (axis 1)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 3, 1), nn.ConvTranspose2d(3, 8, 2), nn.Linear(4, 8))
    layers = study_model(model, [4], progress=False, structure="1xN:4")[4]
    for name in ("0", "1"):
        assert all(layers[name][key] is None for key in ("pruning_mse", "pruning_sqnr", "pruning_mse_corrected"))
        assert math.isfinite(layers[name]["quant_sqnr"])
    transposed = model[2].weight.detach().transpose(0, 1).numpy()
    assert layers["2"]["pruning_mse"] == pytest.approx(numpy_block_pruning_mse(transposed, 4, sparsity_of(4)), rel=1e-12)
    linear = model[3].weight.detach().numpy()
    assert layers["3"]["pruning_mse"] == pytest.approx(numpy_block_pruning_mse(linear, 4, sparsity_of(4)), rel=1e-12)
    assert study_tensor(torch.randn(16), [4], block_size=4)[4]["pruning_mse"] is None


@pytest.mark.parametrize(("text", "expected"), [("unstructured", "unstructured"), ("1xN:4", "1xN:4"), ("1xn:04", "1xN:4")])
def test_structure_parses(text, expected):
    assert parse_pruning_structure(text) == expected


@pytest.mark.parametrize("text", ["1xN:0", "1xN:x", "blocks", "1xN:", "1xN:-2"])
def test_bad_structure_is_one_clear_line(text):
    with pytest.raises(click.BadParameter) as error:
        PruningStructureType().convert(text, None, None)
    message = error.value.format_message()
    assert "\n" not in message and text in message and "1xN:<N>" in message


def test_file_names_keep_unstructured_names_and_old_files_stay_valid(tmp_path: Path):
    assert result_file_name("m", 4) == "m_4_bits_mse.json" == result_file_name("m", 4, "mse", False, "unstructured")
    assert table_file_name() == "weights_sqnr_mse.csv"
    blocks = result_file_name("m", 4, "mse", True, "1xN:4")
    assert blocks == "m_4_bits_mse_per_channel_1x4.json"
    assert fnmatch.fnmatch(blocks, result_glob("mse", True, "1xN:4"))
    assert not any(fnmatch.fnmatch(blocks, result_glob("mse", channel)) for channel in (False, True))
    # a result file from before the structure was recorded is an unstructured one
    config = {"model": "m", **result_config(4, "mse", False, "pretrained")}
    old = {key: value for key, value in config.items() if key != "pruning_structure"}
    write_json(tmp_path / "m_4_bits_mse.json", {**old, "complete": True, "layers": {}})
    assert check_result_file(tmp_path / "m_4_bits_mse.json", config)[1] is None
    blocks_config = {"model": "m", **result_config(4, "mse", False, "pretrained", "1xN:4")}
    assert "pruning_structure" in check_result_file(tmp_path / "m_4_bits_mse.json", blocks_config)[1]
    assert other_settings_hint(tmp_path, "mse", False, "1xN:4") == "it holds result files of another setting: 1 file(s) need no setting option"


@pytest.mark.slow
def test_cli_writes_distinct_files_and_the_plot_summarises_them(tmp_path: Path):
    """efficientnet_lite0 at 4 bits against 1x4 blocks: distinct file names, the structure recorded, a conv
    tensor's pruning MSE equal to numpy's, depthwise ones null; the plot script finds and summarises them."""
    from models.registry import load_model
    from plot_weights_sqnr import main as plot_main
    from quant_pruning_weights_sqnr import main

    args = ["--no-progress", "--device", "cpu", "--models", "efficientnet_lite0", "--bits", "4"]
    result = CliRunner().invoke(main, [*args, "--pruning-structure", "1xN:4", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientnet_lite0_4_bits_mse_1x4.json", "weights_sqnr_mse_1x4.csv"]
    data = json.loads((tmp_path / "efficientnet_lite0_4_bits_mse_1x4.json").read_text())
    assert data["pruning_structure"] == "1xN:4"
    model = load_model("efficientnet_lite0", pretrained=True)
    modules = dict(model.named_modules())
    convs = [name for name, module in modules.items() if isinstance(module, nn.Conv2d) and module.groups == 1]
    depthwise = [name for name, module in modules.items() if isinstance(module, nn.Conv2d) and module.groups > 1]
    assert depthwise and all(data["layers"][name]["pruning_mse"] is None for name in depthwise)
    name = convs[len(convs) // 2]
    expected = numpy_block_pruning_mse(modules[name].weight.detach().numpy(), 4, sparsity_of(4))
    assert data["layers"][name]["pruning_mse"] == pytest.approx(expected, rel=1e-9)

    plots = tmp_path / "plots"
    missing = CliRunner().invoke(plot_main, ["--input-dir", str(tmp_path), "--output-dir", str(plots)])
    assert missing.exit_code != 0 and "--pruning-structure 1xN:4" in missing.output
    shown = CliRunner().invoke(
        plot_main, ["--input-dir", str(tmp_path), "--output-dir", str(plots), "--pruning-structure", "1xN:4"]
    )
    assert shown.exit_code == 0, shown.output
    assert f"pruning 1xN:4 ({len(depthwise)} tensor result(s) without 1xN blocks" in shown.output
    row = next(line for line in shown.output.splitlines() if line.startswith("| 4 |"))
    assert row.split("|")[3].strip() == str(len(data["layers"]))
