"""1xN block-pruning bounds (pruning/group_sparse_ls.py, studies/block_prune_bounds.py): brute force, files, CLI.

Every optimum is checked against an independent brute force: all supports of ``K`` input
channels are enumerated and the ``N`` channels are refit by ``numpy.linalg.lstsq`` on the patch
matrix ``A`` itself (not on ``G = A'A``), the error being ``sum_c ||A w_c - A_S x_c||^2``.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import post_training_quant_acts_sqnr as cli_module
import pruning.group_sparse_ls as group_ls
from pruning.block_masks import num_blocks_pruned, one_by_n_mask
from pruning.perspective_bound import lower_bound, problem_splits
from pruning.sparse_ls import solve_exact_batch
from studies.block_prune_bounds import BlockPruneBoundsConfig, block_prune_bounds_layer, kept_blocks, run_stem
from studies.layer_problems import collect_layer_data
from studies.prune_bounds import PruneBoundsConfig, prune_bounds_layer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "_blocks.0._project_conv"  # (16, 32, 1, 1)


def brute_force(A: np.ndarray, W: np.ndarray, group_size: int, kept: int) -> float:
    """min over supports of ``kept`` groups of ``sum_c ||A w_c - A_S x_c||^2``, by lstsq on ``A`` (``W`` ``(N, n)``)."""
    targets = A @ W.T
    best = float((targets * targets).sum())
    for support in itertools.combinations(range(W.shape[1] // group_size), kept):
        columns = A[:, [h * group_size + i for h in support for i in range(group_size)]]
        if columns.shape[1]:
            residual = targets - columns @ np.linalg.lstsq(columns, targets, rcond=None)[0]
            best = min(best, float((residual * residual).sum()))
    return best


def random_problems(rng: np.random.Generator, kind: str, batch: int, channels: int, n: int):
    """Patch matrices (well conditioned, or with fewer rows than inputs: singular ``G``), their ``G`` and weights."""
    rows = 3 * n if kind == "definite" else n // 2 + 1
    patches = [rng.standard_normal((rows, n)) * np.exp(rng.uniform(-1, 1, n)) for _ in range(batch)]
    grams = torch.tensor(np.stack([A.T @ A for A in patches]))
    return patches, grams, torch.tensor(rng.standard_normal((batch, channels, n)))


CASES = [(1, 8, 4), (3, 4, 2), (9, 3, 1)]  # (group size g, groups m, kept K)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["definite", "singular"])
@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("enumeration", [None, 6], ids=["default", "branching"])
def test_solvers_bracket_the_brute_force_optimum(kind: str, channels: int, enumeration, monkeypatch) -> None:
    """Exact = brute force (branching down to 6 supports with ``enumeration=6``); certified bounds below; methods above."""
    if enumeration is not None:
        monkeypatch.setattr(group_ls, "ENUMERATION_SUPPORTS", enumeration)
    rng = np.random.default_rng(channels + 10 * (kind == "singular"))
    for g, m, K in CASES:
        patches, G, W = random_problems(rng, kind, 3, channels, g * m)
        optimum = np.array([brute_force(A, w.numpy(), g, K) for A, w in zip(patches, W)])
        tolerance = 1e-9 * float(torch.einsum("bci,bij,bcj->b", W, G, W).max())
        d = problem_splits(G)
        results = group_ls.solve_block_exact_batch(G, W, g, K, d=d)
        assert [r.status for r in results] == ["optimal"] * 3
        np.testing.assert_allclose([r.ub for r in results], optimum, rtol=0, atol=tolerance)
        for r in results:
            assert r.lb <= r.ub and r.support.sum() <= K
            assert not r.x[:, ~np.repeat(r.support, g)].any()  # zero outside the kept blocks
        for bound in (group_ls.block_lower_bound(G, W, g, K, d=d), group_ls.unstructured_lower_bound(G, W, g, K, d=d),
                      torch.tensor([r.lb for r in results], dtype=torch.float64)):
            assert (bound.numpy() <= optimum + tolerance).all() and (bound >= 0).all()
        for method, x in group_ls.block_pruning_methods(G, W, g, K).items():
            kept_groups = x.abs().sum(1).reshape(3, m, g).sum(-1) > 0
            assert (kept_groups.sum(1) <= K).all(), method
            assert (group_ls.block_error(G, W, x).numpy() >= optimum - tolerance).all(), method


@pytest.mark.slow
def test_one_channel_of_single_inputs_is_the_unstructured_problem() -> None:
    """N = 1, g = 1: the block solver's optimum is :func:`pruning.sparse_ls.solve_exact_batch`'s, and both
    relaxations are the same (the perspective one of :mod:`pruning.perspective_bound`, solved precisely there)."""
    rng = np.random.default_rng(3)
    _, G, W = random_problems(rng, "definite", 4, 1, 12)
    energy = torch.einsum("bi,bij,bj->b", W[:, 0], G, W[:, 0])
    for k in (3, 6):
        block = group_ls.solve_block_exact_batch(G, W, 1, k)
        unstructured = solve_exact_batch(G, W[:, 0], k)
        assert all(r.status == "optimal" for r in block + unstructured)
        np.testing.assert_allclose([r.ub for r in block], [r.ub for r in unstructured], rtol=1e-10)
        assert all(np.array_equal(b.support, u.support) for b, u in zip(block, unstructured))
        relaxation = lower_bound(G, W[:, 0], k)
        group_bound = group_ls.block_lower_bound(G, W, 1, k, iterations=500)
        assert (group_bound <= relaxation + 1e-9 * energy).all()
        assert (group_bound >= relaxation - 1e-3 * energy).all()


def test_blocks_of_one_channel_of_a_pointwise_conv_are_the_unstructured_study() -> None:
    """N = 1 on a 1x1 conv (g = 1): per chunk the same errors as :func:`studies.prune_bounds.prune_bounds_layer`
    at the same count (6 of 12 removed: floor and round half up agree)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(12, 3, 1)).double()
    data = collect_layer_data(model, ["0"], torch.randn(2, 12, 3, 3, dtype=torch.float64))["0"]
    block = block_prune_bounds_layer(data, BlockPruneBoundsConfig(block_size=1, sparsity=0.5, opt_dim=12))
    single = prune_bounds_layer(data, PruneBoundsConfig(sparsity=0.5, opt_dim=12))
    (block_set,), (single_set,) = block["sets"], single["sets"]
    assert block_set.kept == single_set.k == 6 and block_set.status == single_set.status == ["optimal"] * 3
    for method in ("magnitude", "magnitude_refit", "obs", "exact"):
        torch.testing.assert_close(block_set.errors[method], single_set.errors[method], rtol=1e-9, atol=0)
    torch.testing.assert_close(block_set.unstructured_lb, single_set.relaxation_lb, rtol=1e-9, atol=0)


