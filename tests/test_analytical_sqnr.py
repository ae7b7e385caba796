"""The analytical study (studies/analytical_sqnr.py, analytical_sqnr.py) against independent computations.

References: scipy.stats densities, quantiles and moments; scipy.integrate.quad of the error
integrands built from the foundation's own quantizer; a brute-force grid integral; Lloyd's
algorithm; and Monte Carlo through the weight study's per-tensor code.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.stats
import torch
from click.testing import CliRunner, Result
from matplotlib.image import imread

from analytical_sqnr import DEFAULT_DISTRIBUTIONS, main
from quant_pruning_weights_sqnr import main as weight_study_main
from quantization.quantizers import params_from_range, quantize_dequantize
from studies import analytical_sqnr as an
from studies import analytical_sqnr_plots as plots

# (spec, the same distribution in scipy.stats, truncation c or None)
REFERENCES = [
    ("gaussian", scipy.stats.norm(), None),
    ("laplace", scipy.stats.laplace(), None),
    ("uniform", scipy.stats.uniform(loc=-1.0, scale=2.0), None),
    ("student_t:3", scipy.stats.t(3.0), None),
    ("student_t:2.5", scipy.stats.t(2.5), None),
    ("student_t:7", scipy.stats.t(7.0), None),
    ("truncated_student_t:3:10", scipy.stats.t(3.0), 10.0),
    ("truncated_student_t:5:1.5", scipy.stats.t(5.0), 1.5),
    ("truncated_student_t:1.5:4", scipy.stats.t(1.5), 4.0),  # nu <= 2: the quadrature fallback
]
FAST_SPECS = [spec for spec, _, _ in REFERENCES if spec != "truncated_student_t:1.5:4"]
INTERVALS = [
    (-np.inf, np.inf), (-1.3, 0.4), (0.2, 2.5), (-5.0, -0.1), (1.0, np.inf), (-np.inf, -2.0), (0.0, 0.3), (0.7, 0.7),
]  # fmt: skip
QUAD = {"epsabs": 1e-14, "epsrel": 1e-12, "limit": 500}


def reference_pdf(frozen, c: float | None):
    """scipy's density, restricted to [-c, c] and renormalised when truncated."""
    if c is None:
        return frozen.pdf
    mass = frozen.cdf(c) - frozen.cdf(-c)
    return lambda w: frozen.pdf(w) / mass if abs(w) <= c else 0.0


def quad_moment(pdf, k: int, lo: float, hi: float, c: float | None) -> float:
    """int_lo^hi w^k pdf(w) dw, split at 0 (and clipped to the support)."""
    if c is not None:
        lo, hi = max(lo, -c), min(hi, c)
    pieces = [(lo, min(hi, 0.0)), (max(lo, 0.0), hi)]
    return sum(scipy.integrate.quad(lambda w: w**k * pdf(w), a, b, **QUAD)[0] for a, b in pieces if b > a)


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize(("spec", "frozen", "c"), REFERENCES, ids=[spec for spec, _, _ in REFERENCES])
@pytest.mark.slow
def test_partial_moments_match_numerical_integration(spec: str, frozen, c: float | None) -> None:
    dist = an.parse_distribution(spec)
    pdf = reference_pdf(frozen, c)
    lows, highs = np.array(INTERVALS).T
    moments = dist.partial_moments(lows, highs)
    for k in range(3):
        expected = [quad_moment(pdf, k, lo, hi, c) for lo, hi in INTERVALS]
        np.testing.assert_allclose(moments[k], expected, rtol=1e-9, atol=1e-13, err_msg=f"M{k}")


@pytest.mark.parametrize(("spec", "frozen", "c"), REFERENCES, ids=[spec for spec, _, _ in REFERENCES])
def test_pdf_and_magnitude_quantile_match_scipy(spec: str, frozen, c: float | None) -> None:
    dist = an.parse_distribution(spec)
    w = np.linspace(-6.0, 6.0, 41)
    np.testing.assert_allclose(dist.pdf(w), [reference_pdf(frozen, c)(x) for x in w], rtol=1e-12, atol=1e-300)
    p = np.array([1e-12, 1e-6, 0.01, 0.125, 0.5, 0.9, 1.0])
    t = dist.abs_isf(p)
    if c is None:
        exceed = 2.0 * frozen.sf(t)
    else:
        exceed = 2.0 * (frozen.sf(t) - frozen.sf(c)) / (frozen.cdf(c) - frozen.cdf(-c))
    np.testing.assert_allclose(exceed, p, rtol=1e-8, atol=1e-15)


UNTRUNCATED = [(spec, frozen) for spec, frozen, c in REFERENCES if c is None]


