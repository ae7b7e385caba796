"""Expected SQNR of INT-b quantization against magnitude pruning for known weight distributions.

The analytical argument of the paper (Sec. 2). For a symmetric weight density ``p(w)`` and a
bit-width ``b``:

* **pruning** at the same compression as INT-b against 16-bit floats, sparsity ``1 - b/16``:
  the threshold ``t`` with ``P(|w| < t) = 1 - b/16`` and the error
  ``E_prune = int_{-t}^{t} w^2 p(w) dw`` (everything below ``t`` in magnitude is set to 0);
* **quantization** on the weight study's symmetric signed grid: integers
  ``k in [-2^(b-1), 2^(b-1) - 1]``, levels ``k s`` with step ``s = T / (2^(b-1) - 1)`` for the
  clipping threshold ``T`` (the top level is ``T``, the bottom one ``-T - s``). A value goes to
  its nearest level; the mid-points ``(k + 1/2) s`` between levels are the bin edges and the
  outermost bins reach to ``+-inf`` (clipping). The error

      E_quant(T) = sum_bins int_bin (w - L)^2 p(w) dw = sum_bins (M2 - 2 L M1 + L^2 M0),

  with ``Mk = int_bin w^k p(w) dw`` the bin's partial moments, is minimised over ``T``
  (:func:`optimal_threshold`);
* ``SQNR = 10 log10(E[w^2] / E)`` dB for either error.

SQNR is scale invariant, so every distribution is used in a standard form (unit scale):
``gaussian`` N(0, 1); ``laplace`` with density ``exp(-|w|)/2`` (variance 2); ``uniform`` on
``[-1, 1]`` (variance 1/3); ``student_t`` with ``nu`` degrees of freedom and unit scale
(variance ``nu/(nu-2)``, finite for ``nu > 2``); ``truncated_student_t``, that Student-t
restricted to ``[-c, c]`` and renormalised, whose moments are all finite. Kurtosis is always the *excess*
kurtosis ``E[w^4]/E[w^2]^2 - 3`` (0 for the Gaussian), the quantity the weight study reports
as ``sample_kurtosis``; it is ``inf`` where the fourth moment diverges (Student-t, ``nu <= 4``).

All integrals rest on the upper tail moments ``S_k(x) = int_x^inf w^k p(w) dw`` (``x >= 0``,
``k = 0, 1, 2``), in closed form where one exists and by :func:`scipy.integrate.quad`
otherwise; partial moments over any interval follow from them by symmetry. Everything is
float64 numpy, deterministic, with no I/O.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import integrate, optimize, special

from studies.compression import pruning_sparsity, sqnr_db

TailMoments = tuple[np.ndarray, np.ndarray, np.ndarray]

MIN_BITS, MAX_BITS = 2, 16
# The optimal clipping threshold is searched on a log grid from SEARCH_LOW_RMS * rms(w) up to
# SEARCH_HIGH_FACTOR times the magnitude exceeded with probability SEARCH_TAIL_PROBABILITY.
SEARCH_LOW_RMS = 1e-2
SEARCH_TAIL_PROBABILITY = 1e-15
SEARCH_HIGH_FACTOR = 2.0
SEARCH_POINTS_PER_DECADE = 40
# Largest (thresholds x bins) array built at once by quantization_mse.
_MAX_CHUNK_ELEMENTS = 1 << 21
# Relative tolerance of numerical integration (the fallback and the fourth moments).
QUAD_RTOL = 1e-12
# The kurtosis sweep: Student-t with SWEEP_NU degrees of freedom truncated at +-c, for these c
# (excess kurtosis from -1.2, near uniform, to about 2200; without truncation it is infinite).
SWEEP_NU = 3.0
SWEEP_C = tuple(np.geomspace(0.5, 3000.0, 49))
CROSSOVER_COLUMNS = ("bits", "crossover_c", "crossover_kurtosis")
CSV_COLUMNS = (
    "distribution", "parameter", "kurtosis", "bits", "sparsity",
    "quant_sqnr_db", "pruning_sqnr_db", "quant_threshold",
)  # fmt: skip


def _finite(x: np.ndarray) -> np.ndarray:
    """``x`` with ``+inf`` replaced by 0: for products ``x^n S(x)`` whose limit at infinity is 0."""
    return np.where(np.isinf(x), 0.0, x)


# ----------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Distribution(ABC):
    """A density symmetric about 0, in its unit-scale standard form.

    Subclasses give :meth:`pdf` and may override the numerical fallbacks of
    :meth:`tail_moments`, :meth:`abs_isf` and :meth:`excess_kurtosis` with closed forms.
    """

    name: ClassVar[str]

    @property
    def support_max(self) -> float:
        """The largest ``|w|`` with non-zero density (``inf`` for an unbounded support)."""
        return math.inf

    @property
    def parameter(self) -> str:
        """The parameters as text, e.g. ``nu=3 c=10`` (empty when there are none)."""
        return ""

    @property
    def spec(self) -> str:
        """The command-line spec that :func:`parse_distribution` turns back into this distribution."""
        return self.name

    @property
    def label(self) -> str:
        """Legend text, e.g. ``Student-t (nu=3)``."""
        return self.name

    @abstractmethod
    def pdf(self, w: np.ndarray) -> np.ndarray:
        """The density ``p(w)``."""

    def tail_moments(self, x: np.ndarray) -> TailMoments:
        """``S_k(x) = int_x^inf w^k p(w) dw`` for ``k = 0, 1, 2`` and every ``x >= 0`` (may be ``inf``).

        Fallback: :func:`scipy.integrate.quad` between consecutive distinct points, summed from
        the top, so that the tails are consistent (non-increasing in ``x``).
        """
        x = np.asarray(x, dtype=np.float64)
        points, inverse = np.unique(np.minimum(x, self.support_max), return_inverse=True)
        bounds = np.append(points, self.support_max)
        tails = []
        for k in range(3):
            pieces = np.array([self._quad_moment(k, lo, hi) for lo, hi in itertools.pairwise(bounds)])
            tails.append(np.cumsum(pieces[::-1])[::-1][inverse].reshape(x.shape))
        return tails[0], tails[1], tails[2]

    def _quad_moment(self, k: int, lo: float, hi: float) -> float:
        """``int_lo^hi w^k p(w) dw`` by adaptive quadrature (0 for an empty interval)."""
        if hi <= lo:
            return 0.0
        value, _ = integrate.quad(lambda w: w**k * float(self.pdf(w)), lo, hi, epsabs=0.0, epsrel=QUAD_RTOL, limit=200)
        return value

    def partial_moments(self, a: np.ndarray, b: np.ndarray) -> TailMoments:
        """``(M0, M1, M2)``: ``Mk = int_a^b w^k p(w) dw`` element-wise, for ``a <= b`` (may be ``+-inf``).

        By symmetry, ``[a, b]`` splits into ``[max(a, 0), max(b, 0)]``, worth ``S_k(max(a, 0)) -
        S_k(max(b, 0))``, and the mirror image of ``[min(a, 0), min(b, 0)]``, worth
        ``(-1)^k (S_k(max(-b, 0)) - S_k(max(-a, 0)))``.
        """
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        points = np.stack([np.maximum(a, 0.0), np.maximum(b, 0.0), np.maximum(-b, 0.0), np.maximum(-a, 0.0)])
        m0, m1, m2 = ((t[0] - t[1]) + (-1) ** k * (t[2] - t[3]) for k, t in enumerate(self.tail_moments(points)))
        return m0, m1, m2

    def abs_isf(self, p: np.ndarray) -> np.ndarray:
        """The magnitude ``t`` with ``P(|w| > t) = p``, i.e. ``2 S_0(t) = p`` (fallback: Brent's root finder)."""

        def excess(t: float, probability: float) -> float:
            return 2.0 * float(self.tail_moments(np.array(t))[0]) - probability

        def solve(probability: float) -> float:
            if probability >= 1.0:
                return 0.0
            if probability <= 0.0:
                return self.support_max
            high = self.support_max if math.isfinite(self.support_max) else 1.0
            while excess(high, probability) > 0.0:
                high *= 2.0
            return optimize.brentq(excess, 0.0, high, args=(probability,), xtol=1e-14 * high, rtol=1e-14)

        return np.vectorize(solve, otypes=[np.float64])(np.asarray(p, dtype=np.float64))

    def second_moment(self) -> float:
        """``E[w^2] = 2 S_2(0)``."""
        return 2.0 * float(self.tail_moments(np.array(0.0))[2])

    def excess_kurtosis(self) -> float:
        """``E[w^4] / E[w^2]^2 - 3``, with ``E[w^4] = 2 int_0^inf w^4 p(w) dw`` by quadrature (fallback)."""
        return 2.0 * self._quad_moment(4, 0.0, self.support_max) / self.second_moment() ** 2 - 3.0

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` independent draws (inverse transform: ``|w| = abs_isf(u)``, ``u ~ U(0, 1]``, random sign)."""
        rng = np.random.default_rng(seed)
        magnitudes = self.abs_isf(1.0 - rng.random(n))
        return np.where(rng.random(n) < 0.5, -magnitudes, magnitudes)


@dataclass(frozen=True)
class Gaussian(Distribution):
    """N(0, 1): ``S_0 = Phi(-x)``, ``S_1 = phi(x)``, ``S_2 = x phi(x) + Phi(-x)``; excess kurtosis 0."""

    name: ClassVar[str] = "gaussian"

    @property
    def label(self) -> str:
        return "Gaussian"

    def pdf(self, w: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * np.square(w)) / math.sqrt(2.0 * math.pi)

    def tail_moments(self, x: np.ndarray) -> TailMoments:
        x = np.asarray(x, dtype=np.float64)
        s0, s1 = special.ndtr(-x), self.pdf(x)
        return s0, s1, _finite(x) * s1 + s0

    def abs_isf(self, p: np.ndarray) -> np.ndarray:
        return -special.ndtri(0.5 * np.asarray(p, dtype=np.float64))

    def second_moment(self) -> float:
        return 1.0

    def excess_kurtosis(self) -> float:
        return 0.0


@dataclass(frozen=True)
class Laplace(Distribution):
    """Density ``exp(-|w|)/2``: ``S_k(x) = e^-x / 2 * (1, x + 1, x^2 + 2x + 2)``; variance 2, excess kurtosis 3."""

    name: ClassVar[str] = "laplace"

    @property
    def label(self) -> str:
        return "Laplace"

    def pdf(self, w: np.ndarray) -> np.ndarray:
        return 0.5 * np.exp(-np.abs(w))

    def tail_moments(self, x: np.ndarray) -> TailMoments:
        x = np.asarray(x, dtype=np.float64)
        s0, x = 0.5 * np.exp(-x), _finite(x)
        return s0, (x + 1.0) * s0, (x * x + 2.0 * x + 2.0) * s0

    def abs_isf(self, p: np.ndarray) -> np.ndarray:
        return -np.log(np.asarray(p, dtype=np.float64))

    def second_moment(self) -> float:
        return 2.0

    def excess_kurtosis(self) -> float:
        return 3.0


@dataclass(frozen=True)
class Uniform(Distribution):
    """Uniform on ``[-1, 1]``: ``S_k = ((1 - m)/2, (1 - m^2)/4, (1 - m^3)/6)`` with ``m = min(x, 1)``.

    Variance 1/3, excess kurtosis -6/5.
    """

    name: ClassVar[str] = "uniform"

    @property
    def support_max(self) -> float:
        return 1.0

    @property
    def label(self) -> str:
        return "uniform"

    def pdf(self, w: np.ndarray) -> np.ndarray:
        return np.where(np.abs(w) <= 1.0, 0.5, 0.0)

    def tail_moments(self, x: np.ndarray) -> TailMoments:
        m = np.minimum(np.asarray(x, dtype=np.float64), 1.0)
        return (1.0 - m) / 2.0, (1.0 - m**2) / 4.0, (1.0 - m**3) / 6.0

    def abs_isf(self, p: np.ndarray) -> np.ndarray:
        return 1.0 - np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)

    def second_moment(self) -> float:
        return 1.0 / 3.0

    def excess_kurtosis(self) -> float:
        return -1.2


def _student_t_log_norm(nu: float) -> float:
    """``log C_nu`` with ``C_nu = Gamma((nu+1)/2) / (sqrt(nu pi) Gamma(nu/2))``."""
    return special.gammaln(0.5 * (nu + 1.0)) - special.gammaln(0.5 * nu) - 0.5 * math.log(nu * math.pi)


def _student_t_pdf(w: np.ndarray, nu: float) -> np.ndarray:
    """``f_nu(w) = C_nu (1 + w^2/nu)^(-(nu+1)/2)``."""
    return np.exp(_student_t_log_norm(nu) - 0.5 * (nu + 1.0) * np.log1p(np.square(w) / nu))


def _student_t_tails(x: np.ndarray, nu: float) -> TailMoments:
    """Upper tail moments of the unit-scale Student-t, ``nu > 2``.

    * ``S_0(x) = F_nu(-x)``;
    * ``S_1(x) = f_nu(x) (nu + x^2)/(nu - 1) = C_nu nu/(nu - 1) (1 + x^2/nu)^(-(nu-1)/2)``, since
      ``-d/dw [f_nu(w) (nu + w^2)/(nu - 1)] = w f_nu(w)``;
    * ``S_2(x) = x S_1(x) + nu/(nu-2) F_{nu-2}(-x sqrt((nu-2)/nu))``, by parts
      (``int_x^inf w (w f_nu) dw = x S_1(x) + int_x^inf S_1``), because ``S_1(w)`` is ``nu/(nu-2)``
      times the density of ``v sqrt(nu/(nu-2))`` with ``v ~ t_{nu-2}``. Equivalently
      ``int_-inf^x w^2 f_nu = nu/(nu-2) F_{nu-2}(x sqrt((nu-2)/nu)) - x f_nu(x) (nu + x^2)/(nu - 1)``.
    """
    x = np.asarray(x, dtype=np.float64)
    s1 = nu / (nu - 1.0) * np.exp(_student_t_log_norm(nu) - 0.5 * (nu - 1.0) * np.log1p(np.square(x) / nu))
    s2 = _finite(x) * s1 + nu / (nu - 2.0) * special.stdtr(nu - 2.0, -x * math.sqrt((nu - 2.0) / nu))
    return special.stdtr(nu, -x), s1, s2


@dataclass(frozen=True)
class StudentT(Distribution):
    """Student-t with ``nu > 2`` degrees of freedom, unit scale.

    Variance ``nu/(nu-2)``; excess kurtosis ``6/(nu-4)``, ``inf`` for ``nu <= 4``.
    """

    nu: float
    name: ClassVar[str] = "student_t"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.nu) and self.nu > 2.0):
            raise ValueError(
                f"student_t needs nu > 2 for a finite second moment (got nu={self.nu:g}); "
                "truncate it instead: truncated_student_t:NU:C"
            )

    @property
    def parameter(self) -> str:
        return f"nu={self.nu:g}"

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.nu:g}"

    @property
    def label(self) -> str:
        return f"Student-t ($\\nu$={self.nu:g})"

    def pdf(self, w: np.ndarray) -> np.ndarray:
        return _student_t_pdf(w, self.nu)

    def tail_moments(self, x: np.ndarray) -> TailMoments:
        return _student_t_tails(x, self.nu)

    def abs_isf(self, p: np.ndarray) -> np.ndarray:
        return -special.stdtrit(self.nu, 0.5 * np.asarray(p, dtype=np.float64))

    def second_moment(self) -> float:
        return self.nu / (self.nu - 2.0)

    def excess_kurtosis(self) -> float:
        return 6.0 / (self.nu - 4.0) if self.nu > 4.0 else math.inf


@dataclass(frozen=True)
class TruncatedStudentT(Distribution):
    """Student-t with ``nu > 0`` degrees of freedom restricted to ``[-c, c]`` and renormalised.

    Density ``f_nu(w) / Z`` for ``|w| <= c``, ``Z = 1 - 2 F_nu(-c)``. For ``nu > 2`` the tail
    moments are the Student-t's clipped at ``c``: ``S_k(x) = (S_k^t(min(x, c)) - S_k^t(c)) / Z``;
    for ``nu <= 2``, where the Student-t's own ``S_2`` diverges, they come from quadrature (slower).
    Every moment is finite, and for ``nu <= 4`` the excess kurtosis grows without bound with
    ``c``; it is ``2 int_0^c w^4 p(w) dw / E[w^2]^2 - 3`` by quadrature.
    """

    nu: float
    c: float
    name: ClassVar[str] = "truncated_student_t"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.nu) and self.nu > 0.0):
            raise ValueError(f"truncated_student_t needs a finite nu > 0 (got nu={self.nu:g})")
        if not (math.isfinite(self.c) and self.c > 0.0):
            raise ValueError(f"truncated_student_t needs a finite truncation c > 0 (got c={self.c:g})")

    @property
    def support_max(self) -> float:
        return self.c

    @property
    def parameter(self) -> str:
        return f"nu={self.nu:g} c={self.c:g}"

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.nu:g}:{self.c:g}"

    @property
    def label(self) -> str:
        return f"Student-t ($\\nu$={self.nu:g}) truncated at $\\pm${self.c:g}"

    @property
    def mass(self) -> float:
        """``Z = P(|v| <= c)`` for ``v ~ t_nu``."""
        return 1.0 - 2.0 * float(special.stdtr(self.nu, -self.c))

    def pdf(self, w: np.ndarray) -> np.ndarray:
        return np.where(np.abs(w) <= self.c, _student_t_pdf(w, self.nu) / self.mass, 0.0)

    def tail_moments(self, x: np.ndarray) -> TailMoments:
        if self.nu <= 2.0:
            return super().tail_moments(x)
        inside = _student_t_tails(np.minimum(np.asarray(x, dtype=np.float64), self.c), self.nu)
        at_c = _student_t_tails(np.array(self.c), self.nu)
        mass = self.mass
        s0, s1, s2 = ((tail - tail_c) / mass for tail, tail_c in zip(inside, at_c))
        return s0, s1, s2

    def abs_isf(self, p: np.ndarray) -> np.ndarray:
        """``t`` with ``F_nu(-t) = p Z / 2 + F_nu(-c)``."""
        p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
        return -special.stdtrit(self.nu, 0.5 * p * self.mass + special.stdtr(self.nu, -self.c))


DISTRIBUTIONS: dict[str, type[Distribution]] = {
    cls.name: cls for cls in (Gaussian, Laplace, Uniform, StudentT, TruncatedStudentT)
}
SPEC_USAGE = "gaussian, laplace, uniform, student_t:NU, truncated_student_t:NU:C"


def parse_distribution(spec: str) -> Distribution:
    """A distribution from a spec like ``gaussian``, ``student_t:3`` or ``truncated_student_t:3:10``.

    Raises:
        ValueError: with a one-line message for an unknown name, a wrong number of parameters,
            a parameter that is not a number, or parameters out of range.
    """
    name, *texts = (part.strip() for part in spec.strip().split(":"))
    cls = DISTRIBUTIONS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown distribution '{name}' (valid: {SPEC_USAGE})")
    fields = [field.name for field in dataclasses.fields(cls)]
    if len(texts) != len(fields):
        usage = ":".join([cls.name, *(field.upper() for field in fields)])
        raise ValueError(f"'{spec}' does not match {usage}")
    values = []
    for field, text in zip(fields, texts):
        try:
            values.append(float(text))
        except ValueError:
            raise ValueError(f"{field} '{text}' in '{spec}' is not a number") from None
    return cls(*values)


# ----------------------------------------------------------------------------- the two errors


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an integer in ``MIN_BITS..MAX_BITS``."""
    if not (isinstance(bits, (int, np.integer)) and MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits}")


def pruning_threshold(dist: Distribution, bits: int) -> float:
    """The magnitude ``t`` with ``P(|w| < t) = 1 - b/16``, i.e. ``P(|w| >= t) = b/16``."""
    check_bits(bits)
    return float(dist.abs_isf(bits / 16.0))


def pruning_mse(dist: Distribution, bits: int) -> float:
    """``int_{-t}^{t} w^2 p(w) dw`` at ``t`` = :func:`pruning_threshold`.

    For the unit Gaussian this is ``(2 Phi(t) - 1) - 2 t phi(t)``.
    """
    t = pruning_threshold(dist, bits)
    return float(dist.partial_moments(-t, t)[2])


def quantization_mse(dist: Distribution, bits: int, thresholds: np.ndarray | float) -> np.ndarray:
    """Expected squared error of INT-b quantization with clipping threshold ``T``, for each ``T``.

    With ``q = 2^(b-1) - 1`` and ``s = T/q``, fold the line onto ``|w|``: bin ``j = 0..q+1`` is
    ``[(j - 1/2) s, (j + 1/2) s]`` (``[0, s/2]`` for ``j = 0``, ``[(q + 1/2) s, inf)`` for
    ``j = q + 1``). A positive ``w`` in bin ``j`` goes to level ``min(j, q) s`` (the top level is
    ``T = q s``), a negative one to ``-j s`` (the bottom level is ``-(q + 1) s``), so by symmetry

        E(T) = sum_j [2 M2_j - 2 M1_j (P_j + N_j) + M0_j (P_j^2 + N_j^2)],

    ``P_j = min(j, q) s``, ``N_j = j s``, ``Mk_j = S_k(lower edge) - S_k(upper edge)``: the sum
    over the ``2^b`` levels ``L`` of ``int (w - L)^2 p(w) dw`` over each level's bin.
    """
    check_bits(bits)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    flat = thresholds.reshape(-1)
    q = 2 ** (bits - 1) - 1
    bins = np.arange(q + 2, dtype=np.float64)
    half_integers = np.arange(q + 1, dtype=np.float64) + 0.5
    errors = np.empty_like(flat)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (q + 3))
    for start in range(0, flat.size, chunk):
        step = flat[start : start + chunk, None] / q
        rows = step.shape[0]
        edges = np.concatenate([np.zeros((rows, 1)), half_integers * step, np.full((rows, 1), np.inf)], axis=1)
        m0, m1, m2 = (tail[:, :-1] - tail[:, 1:] for tail in dist.tail_moments(edges))
        positive, negative = np.minimum(bins, q) * step, bins * step
        terms = 2.0 * m2 - 2.0 * m1 * (positive + negative) + m0 * (positive**2 + negative**2)
        errors[start : start + chunk] = terms.sum(axis=1)
    return errors.reshape(thresholds.shape)


def threshold_grid(dist: Distribution) -> np.ndarray:
    """Log-spaced clipping thresholds, 40 per decade.

    From ``rms(w) / 100`` to twice the magnitude exceeded with probability ``1e-15``.
    """
    low = SEARCH_LOW_RMS * math.sqrt(dist.second_moment())
    high = SEARCH_HIGH_FACTOR * float(dist.abs_isf(SEARCH_TAIL_PROBABILITY))
    size = math.ceil(SEARCH_POINTS_PER_DECADE * math.log10(high / low)) + 1
    return np.geomspace(low, high, size)


def optimal_threshold(dist: Distribution, bits: int) -> tuple[float, float]:
    """The clipping threshold ``T`` minimising :func:`quantization_mse`, and that minimum.

    The dense log grid of :func:`threshold_grid` locates the global minimum, which must lie
    strictly inside it; Brent's bounded method on ``log T`` then refines it between the best
    grid point's neighbours.

    Raises:
        RuntimeError: the best grid point is an end of the grid (the search range is too narrow).
    """
    grid = threshold_grid(dist)
    errors = quantization_mse(dist, bits, grid)
    best = int(np.argmin(errors))
    if best in (0, grid.size - 1):
        raise RuntimeError(f"{dist.spec}, {bits} bits: the optimal threshold is at the end of the search range")
    refined = optimize.minimize_scalar(
        lambda log_t: float(quantization_mse(dist, bits, math.exp(log_t))),
        bounds=(math.log(grid[best - 1]), math.log(grid[best + 1])),
        method="bounded",
        options={"xatol": 1e-10},
    )
    if refined.fun <= errors[best]:
        return math.exp(refined.x), float(refined.fun)
    return float(grid[best]), float(errors[best])


# ----------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class SqnrComparison:
    """Quantization against pruning at one bit-width.

    ``quant_threshold`` is the MSE-optimal clipping threshold in units of the RMS value,
    ``T / sqrt(E[w^2])`` (scale free).
    """

    bits: int
    sparsity: float
    quant_sqnr_db: float
    pruning_sqnr_db: float
    quant_threshold: float

    @property
    def gap_db(self) -> float:
        """Quantization's advantage ``quant_sqnr_db - pruning_sqnr_db`` (negative: pruning is better)."""
        return self.quant_sqnr_db - self.pruning_sqnr_db


def compare(dist: Distribution, bits: int) -> SqnrComparison:
    """Expected SQNR (dB, relative to ``E[w^2]``) of optimally clipped INT-b and of pruning at ``1 - b/16``."""
    power = dist.second_moment()
    threshold, quant_mse = optimal_threshold(dist, bits)
    return SqnrComparison(
        bits=bits,
        sparsity=pruning_sparsity(bits),
        quant_sqnr_db=sqnr_db(power, quant_mse),
        pruning_sqnr_db=sqnr_db(power, pruning_mse(dist, bits)),
        quant_threshold=threshold / math.sqrt(power),
    )


def comparison_table(distributions: Sequence[Distribution], bits: Sequence[int]) -> pd.DataFrame:
    """One row per distribution and bit-width, columns :data:`CSV_COLUMNS`.

    ``kurtosis`` is the exact excess kurtosis (``inf`` where the fourth moment diverges),
    ``quant_threshold`` is ``T / sqrt(E[w^2])``.
    """
    rows = []
    for dist in distributions:
        kurtosis = dist.excess_kurtosis()
        for n_bits in bits:
            result = compare(dist, n_bits)
            rows.append(
                {
                    "distribution": dist.name,
                    "parameter": dist.parameter,
                    "kurtosis": kurtosis,
                    "bits": n_bits,
                    "sparsity": result.sparsity,
                    "quant_sqnr_db": result.quant_sqnr_db,
                    "pruning_sqnr_db": result.pruning_sqnr_db,
                    "quant_threshold": result.quant_threshold,
                }
            )
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def crossover_bits(bits: Sequence[int], gaps: Sequence[float]) -> float:
    """The real bit-width where the gap (quantization - pruning, dB) first turns positive.

    ``bits`` ascending. Linear interpolation of the gap in ``b`` between the first listed
    bit-width where quantization wins and the one before it; NaN when quantization wins at
    the smallest bit-width already or at none.
    """
    bits = np.asarray(bits, dtype=np.float64)
    gaps = np.asarray(gaps, dtype=np.float64)
    winning = np.flatnonzero(gaps > 0.0)
    if winning.size == 0 or winning[0] == 0:
        return math.nan
    i = winning[0]
    return float(bits[i - 1] + (bits[i] - bits[i - 1]) * -gaps[i - 1] / (gaps[i] - gaps[i - 1]))


def crossover_truncation(nu: float, bits: int, c_low: float, c_high: float) -> float:
    """The truncation ``c`` in ``[c_low, c_high]`` where INT-b and pruning tie on ``truncated_student_t:nu:c``.

    Brent's root finder on ``log c``; NaN when the gap has the same sign at both ends.
    """

    def gap(log_c: float) -> float:
        return compare(TruncatedStudentT(nu, math.exp(log_c)), bits).gap_db

    low, high = math.log(c_low), math.log(c_high)
    if gap(low) * gap(high) > 0.0:
        return math.nan
    return math.exp(optimize.brentq(gap, low, high, xtol=1e-8))


def kurtosis_sweep(bits: Sequence[int], nu: float = SWEEP_NU, c_values: Sequence[float] = SWEEP_C) -> pd.DataFrame:
    """:func:`comparison_table` of ``truncated_student_t:nu:c`` for every ``c``: SQNRs across kurtosis."""
    return comparison_table([TruncatedStudentT(nu, float(c)) for c in c_values], bits)


def crossover_table(bits: Sequence[int], nu: float = SWEEP_NU, c_values: Sequence[float] = SWEEP_C) -> pd.DataFrame:
    """Per bit-width, where INT-b and pruning tie on ``truncated_student_t:nu:c`` within the sweep's ``c`` range.

    Columns :data:`CROSSOVER_COLUMNS`: ``crossover_c`` (:func:`crossover_truncation`) and the
    excess kurtosis there, ``crossover_kurtosis``; both NaN where one method wins over the
    whole range. Above the crossover kurtosis pruning has the higher SQNR.
    """
    rows = []
    for n_bits in bits:
        c = crossover_truncation(nu, n_bits, min(c_values), max(c_values))
        kurtosis = TruncatedStudentT(nu, c).excess_kurtosis() if math.isfinite(c) else math.nan
        rows.append({"bits": n_bits, "crossover_c": c, "crossover_kurtosis": kurtosis})
    return pd.DataFrame(rows, columns=list(CROSSOVER_COLUMNS))


def monte_carlo_sqnr(dist: Distribution, bits: Sequence[int], n_samples: int, seed: int) -> list[SqnrComparison]:
    """The weight study's own per-tensor numbers on ``n_samples`` draws from ``dist`` (a cross-check).

    Runs :func:`studies.weight_sqnr.study_tensor` (MSE range estimator, one quantizer for the
    whole tensor) on the samples as one float64 tensor. Its SQNRs are relative to the sample's
    mean square and ``quant_threshold`` to the sample's RMS.
    """
    import torch  # only the cross-check needs torch and the weight study

    from studies.weight_sqnr import study_tensor

    samples = dist.sample(n_samples, seed)
    rms = math.sqrt(float(np.mean(samples * samples)))
    metrics = study_tensor(torch.from_numpy(samples), list(bits), range_estimator="mse")
    return [
        SqnrComparison(
            bits=n_bits,
            sparsity=pruning_sparsity(n_bits),
            quant_sqnr_db=metrics[n_bits]["quant_sqnr"],
            pruning_sqnr_db=metrics[n_bits]["pruning_sqnr"],
            quant_threshold=metrics[n_bits]["quant_step_size"] * (2 ** (n_bits - 1) - 1) / rms,
        )
        for n_bits in bits
    ]
