"""Tests for the weight-SQNR figures and summary (studies/weight_sqnr_plots.py, plot_weights_sqnr.py).

A small synthetic results directory with hand-chosen SQNRs: models ``alpha`` and ``beta``,
bits 2..8, three layers each, with a null (+inf) pruning SQNR, a null (unknown) quantization
SQNR, a truncated JSON file and an incomplete run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from matplotlib.image import imread

from plot_weights_sqnr import main
from studies import weight_sqnr_plots as plots

MODELS = {"alpha": 0, "beta": 1}
BITS = range(2, 9)
N_LAYERS = 3
OUTPUT_FILES = (
    "weights_sqnr_scatter.png", "weights_sqnr_scatter.pdf",
    "weights_sqnr_scatter_corrected.png", "weights_sqnr_scatter_corrected.pdf",
    "weights_sqnr_gap_vs_kurtosis.png", "weights_sqnr_gap_vs_kurtosis.pdf",
    "weights_sqnr_summary.csv", "weights_sqnr_summary.md",
)  # fmt: skip


def layer_metrics(model_index: int, n_bits: int, layer: int) -> dict:
    """Hand-chosen metrics: quant = 6b + layer - 3m, pruning = 11 + layer + m, corrected = pruning + 1."""
    quant, pruning = 6.0 * n_bits + layer - 3.0 * model_index, 11.0 + layer + model_index
    metrics = {
        "shape": [4, 2, 3, 3],
        "numel": 72,
        "sample_kurtosis": [-1.2, 0.5, 40.0][layer] + model_index,
        "quant_sqnr": quant,
        "quant_mse": 10 ** (-quant / 10),
        "quant_sparsity": 0.1,
        "quant_step_size": 0.05,
        "pruning_sqnr": pruning,
        "pruning_mse": 10 ** (-pruning / 10),
        "pruning_sqnr_corrected": pruning + 1.0,
        "pruning_mse_corrected": 10 ** (-(pruning + 1.0) / 10),
    }
    if (model_index, n_bits, layer) == (0, 4, 0):  # pruning error 0: SQNR +inf, written as null
        metrics.update(pruning_sqnr=None, pruning_mse=0.0, pruning_sqnr_corrected=None, pruning_mse_corrected=0.0)
    if (model_index, n_bits, layer) == (0, 4, 1):  # an undefined quantization SQNR
        metrics.update(quant_sqnr=None, quant_mse=None)
    return metrics


def result_file(model: str, n_bits: int, complete: bool = True) -> dict:
    return {
        "model": model,
        "n_bits": n_bits,
        "sparsity": 1 - n_bits / 16,
        "range_estimator": "mse",
        "per_channel": False,
        "weights": "pretrained",
        "complete": complete,
        "layers": {
            f"block{layer}.conv": layer_metrics(MODELS.get(model, 0), n_bits, layer) for layer in range(N_LAYERS)
        },
    }


def expected_sqnrs(n_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quant, pruning, corrected pruning) SQNRs of all tensors at ``n_bits``, nulls resolved by hand."""
    rows = [layer_metrics(m, n_bits, layer) for m in MODELS.values() for layer in range(N_LAYERS)]

    def value(row: dict, key: str) -> float:
        if row[key] is not None:
            return row[key]
        return np.inf if row[key.replace("sqnr", "mse")] == 0 else np.nan

    def column(key: str) -> np.ndarray:
        return np.array([value(row, key) for row in rows])

    return column("quant_sqnr"), column("pruning_sqnr"), column("pruning_sqnr_corrected")


def win_share(quant: np.ndarray, pruning: np.ndarray) -> float:
    defined = ~np.isnan(quant) & ~np.isnan(pruning)
    return float(np.mean(quant[defined] > pruning[defined]))


def nan_median(values: np.ndarray) -> float:
    return float(np.median(values[~np.isnan(values)]))


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights_sqnr")
    for model in MODELS:
        for n_bits in BITS:
            (path / f"{model}_{n_bits}_bits_mse.json").write_text(json.dumps(result_file(model, n_bits)))
    (path / "gamma_4_bits_mse.json").write_text(json.dumps(result_file("gamma", 4))[:150])  # killed mid-write
    (path / "gamma_5_bits_mse.json").write_text(json.dumps(result_file("gamma", 5, complete=False)))
    (path / "weights_sqnr.csv").write_text("model,layer\nnot,read\n")
    return path