@pytest.mark.parametrize(("spec", "frozen"), UNTRUNCATED, ids=[spec for spec, _ in UNTRUNCATED])
def test_second_moment_and_kurtosis_match_scipy_stats(spec: str, frozen) -> None:
    """Exact formulas against scipy.stats' moments (excess kurtosis: scipy's 'k'; inf for nu <= 4)."""
    dist = an.parse_distribution(spec)
    variance, kurtosis = (float(value) for value in frozen.stats(moments="vk"))
    assert dist.second_moment() == pytest.approx(variance, rel=1e-14)
    if math.isfinite(kurtosis):
        assert dist.excess_kurtosis() == pytest.approx(kurtosis, rel=1e-14)
    else:
        assert dist.excess_kurtosis() == math.inf


@pytest.mark.parametrize(("nu", "c"), [(3.0, 10.0), (3.0, 500.0), (5.0, 1.5), (1.5, 4.0)])
def test_truncated_student_t_kurtosis_matches_scipy_integration(nu: float, c: float) -> None:
    frozen = scipy.stats.t(nu)
    m2 = frozen.expect(lambda w: w**2, lb=-c, ub=c, conditional=True)
    m4 = frozen.expect(lambda w: w**4, lb=-c, ub=c, conditional=True)
    dist = an.TruncatedStudentT(nu, c)
    assert dist.second_moment() == pytest.approx(m2, rel=1e-10)
    assert dist.excess_kurtosis() == pytest.approx(m4 / m2**2 - 3.0, rel=1e-8)


@pytest.mark.slow
def test_truncated_student_t_kurtosis_matches_monte_carlo() -> None:
    """A second, sampling-based check: at c = 10 the sample kurtosis of 10^6 draws varies by about 0.6%."""
    dist = an.TruncatedStudentT(3.0, 10.0)
    samples = dist.sample(10**6, seed=1)
    assert scipy.stats.kurtosis(samples) == pytest.approx(dist.excess_kurtosis(), rel=0.03)
    assert np.abs(samples).max() <= 10.0


# --------------------------------------------------------------------------- pruning and quantization


@pytest.mark.slow
def test_gaussian_pruning_matches_closed_form() -> None:
    """E[w^2 1{|w| < t}] = (2 Phi(t) - 1) - 2 t phi(t) with P(|w| < t) = 1 - b/16."""
    for n_bits in range(2, 17):
        t = scipy.stats.norm.ppf(1.0 - n_bits / 32.0)
        expected = (2.0 * scipy.stats.norm.cdf(t) - 1.0) - 2.0 * t * scipy.stats.norm.pdf(t)
        assert an.pruning_threshold(an.Gaussian(), n_bits) == pytest.approx(t, rel=1e-12, abs=1e-15)
        assert an.pruning_mse(an.Gaussian(), n_bits) == pytest.approx(expected, rel=1e-10, abs=1e-15)
    assert an.compare(an.Gaussian(), 16).pruning_sqnr_db == math.inf  # sparsity 0: nothing is pruned


@pytest.mark.parametrize("spec", ["gaussian", "laplace", "uniform", "student_t:3", "truncated_student_t:3:10"])
@pytest.mark.parametrize("n_bits", [2, 3, 5])
def test_quantization_mse_matches_integral_of_the_foundation_quantizer(spec: str, n_bits: int) -> None:
    """quad of (w - Q(w))^2 p(w), Q = quantization.quantizers' symmetric grid, split at Q's bin edges."""
    dist = an.parse_distribution(spec)
    q_max = 2 ** (n_bits - 1) - 1
    for threshold in (0.7, 1.3, 2.6):
        limit = torch.tensor(threshold * math.sqrt(dist.second_moment()), dtype=torch.float64)
        params = params_from_range(-limit, limit, n_bits, "symmetric")
        step = float(params.step_size)
        edges = (np.arange(-q_max - 1, q_max) + 0.5) * step
        support = dist.support_max  # quad maps an infinite end onto a finite interval
        breaks = [-support, -3.0 * float(limit), 0.0, 3.0 * float(limit), support]
        points = np.unique(np.clip(np.concatenate([breaks, edges]), -support, support))

        def integrand(w: float, params=params) -> float:
            x = torch.tensor([w], dtype=torch.float64)
            return float((x - quantize_dequantize(x, params)) ** 2) * float(dist.pdf(w))

        expected = sum(scipy.integrate.quad(integrand, a, b, **QUAD)[0] for a, b in itertools.pairwise(points))
        assert float(an.quantization_mse(dist, n_bits, float(limit))) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "spec", ["gaussian", "laplace", "uniform", "student_t:3", "student_t:2.2", "truncated_student_t:3:300"]
)
@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_optimal_threshold_is_the_global_minimum(spec: str, n_bits: int) -> None:
    """No threshold of a dense log grid over the whole search range, nor of a fine grid around T, does better."""
    dist = an.parse_distribution(spec)
    threshold, mse = an.optimal_threshold(dist, n_bits)
    search = an.threshold_grid(dist)
    candidates = np.concatenate([np.geomspace(search[0], search[-1], 5000), threshold * np.linspace(0.8, 1.2, 2001)])
    errors = an.quantization_mse(dist, n_bits, candidates)
    assert mse <= errors.min() * (1.0 + 1e-12)
    assert search[0] < threshold < search[-1]


