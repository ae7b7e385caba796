"""Figures and tables of the analytical study (:mod:`studies.analytical_sqnr`, the paper's Sec. 2).

* :func:`sqnr_vs_bits_figure`: expected SQNR against the bit-width for each distribution,
  quantization solid, pruning dashed, one colour per distribution;
* :func:`phase_diagram_figure`: over the kurtosis sweep (truncated Student-t), the SQNR gap
  per integer bit-width as coloured cells, the exact crossover kurtosis of each bit-width and
  the crossover bit-width interpolated in ``b``;
* :func:`weights_overlay_figure`: the weight study's per-tensor SQNR gap against sample
  kurtosis, over the analytical gap of the sweep, one panel per bit-width.

The kurtosis axes show the non-excess kurtosis (excess + 3, log scale), as the weight study's
gap-vs-kurtosis figure does; tables hold the excess kurtosis. Figures are built with
:class:`matplotlib.figure.Figure` (never ``pyplot``) and every file is written atomically.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from studies.analytical_sqnr import SWEEP_NU, Distribution, crossover_bits
from studies.compression import pruning_sparsity
from studies.figures import DPI, save_figure
from studies.weight_sqnr_plots import NOTE_STYLE, bits_label, finite_rows, models_label
from utils.io import write_csv

TABLE_CSV = "analytical_sqnr.csv"
SWEEP_CSV = "analytical_sqnr_kurtosis_sweep.csv"
CROSSOVER_CSV = "analytical_sqnr_crossover.csv"
VS_BITS_STEM = "analytical_sqnr_vs_bits"
PHASE_STEM = "analytical_sqnr_phase_diagram"
OVERLAY_STEM = "analytical_sqnr_weights_overlay"
VS_BITS_SIZE_IN = (6.4, 6.0)
PHASE_SIZE_IN = (7.2, 5.0)
PANEL_SIZE_IN = (3.6, 3.0)
GRID_STYLE = {"color": "0.9", "linewidth": 0.6, "zorder": 0}
SWEEP_LABEL = f"truncated Student-t ($\\nu$={SWEEP_NU:g}), analytical"


def kurtosis_axis(values: pd.Series | np.ndarray) -> np.ndarray:
    """Excess kurtosis as plotted: the non-excess kurtosis ``excess + 3`` (1.8 for uniform, 3 for Gaussian)."""
    return np.asarray(values, dtype=np.float64) + 3.0


def log_kurtosis_axis(ax: Axes, label: str, low: float, high: float, max_ticks: int) -> None:
    """Log x-axis over ``[low, high]``, plain-number ticks at 1, 2, 5 x 10^k (at 10^k if more than ``max_ticks``)."""
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    dense = 3.0 * math.log10(high / low) <= max_ticks
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if dense else (1.0,)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def kurtosis_text(kurtosis: float) -> str:
    """``3``, ``4.77``, or ``inf`` for an infinite excess kurtosis."""
    return "$\\infty$" if math.isinf(kurtosis) else f"{kurtosis:.3g}"


def sparsity_text(n_bits: int) -> str:
    """Pruning sparsity ``1 - b/16`` in %, e.g. ``75%``."""
    return f"{100 * pruning_sparsity(n_bits):g}%"


# ----------------------------------------------------------------------------- figures


def sqnr_vs_bits_figure(table: pd.DataFrame, distributions: Sequence[Distribution]) -> Figure:
    """Expected SQNR (dB) against ``b``: quantization solid, pruning at ``1 - b/16`` dashed, a colour per distribution.

    Non-finite SQNRs (pruning at 16 bits removes nothing) are left out.
    """
    fig = Figure(figsize=VS_BITS_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = colormaps["tab10"]
    handles = []
    for index, dist in enumerate(distributions):
        rows = table[(table["distribution"] == dist.name) & (table["parameter"] == dist.parameter)]
        color = colors(index % 10)
        bits = rows["bits"].to_numpy()
        for column, style in (("quant_sqnr_db", "-"), ("pruning_sqnr_db", "--")):
            values = rows[column].to_numpy(dtype=float)
            finite = np.isfinite(values)
            ax.plot(bits[finite], values[finite], linestyle=style, marker="o", markersize=3.5, color=color)
        kurtosis = kurtosis_text(float(rows["kurtosis"].iloc[0]))
        handles.append(Line2D([], [], color=color, label=f"{dist.label}, excess kurtosis {kurtosis}"))
    handles += [
        Line2D([], [], color="0.3", linestyle="-", label="INT-b, MSE-optimal clipping"),
        Line2D([], [], color="0.3", linestyle="--", label="magnitude pruning at 1 - b/16"),
    ]
    bits = sorted(table["bits"].unique())
    ax.set_xticks(bits, [f"{b}\n{sparsity_text(b)}" for b in bits], fontsize="small")
    ax.set_xlabel("bits b  (pruning sparsity 1 - b/16)")
    ax.set_ylabel("expected SQNR (dB)")
    ax.set_title("Expected SQNR: INT-b quantization vs pruning at equal compression", fontsize="medium")
    ax.grid(True, **GRID_STYLE)
    ax.set_axisbelow(True)
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    return fig


def cell_edges(centers: np.ndarray, log: bool) -> np.ndarray:
    """Edges of cells around sorted ``centers``: mid-points (geometric on a log axis), the ends mirrored."""
    x = np.log(centers) if log else np.asarray(centers, dtype=np.float64)
    if x.size == 1:
        edges = np.array([x[0] - 0.5, x[0] + 0.5])
    else:
        middle = 0.5 * (x[1:] + x[:-1])
        edges = np.concatenate([[2 * x[0] - middle[0]], middle, [2 * x[-1] - middle[-1]]])
    return np.exp(edges) if log else edges


def gap_grid(sweep: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(kurtosis, bits, gap)``: the sweep's excess kurtosis (ascending), bit-widths, and gap (dB) per pair."""
    frame = sweep.assign(gap=sweep["quant_sqnr_db"] - sweep["pruning_sqnr_db"])
    grid = frame.pivot_table(index="kurtosis", columns="bits", values="gap", sort=True)
    return grid.index.to_numpy(dtype=float), grid.columns.to_numpy(dtype=int), grid.to_numpy(dtype=float)