@pytest.fixture(scope="module")
def cli_run(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    output_dir = tmp_path_factory.mktemp("plots") / "weights_sqnr"
    result = CliRunner().invoke(main, ["--input-dir", str(results_dir), "--output-dir", str(output_dir)])
    return result, output_dir


def assert_one_line_error(result: Result, expected: str) -> None:
    """Non-zero exit, no traceback, and exactly one ``Error:`` line (besides log records) naming ``expected``."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if not line.startswith(("WARNING:", "INFO:"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert expected in lines[0]


def test_load_results_is_tidy_and_skips_bad_files(results_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        frame = plots.load_results(results_dir)
    assert list(frame.columns) == list(plots.COLUMNS)
    assert len(frame) == len(MODELS) * len(BITS) * N_LAYERS
    assert set(frame["model"]) == set(MODELS)
    assert not frame.duplicated(["model", "layer", "n_bits"]).any()
    assert np.allclose(frame["sparsity"], 1 - frame["n_bits"] / 16)
    skipped = {record.getMessage().split(":")[0] for record in caplog.records}
    assert skipped == {f"skipping {results_dir / name}" for name in ("gamma_4_bits_mse.json", "gamma_5_bits_mse.json")}

    special = frame[(frame["model"] == "alpha") & (frame["n_bits"] == 4)].set_index("layer")
    assert special.loc["block0.conv", "pruning_sqnr"] == np.inf
    assert special.loc["block0.conv", "pruning_sqnr_corrected"] == np.inf
    assert np.isnan(special.loc["block1.conv", "quant_sqnr"])
    assert special.loc["block2.conv", "quant_sqnr"] == 26.0


def test_cli_writes_every_output(cli_run: tuple[Result, Path]) -> None:
    result, output_dir = cli_run
    assert result.exit_code == 0, result.output
    for name in OUTPUT_FILES:
        path = output_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert str(path) in result.output
    assert not list(output_dir.glob(".*.tmp")), "temporary files left behind"
    assert "| bits | sparsity | tensors |" in result.output


@pytest.mark.parametrize(
    ("stem", "size_in"),
    [
        ("weights_sqnr_scatter", plots.SCATTER_SIZE_IN),
        ("weights_sqnr_scatter_corrected", plots.SCATTER_SIZE_IN),
        ("weights_sqnr_gap_vs_kurtosis", plots.GAP_SIZE_IN),
    ],
)
def test_png_figures_load_with_expected_shape(cli_run: tuple[Result, Path], stem: str, size_in: tuple) -> None:
    image = imread(cli_run[1] / f"{stem}.png")
    width, height = (round(inches * plots.DPI) for inches in size_in)
    assert image.shape == (height, width, 4)
    assert image[..., :3].std() > 0.05, "blank figure"
    assert (cli_run[1] / f"{stem}.pdf").read_bytes().startswith(b"%PDF")


def test_summary_matches_numpy(cli_run: tuple[Result, Path]) -> None:
    summary = pd.read_csv(cli_run[1] / "weights_sqnr_summary.csv")
    assert list(summary.columns) == list(plots.SUMMARY_COLUMNS)
    assert summary["n_bits"].tolist() == list(BITS)
    for row in summary.itertuples(index=False):
        quant, pruning, corrected = expected_sqnrs(row.n_bits)
        assert row.sparsity == pytest.approx(1 - row.n_bits / 16)
        assert row.n_tensors == len(MODELS) * N_LAYERS
        assert row.quant_wins_share == pytest.approx(win_share(quant, pruning))
        assert row.quant_wins_share_corrected == pytest.approx(win_share(quant, corrected))
        assert row.median_quant_sqnr == pytest.approx(nan_median(quant))
        assert row.median_pruning_sqnr == pytest.approx(nan_median(pruning))
        assert row.median_gap == pytest.approx(nan_median(quant - pruning))


def test_summary_hand_values(cli_run: tuple[Result, Path]) -> None:
    summary = pd.read_csv(cli_run[1] / "weights_sqnr_summary.csv").set_index("n_bits")
    # b=2: quant alpha 12,13,14 | beta 9,10,11; pruning alpha 11,12,13 | beta 12,13,14; corrected = +1 (ties).
    assert summary.loc[2].tolist() == pytest.approx([0.875, 6, 0.5, 0.0, 11.5, 12.5, -1.0])
    # b=4: alpha's block0 pruning is +inf (pruning wins), block1 quant undefined (not compared):
    # wins 4 of 5, medians of [24, 26, 21, 22, 23], [inf, 12, 13, 12, 13, 14], [-inf, 13, 9, 9, 9].
    assert summary.loc[4].tolist() == pytest.approx([0.75, 6, 0.8, 0.8, 23.0, 13.0, 9.0])
    assert summary.loc[8, "quant_wins_share"] == 1.0
    markdown = (cli_run[1] / "weights_sqnr_summary.md").read_text()
    assert "| 2 | 87.5% | 6 | 50.0% | 0.0% | 11.50 | 12.50 | -1.00 |" in markdown.splitlines()
    assert len(markdown.splitlines()) == 2 + len(BITS)


def test_models_filter(results_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    arguments = ["--input-dir", str(results_dir), "--output-dir", str(output_dir), "--models", "beta"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(output_dir / "weights_sqnr_summary.csv")
    assert (summary["n_tensors"] == N_LAYERS).all()
    assert (summary["quant_wins_share"] == [0.0] + [1.0] * (len(BITS) - 1)).all()


def test_unknown_model_is_one_line_error(results_dir: Path, tmp_path: Path) -> None:
    arguments = ["--input-dir", str(results_dir), "--output-dir", str(tmp_path), "--models", "alpha,zeta"]
    result = CliRunner().invoke(main, arguments)
    assert_one_line_error(result, "no results for model(s) zeta")


def test_missing_input_dir_is_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--input-dir", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out")])
    assert_one_line_error(result, "does not exist")


def test_no_complete_results_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "m_4_bits_mse.json").write_text('{"model": "m", "n_bits": 4, "comp')
    (tmp_path / "m_5_bits_mse.json").write_text(json.dumps(result_file("m", 5, complete=False)))
    result = CliRunner().invoke(main, ["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert_one_line_error(result, "no complete result files")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_one_line_error(results_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["--input-dir", str(results_dir), "--output-dir", str(blocker / "out")])
    assert_one_line_error(result, "cannot write to output directory")


def test_gap_figure_handles_negative_excess_kurtosis() -> None:
    frame = pd.DataFrame(
        {
            "model": ["m"] * 4,
            "n_bits": [4, 4, 8, 8],
            "sample_kurtosis": [-1.5, -0.2, 3.0, 80.0],
            "quant_sqnr": [20.0, 21.0, 45.0, 30.0],
            "pruning_sqnr": [5.0, 6.0, np.inf, 9.0],
        }
    )
    ax = plots.gap_vs_kurtosis_figure(frame).axes[0]
    assert ax.get_xscale() == "log"
    assert sum(len(collection.get_offsets()) for collection in ax.collections) == 3
    assert "excess + 3" in ax.get_xlabel()