@pytest.mark.slow
def test_gaussian_four_bits_against_brute_force_and_lloyd_max() -> None:
    """INT4 on N(0, 1) against a brute-force integral, and the often quoted 20.2 dB.

    The brute force: Simpson's rule over a fine grid of w with numpy's round/clip quantizer,
    minimised over a fine grid of T. 20.2 dB is the optimal *non-uniform* 16-level (Lloyd-Max)
    quantizer, computed here by Lloyd's algorithm; a uniform grid cannot reach it: the paper's
    INT4 grid (levels -8s..7s) gives 19.26 dB.
    """
    w = np.linspace(-12.0, 12.0, 240_001)
    density = scipy.stats.norm.pdf(w)

    def brute_force_mse(threshold: float) -> float:
        step = threshold / 7.0
        quantized = np.clip(np.round(w / step), -8, 7) * step
        return scipy.integrate.simpson((w - quantized) ** 2 * density, x=w)

    thresholds = np.linspace(2.2, 2.55, 351)
    errors = np.array([brute_force_mse(t) for t in thresholds])
    best = int(np.argmin(errors))
    result = an.compare(an.Gaussian(), 4)
    assert result.quant_sqnr_db == pytest.approx(-10 * np.log10(errors[best]), abs=2e-4)
    assert result.quant_threshold == pytest.approx(thresholds[best], abs=2e-3)

    levels = np.linspace(-2.0, 2.0, 16)
    for _ in range(3000):  # Lloyd: edges at mid-points, levels at the bins' centroids
        edges = np.concatenate([[-np.inf], 0.5 * (levels[1:] + levels[:-1]), [np.inf]])
        mass = np.diff(scipy.stats.norm.cdf(edges))
        levels = -np.diff(scipy.stats.norm.pdf(edges)) / mass
    lloyd_max_db = -10 * np.log10(1.0 - np.sum(mass * levels**2))  # centroids: error = E[w^2] - sum P L^2
    assert lloyd_max_db == pytest.approx(20.22, abs=0.01)  # Max (1960), 16 levels: MSE 0.009497
    assert lloyd_max_db - 1.0 < result.quant_sqnr_db < lloyd_max_db


@pytest.mark.slow
def test_sixteen_bits_matches_the_high_resolution_approximation() -> None:
    """At b = 16 (32768 bins per side) the error is s^2/12 inside the grid plus the exact clipping error."""
    dist = an.Gaussian()
    threshold, mse = an.optimal_threshold(dist, 16)
    step = threshold / (2**15 - 1)
    top, bottom = threshold, threshold + step  # |end levels|
    inside = step**2 / 12.0 * (1.0 - scipy.stats.norm.sf(top - step / 2) - scipy.stats.norm.sf(bottom - step / 2))

    def clipping_error(level: float) -> float:
        def integrand(w: float) -> float:
            return (w - level) ** 2 * scipy.stats.norm.pdf(w)

        return scipy.integrate.quad(integrand, level - step / 2, np.inf, **QUAD)[0]

    clipped = clipping_error(top) + clipping_error(bottom)
    assert mse == pytest.approx(inside + clipped, rel=1e-5)


@pytest.mark.parametrize("spec", FAST_SPECS)
def test_both_sqnrs_increase_with_bits(spec: str) -> None:
    table = an.comparison_table([an.parse_distribution(spec)], list(range(2, 11)))
    assert (np.diff(table["quant_sqnr_db"]) > 0).all()
    assert (np.diff(table["pruning_sqnr_db"]) > 0).all()


