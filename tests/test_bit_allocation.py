"""The ILP bit allocation (quantization/bit_allocation.py) against brute force, PuLP/CBC and the official outliers."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from quantization.bit_allocation import FIXED_LAYER_BITS, SOLVERS, allocate_bits, forbidden_choices

CONSTRAINTS = ("bitops", "size", "both")


def brute_force(weight, act, bits, macs, counts, alpha, bitops_bits, ratio, fixed):
    """Every policy of allowed choices, in Python integers: (objective, weight bits, act bits) of the best, or None."""
    allowed = []
    for layer in range(len(macs)):
        keep_w = [k for k in range(len(bits)) if not _official_style_outlier(weight[layer], bits, k)]
        keep_a = [k for k in range(len(bits)) if not _official_style_outlier(act[layer], bits, k)]
        allowed.append([(i, j) for i in keep_w for j in keep_a])
    total_bits = 32 * (sum(counts) + fixed)
    best = None
    for policy in itertools.product(*allowed):
        w_bits = [bits[i] for i, _ in policy]
        a_bits = [bits[j] for _, j in policy]
        bitops = sum(m * wb * ab for m, wb, ab in zip(macs, w_bits, a_bits))
        if bitops_bits is not None and bitops > sum(macs) * bitops_bits[0] * bitops_bits[1]:
            continue
        size = FIXED_LAYER_BITS * fixed + sum(p * b for p, b in zip(counts, w_bits))
        if ratio is not None and size > total_bits / ratio:
            continue
        cost = sum(act[layer][j] + alpha * weight[layer][i] for layer, (i, j) in enumerate(policy))
        if best is None or cost < best[0]:
            best = (cost, tuple(w_bits), tuple(a_bits))
    return best


def _official_style_outlier(scores, bits, k):
    """Is ``bits[k]`` forbidden: ``s(b) > s(bits[k])`` for ``b`` the candidate whose next smaller one is ``bits[k]``."""
    smaller = [b for b in bits if b > bits[k]]
    if not smaller:
        return False
    above = bits.index(min(smaller))
    return scores[k] < scores[above]


def random_instance(rng, n_layers=3, bits=(6, 4, 2), outliers=0.1):
    """Indicators falling with the bit-width (as learned step sizes), a fraction ``outliers`` of entries redrawn."""
    weight, act = (_step_like(rng, n_layers, bits, outliers) for _ in range(2))
    macs = rng.integers(1, 10_000, n_layers)
    counts = rng.integers(1, 1_000, n_layers)
    return weight, act, macs, counts


def _step_like(rng, n_layers, bits, outliers):
    scores = np.sort(rng.uniform(0.01, 1.0, (n_layers, len(bits))), axis=1)[:, np.argsort(np.argsort(bits)[::-1])]
    redraw = rng.random(scores.shape) < outliers
    scores[redraw] = rng.uniform(0.01, 1.0, redraw.sum())
    return scores


def settings(rng, kind, bits):
    """A BitOPs target and a compression ratio that bind (or are out of reach) for a random instance."""
    bitops_bits = tuple(int(b) for b in rng.integers(min(bits), max(bits) + 1, 2) - (rng.random() < 0.15))
    ratio = float(rng.uniform(32 / max(bits) * 0.9, 32 / min(bits) * 1.1))
    return (bitops_bits if kind in ("bitops", "both") else None), (ratio if kind in ("size", "both") else None)


def check_against_brute_force(seed: int, kind: str, bits=(6, 4, 2)) -> str:
    rng = np.random.default_rng(seed)
    weight, act, macs, counts = random_instance(rng, bits=bits)
    bitops_bits, ratio = settings(rng, kind, bits)
    alpha = float(rng.uniform(0.5, 3))
    fixed = int(rng.integers(0, 100))
    expected = brute_force(weight.tolist(), act.tolist(), list(bits), macs.tolist(), counts.tolist(), alpha,
                           bitops_bits, ratio, fixed)  # fmt: skip
    for solver in SOLVERS:
        result = allocate_bits(weight, act, bits, macs, counts, alpha=alpha, bitops_bits=bitops_bits,
                               compression_ratio=ratio, fixed_weight_count=fixed, solver=solver)  # fmt: skip
        if expected is None:
            assert result.status == "infeasible" and result.reason and result.weight_bits == ()
            continue
        assert result.status == "optimal" and result.solver in (solver, "highs"), (seed, kind, result)
        assert result.objective == pytest.approx(expected[0], rel=1e-12), (seed, kind)
        assert (result.weight_bits, result.act_bits) == expected[1:], (seed, kind)  # ties have probability 0
        w_bits, a_bits = np.array(result.weight_bits), np.array(result.act_bits)
        assert result.bitops == int(np.sum(macs * w_bits * a_bits))
        assert result.size_bits == 8 * fixed + int(np.sum(counts * w_bits))
        assert result.compression_ratio == pytest.approx(32 * (counts.sum() + fixed) / result.size_bits)
        if bitops_bits is not None:
            assert result.bitops <= result.bitops_target == macs.sum() * bitops_bits[0] * bitops_bits[1]
        if ratio is not None:
            assert result.size_bits <= result.size_budget_bits == pytest.approx(32 * (counts.sum() + fixed) / ratio)
    return result.status


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_matches_brute_force_quick(kind: str) -> None:
    statuses = {check_against_brute_force(seed, kind) for seed in range(2)}
    assert statuses <= {"optimal", "infeasible"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_matches_brute_force(kind: str) -> None:
    statuses = [check_against_brute_force(seed, kind) for seed in range(2, 40)]
    assert statuses.count("optimal") >= 19 and "infeasible" in statuses  # both kinds of outcome were checked


@pytest.mark.slow
def test_matches_brute_force_consecutive_and_unordered_bits() -> None:
    for seed in range(12):
        check_against_brute_force(seed, CONSTRAINTS[seed % 3], bits=(3, 5, 4))


def test_near_ties_are_resolved_exactly() -> None:
    """Indicators on a coarse grid plus 1e-9 noise: many policies within 1e-8 of the optimum, one optimum."""
    rng = np.random.default_rng(7)
    bits = (6, 4, 2)
    weight = np.sort(rng.integers(1, 4, (3, 3)), axis=1) + rng.uniform(0, 1e-9, (3, 3))
    act = np.sort(rng.integers(1, 4, (3, 3)), axis=1) + rng.uniform(0, 1e-9, (3, 3))
    macs, counts = np.array([300, 200, 100]), np.array([10, 20, 30])
    expected = brute_force(weight.tolist(), act.tolist(), list(bits), macs.tolist(), counts.tolist(), 1.0, (4, 4),
                           None, 0)  # fmt: skip
    for solver in SOLVERS:
        result = allocate_bits(weight, act, bits, macs, counts, alpha=1.0, bitops_bits=(4, 4), solver=solver)
        assert (result.weight_bits, result.act_bits) == expected[1:]
        assert result.objective == pytest.approx(expected[0], rel=1e-14, abs=0)


def test_outlier_rule_is_the_official_one_for_consecutive_bits() -> None:
    """The official loop: for b in B[:-1], if s[b - 1] < s[b] then b - 1 is forbidden (original values compared)."""
    rng = np.random.default_rng(3)
    bits = (6, 5, 4, 3, 2)
    scores = rng.uniform(0, 1, (200, 5))
    official = np.zeros_like(scores, dtype=bool)
    for layer, row in enumerate(scores):
        by_bits = {b: s for b, s in zip(bits, row)}
        for b in bits[:-1]:
            if by_bits[b - 1] < by_bits[b]:
                official[layer, bits.index(b - 1)] = True
    np.testing.assert_array_equal(forbidden_choices(scores, bits), official)
    assert official.any() and not official[:, 0].any()


def test_outlier_rule_uses_the_next_smaller_candidate() -> None:
    bits = (2, 8, 4)  # any order: columns follow bits
    scores = np.array([[0.9, 0.1, 0.5],   # 4 > 8 fine, 2 > 4 fine
                       [0.3, 0.2, 0.1],   # s(4) < s(8): 4 forbidden; s(2) = 0.3 > s(4): fine
                       [0.05, 0.1, 0.5]])  # s(2) < s(4): 2 forbidden  # fmt: skip
    expected = np.array([[False, False, False], [False, False, True], [True, False, False]])
    np.testing.assert_array_equal(forbidden_choices(scores, bits), expected)


def test_forbidden_choices_are_never_chosen() -> None:
    bits = (6, 4, 2)
    weight = np.array([[0.1, 0.05, 0.9], [0.1, 0.2, 0.3]])  # layer 0: 4 bits cheaper than 6 -> 4 forbidden
    act = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    result = allocate_bits(weight, act, bits, [100, 100], [10, 10], alpha=1.0, bitops_bits=(4, 4))
    # without the rule layer 0 would take W4 (cheapest weight and fits); with it, W6 or W2
    assert result.weight_bits[0] in (6, 2)
    # everything forbidden but 6 bits, under a budget only smaller bits meet: infeasible, said why
    squeezed = allocate_bits(np.array([[0.5, 0.1, 0.0]] * 2), act, bits, [100, 100], [10, 10], alpha=1.0,
                             bitops_bits=(2, 2))  # fmt: skip
    assert squeezed.status == "infeasible" and "BitOPs" in squeezed.reason and squeezed.objective is None


def test_infeasible_settings() -> None:
    rng = np.random.default_rng(1)
    weight, act, macs, counts = random_instance(rng, n_layers=4, outliers=0.0)
    bits = (6, 4, 2)
    below = allocate_bits(weight, act, bits, macs, counts, bitops_bits=(1, 2))  # 2-bit everything exceeds W1A2
    assert below.status == "infeasible" and "BitOPs" in below.reason
    assert below.bitops_target == macs.sum() * 2 and below.bitops is None and below.weight_bits == ()
    small = allocate_bits(weight, act, bits, macs, counts, compression_ratio=16.5, fixed_weight_count=0)
    assert small.status == "infeasible" and "weight bits" in small.reason  # 2 bits is CR 16 at best
    assert small.size_budget_bits == pytest.approx(32 * counts.sum() / 16.5)
    exact = allocate_bits(weight, act, bits, macs, counts, compression_ratio=16.0)
    assert exact.status == "optimal" and exact.weight_bits == (2, 2, 2, 2) and exact.compression_ratio == 16.0


def test_bits_order_does_not_matter() -> None:
    rng = np.random.default_rng(5)
    weight, act, macs, counts = random_instance(rng, n_layers=6, bits=(6, 5, 4, 3, 2))
    forward = allocate_bits(weight, act, (6, 5, 4, 3, 2), macs, counts, bitops_bits=(4, 4), compression_ratio=9.0)
    backward = allocate_bits(weight[:, ::-1], act[:, ::-1], (2, 3, 4, 5, 6), macs, counts, bitops_bits=(4, 4),
                             compression_ratio=9.0)  # fmt: skip
    assert forward.status == "optimal"
    assert (forward.weight_bits, forward.act_bits, forward.objective) == (
        backward.weight_bits, backward.act_bits, backward.objective)  # fmt: skip


def test_bad_arguments_are_value_errors() -> None:
    weight = np.ones((2, 3))
    cases = [
        ({}, "at least one constraint"),
        ({"compression_ratio": 0.0}, "compression ratio must be positive"),
        ({"compression_ratio": math.inf}, "compression ratio must be positive"),
        ({"bitops_bits": (4, 4), "alpha": math.nan}, "alpha must be finite"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            allocate_bits(weight, weight, (6, 4, 2), [1, 2], [1, 2], **options)
    with pytest.raises(ValueError, match="distinct positive"):
        allocate_bits(weight, weight, (4, 4, 2), [1, 2], [1, 2], bitops_bits=(4, 4))
    with pytest.raises(ValueError, match="arrays of one shape"):
        allocate_bits(weight, np.ones((3, 3)), (6, 4, 2), [1, 2], [1, 2], bitops_bits=(4, 4))
    with pytest.raises(ValueError, match="finite"):
        allocate_bits(weight * np.nan, weight, (6, 4, 2), [1, 2], [1, 2], bitops_bits=(4, 4))
    with pytest.raises(ValueError, match="solver must be one of"):
        allocate_bits(weight, weight, (6, 4, 2), [1, 2], [1, 2], bitops_bits=(4, 4), solver="cbc")
    with pytest.raises(ValueError, match="macs must hold 2 non-negative integers"):
        allocate_bits(weight, weight, (6, 4, 2), [1.5, 2], [1, 2], bitops_bits=(4, 4))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:PULP_CBC_CMD is deprecated:DeprecationWarning")  # the CBC that PuLP bundles
def test_matches_pulp_cbc() -> None:
    """A second solver on 12-layer instances (PuLP's CBC, the official search's solver), all choices given to it."""
    pulp = pytest.importorskip("pulp")
    bits = (6, 5, 4, 3, 2)
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        weight, act, macs, counts = random_instance(rng, n_layers=12, bits=bits)
        weight[seed, 2] = weight[seed, 1] * 0.5  # one outlier: W4 of layer `seed` is forbidden
        bitops_bits, ratio = (3, 4), 9.5
        ours = allocate_bits(weight, act, bits, macs, counts, alpha=2.0, bitops_bits=bitops_bits,
                             compression_ratio=ratio, fixed_weight_count=100)  # fmt: skip
        forbidden_w, forbidden_a = forbidden_choices(weight, bits), forbidden_choices(act, bits)
        problem = pulp.LpProblem("bits", pulp.LpMinimize)
        x = {(l, i, j): problem.add_variable(f"x_{l}_{i}_{j}", 0, 1, cat="Binary")
             for l in range(12) for i in range(5) for j in range(5)}  # fmt: skip
        problem += pulp.lpSum((act[l, j] + 2.0 * weight[l, i]) * v for (l, i, j), v in x.items())
        for l in range(12):
            problem += pulp.lpSum(v for (layer, _, _), v in x.items() if layer == l) == 1
        for (l, i, j), v in x.items():
            if forbidden_w[l, i] or forbidden_a[l, j]:
                problem += v == 0
        problem += (pulp.lpSum(int(macs[l]) * bits[i] * bits[j] * v for (l, i, j), v in x.items())
                    <= int(macs.sum()) * 12)  # fmt: skip
        problem += (8 * 100 + pulp.lpSum(int(counts[l]) * bits[i] * v for (l, i, j), v in x.items())
                    <= 32 * (int(counts.sum()) + 100) / ratio)  # fmt: skip
        problem.solve(pulp.PULP_CBC_CMD(msg=0, gapRel=0, gapAbs=0))
        assert pulp.LpStatus[problem.status] == "Optimal" and ours.status == "optimal"
        assert ours.objective == pytest.approx(pulp.value(problem.objective), rel=1e-9)
        assert ours.weight_bits[seed] != 4


@pytest.mark.parametrize("seed", [67, 276])
def test_a_restriction_without_a_policy_keeps_more_choices(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Instances where the choices of zero reduced cost hold no feasible policy: the kept set grows, optimum exact."""
    from quantization import bit_allocation

    solves = []
    solve = bit_allocation._solve_milp
    monkeypatch.setattr(bit_allocation, "_solve_milp", lambda *args: solves.append(solve(*args)) or solves[-1])
    rng = np.random.default_rng(seed)
    n_layers, bits = int(rng.integers(2, 5)), (6, 4, 2)
    weight, act, macs, counts = random_instance(rng, n_layers=n_layers, bits=bits)
    bitops_bits, ratio = settings(rng, "both", bits)
    result = allocate_bits(weight, act, bits, macs, counts, bitops_bits=bitops_bits, compression_ratio=ratio,
                           solver="highs")  # fmt: skip
    expected = brute_force(weight.tolist(), act.tolist(), list(bits), macs.tolist(), counts.tolist(), 2.0,
                           bitops_bits, ratio, 0)  # fmt: skip
    assert solves[0] is None and solves[-1] is not None
    assert (result.objective, result.weight_bits, result.act_bits) == (pytest.approx(expected[0], rel=1e-12),
                                                                      *expected[1:])  # fmt: skip