def test_magnitude_blocks_are_the_one_by_n_mask() -> None:
    """The methods' blocks = :func:`pruning.block_masks.one_by_n_mask` of each row, ties included."""
    rng = np.random.default_rng(4)
    weights = torch.tensor(rng.integers(-2, 3, size=(6, 4, 5, 9)), dtype=torch.float64)  # many equal L1 scores
    for rate in (0.2, 0.5, 0.7):
        kept = kept_blocks(5, rate)
        support = group_ls.block_magnitude_support(weights.reshape(6, 4, 45), 9, kept)
        for row in range(6):
            mask = one_by_n_mask(weights[row], 4, rate)  # (4, 5, 9): one block row of 5 blocks
            assert torch.equal(mask[:, :, 0].all(0), support[row]) and torch.equal(mask.any(0).any(-1), support[row])
            assert int((~support[row]).sum()) == num_blocks_pruned(5, rate)
        pruned = group_ls.block_magnitude_prune(weights.reshape(6, 4, 45), 9, kept)
        assert torch.equal(pruned, weights.reshape(6, 4, 45) * support.repeat_interleave(9, -1)[:, None, :])


def test_node_limit_reports_a_certified_gap(monkeypatch) -> None:
    monkeypatch.setattr(group_ls, "ENUMERATION_SUPPORTS", 1)
    rng = np.random.default_rng(5)
    patches, G, W = random_problems(rng, "definite", 2, 2, 10)
    optimum = np.array([brute_force(A, w.numpy(), 1, 5) for A, w in zip(patches, W)])
    results = group_ls.solve_block_exact_batch(G, W, 1, 5, node_limit=1)
    for r, best in zip(results, optimum):
        assert r.status == "node_limit" and r.nodes == 1
        assert r.lb <= best * (1 + 1e-9) <= r.ub * (1 + 2e-9)