@pytest.mark.parametrize(
    ("spec", "bits"),
    [("gaussian", (2, 3, 4)), ("truncated_student_t:3:10", (2, 4, 8))],
)
@pytest.mark.slow
def test_integrals_agree_with_monte_carlo_through_the_weight_study(spec: str, bits: tuple[int, ...]) -> None:
    """10^6 seeded samples through studies.weight_sqnr.study_tensor agree within 0.05 dB.

    The sampling noise of the SQNR decides which cases can be held to 0.05 dB with 10^6
    samples. The sample-optimal clipping error rests on the few samples beyond T: for the
    Gaussian the standard deviation over seeds is about 0.01 dB at 2-4 bits but 0.06 dB at
    8 bits. Untruncated heavy tails (Student-t with small nu) have an infinite fourth
    moment, so even the sample mean square converges too slowly; the truncated t keeps
    every moment finite (about 0.01-0.02 dB at every bit-width).
    """
    dist = an.parse_distribution(spec)
    for sampled in an.monte_carlo_sqnr(dist, bits, n_samples=10**6, seed=0):
        exact = an.compare(dist, sampled.bits)
        assert sampled.quant_sqnr_db == pytest.approx(exact.quant_sqnr_db, abs=0.05)
        assert sampled.pruning_sqnr_db == pytest.approx(exact.pruning_sqnr_db, abs=0.05)
        assert sampled.quant_threshold == pytest.approx(exact.quant_threshold, rel=0.02)


# --------------------------------------------------------------------------- crossovers and parsing


def test_crossover_bits_interpolates_the_gap_in_b() -> None:
    assert an.crossover_bits([2, 3, 4], [-1.0, -0.5, 1.5]) == pytest.approx(3.25)
    assert an.crossover_bits([2, 4, 8], [-2.0, 2.0, 5.0]) == pytest.approx(3.0)
    assert math.isnan(an.crossover_bits([2, 3], [0.5, 1.0]))  # quantization wins from the start
    assert math.isnan(an.crossover_bits([2, 3], [-0.5, -1.0]))  # never


def test_crossover_truncation_is_a_tie_inside_the_sweep() -> None:
    c = an.crossover_truncation(an.SWEEP_NU, 2, min(an.SWEEP_C), max(an.SWEEP_C))
    assert an.compare(an.TruncatedStudentT(an.SWEEP_NU, c), 2).gap_db == pytest.approx(0.0, abs=1e-6)
    assert an.compare(an.TruncatedStudentT(an.SWEEP_NU, 0.9 * c), 2).gap_db > 0  # lighter tails: quantization
    assert an.compare(an.TruncatedStudentT(an.SWEEP_NU, 1.1 * c), 2).gap_db < 0  # heavier tails: pruning
    assert math.isnan(an.crossover_truncation(an.SWEEP_NU, 8, min(an.SWEEP_C), max(an.SWEEP_C)))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gaussian", an.Gaussian()),
        (" Laplace ", an.Laplace()),
        ("student_t:3", an.StudentT(3.0)),
        ("truncated_student_t:3:10", an.TruncatedStudentT(3.0, 10.0)),
        ("truncated_student_t:1:2.5", an.TruncatedStudentT(1.0, 2.5)),
    ],
)
def test_parse_distribution(spec: str, expected: an.Distribution) -> None:
    dist = an.parse_distribution(spec)
    assert dist == expected
    assert an.parse_distribution(dist.spec) == dist


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cauchy", "unknown distribution 'cauchy'"),
        ("student_t", "does not match student_t:NU"),
        ("gaussian:1", "does not match gaussian"),
        ("truncated_student_t:3", "does not match truncated_student_t:NU:C"),
        ("student_t:three", "nu 'three' in 'student_t:three' is not a number"),
        ("student_t:2", "student_t needs nu > 2"),
        ("student_t:inf", "student_t needs nu > 2"),
        ("truncated_student_t:3:0", "finite truncation c > 0"),
        ("truncated_student_t:-1:5", "finite nu > 0"),
    ],
)
def test_parse_distribution_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        an.parse_distribution(spec)


def test_bits_outside_the_range_are_refused() -> None:
    for n_bits in (1, 17):
        with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
            an.quantization_mse(an.Gaussian(), n_bits, 1.0)


# --------------------------------------------------------------------------- command line


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_png(path: Path, size_in: tuple[float, float]) -> None:
    image = imread(path)
    assert image.shape == (round(size_in[1] * plots.DPI), round(size_in[0] * plots.DPI), 4)
    assert image[..., :3].std() > 0.05, "blank figure"
    assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    output_dir = tmp_path_factory.mktemp("analytical") / "out"
    return invoke("--output-dir", str(output_dir)), output_dir


