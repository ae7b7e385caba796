"""The quantization-bounds study: layer data, chunking, bounds vs brute force, aggregation, files and CLI."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

import post_training_quant_acts_sqnr as cli_module
from quantization.qp_bounds import QuadraticProblems, decoupled_coordinates, dual_bound
from studies import quant_bounds
from studies.layer_problems import collect_layer_data, input_chunks
from studies.quant_bounds import METHODS, QuantBoundsConfig, layer_step_sizes, quant_bounds_layer, solve_problems

LAYER = "_blocks.5._project_conv"  # EfficientNet-Lite0: 1x1, 240 -> 80
DEPTHWISE = "_blocks.1._depthwise_conv"  # 3x3 depthwise, 96 channels


def brute_force_minimum(problems: QuadraticProblems, index: int) -> float:
    lo, hi = problems.lo[index].long().tolist(), problems.hi[index].long().tolist()
    grid = torch.tensor(list(itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)])), dtype=torch.float64)
    single = problems.select(index)
    return float(single.objective(grid[None])[0].min())


def random_problems(batch: int, n: int, n_bits: int, seed: int, rank: int | None = None) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, rank or 3 * n, n, generator=generator, dtype=torch.float64)
    patches = patches * torch.rand(1, 1, n, generator=generator, dtype=torch.float64)  # uneven input scales
    grams = patches.transpose(1, 2) @ patches
    weights = torch.randn(batch, n, generator=generator, dtype=torch.float64) * 0.5
    step = weights.abs().amax(1) / (2 ** (n_bits - 1) - 1)
    return QuadraticProblems.from_gram(grams, weights, step, n_bits), weights / step[:, None]


@pytest.mark.parametrize("box", [False, True])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.slow
def test_bounds_bracket_the_brute_force_optimum(box: bool, rank: int | None) -> None:
    """lb <= exact minimum (enumeration) <= every method, and --exact finds the minimum itself."""
    problems, w_over_s = random_problems(batch=6, n=5, n_bits=3, seed=1 + (rank or 0), rank=rank)
    config = QuantBoundsConfig(n_bits=3, box=box, exact=True, time_limit=5.0)
    result = solve_problems(problems, w_over_s, config, torch.Generator().manual_seed(0))
    for b in range(problems.batch_size):
        optimum = brute_force_minimum(problems, b)
        tolerance = 1e-9 * float(problems.r[b])
        assert 0.0 <= result["relaxation_lb"][b] <= optimum + tolerance
        assert result["exact_lb"][b] <= optimum + tolerance
        assert abs(float(result["errors"]["exact"][b]) - optimum) <= tolerance
        for method in METHODS:
            assert float(result["errors"][method][b]) >= optimum - tolerance, method
        assert float(result["ub"][b]) == pytest.approx(optimum, abs=tolerance)
        z = result["z"][b]
        assert torch.equal(z, z.round()) and bool((z >= problems.lo[b]).all() and (z <= problems.hi[b]).all())
    if rank is not None and not box:  # rank-deficient P without the box: only the trivial bound 0 is certified
        # P = s^2 A'A with rank(A) = 3 < n is singular, but rounding leaves its smallest eigenvalue a tiny
        # number of either sign. solve_dual's contract: "infeasible" where no strictly dual-feasible start
        # exists (lambda_min(P) <= 0 in float64), "numerical" where a start exists but the final multipliers
        # cannot be certified (the certification margin exceeds rounding-size eigenvalues). Both give no bound.
        eigenvalues = torch.linalg.eigvalsh(problems.P)
        assert bool((eigenvalues[:, 0].abs() <= 1e-12 * eigenvalues[:, -1]).all())  # singular up to rounding
        assert set(result["status"]) <= {"infeasible", "numerical"}
        _, certified = dual_bound(problems, result["lam"], None, result["origin"])
        assert not bool(certified.any()) and bool((result["relaxation_lb"] == 0).all())
    if rank is None or box:  # certified (a rank-deficient P's bound may still be the trivial 0)
        assert set(result["status"]) == {"optimal"}
    if rank is None:
        assert bool((result["relaxation_lb"] > 0).all())


@pytest.mark.slow
def test_cvxpy_reference_agrees_with_our_solver() -> None:
    problems, w_over_s = random_problems(batch=3, n=6, n_bits=4, seed=5)
    generator = torch.Generator().manual_seed(0)
    ours = solve_problems(problems, w_over_s, QuantBoundsConfig(n_bits=4), generator)
    reference = solve_problems(problems, w_over_s, QuantBoundsConfig(n_bits=4, solver="clarabel"), generator)
    assert torch.allclose(ours["relaxation_lb"], reference["relaxation_lb"], rtol=1e-3)
    assert reference["status"] == ["optimal"] * 3


def test_input_chunks_hold_whole_input_channels() -> None:
    assert [len(c) for c in input_chunks(240, 1, 32)] == [32] * 7 + [16]
    chunks = input_chunks(9 * 10, 9, 32)  # 3x3 kernel: 3 input channels (27 inputs) per chunk
    assert [len(c) for c in chunks] == [27, 27, 27, 9]
    assert torch.equal(torch.cat(chunks), torch.arange(90))
    assert [len(c) for c in input_chunks(9, 9, 4)] == [9]  # one input channel is the smallest chunk
    assert [len(c) for c in input_chunks(50, 1, 0)] == [50]


class TinyNet(nn.Module):
    """A strided, padded, dilated grouped conv, a dead channel and a Linear layer fed by 2 positions only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(6 * 4 * 4, 3)
        with torch.no_grad():
            self.conv.weight[5].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.slow
