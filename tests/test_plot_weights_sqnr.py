"""Tests for the weight-SQNR figures and summary (studies/weight_sqnr_plots.py, plot_weights_sqnr.py).

A small synthetic results directory with hand-chosen SQNRs: models ``alpha`` and ``beta``,
bits 2..8, three layers each, with a null (+inf) pruning SQNR, a null (unknown) quantization
SQNR, a truncated JSON file and an incomplete run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from matplotlib.image import imread

from bundle_paper_weights_sqnr import main as bundle_main
from plot_weights_sqnr import main
from studies import paper_data
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert ax.get_xscale() == "symlog"  # excess kurtosis as stored, negatives kept
    offsets = np.concatenate([collection.get_offsets() for collection in ax.collections])
    assert sorted(offsets[:, 0]) == [-1.5, -0.2, 80.0]
    assert "excess kurtosis" in ax.get_xlabel() and "+ 3" not in ax.get_xlabel()
    assert not ax.texts, "the win labels belong in the legend, not over the data"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "above: quantization better" in legend and "below: pruning better" in legend


# ----------------------------------------------------------------------------- the paper's flat format

PAPER_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper_weights_sqnr"


def flat_metrics(kurtosis: float, quant_sqnr: float, pruning_mse: float, quant_sparsity: float = 0.3) -> dict:
    """A layer in the paper's flat format, with the signal power fixed at 1e-4 (SQNRs consistent with MSEs)."""
    power = 1e-4
    quant_mse = power / 10 ** (quant_sqnr / 10)
    pruning_sqnr = math.inf if pruning_mse == 0 else 10 * math.log10(power / pruning_mse)
    return {
        "sample_kurtosis": kurtosis,
        "quant_sqnr": quant_sqnr,
        "quant_mse": quant_mse,
        "quant_sparsity": quant_sparsity,
        "pruning_sqnr": pruning_sqnr,
        "pruning_mse": pruning_mse,
        "pruning_sqnr_corrected": pruning_sqnr - 1.0,
        "pruning_mse_corrected": pruning_mse * 1.26,
    }


# Made-up paper data: (model, bits) -> layers. Values chosen to hit each artefact kind a known number of times.
FLAT_FILES = {
    ("pa", 2): {
        "conv1": flat_metrics(-3.0, 5.0, 2.0**-16),  # kurtosis -3 (and coarse grid: rms 0.01), subnormal
        "fc": flat_metrics(math.inf, -0.001, 2.0**-16),  # kurtosis inf, quant SQNR <= 0, subnormal
    },
    ("pa", 4): {
        "conv1": flat_metrics(-3.0, 15.0, 0.0, quant_sparsity=0.2),  # -3; pruning +inf proven (0.2 < 0.75)
        # inf; pruning +inf undecided (0.8 >= 0.75; the corrected MSE is not 0)
        "fc": flat_metrics(math.inf, 9.0, 0.0, quant_sparsity=0.8) | {"pruning_mse_corrected": 1e-5},
    },
    ("pb", 8): {
        "layer": flat_metrics(0.4, 30.0, 2.0**-20),  # pruning MSE subnormal
        "head": flat_metrics(12.0, 31.0, 2.0**-13),  # nothing
    },
}
# The same counts, written out by hand per model: {kind: count}.
EXPECTED_ARTEFACTS = {
    "pa": {"kurtosis_minus_3": 2, "kurtosis_inf": 2, "coarse_grid": 2, "quant_sqnr_nonpositive": 1,
           "pruning_inf_underflow": 1, "pruning_inf_undecided": 1, "pruning_mse_subnormal": 2},
    "pb": {"kurtosis_minus_3": 0, "kurtosis_inf": 0, "coarse_grid": 0, "quant_sqnr_nonpositive": 0,
           "pruning_inf_underflow": 0, "pruning_inf_undecided": 0, "pruning_mse_subnormal": 1},
}  # fmt: skip


def write_flat_folder(path: Path) -> Path:
    """The made-up paper folder (with a LICENSE), written as the paper's code did (``Infinity`` tokens)."""
    path.mkdir(parents=True, exist_ok=True)
    for (model, n_bits), layers in FLAT_FILES.items():
        (path / f"{model}_{n_bits}_bits_mse.json").write_text(json.dumps(layers))
    (path / "LICENSE").write_text("Copyright (c) 2023 Made-up Holder\n")
    return path


@pytest.fixture()
def flat_dir(tmp_path: Path) -> Path:
    return write_flat_folder(tmp_path / "paper")


