"""The pruning-bounds study and the quantization-vs-pruning comparison: brute force, aggregation, files, CLI."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import post_training_quant_acts_sqnr as cli_module
from studies.layer_problems import collect_layer_data
from studies.prune_bounds import PruneBoundsConfig, kept_weights, prune_bounds_layer

LAYER = "_blocks.5._project_conv"


def brute_force_pruning(gram: np.ndarray, w: np.ndarray, k: int) -> float:
    """min over supports of size k of the least-squares refit error, by numpy lstsq on A (G = A'A)."""
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    A = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))).T  # A'A = G
    target = A @ w
    best = float(target @ target)
    for support in itertools.combinations(range(len(w)), k):
        columns = A[:, list(support)]
        coefficients = np.linalg.lstsq(columns, target, rcond=None)[0]
        residual = target - columns @ coefficients
        best = min(best, float(residual @ residual))
    return best


def test_kept_weights_follow_the_mask_rounding() -> None:
    assert kept_weights(32, 0.75) == 8 and kept_weights(16, 0.875) == 2 and kept_weights(9, 0.75) == 2
    assert kept_weights(10, 0.0) == 10 and kept_weights(7, 0.5) == 3  # round half up prunes 4 of 7


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.conv.weight[4].zero_()  # a dead channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.slow
def test_layer_bounds_bracket_the_brute_force_optimum() -> None:
    torch.manual_seed(0)
    model = SmallConv().double()
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    data = collect_layer_data(model, ["conv"], images)["conv"]
    config = PruneBoundsConfig(sparsity=0.75, opt_dim=9, max_whole_dim=27)
    result = prune_bounds_layer(data, config)
    summary = result["summary"]
    assert summary["dead_channels"] == 1 and len(summary["chunks"]) == 3
    chunk_sets = [s for s in result["sets"] if s.scope == "chunk"]
    for problem_set in chunk_sets:
        assert problem_set.k == 2
        for b in range(problem_set.batch_size):
            gram, w = problem_set.grams[b].numpy(), problem_set.weights[b].numpy()
            optimum = brute_force_pruning(gram, w, problem_set.k)
            tolerance = 1e-9 * float(problem_set.r[b])
            assert problem_set.status[b] == "optimal"
            assert float(problem_set.errors["exact"][b]) == pytest.approx(optimum, abs=tolerance)
            assert float(problem_set.relaxation_lb[b]) <= optimum + tolerance
            assert float(problem_set.best_lb[b]) <= optimum + tolerance
            for method, errors in problem_set.errors.items():
                assert float(errors[b]) >= optimum - tolerance, method
            assert int((problem_set.x[b] != 0).sum()) <= problem_set.k
    scope = summary["scopes"]["chunk"]
    for method in scope["errors"]:
        assert scope["errors"][method] == pytest.approx(sum(c["errors"][method] for c in summary["chunks"]))
    whole = next(s for s in result["sets"] if s.scope == "whole_channel")
    assert whole.k == 7 and whole.status == ["optimal"] * 4  # 27 inputs: solved exactly as well
    # Whole-channel energy = the live channels' output energies (bias excluded), from F.conv2d.
    output = torch.nn.functional.conv2d(images, model.conv.weight.detach(), padding=1)
    expected = float(output[:, :4].pow(2).sum())
    assert summary["scopes"]["whole_channel"]["energy"] == pytest.approx(expected, rel=1e-10)