def _layer_instance(seed: int, n_layers: int, kind: str, bits=(6, 5, 4, 3, 2)):
    """A ResNet-like instance: MACs and weight counts with large common factors, binding constraints."""
    rng = np.random.default_rng(seed)
    weight, act, _, _ = random_instance(rng, n_layers=n_layers, bits=bits)
    macs = rng.integers(1, 64, n_layers) * 4096 * int(rng.choice([1, 49, 196]))
    counts = rng.integers(1, 300, n_layers) * 64
    bitops_bits = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))
    ratio = float(rng.uniform(32 / 5.5, 32 / 2.5))
    return {"weight_scores": weight, "act_scores": act, "bits": bits, "macs": macs, "weight_counts": counts,
            "alpha": float(rng.uniform(0.5, 3)), "bitops_bits": bitops_bits if kind != "size" else None,
            "compression_ratio": ratio if kind != "bitops" else None,
            "fixed_weight_count": int(rng.integers(0, 5000))}


@pytest.mark.slow
@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_dp_matches_highs(kind: str) -> None:
    """The bounded DP against HiGHS on every choice: 10 to 30 layers, five candidates, both outcomes."""
    statuses = []
    for seed in range(8):
        problem = _layer_instance(seed, 10 + 3 * seed, kind)
        dp = allocate_bits(**problem)
        highs = allocate_bits(**problem, solver="highs-full")
        statuses.append(dp.status)
        assert dp.status == highs.status, (seed, dp, highs)
        if dp.status == "optimal":
            assert dp.solver == "dp"
            assert dp.objective == pytest.approx(highs.objective, rel=1e-9, abs=1e-9), seed
    assert "optimal" in statuses