def test_flat_format_is_read_per_file_beside_ours(flat_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (flat_dir / "alpha_4_bits_mse.json").write_text(json.dumps(result_file("alpha", 4)))  # our format, same folder
    with caplog.at_level(logging.WARNING):
        frame = plots.load_results(flat_dir)
    assert not caplog.records
    assert sorted(frame.groupby(["model", "n_bits"]).size().items()) == [
        (("alpha", 4), N_LAYERS), (("pa", 2), 2), (("pa", 4), 2), (("pb", 8), 2)
    ]  # fmt: skip
    rows = frame.set_index(["model", "n_bits", "layer"])
    for (model, n_bits), layers in FLAT_FILES.items():
        for layer, metrics in layers.items():
            for field, value in metrics.items():  # kurtosis unchanged: both conventions are excess
                assert rows.loc[(model, n_bits, layer), field] == value, (model, n_bits, layer, field)
    assert rows.loc[("pa", 4, "conv1"), "pruning_sqnr"] == np.inf
    assert np.isnan(rows.loc[("pa", 2, "fc"), "numel"])
    assert rows.loc[("alpha", 4, "block2.conv"), "quant_sqnr"] == 26.0


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (json.dumps({"conv": {"quant_sqnr": 3.0}}), "paper's flat format, but layer 'conv' lacks sample_kurtosis"),
        (json.dumps({"conv": {**flat_metrics(1.0, 5.0, 1e-3), "quant_mse": "x"}}), "non-numeric quant_mse"),
        (json.dumps([1, 2, 3]), "neither the weight study's format nor the paper's flat format"),
        (json.dumps({"conv": 3.0}), "neither the weight study's format nor the paper's flat format"),
        (json.dumps({}), "neither the weight study's format nor the paper's flat format"),
    ],
)
def test_bad_files_are_skipped_with_one_line(
    flat_dir: Path, content: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = flat_dir / "zz_4_bits_mse.json"
    bad.write_text(content)
    with caplog.at_level(logging.WARNING):
        frame = plots.load_results(flat_dir)
    assert set(frame["model"]) == {"pa", "pb"}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"skipping {bad}: "), messages
    assert reason in messages[0]