def test_layer_data_matches_the_layer_output_and_chunks_sum_up() -> None:
    torch.manual_seed(0)
    model = TinyNet().double()
    images = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    data = collect_layer_data(model, ["conv", "fc"], images)
    conv = data["conv"]
    # Independent: the channel output energies from F.conv2d without bias.
    output = F.conv2d(images, model.conv.weight, None, stride=2, padding=2, dilation=2, groups=2)
    energy = output.detach().pow(2).sum((0, 2, 3))
    assert torch.allclose(conv.output_energy(), energy, rtol=1e-10)
    assert conv.kernel_elements == 9 and conv.grams.shape == (2, 18, 18)

    config = QuantBoundsConfig(n_bits=3, opt_dim=9, max_whole_dim=64)
    result = quant_bounds_layer(conv, config)
    summary = result["summary"]
    assert summary["dead_channels"] == 1 and summary["channels"] == 6
    chunk_scope = summary["scopes"]["chunk"]
    assert len(summary["chunks"]) == 2  # 18 inputs, one input channel (9) per chunk
    for key in ("energy", "lower_bound"):
        assert chunk_scope[key] == pytest.approx(sum(c[key] for c in summary["chunks"]), rel=1e-12)
    for method in METHODS:
        assert chunk_scope["errors"][method] == pytest.approx(
            sum(c["errors"][method] for c in summary["chunks"]), rel=1e-12
        )
    # The chunks' energy: partial outputs of each input channel of the 5 live output channels.
    weight = model.conv.weight.detach()
    per_input = [
        F.conv2d(images, torch.where(torch.arange(2).view(1, 2, 1, 1) == j, weight, 0.0), None, 2, 2, 2, 2)
        .detach().pow(2).sum((0, 2, 3))[:5].sum()
        for j in range(2)
    ]
    assert chunk_scope["energy"] == pytest.approx(float(sum(per_input)), rel=1e-10)
    whole = summary["scopes"]["whole_channel"]
    assert whole["energy"] == pytest.approx(float(energy[:5].sum()), rel=1e-10)
    sqnr = whole["sqnr_db"]["best"]
    assert sqnr == pytest.approx(10 * math.log10(whole["energy"] / whole["errors"]["best"]))
    assert whole["sqnr_upper_bound_db"] >= sqnr

    # fc sees 2 positions and 96 inputs: A'A has rank 2. No certified SDP bound without the box ...
    fc = quant_bounds_layer(data["fc"], QuantBoundsConfig(n_bits=2, opt_dim=16, max_whole_dim=0))["summary"]
    assert fc["scopes"]["chunk"]["status"] == {"infeasible": 6 * 3}
    assert fc["scopes"]["chunk"]["lower_bound"] == 0.0
    # ... with it every problem is certified (here the rank is so low that the bounds stay near 0).
    boxed = quant_bounds_layer(data["fc"], QuantBoundsConfig(n_bits=2, opt_dim=16, max_whole_dim=0, box=True))
    statuses = boxed["summary"]["scopes"]["chunk"]["status"]
    assert sum(statuses.values()) == 18 and set(statuses) <= {"optimal", "stalled", "max_iters"}