def test_kept_blocks_config_and_run_stem() -> None:
    assert [kept_blocks(m, 0.5) for m in (1, 3, 4, 32)] == [1, 2, 2, 16]  # floor(p m) removed
    assert kept_blocks(10, 0.29) == 8 and kept_blocks(100, 0.29) == 71  # the exact decimal product
    config = BlockPruneBoundsConfig(block_size=8, sparsity=0.75, opt_dim=16, methods=("swap", "magnitude"))
    assert config.methods == ("magnitude", "swap")
    assert run_stem("m", config) == "block_prune_bounds_m_1x8_sparsity0.75_opt16_methods-magnitude+swap"
    for bad in ({"block_size": 0}, {"sparsity": 1.0}, {"methods": ("iht",)}, {"node_limit": 0}):
        with pytest.raises(ValueError):
            BlockPruneBoundsConfig(**bad)
    assert cli_module.BLOCK_PRUNE_METHODS == group_ls.METHODS
    assert cli_module.BLOCK_PRUNE_NODE_LIMIT == group_ls.DEFAULT_NODE_LIMIT


class GroupedConv(nn.Module):
    """A 3x3 convolution with 2 groups of 3 output channels (block rows of N = 2: 2 + 1 channels per group)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        with torch.no_grad():
            self.conv.weight[5].zero_()  # a dead channel: its row (of one channel) is not solved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.slow
def test_layer_problems_against_brute_force_and_the_layer_output() -> None:
    torch.manual_seed(0)
    model = GroupedConv().double()
    images = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    data = collect_layer_data(model, ["conv"], images)["conv"]
    config = BlockPruneBoundsConfig(block_size=2, sparsity=0.5, opt_dim=18, max_whole_dim=27)
    result = block_prune_bounds_layer(data, config)
    summary = result["summary"]
    assert summary["dead_channels"] == 1 and summary["block_rows"] == 4 and len(summary["chunks"]) == 2
    chunk_sets = [s for s in result["sets"] if s.scope == "chunk"]
    assert [s.kept for s in chunk_sets] == [1, 1] and chunk_sets[0].rows.tolist() == [0, 1, 2]
    output = torch.nn.functional.conv2d(images, model.conv.weight.detach(), padding=1, groups=2)
    unfolded = torch.nn.functional.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 54).numpy()
    patches = {group: unfolded[:, group * 27:(group + 1) * 27] for group in (0, 1)}  # A of each group
    for problem_set in result["sets"]:
        for b, row in enumerate(problem_set.rows.tolist()):
            first, count = int(problem_set.channels[b]), (2 if row % 2 == 0 else 1)
            A = patches[row // 2][:, problem_set.inputs[0]:problem_set.inputs[1] + 1]
            np.testing.assert_array_equal(problem_set.weights[b, count:].numpy(), 0.0)  # padding of the short row
            optimum = brute_force(A, problem_set.weights[b, :count].numpy(), 9, problem_set.kept)
            tolerance = 1e-9 * float(problem_set.r[b])
            assert problem_set.status[b] == "optimal"
            assert float(problem_set.errors["exact"][b]) == pytest.approx(optimum, abs=tolerance)
            assert float(problem_set.best_lb[b]) <= optimum + tolerance
            for method, errors in problem_set.errors.items():
                assert float(errors[b]) >= optimum - tolerance, method
            if problem_set.scope == "whole_channel":
                assert problem_set.kept == 2  # 3 input channels per group: floor(1.5) = 1 removed
                energy = float(output[:, first:first + count].pow(2).sum())
                assert float(problem_set.r[b]) == pytest.approx(energy, rel=1e-10)
    scope = summary["scopes"]["chunk"]
    assert scope["lower_bound"] >= max(scope["unstructured_lower_bound"], scope["group_relaxation_lower_bound"])
    assert scope["errors"]["magnitude"] >= scope["errors"]["magnitude_refit"] >= scope["errors"]["exact"] * (1 - 1e-12)


def test_block_size_that_does_not_fit_is_a_value_error() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)).double()
    data = collect_layer_data(model, ["0"], torch.randn(1, 2, 4, 4, dtype=torch.float64))["0"]
    with pytest.raises(ValueError, match="larger than the layer"):
        block_prune_bounds_layer(data, BlockPruneBoundsConfig(block_size=2))


def run(*args: str):
    return CliRunner().invoke(cli_module.cli, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_cli_writes_the_files_and_the_npz_rechecks(tmp_path: Path) -> None:
    result = run(
        "block-prune-bounds-data-opt", "--layer-name", LAYER, "--num-output-channels", "2", "--num-samples", "2",
        "--opt-dim", "16", "--block-size", "4", "--sparsity", "0.5", "--max-whole-dim", "0", "--save-problems",
        "--no-progress", "--output-dir", str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    name = "block_prune_bounds_efficientnet_lite0_1x4_sparsity0.5_opt16"
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.{e}" for e in ("json", "csv", "png", "pdf")} | {
        f"{name}_problems"}
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["kind"] == "block_pruning" and record["config"]["block_size"] == 4
    scope = record["layers"][0]["scopes"]["chunk"]
    assert scope["problems"] == 2 and scope["status"] == {"optimal": 2}  # one row of 4 channels, 32 / 16 chunks
    assert scope["errors"]["magnitude"] > scope["errors"]["magnitude_refit"] >= scope["errors"]["exact"] * (1 - 1e-9)
    assert scope["lower_bound"] == pytest.approx(scope["errors"]["exact"], rel=1e-9)
    with np.load(tmp_path / f"{name}_problems" / f"000_{LAYER}.npz", allow_pickle=False) as stored:
        G, w, x, ub, lb, kept = (stored[key] for key in ("G", "w", "x", "ub", "lb", "kept_blocks"))
    errors = np.einsum("bci,bij,bcj->b", w - x, G, w - x)
    np.testing.assert_allclose(errors, ub, rtol=1e-9)
    assert ((np.abs(x).sum(1) > 0).sum(1) <= kept).all() and (kept == 8).all()
    assert (lb <= ub * (1 + 1e-9)).all()
    assert "SQNR best method" in result.output


@pytest.mark.slow
def test_enumeration_margin_bounds_the_rounding_of_every_support() -> None:
    """Ill-conditioned group problems (``cond(G)`` about 1e9): every enumerated value is within the certified
    margin of the support's exact (rational) error, and the float values are not exact (a zero margin fails)."""
    from fractions import Fraction

    from test_sparse_ls import _exact_support_error

    n, g, N, kept = 12, 2, 3, 3
    worst_error = Fraction(0)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        G = (Q * np.geomspace(1.0, 1e-9, n)) @ Q.T + np.diag(1e-6 * rng.uniform(1.0, 10.0, n))
        W = rng.standard_normal((N, n))
        Gt, Wt = torch.from_numpy(G)[None], torch.from_numpy(W)[None]
        b = torch.einsum("bij,bcj->bci", Gt, Wt)
        r = (Wt * b).sum((1, 2))
        margin = float(group_ls.enumeration_margins(Gt, Wt, b, r, kept * g)[0])
        assert 0 < margin < 1e-3 * float(r[0])
        supports = torch.tensor([[group in chosen for group in range(n // g)]
                                 for chosen in itertools.combinations(range(n // g), kept)])  # fmt: skip
        values = group_ls._support_values(Gt, b, r, supports, torch.zeros(len(supports), dtype=torch.long), g)
        assert torch.isfinite(values).all()
        for support, value in zip(supports, values.tolist()):
            inputs = np.flatnonzero(group_ls.group_inputs(support[None], g)[0].numpy())
            exact = sum(_exact_support_error(G, W[c], inputs) for c in range(N))
            error = abs(Fraction(value) - exact)
            assert error <= Fraction(margin), (seed, inputs, float(error), margin)
            worst_error = max(worst_error, error)
    assert worst_error > 0