def phase_diagram_figure(sweep: pd.DataFrame, crossovers: pd.DataFrame) -> Figure:
    """Where pruning beats quantization, over the kurtosis sweep (x, log) and the bit-width (y).

    Cells: the SQNR gap (quantization - pruning) at each integer bit-width, blue where
    quantization is better, red where pruning is. Markers: the exact crossover kurtosis of
    each bit-width (root of the gap in ``c``). Line: the crossover bit-width as a real number,
    the gap interpolated linearly in ``b`` between bit-widths; pruning is better below it.
    """
    kurtosis, bits, gap = gap_grid(sweep)
    x = kurtosis_axis(kurtosis)
    finite = gap[np.isfinite(gap)]
    low, high = min(float(finite.min(initial=0.0)), -1.0), max(float(finite.max(initial=0.0)), 1.0)

    fig = Figure(figsize=PHASE_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(
        cell_edges(x, log=True),
        cell_edges(bits.astype(float), log=False),
        np.clip(gap, low, high).T,
        cmap="RdBu",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high),
        rasterized=True,
    )
    colorbar = fig.colorbar(mesh, ax=ax, label="SQNR gap: quantization $-$ pruning (dB)")
    positive_ticks = MaxNLocator(5).tick_values(0.0, high)
    colorbar.set_ticks(np.concatenate([[low, 0.5 * low], positive_ticks[positive_ticks <= high]]))
    colorbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    crossing = np.array([crossover_bits(bits, row) for row in gap])
    line_label = "crossover bit-width, gap interpolated in b (pruning is better below the line)"
    ax.plot(x, crossing, color="black", linewidth=1.4, label=line_label)
    found = crossovers.dropna(subset=["crossover_kurtosis"])
    marker_x = kurtosis_axis(found["crossover_kurtosis"])
    ax.plot(marker_x, found["bits"], linestyle="", marker="o", markersize=6, markerfacecolor="white",
            markeredgecolor="black", label="exact crossover kurtosis per bit-width")  # fmt: skip
    for at, n_bits in zip(marker_x, found["bits"]):
        text = f"INT{n_bits}: {at:.3g} (excess {at - 3.0:.3g})"
        ax.annotate(text, (at, n_bits), xytext=(-7, 7), textcoords="offset points", ha="right", **NOTE_STYLE)
    edges = cell_edges(x, log=True)
    log_kurtosis_axis(ax, "kurtosis, non-excess (excess + 3), log scale", edges[0], edges[-1], max_ticks=12)
    ax.set_yticks(bits, [f"{b} ({sparsity_text(b)})" for b in bits])
    ax.set_ylabel("bits b  (pruning sparsity)")
    ax.set_title(
        f"Quantization vs pruning over kurtosis: Student-t ($\\nu$={SWEEP_NU:g}) truncated at $\\pm c$",
        fontsize="medium",
    )
    fig.legend(loc="outside lower center", ncols=1, fontsize="small", frameon=False)
    return fig