def test_dp_falls_back_to_highs_past_its_label_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantization import bit_allocation

    problem = _layer_instance(3, 14, "both")
    expected = allocate_bits(**problem)
    assert expected.solver == "dp"
    monkeypatch.setattr(bit_allocation, "_MAX_LABELS", 1)  # a count of labels, not a time: deterministic
    fallback = allocate_bits(**problem)
    assert fallback.solver == "highs" and fallback.objective == pytest.approx(expected.objective, rel=1e-12)
    assert (fallback.weight_bits, fallback.act_bits) == (expected.weight_bits, expected.act_bits)


def test_dp_ceilings_that_find_nothing_or_end_above_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance whose label passes find no policy, then one above the ceiling, then the optimum; as HiGHS."""
    from quantization import bit_allocation

    outcomes = []
    label_pass = bit_allocation._label_pass

    def traced(problem, layers, multipliers, tables, offsets, ceiling):
        slots = label_pass(problem, layers, multipliers, tables, offsets, ceiling)
        cost = problem.cost[np.arange(slots.size), slots].sum() if slots.size else math.inf
        outcomes.append("none" if slots.size == 0 else "below" if cost <= ceiling else "above")
        return slots

    monkeypatch.setattr(bit_allocation, "_label_pass", traced)
    problem = _layer_instance(3, 19, "both")
    dp = allocate_bits(**problem)
    assert outcomes == ["none", "above", "below"] and dp.solver == "dp"
    highs = allocate_bits(**problem, solver="highs-full")
    assert (dp.weight_bits, dp.act_bits) == (highs.weight_bits, highs.act_bits)
    assert dp.objective == pytest.approx(highs.objective, rel=1e-12)