def test_step_sizes_follow_the_range_method() -> None:
    weights = torch.tensor([[1.0, -0.5], [0.25, 3.5]], dtype=torch.float64)
    assert torch.allclose(layer_step_sizes(weights, 3, "minmax", False), torch.full((2,), 3.5 / 3, dtype=torch.float64))
    assert torch.allclose(layer_step_sizes(weights, 3, "minmax", True), torch.tensor([1 / 3, 3.5 / 3], dtype=torch.float64))
    mse = layer_step_sizes(weights, 3, "mse", False)
    assert mse.shape == (2,) and bool((mse <= 3.5 / 3 + 1e-12).all())


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str):
    return CliRunner().invoke(cli_module.cli, ["quant-bounds-data-opt", *args], catch_exceptions=False)


@pytest.mark.slow
def test_cli_writes_certified_results(tmp_path: Path) -> None:
    result = run_cli(
        "--layer-name", LAYER, "--num-output-channels", "3", "--num-samples", "2", "--n-bits", "4",
        "--range-search-method", "MSE", "--output-dir", str(tmp_path), "--save-problems", "--no-progress",
        "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    name = "quant_bounds_efficientnet_lite0_4bits_opt32_mse"
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["calibration"]["images"] == 2 and record["failed_layers"] == []
    layer = record["layers"][0]
    assert layer["layer"] == LAYER and layer["scopes"]["chunk"]["problems"] == 3 * 8
    table = pd.read_csv(tmp_path / f"{name}.csv")
    assert list(table["scope"]) == ["layer_chunk"] + ["chunk"] * 8
    assert (tmp_path / f"{name}.png").exists()

    # One npz per layer, named by the index.
    index = json.loads((tmp_path / f"{name}_problems" / "index.json").read_text())
    assert index["run"] == name and index["layer_names"] == [LAYER]
    assert index["layers"] == [{"index": 0, "layer": LAYER, "file": f"000_{LAYER}.npz", "problems": 24,
                                "whole_channel_problems": 0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.json", f"{name}.csv", f"{name}.png", f"{name}.pdf", f"{name}_problems"]
    )
    # Every stored bound is the dual bound of its stored multipliers, and dual-feasible (Cholesky).
    with np.load(tmp_path / f"{name}_problems" / f"000_{LAYER}.npz", allow_pickle=False) as arrays:
        stored = {key: arrays[key] for key in arrays.files}
    assert stored["P"].shape == (24, 32, 32) and list(stored["n"][-3:]) == [16] * 3
    for i in range(24):
        n = int(stored["n"][i])
        problems = QuadraticProblems(
            *(torch.as_tensor(stored[k][i, :n, :n] if k == "P" else stored[k][i, :n])[None] for k in ("P", "q")),
            torch.as_tensor(stored["r"][i : i + 1]),
        )
        lam, origin = (torch.as_tensor(stored[k][i, :n])[None] for k in ("lam", "origin"))
        bound, certified = dual_bound(problems, lam, None, origin)
        assert bool(certified[0]) and float(bound[0]) == pytest.approx(stored["lb"][i], rel=1e-12)
        # Inputs that never fire (zero rows of P) are decoupled and carry no multiplier (see dual_bound).
        decoupled = decoupled_coordinates(problems)[0]
        assert bool((lam[0][decoupled] == 0).all())
        torch.linalg.cholesky(problems.P[0] - torch.diag(lam[0]) + torch.diag(decoupled.double()))
        z = torch.as_tensor(stored["z"][i, :n])[None]
        assert float(problems.objective(z)[0]) == pytest.approx(stored["ub"][i], rel=1e-12)
        assert stored["lb"][i] <= stored["ub"][i] <= stored["error_rtn"][i] * (1 + 1e-12)


@pytest.mark.slow
def test_cli_lists_layers_and_rejects_bad_input(tmp_path: Path) -> None:
    listed = run_cli("--list-layers")
    assert listed.exit_code == 0 and LAYER in listed.output and "(80, 240, 1, 1)" in listed.output
    unknown = run_cli("--layer-name", "_blocks.5._project_cnv", "--output-dir", str(tmp_path))
    assert unknown.exit_code == 2 and "closest: _blocks.5._project_conv" in unknown.output
    assert "Traceback" not in unknown.output
    not_weight = run_cli("--layer-name", "_blocks.5._bn2", "--output-dir", str(tmp_path))
    assert not_weight.exit_code == 2 and "only Conv1d, Conv2d, Conv3d and Linear" in not_weight.output
    zero = run_cli("--num-output-channels", "0", "--output-dir", str(tmp_path))
    assert zero.exit_code == 2 and "--num-output-channels" in zero.output
    bad_solver = run_cli("--solver", "gurobi", "--output-dir", str(tmp_path))
    assert bad_solver.exit_code == 2


@pytest.mark.slow
def test_cli_images_dir_with_too_few_images_and_a_failing_layer(tmp_path: Path, monkeypatch) -> None:
    images_dir = tmp_path / "images"
    for k, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        (images_dir / f"class{k}").mkdir(parents=True)
        Image.new("RGB", (40, 30), color).save(images_dir / f"class{k}" / "a.png")
    (images_dir / "class0" / "broken.png").write_bytes(b"not an image")

    original = quant_bounds.quant_bounds_layer

    def failing(data, config, progress=None):
        if data.name == DEPTHWISE:
            raise RuntimeError("solver exploded")
        return original(data, config, progress)

    monkeypatch.setattr(quant_bounds, "STUDY", dataclasses.replace(quant_bounds.STUDY, solve_layer=failing))
    result = run_cli(
        "--layer-name", DEPTHWISE, "--layer-name", LAYER, "--num-output-channels", "2", "--num-samples", "8",
        "--images-dir", str(images_dir), "--output-dir", str(tmp_path / "out"), "--no-progress", "--opt-dim", "120",
    )
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["calibration"]["images"] == 2  # 3 files drawn, one unreadable and skipped
    assert record["failed_layers"] == [{"layer": DEPTHWISE, "error": "RuntimeError: solver exploded"}]
    assert [layer["layer"] for layer in record["layers"]] == [LAYER]
    assert "FAILED" in result.output


@pytest.mark.slow
def test_cli_methods_choose_the_feasible_methods(tmp_path: Path) -> None:
    """--methods rtn: only rtn in every output, with the numbers of the all-methods run."""
    common = ["--layer-name", LAYER, "--num-output-channels", "2", "--num-samples", "2", "--opt-dim", "120",
              "--save-problems", "--no-progress", "--device", "cpu"]
    for run, extra in (("all", []), ("rtn", ["--methods", "rtn"])):
        result = run_cli(*common, *extra, "--output-dir", str(tmp_path / run))
        assert result.exit_code == 0, result.output
    base = "quant_bounds_efficientnet_lite0_4bits_opt120_mse"
    stems = {"all": tmp_path / "all" / base, "rtn": tmp_path / "rtn" / f"{base}_methods-rtn"}
    records = {run: json.loads(Path(f"{stem}.json").read_text()) for run, stem in stems.items()}
    assert records["rtn"]["config"]["methods"] == ["rtn"] and records["all"]["config"]["methods"] == list(METHODS)
    for run, record in records.items():
        for scope in [record["layers"][0]["scopes"]["chunk"], *record["layers"][0]["chunks"]]:
            assert set(scope["errors"]) == ({"rtn", "best"} if run == "rtn" else {*METHODS, "best"})
            assert set(scope["sqnr_db"]) == set(scope["errors"])
    all_chunks, rtn_chunks = (records[run]["layers"][0]["chunks"] for run in ("all", "rtn"))
    for full, alone in zip(all_chunks, rtn_chunks, strict=True):
        assert alone["errors"]["rtn"] == full["errors"]["rtn"]  # the same numbers, bit for bit
        assert alone["errors"]["best"] == alone["errors"]["rtn"] >= full["errors"]["best"]
        assert alone["lower_bound"] == full["lower_bound"]
    columns = pd.read_csv(f"{stems['rtn']}.csv").columns
    assert [c for c in columns if c.startswith("error_")] == ["error_rtn", "error_best"]
    assert [c for c in columns if c.startswith("sqnr_") and c.endswith("_db") and "bound" not in c] == [
        "sqnr_rtn_db", "sqnr_best_db"]
    assert Path(f"{stems['rtn']}.png").exists() and Path(f"{stems['rtn']}.pdf").exists()
    stored = {}
    for run, stem in stems.items():
        with np.load(stem.parent / f"{stem.name}_problems" / f"000_{LAYER}.npz", allow_pickle=False) as arrays:
            stored[run] = {key: arrays[key] for key in arrays.files}
    assert [key for key in stored["rtn"] if key.startswith("error_")] == ["error_rtn"]
    np.testing.assert_array_equal(stored["rtn"]["error_rtn"], stored["all"]["error_rtn"])
    np.testing.assert_array_equal(stored["rtn"]["lb"], stored["all"]["lb"])


def test_cli_rejects_unknown_methods_in_one_line(tmp_path: Path) -> None:
    bad = run_cli("--methods", "rtn,gptqq", "--output-dir", str(tmp_path))
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "unknown method 'gptqq'; choose from rtn, sdp_rounding, gptq, adaround" in bad.output
    empty = run_cli("--methods", "rtn,,gptq", "--output-dir", str(tmp_path))
    assert empty.exit_code == 2 and "--methods" in empty.output
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cli_constants_agree_with_the_studies() -> None:
    """The help's method lists and --max-whole-dim default are the studies' (one default for both configs)."""
    from pruning.sparse_ls_heuristics import METHODS as PRUNE_METHODS
    from studies.layer_problems import DEFAULT_MAX_WHOLE_DIM
    from studies.prune_bounds import PruneBoundsConfig

    assert cli_module.QUANT_METHODS == METHODS and cli_module.PRUNE_METHODS == PRUNE_METHODS
    assert cli_module.MAX_WHOLE_DIM == DEFAULT_MAX_WHOLE_DIM == 128
    assert QuantBoundsConfig().max_whole_dim == PruneBoundsConfig().max_whole_dim == DEFAULT_MAX_WHOLE_DIM
    assert QuantBoundsConfig(methods=("gptq", "rtn")).methods == ("rtn", "gptq")  # kept in METHODS order
    with pytest.raises(ValueError, match="methods"):
        QuantBoundsConfig(methods=("rtn", "exact"))
    with pytest.raises(ValueError, match="methods"):
        QuantBoundsConfig(methods=())


@pytest.mark.slow
def test_problem_files_one_per_layer_hold_the_problems(tmp_path: Path) -> None:
    """run_layers with --save-problems: one npz per finished layer and an index; the arrays are the solved problems."""
    from studies.bounds_files import RunFiles, layer_problem_files, read_layer_problems
    from studies.bounds_run import run_layers

    torch.manual_seed(0)
    model = TinyNet().double()
    data = collect_layer_data(model, ["conv", "fc"], torch.randn(2, 4, 8, 8, dtype=torch.float64))
    config = QuantBoundsConfig(n_bits=3, opt_dim=9, max_whole_dim=64)
    solved = {}

    def solve(layer):
        solved[layer.name] = quant_bounds_layer(layer, config)
        return solved[layer.name]

    files = RunFiles(tmp_path, "quant_bounds_tiny_3bits_opt9.5")  # a dot in the stem
    stale = files.layer_problems(7, "gone")
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    (files.problems_index).write_text(json.dumps({"layers": [{"file": stale.name}]}))
    run_layers(data, solve, True, {"model": "tiny"}, files, "INT3")
    assert not stale.exists()  # the earlier run's files of this stem are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"quant_bounds_tiny_3bits_opt9.5{suffix}" for suffix in (".json", ".csv", ".png", ".pdf", "_problems")
    )
    index = json.loads(files.problems_index.read_text())
    assert index["layer_names"] == ["conv", "fc"] and [e["layer"] for e in index["layers"]] == ["conv", "fc"]
    paths = layer_problem_files(files)
    assert sorted(p.name for p in files.problems_dir.iterdir()) == sorted(["index.json", "000_conv.npz", "001_fc.npz"])
    for layer_index, (name, path) in enumerate(paths.items()):
        stored = read_layer_problems(path)
        assert list(stored["layer_names"]) == ["conv", "fc"]
        for scope, prefix in (("chunk", ""), ("whole_channel", "whole_channel_")):
            sets = [s for s in solved[name]["sets"] if s.scope == scope]
            if not sets:
                assert prefix + "P" not in stored
                continue
            rows = 0
            for s in sets:  # row by row against the solved problems in memory
                for b in range(s.batch_size):
                    i, n = rows + b, s.n
                    assert int(stored[prefix + "n"][i]) == n and int(stored[prefix + "layer"][i]) == layer_index
                    assert int(stored[prefix + "channel"][i]) == int(s.channels[b])
                    np.testing.assert_array_equal(stored[prefix + "P"][i, :n, :n], s.problems.P[b].numpy())
                    assert not stored[prefix + "P"][i, n:].any() and not stored[prefix + "P"][i, :, n:].any()
                    np.testing.assert_array_equal(stored[prefix + "q"][i, :n], s.problems.q[b].numpy())
                    np.testing.assert_array_equal(stored[prefix + "z"][i, :n], s.z[b].numpy())
                    for key, value in (("r", s.problems.r), ("lb", s.relaxation_lb), ("ub", s.ub),
                                       ("step_size", s.step_size)):
                        assert stored[prefix + key][i] == float(value[b]), key
                    for method in METHODS:
                        assert stored[prefix + f"error_{method}"][i] == float(s.errors[method][b])
                rows += s.batch_size
            assert len(stored[prefix + "n"]) == rows == next(
                e for e in index["layers"] if e["layer"] == name
            )["problems" if scope == "chunk" else "whole_channel_problems"]


@pytest.mark.slow
def test_a_relaxation_without_a_finite_point_still_gets_every_method(monkeypatch) -> None:
    """A problem whose relaxation ends ``numerical`` with a NaN point (seen on AVX-512 CPUs) samples around
    ``clamp(-P^+ q)`` instead of crashing in the covariance factorisation; the other problems keep theirs."""
    problems, w_over_s = random_problems(batch=4, n=5, n_bits=3, seed=3)
    config = QuantBoundsConfig(n_bits=3, box=True)
    reference = solve_problems(problems, w_over_s, config, torch.Generator().manual_seed(0))
    solve_dual = quant_bounds.solve_dual

    def nan_point(relaxed, tol):
        solution = solve_dual(relaxed, tol=tol)
        solution.x[1] = float("nan")
        solution.covariance[1] = float("nan")
        return dataclasses.replace(solution, status=tuple("numerical" if i == 1 else s for i, s in enumerate(solution.status)))

    monkeypatch.setattr(quant_bounds, "solve_dual", nan_point)
    result = solve_problems(problems, w_over_s, config, torch.Generator().manual_seed(0))
    assert result["status"][1] == "numerical"
    z = result["z"]
    assert torch.isfinite(z).all() and bool(((z >= problems.lo) & (z <= problems.hi)).all())
    best = torch.stack([result["errors"][m] for m in METHODS]).amin(0)
    torch.testing.assert_close(result["ub"], best)
    assert float(result["errors"]["sdp_rounding"][1]) <= float(result["errors"]["rtn"][1]) + 1e-12
    torch.testing.assert_close(result["relaxation_lb"][[0, 2, 3]], reference["relaxation_lb"][[0, 2, 3]])