def run(*args: str):
    return CliRunner().invoke(cli_module.cli, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_prune_cli_files_recheck(tmp_path: Path) -> None:
    result = run(
        "prune-bounds-data-opt", "--layer-name", LAYER, "--num-output-channels", "2", "--num-samples", "2",
        "--opt-dim", "16", "--n-bits", "4", "--output-dir", str(tmp_path), "--save-problems", "--no-progress",
        "--max-whole-dim", "0",
    )
    assert result.exit_code == 0, result.output
    name = "prune_bounds_efficientnet_lite0_sparsity0.75_opt16"
    record = json.loads((tmp_path / f"{name}.json").read_text())
    scope = record["layers"][0]["scopes"]["chunk"]
    assert scope["problems"] == 2 * 15 and scope["status"] == {"optimal": 30}
    assert scope["lower_bound"] <= scope["errors"]["exact"] * (1 + 1e-9) <= scope["errors"]["obs"] * (1 + 1e-9)
    assert scope["errors"]["magnitude"] > scope["errors"]["magnitude_refit"] >= scope["errors"]["exact"] * (1 - 1e-9)
    assert len(pd.read_csv(tmp_path / f"{name}.csv")) == 1 + 15
    with np.load(tmp_path / f"{name}_problems" / f"000_{LAYER}.npz", allow_pickle=False) as stored:
        G, w, x, ub, lb, k = (stored[key] for key in ("G", "w", "x", "ub", "lb", "k"))
        assert list(stored["status"]) == ["optimal"] * 30
    errors = np.einsum("bi,bij,bj->b", w - x, G, w - x)
    np.testing.assert_allclose(errors, ub, rtol=1e-9, atol=1e-12 * ub.max())
    assert ((x != 0).sum(1) <= k).all() and (k == 4).all()
    assert (lb <= ub * (1 + 1e-9)).all()


def test_prune_cli_bad_input(tmp_path: Path) -> None:
    both = run("prune-bounds-data-opt", "--n-bits", "4", "--sparsity", "0.5", "--output-dir", str(tmp_path))
    assert both.exit_code == 2 and "not both" in both.output
    full = run("prune-bounds-data-opt", "--sparsity", "1.0", "--output-dir", str(tmp_path))
    assert full.exit_code == 2 and "--sparsity" in full.output
    unknown = run("prune-bounds-data-opt", "--layer-name", "_conv_had", "--output-dir", str(tmp_path))
    assert unknown.exit_code == 2 and "closest: _conv_head" in unknown.output


@pytest.mark.slow
def test_compare_bounds_table_and_figure(tmp_path: Path) -> None:
    result = run(
        "compare-bounds", "--layer-name", LAYER, "--num-output-channels", "2", "--num-samples", "2",
        "--n-bits", "3,6", "--opt-dim", "120", "--max-exact-dim", "0", "--output-dir", str(tmp_path), "--no-progress",
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "compare_bounds_efficientnet_lite0_opt120.csv")
    assert list(table["n_bits"]) == [3, 6]
    assert table["sparsity"].tolist() == pytest.approx([1 - 3 / 16, 1 - 6 / 16])
    for _, row in table.iterrows():
        assert row["quant_best_db"] <= row["quant_bound_db"] and row["prune_best_db"] <= row["prune_bound_db"] + 1e-9
        expected = "quantization" if row["prune_bound_db"] < row["quant_best_db"] else (
            "pruning" if row["quant_bound_db"] < row["prune_best_db"] else "ranges overlap")
        assert row["provably_better"] == expected
    assert (tmp_path / "compare_bounds_efficientnet_lite0_opt120.png").exists()
    assert (tmp_path / "quant_bounds_efficientnet_lite0_3bits_opt120.json").exists()
    assert (tmp_path / "prune_bounds_efficientnet_lite0_6bits_opt120.json").exists()
    assert set(table["prune_status"]) == {"not_solved:4"}  # chunks above --max-exact-dim: certified bound only
    assert "INT3 vs 81.25% sparse" in result.output and "INT6 vs 62.5% sparse" in result.output  # exact percents


FAST = ["--layer-name", LAYER, "--num-output-channels", "2", "--num-samples", "2", "--opt-dim", "16",
        "--max-whole-dim", "0", "--no-progress"]


@pytest.mark.slow
def test_prune_runs_at_two_sparsities_keep_their_own_files(tmp_path: Path) -> None:
    outputs = {}
    for sparsity in ("0.75", "0.875"):
        result = run("prune-bounds-data-opt", *FAST, "--sparsity", sparsity, "--max-exact-dim", "0",
                     "--output-dir", str(tmp_path))
        assert result.exit_code == 0, result.output
        outputs[sparsity] = result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"prune_bounds_efficientnet_lite0_sparsity{s}_opt16.{ext}" for s in ("0.75", "0.875")
        for ext in ("json", "csv", "png", "pdf")
    )
    first, second = (tmp_path / f"prune_bounds_efficientnet_lite0_sparsity{s}_opt16.png" for s in ("0.75", "0.875"))
    assert first.read_bytes() != second.read_bytes()
    assert json.loads((tmp_path / "prune_bounds_efficientnet_lite0_sparsity0.875_opt16.json").read_text())[
        "config"]["sparsity"] == 0.875
    assert "results in" in outputs["0.875"] and "sparsity0.875_opt16.png" in outputs["0.875"]