@pytest.mark.slow
def test_cli_default_run_writes_tables_and_figures(default_run: tuple[Result, Path]) -> None:
    result, output_dir = default_run
    assert result.exit_code == 0, result.output
    table = pd.read_csv(output_dir / "analytical_sqnr.csv", keep_default_na=False)
    assert list(table.columns) == list(an.CSV_COLUMNS)
    specs = DEFAULT_DISTRIBUTIONS.split(",")
    assert len(table) == len(specs) * 7
    assert table.groupby(["distribution", "parameter"], sort=False).size().tolist() == [7] * len(specs)
    gaussian = table[table["distribution"] == "gaussian"].set_index("bits")
    assert gaussian.loc[4, "quant_sqnr_db"] == pytest.approx(an.compare(an.Gaussian(), 4).quant_sqnr_db, rel=1e-12)
    assert gaussian.loc[4, "sparsity"] == 0.75 and gaussian.loc[4, "parameter"] == ""
    assert table.loc[table["parameter"] == "nu=3", "kurtosis"].eq(np.inf).all()

    sweep = pd.read_csv(output_dir / "analytical_sqnr_kurtosis_sweep.csv")
    assert list(sweep.columns) == list(an.CSV_COLUMNS) and len(sweep) == len(an.SWEEP_C) * 7
    assert sweep["kurtosis"].min() < 0 and sweep["kurtosis"].max() > 100
    crossovers = pd.read_csv(output_dir / "analytical_sqnr_crossover.csv")
    assert list(crossovers.columns) == list(an.CROSSOVER_COLUMNS) and crossovers["bits"].tolist() == list(range(2, 9))
    assert crossovers["crossover_kurtosis"].iloc[0] < crossovers["crossover_kurtosis"].iloc[1]

    assert_png(output_dir / "analytical_sqnr_vs_bits.png", plots.VS_BITS_SIZE_IN)
    assert_png(output_dir / "analytical_sqnr_phase_diagram.png", plots.PHASE_SIZE_IN)
    assert not (output_dir / "analytical_sqnr_weights_overlay.png").exists()
    assert not list(output_dir.glob(".*.tmp"))
    for path in output_dir.iterdir():
        assert str(path) in result.output
    assert "INT2 vs 87.5% sparsity: pruning is better above excess kurtosis" in result.output


@pytest.mark.slow
def test_cli_overlays_the_weight_study(tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    study = CliRunner().invoke(
        weight_study_main,
        [
            "--models", "efficientnet_lite0", "--bits", "2", "--no-progress", "--device", "cpu",
            "--output-dir", str(weights_dir),
        ],
    )
    assert study.exit_code == 0, study.output
    output_dir = tmp_path / "out"
    result = invoke("--output-dir", str(output_dir), "--bits", "2,3", "--distributions", "gaussian",
                    "--weights-dir", str(weights_dir))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_png(output_dir / "analytical_sqnr_weights_overlay.png", plots.overlay_layout(1)[3])  # 2 bits, in both runs
    assert str(output_dir / "analytical_sqnr_weights_overlay.pdf") in result.output
    assert len(pd.read_csv(output_dir / "analytical_sqnr.csv")) == 2

    other_bits = invoke("--output-dir", str(output_dir), "--bits", "4,5", "--weights-dir", str(weights_dir))
    assert_usage_error(other_bits, "are for bits 2, none of --bits")


def assert_usage_error(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--distributions", "gaussian,cauchy"], "unknown distribution 'cauchy'"),
        (["--distributions", "student_t:2"], "student_t needs nu > 2"),
        (["--distributions", "student_t:1.5"], "truncate it instead: truncated_student_t:NU:C"),
        (["--distributions", "truncated_student_t:3:0"], "c > 0"),
        (["--distributions", "truncated_student_t:3:-2"], "c > 0"),
        (["--distributions", "student_t"], "does not match student_t:NU"),
        (["--distributions", "student_t:x"], "is not a number"),
        (["--distributions", "gaussian,,laplace"], "not a comma-separated list"),
        (["--bits", "1"], "1 is outside 2..16"),
        (["--bits", "4,17"], "17 is outside 2..16"),
        (["--bits", "four"], "not a comma-separated list of integers"),
    ],
)
def test_bad_input_is_a_usage_error(args: list[str], message: str, tmp_path: Path) -> None:
    assert_usage_error(invoke("--output-dir", str(tmp_path), *args), message)
    assert not list(tmp_path.iterdir())


def test_missing_or_empty_weights_dir_is_a_usage_error(tmp_path: Path) -> None:
    assert_usage_error(invoke("--weights-dir", str(tmp_path / "absent")), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_usage_error(invoke("--weights-dir", str(tmp_path / "empty")), "no complete weight-study results")


def test_help_lists_the_options() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--output-dir", "--bits", "--distributions", "--weights-dir"):
        assert option in result.output