@pytest.mark.slow
def test_cli_plots_a_flat_folder(flat_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--input-dir", str(flat_dir), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "out" / "weights_sqnr_summary.csv").set_index("n_bits")
    assert summary["n_tensors"].to_dict() == {2: 2, 4: 2, 8: 2}
    # b=2: quant 5 and -0.001 dB vs pruning 10 log10(1e-4 2^16) = 8.16 dB: pruning wins both.
    assert summary.loc[2, "quant_wins_share"] == 0.0
    assert summary.loc[4, "quant_wins_share"] == 0.0  # both pruning SQNRs are +inf
    # b=8: 30 vs 10 log10(1e-4 2^20) = 20.2 dB and 31 vs 10 log10(1e-4 2^13) = -0.87 dB: quantization wins both.
    assert summary.loc[8, "quant_wins_share"] == 1.0


@pytest.mark.slow
def test_per_channel_folder_names_the_option(tmp_path: Path) -> None:
    for n_bits in (2, 3):
        name = f"alpha_{n_bits}_bits_mse_per_channel.json"
        (tmp_path / name).write_text(json.dumps(result_file("alpha", n_bits) | {"per_channel": True}))
    result = CliRunner().invoke(main, ["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert_one_line_error(result, "2 file(s) need --per-channel")
    result = CliRunner().invoke(
        main, ["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--per-channel"]
    )
    assert result.exit_code == 0, result.output


def test_short_help_option() -> None:
    result = CliRunner().invoke(main, ["-h"])
    assert result.exit_code == 0 and "--paper-artefacts" in result.output


# ----------------------------------------------------------------------------- the bundled table


def json_rows(folder: Path) -> dict[tuple[str, int, str], dict]:
    """Every layer of every ``<model>_<b>_bits_mse.json`` in ``folder``, read with plain ``json``."""
    rows = {}
    for path in folder.glob("*_bits_mse.json"):
        model, n_bits = path.name[: -len("_bits_mse.json")].rsplit("_", 1)
        for layer, metrics in json.loads(path.read_text()).items():
            rows[(model, int(n_bits), layer)] = metrics
    return rows


def test_bundled_table_stands_alone() -> None:
    table = paper_data.read_paper_table()
    assert paper_data.BUNDLED_TABLE.stat().st_size <= 2 * 2**20
    assert table["model"].nunique() == 45
    assert sorted(table["n_bits"].unique()) == list(BITS)
    assert len(table) == 18928 and not table.duplicated(["model", "n_bits", "layer"]).any()
    assert table.groupby(["model", "n_bits"]).ngroups == 315
    # Every model has the same layers at every bit-width, and one kurtosis per tensor.
    layers = table.groupby(["model", "n_bits"])["layer"].apply(frozenset)
    assert all(layers[model].nunique() == 1 for model in table["model"].unique())
    assert (table.groupby(["model", "layer"])["sample_kurtosis"].nunique(dropna=False) == 1).all()
    # Excess kurtosis: below 1 (impossible for plain kurtosis m4/m2^2 >= 1) on many tensors, median near 5.
    kurtosis = table["sample_kurtosis"]
    assert ((kurtosis > -2) & (kurtosis < 0)).sum() > 100
    # SQNRs agree with their MSEs through one signal power per row (to float rounding).
    power_quant = table["quant_mse"] * 10 ** (table["quant_sqnr"] / 10)
    power_pruning = table["pruning_mse"] * 10 ** (table["pruning_sqnr"] / 10)
    finite = table["pruning_mse"] > 0
    assert np.allclose(power_quant[finite], power_pruning[finite], rtol=1e-9, atol=0)
    license_text = paper_data.BUNDLED_LICENSE.read_text()
    assert "Copyright (c) 2023 Qualcomm Technologies, Inc." in license_text


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason="the paper's folder is not at ../shared/data/paper_weights_sqnr")
@pytest.mark.slow
def test_bundled_table_matches_the_paper_folder(tmp_path: Path) -> None:
    table = paper_data.read_paper_table()
    expected = json_rows(PAPER_DIR)
    assert len(expected) == len(table)
    for row in table.itertuples(index=False):
        metrics = expected[(row.model, row.n_bits, row.layer)]
        for field in paper_data.PAPER_FIELDS:
            assert getattr(row, field) == metrics[field], (row.model, row.n_bits, row.layer, field)
    assert paper_data.BUNDLED_LICENSE.read_bytes() == (PAPER_DIR / "LICENSE").read_bytes()
    # Regenerating gives the same bytes.
    result = CliRunner().invoke(bundle_main, ["--source-dir", str(PAPER_DIR), "--output", str(tmp_path / "t.csv.gz")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.csv.gz").read_bytes() == paper_data.BUNDLED_TABLE.read_bytes()
    assert (tmp_path / "t.LICENSE").read_bytes() == (PAPER_DIR / "LICENSE").read_bytes()


def test_bundle_cli_on_a_made_up_folder(flat_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "data" / "made_up.csv.gz"
    result = CliRunner().invoke(bundle_main, ["--source-dir", str(flat_dir), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "6 rows: 2 models, bits 2, 4, 8" in result.output
    table = paper_data.read_paper_table(output)
    expected = json_rows(flat_dir)
    assert len(table) == len(expected)
    for row in table.itertuples(index=False):
        for field in paper_data.PAPER_FIELDS:
            assert getattr(row, field) == expected[(row.model, row.n_bits, row.layer)][field]
    (flat_dir / "LICENSE").unlink()
    result = CliRunner().invoke(bundle_main, ["--source-dir", str(flat_dir), "--output", str(output)])
    assert_one_line_error(result, "no LICENSE file")


# ----------------------------------------------------------------------------- artefacts and --paper


@pytest.fixture()
def flat_table(flat_dir: Path, tmp_path: Path) -> Path:
    return paper_data.write_paper_table(paper_data.read_paper_folder(flat_dir), tmp_path / "made_up.csv.gz")


def test_artefact_counts_match_an_independent_count(flat_table: Path) -> None:
    table = paper_data.read_paper_table(flat_table)
    counts = paper_data.artefact_counts(table)
    for model, expected in EXPECTED_ARTEFACTS.items():
        assert counts.loc[model, list(expected)].to_dict() == expected, model
    assert counts.loc["pa", "tensors"] == 2 and counts.loc["pa", "rows"] == 4
    total = {key: sum(expected[key] for expected in EXPECTED_ARTEFACTS.values()) for key in paper_data.ARTEFACT_KEYS}
    assert counts.loc["total", list(total)].to_dict() == total

    # A second, brute-force count straight from the definitions, row by row.
    def kinds(model: str, n_bits: int, metrics: dict) -> set[str]:
        found = set()
        sparsity = 1 - n_bits / 16
        power = metrics["quant_mse"] * 10 ** (metrics["quant_sqnr"] / 10)
        if metrics["sample_kurtosis"] < -2:
            found.add("kurtosis_minus_3")
            bound = 2**-6.25 + math.sqrt(power)
            if math.floor(100 * bound / (bound + 0.5)) <= 5:
                found.add("coarse_grid")
        if metrics["sample_kurtosis"] == math.inf:
            found.add("kurtosis_inf")
        if metrics["quant_sqnr"] <= 0:
            found.add("quant_sqnr_nonpositive")
        corrected_sparsity = 1 - (1 - metrics["quant_sparsity"]) * n_bits / 16
        proven = (metrics["pruning_mse"] == 0 and metrics["quant_sparsity"] + 1e-3 < sparsity) or (
            metrics["pruning_mse_corrected"] == 0 and metrics["quant_sparsity"] + 1e-3 < corrected_sparsity
        )
        if proven:
            found.add("pruning_inf_underflow")
        elif metrics["pruning_mse"] == 0:
            found.add("pruning_inf_undecided")
        if 0 < metrics["pruning_mse"] < 2**-14:
            found.add("pruning_mse_subnormal")
        return found

    brute: dict[str, dict[str, int]] = {}
    for (model, n_bits), layers in FLAT_FILES.items():
        for metrics in layers.values():
            for kind in kinds(model, n_bits, metrics):
                brute.setdefault(model, dict.fromkeys(paper_data.ARTEFACT_KEYS, 0))[kind] += 1
    assert brute == EXPECTED_ARTEFACTS


def test_artefacts_cli_prints_the_table(flat_table: Path) -> None:
    result = CliRunner().invoke(main, ["--paper-artefacts", "--paper-table", str(flat_table)])
    assert result.exit_code == 0, result.output
    assert "| pa | 2 | 4 | 2 | 2 | 2 | 1 | 1 | 1 | 2 |" in result.output
    assert "| total | 4 | 6 | 2 | 2 | 2 | 1 | 1 | 1 | 3 |" in result.output
    assert "pruning MSE is a float16 number: 6 of 6 rows" in result.output  # 2^-16 x2, 0 x2, 2^-20, 2^-13
    result = CliRunner().invoke(main, ["--paper-artefacts", "--paper-table", str(flat_table.with_name("absent.gz"))])
    assert_one_line_error(result, "cannot read the paper's table")


@pytest.mark.slow
def test_paper_option_draws_both_and_summarises_side_by_side(
    flat_table: Path, results_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output_dir = tmp_path / "out"
    arguments = ["--paper", "--paper-table", str(flat_table), "--input-dir", str(results_dir)]
    result = CliRunner().invoke(main, [*arguments, "--output-dir", str(output_dir)])
    assert result.exit_code == 0, result.output
    for name in ("paper_weights_sqnr_scatter.png", "paper_weights_sqnr_scatter.pdf",
                 "paper_vs_ours_summary.csv", "paper_vs_ours_summary.md"):  # fmt: skip
        assert (output_dir / name).stat().st_size > 0 and str(output_dir / name) in result.output
    image = imread(output_dir / "paper_weights_sqnr_scatter.png")
    assert image.shape == tuple(round(inches * plots.DPI) for inches in plots.SCATTER_SIZE_IN[::-1]) + (4,)
    table = pd.read_csv(output_dir / "paper_vs_ours_summary.csv").set_index("n_bits")
    assert list(table.index) == list(BITS)
    ours = plots.summary_table(plots.load_results(results_dir)).set_index("n_bits")
    paper = plots.summary_table(plots.paper_frame(paper_data.read_paper_table(flat_table))).set_index("n_bits")
    assert np.allclose(table["ours_quant_wins_share"], ours["quant_wins_share"])
    assert np.allclose(table["ours_median_gap"], ours["median_gap"])
    assert table.loc[[2, 4, 8], "paper_n_tensors"].tolist() == [2, 2, 2]
    assert table.loc[3, "paper_n_tensors"] != table.loc[3, "paper_n_tensors"]  # NaN: no paper data at 3 bits
    assert table.loc[8, "paper_quant_wins_share"] == paper.loc[8, "quant_wins_share"] == 1.0
    assert "| bits | sparsity | tensors, paper | tensors, ours |" in result.output

    # Without our results the paper's data is drawn alone, with one warning saying so.
    caplog.clear()
    result = CliRunner().invoke(
        main, ["--paper", "--paper-table", str(flat_table), "--input-dir", str(tmp_path / "none"),
               "--output-dir", str(tmp_path / "alone")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "drawing the paper's data alone" in caplog.text
    assert (tmp_path / "alone" / "paper_weights_sqnr_scatter.png").is_file()