@pytest.mark.slow
def test_prune_methods_option(tmp_path: Path) -> None:
    """--methods magnitude,obs reports those two only, with the numbers of the all-methods run."""
    records = {}
    for run_name, extra in (("all", []), ("two", ["--methods", "obs,magnitude"])):
        result = run("prune-bounds-data-opt", *FAST, *extra, "--output-dir", str(tmp_path / run_name))
        assert result.exit_code == 0, result.output
        (path,) = (tmp_path / run_name).glob("*.json")
        records[run_name] = json.loads(path.read_text())
    assert path.name == "prune_bounds_efficientnet_lite0_sparsity0.75_opt16_methods-magnitude+obs.json"
    two, full = (records[name]["layers"][0]["scopes"]["chunk"] for name in ("two", "all"))
    assert set(two["errors"]) == {"magnitude", "obs", "exact", "best"}
    assert set(full["errors"]) == {"magnitude", "magnitude_refit", "obs", "iht", "swap", "exact", "best"}
    for method in ("magnitude", "obs", "exact"):
        assert two["errors"][method] == full["errors"][method]
    assert two["lower_bound"] == full["lower_bound"] and two["errors"]["best"] == full["errors"]["best"]  # all exact
    bad = run("prune-bounds-data-opt", "--methods", "magnitude,sparsegpt", "--output-dir", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "unknown method 'sparsegpt'; choose from magnitude, magnitude_refit, obs, iht, swap" in bad.output


def _help(command: str) -> str:
    return " ".join(CliRunner().invoke(cli_module.cli, [command, "--help"], terminal_width=200).output.split())


@pytest.mark.slow
def test_help_names_the_files_that_are_written(tmp_path: Path) -> None:
    """Every file name pattern of the commands' help against the files a run writes."""
    quant, prune, compare = (_help(c) for c in ("quant-bounds-data-opt", "prune-bounds-data-opt", "compare-bounds"))
    for text in (quant, prune):
        for pattern in ("<run>.json", "<run>.csv", "<run>.png", "<run>.pdf", "<run>_problems/", "<index>_<layer>.npz",
                        "index.json"):
            assert pattern in text, pattern
    assert "<run> = quant_bounds_<model>_<b>bits_opt<d>_<range>" in quant
    assert "<run> = prune_bounds_<model>_sparsity<s>_opt<d>" in prune
    assert "compare_bounds_<model>_opt<d>.csv, .png and .pdf" in compare
    assert "<side>_bounds_<model>_<b>bits_opt<d>.json, .csv, .png and .pdf" in compare
    assert "<side>_bounds_<model>_<b>bits_opt<d>_problems/" in compare

    result = run("prune-bounds-data-opt", *FAST, "--save-problems", "--output-dir", str(tmp_path / "prune"))
    assert result.exit_code == 0, result.output
    stem = "prune_bounds_efficientnet_lite0_sparsity0.75_opt16"
    written = sorted(str(p.relative_to(tmp_path / "prune")) for p in (tmp_path / "prune").rglob("*"))
    assert written == sorted([f"{stem}.json", f"{stem}.csv", f"{stem}.png", f"{stem}.pdf", f"{stem}_problems",
                              f"{stem}_problems/index.json", f"{stem}_problems/000_{LAYER}.npz"])

    result = run("compare-bounds", *FAST[:-3], "--n-bits", "4", "--max-exact-dim", "0", "--no-progress",
                 "--save-problems", "--output-dir", str(tmp_path / "compare"))
    assert result.exit_code == 0, result.output
    sides = [f"{side}_bounds_efficientnet_lite0_4bits_opt16" for side in ("quant", "prune")]
    expected = [f"compare_bounds_efficientnet_lite0_opt16.{ext}" for ext in ("csv", "png", "pdf")]
    expected += [f"{s}.{ext}" for s in sides for ext in ("json", "csv", "png", "pdf")]
    expected += [f"{s}_problems{part}" for s in sides for part in ("", "/index.json", f"/000_{LAYER}.npz")]
    assert sorted(str(p.relative_to(tmp_path / "compare")) for p in (tmp_path / "compare").rglob("*")) == sorted(
        expected)
    assert "INT4 vs 75% sparse" in result.output