def include_zero(ax: Axes, values: np.ndarray) -> None:
    """y-limits spanning ``values`` and 0, padded by 8% of the span."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    pad = 0.08 * max(high - low, 1.0)
    ax.set_ylim(low - pad, high + pad)


def overlay_layout(n_panels: int) -> tuple[int, int, int, tuple[float, float]]:
    """``(rows, columns, legend columns, figure size in inches)`` of the overlay: 4 panels a row at most."""
    n_cols = min(4, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    legend_cols = min(3, n_cols)
    legend_height = 0.3 + 0.25 * math.ceil(3 / legend_cols)
    return n_rows, n_cols, legend_cols, (PANEL_SIZE_IN[0] * n_cols, PANEL_SIZE_IN[1] * n_rows + legend_height)


def weights_overlay_figure(weights: pd.DataFrame, sweep: pd.DataFrame, bits: Sequence[int]) -> Figure:
    """Per-tensor SQNR gap against sample kurtosis (weight study) over the analytical sweep, a panel per bit-width.

    ``weights`` is the weight study's tidy table (:func:`studies.weight_sqnr_plots.load_results`).
    The kurtosis axis reaches from just below the smallest kurtosis of the tensors and the
    sweep (which starts near uniform, at 1.84) to twice the largest kurtosis of the tensors.
    """
    weights = finite_rows(weights, ["quant_sqnr", "pruning_sqnr", "sample_kurtosis"], "analytical overlay")
    tensor_x = kurtosis_axis(weights["sample_kurtosis"])
    low = 0.9 * min(tensor_x.min(), kurtosis_axis(sweep["kurtosis"]).min())
    high = 2.0 * tensor_x.max()
    n_rows, n_cols, legend_cols, size_in = overlay_layout(len(bits))
    fig = Figure(figsize=size_in, dpi=DPI, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax, n_bits in zip(axes.flat, bits):
        tensors = weights[weights["n_bits"] == n_bits]
        curve = sweep[sweep["bits"] == n_bits].sort_values("kurtosis")
        tensor_gap = (tensors["quant_sqnr"] - tensors["pruning_sqnr"]).to_numpy(dtype=float)
        curve_x = kurtosis_axis(curve["kurtosis"])
        curve_gap = (curve["quant_sqnr_db"] - curve["pruning_sqnr_db"]).to_numpy(dtype=float)
        ax.scatter(kurtosis_axis(tensors["sample_kurtosis"]), tensor_gap, s=10, color="tab:blue", alpha=0.6,
                   linewidths=0, rasterized=True)  # fmt: skip
        ax.plot(curve_x, curve_gap, color="black", linewidth=1.4)
        ax.axhline(0.0, linestyle="--", color="0.3", linewidth=1.0)
        include_zero(ax, np.concatenate([tensor_gap, curve_gap[(curve_x >= low) & (curve_x <= high)]]))
        ax.set_title(bits_label(n_bits), fontsize="medium")
        log_kurtosis_axis(ax, "kurtosis (excess + 3)", low, high, max_ticks=7)
        ax.grid(True, **GRID_STYLE)
        ax.set_axisbelow(True)
    for ax in axes.flat[len(bits):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("SQNR gap: quant. $-$ pruning (dB)")
    handles = [
        Line2D(
            [], [], linestyle="", marker="o", color="tab:blue", label=f"weight tensors: {models_label(weights['model'])}"
        ),
        Line2D([], [], color="black", label=SWEEP_LABEL),
        Line2D([], [], linestyle="--", color="0.3", label="equal SQNR (below: pruning better)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=legend_cols, fontsize="small", frameon=False)
    return fig


# ----------------------------------------------------------------------------- output


def crossover_summary(sweep: pd.DataFrame, crossovers: pd.DataFrame) -> list[str]:
    """One line per bit-width: the excess kurtosis above which pruning wins, or which method wins throughout."""
    lines = []
    for row in crossovers.itertuples(index=False):
        rows = sweep[sweep["bits"] == row.bits]
        gaps = rows["quant_sqnr_db"] - rows["pruning_sqnr_db"]
        if math.isfinite(row.crossover_kurtosis):
            at = f"{row.crossover_kurtosis:.3g} (c = {row.crossover_c:.3g})"
            verdict = f"pruning is better above excess kurtosis {at}"
        elif (gaps > 0).all():
            verdict = "quantization is better over the whole sweep"
        elif (gaps <= 0).all():
            verdict = "pruning is better over the whole sweep"
        else:
            verdict = "the gap changes sign inside the sweep but has the same sign at its ends"
        lines.append(f"INT{row.bits} vs {sparsity_text(row.bits)} sparsity: {verdict}")
    return lines


def write_outputs(
    output_dir: Path,
    table: pd.DataFrame,
    distributions: Sequence[Distribution],
    sweep: pd.DataFrame,
    crossovers: pd.DataFrame,
    weights: pd.DataFrame | None = None,
    overlay_bits: Sequence[int] = (),
) -> list[Path]:
    """Write the three tables and the figures (PNG and PDF) into ``output_dir``, each file atomically.

    The overlay figure is made only when ``weights`` is given.
    """
    paths = []
    for name, frame in ((TABLE_CSV, table), (SWEEP_CSV, sweep), (CROSSOVER_CSV, crossovers)):
        write_csv(output_dir / name, frame)
        paths.append(output_dir / name)
    paths += save_figure(sqnr_vs_bits_figure(table, distributions), output_dir, VS_BITS_STEM)
    paths += save_figure(phase_diagram_figure(sweep, crossovers), output_dir, PHASE_STEM)
    if weights is not None:
        paths += save_figure(weights_overlay_figure(weights, sweep, overlay_bits), output_dir, OVERLAY_STEM)
    return paths
