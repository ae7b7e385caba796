"""Load, summarise and draw the weight study's results (the paper's Fig. 3).

The weight study writes one JSON file per model and bit-width, ``<model>_<b>_bits_mse.json``,
holding the per-tensor SQNR of INT-b quantization and of magnitude pruning at the same
compression (sparsity ``1 - b/16``). This module turns those files into a tidy table, a
per-bit-width summary (CSV and markdown) and the figures:

* quantization SQNR against pruning SQNR, one point per tensor (the paper's scatter), also
  with the pruning SQNR corrected for quantization's natural sparsity;
* the SQNR gap (quantization - pruning) against the tensors' excess kurtosis;
* the paper's own data (``data/paper_weights_sqnr.csv.gz``, :mod:`studies.paper_data`) as its
  Fig. 3 with our tensors drawn over it, and both summaries side by side.

Figures are built with :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so no
GUI backend is involved, and every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter, ScalarFormatter

from studies.compression import pruning_sparsity
from studies.figures import DPI, bit_colors, save_figure
from studies.paper_data import is_flat_result, parse_flat_result
from studies.result_files import result_glob
from utils.io import atomic_open, read_json, write_csv

log = logging.getLogger(__name__)

RESULT_GLOB = result_glob()  # the study's default setting: MSE range, per tensor
# SQNR columns and the MSE columns they were computed from (a null SQNR with a zero MSE is +inf).
SQNR_FROM_MSE = {
    "quant_sqnr": "quant_mse",
    "pruning_sqnr": "pruning_mse",
    "pruning_sqnr_corrected": "pruning_mse_corrected",
}
NUMERIC_COLUMNS = (
    "numel", "sample_kurtosis", "quant_sqnr", "pruning_sqnr", "pruning_sqnr_corrected",
    "quant_sparsity", "quant_mse", "pruning_mse", "pruning_mse_corrected", "quant_step_size",
)  # fmt: skip
COLUMNS = ("model", "layer", "n_bits", "sparsity", *NUMERIC_COLUMNS)
SUMMARY_COLUMNS = (
    "n_bits", "sparsity", "n_tensors", "quant_wins_share", "quant_wins_share_corrected",
    "median_quant_sqnr", "median_pruning_sqnr", "median_gap",
)  # fmt: skip
SUMMARY_HEADERS = {
    "n_bits": "bits",
    "sparsity": "sparsity",
    "n_tensors": "tensors",
    "quant_wins_share": "quant. wins",
    "quant_wins_share_corrected": "quant. wins (corrected)",
    "median_quant_sqnr": "median quant. SQNR (dB)",
    "median_pruning_sqnr": "median pruning SQNR (dB)",
    "median_gap": "median gap (dB)",
}
SCATTER_SIZE_IN = (5.0, 5.0)
GAP_SIZE_IN = (6.4, 4.4)
# Side notes ("pruning better") stay legible over dense points.
NOTE_STYLE = {
    "fontsize": "small",
    "color": "0.25",
    "zorder": 4,
    "bbox": {"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1.0},
}
SCATTER_STEM = "weights_sqnr_scatter"
SCATTER_CORRECTED_STEM = "weights_sqnr_scatter_corrected"
GAP_STEM = "weights_sqnr_gap_vs_kurtosis"
PAPER_SCATTER_STEM = "paper_weights_sqnr_scatter"
COMPARISON_CSV = "paper_vs_ours_summary.csv"
COMPARISON_MD = "paper_vs_ours_summary.md"
COMPARISON_COLUMNS = (
    "n_bits", "sparsity", "paper_n_tensors", "ours_n_tensors",
    "paper_quant_wins_share", "ours_quant_wins_share",
    "paper_quant_wins_share_corrected", "ours_quant_wins_share_corrected",
    "paper_median_gap", "ours_median_gap",
)  # fmt: skip
SUMMARY_CSV = "weights_sqnr_summary.csv"
SUMMARY_MD = "weights_sqnr_summary.md"


# ----------------------------------------------------------------------------- loading


def complete_results(input_dir: str | os.PathLike, pattern: str = RESULT_GLOB) -> Iterator[dict]:
    """Parsed result files under ``input_dir`` that are valid and complete; others are logged and skipped.

    Each file may be in the weight study's format (settings plus ``"layers"`` and ``"complete"``)
    or in the paper's flat format (:mod:`studies.paper_data`, model and bit-width from the file
    name); the format is detected per file. Every skipped file gets one warning naming it.
    """
    for path in sorted(Path(input_dir).glob(pattern)):
        data = read_json(path)
        if data is None:
            log.warning("skipping %s: not valid JSON (was the run killed?)", path)
        elif not isinstance(data, dict):
            log.warning("skipping %s: neither the weight study's format nor the paper's flat format", path)
        elif is_flat_result(data):  # only mappings as values: never the study's format ("complete": true)
            try:
                yield parse_flat_result(path, data)
            except ValueError as error:
                log.warning("skipping %s: paper's flat format, but %s", path, error)
        elif "layers" in data or "complete" in data:
            if data.get("complete") is not True:
                log.warning("skipping %s: the run did not complete", path)
            elif not well_formed(data):
                log.warning("skipping %s: model, n_bits or layers missing or malformed", path)
            else:
                yield data
        else:
            log.warning("skipping %s: neither the weight study's format nor the paper's flat format", path)


def well_formed(data: dict) -> bool:
    """Whether a result has a model name, an integer bit-width and a mapping of layer metrics."""
    layers = data.get("layers")
    return (
        isinstance(data.get("model"), str)
        and isinstance(data.get("n_bits"), int)
        and isinstance(layers, dict)
        and all(isinstance(metrics, dict) for metrics in layers.values())
    )


def load_results(input_dir: str | os.PathLike, pattern: str = RESULT_GLOB) -> pd.DataFrame:
    """Tidy table of every complete result file in ``input_dir``: one row per (model, layer, n_bits).

    Columns are :data:`COLUMNS`; ``sparsity`` is ``1 - b/16``. JSON nulls become NaN, except an
    SQNR whose MSE is exactly 0: the writer stores that +inf as null, and it is restored to +inf.

    Raises:
        NotADirectoryError: ``input_dir`` is not an existing directory.
    """
    if not Path(input_dir).is_dir():
        raise NotADirectoryError(f"input directory '{input_dir}' does not exist or is not a directory")
    results = list(complete_results(input_dir, pattern))
    metrics = [layer for data in results for layer in data["layers"].values()]
    frame = pd.DataFrame(metrics, columns=list(NUMERIC_COLUMNS))
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    for sqnr, mse in SQNR_FROM_MSE.items():
        frame.loc[frame[sqnr].isna() & frame[mse].eq(0.0), sqnr] = math.inf
    counts = [len(data["layers"]) for data in results]
    n_bits = np.array([data["n_bits"] for data in results], dtype=np.int64)
    frame.insert(0, "model", np.repeat(np.array([data["model"] for data in results], dtype=object), counts))
    frame.insert(1, "layer", [name for data in results for name in data["layers"]])
    frame.insert(2, "n_bits", np.repeat(n_bits, counts))
    frame.insert(3, "sparsity", pruning_sparsity(frame["n_bits"]))
    return frame.sort_values(["model", "n_bits"], kind="stable", ignore_index=True)


def select_models(frame: pd.DataFrame, models: Sequence[str] | None) -> pd.DataFrame:
    """Rows of the given models (all rows when ``models`` is None).

    Raises:
        ValueError: some requested model has no results.
    """
    if not models:
        return frame
    missing = sorted(set(models) - set(frame["model"]))
    if missing:
        available = ", ".join(sorted(frame["model"].unique())) or "none"
        raise ValueError(f"no results for model(s) {', '.join(missing)} (available: {available})")
    return frame[frame["model"].isin(models)].reset_index(drop=True)


# ----------------------------------------------------------------------------- summary


def quant_wins(quant_sqnr: pd.Series, pruning_sqnr: pd.Series) -> pd.Series:
    """1.0 where quantization's SQNR is strictly higher, 0.0 where not, NaN where either is undefined."""
    return (quant_sqnr > pruning_sqnr).astype(float).where(quant_sqnr.notna() & pruning_sqnr.notna())


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per bit-width: sparsity ``1 - b/16``, tensor count, quantization's win shares and median SQNRs (dB).

    The win shares count the tensors where both SQNRs are defined; ties go to pruning. The
    median gap is the median of ``quant_sqnr - pruning_sqnr`` over the tensors where it is defined.
    """
    columns = frame.assign(
        wins=quant_wins(frame["quant_sqnr"], frame["pruning_sqnr"]),
        wins_corrected=quant_wins(frame["quant_sqnr"], frame["pruning_sqnr_corrected"]),
        gap=frame["quant_sqnr"] - frame["pruning_sqnr"],
    )
    table = columns.groupby("n_bits", sort=True).agg(
        n_tensors=("layer", "size"),
        quant_wins_share=("wins", "mean"),
        quant_wins_share_corrected=("wins_corrected", "mean"),
        median_quant_sqnr=("quant_sqnr", "median"),
        median_pruning_sqnr=("pruning_sqnr", "median"),
        median_gap=("gap", "median"),
    )
    table = table.reset_index()
    table.insert(1, "sparsity", pruning_sparsity(table["n_bits"]))
    return table[list(SUMMARY_COLUMNS)]


def format_cell(column: str, value: float) -> str:
    """A summary value as markdown text: shares and sparsity in %, SQNRs in dB to 2 decimals."""
    if pd.isna(value):
        return "n/a"
    if column in ("n_bits", "n_tensors"):
        return str(int(value))
    if column == "sparsity":
        return f"{100 * value:g}%"
    if column.startswith("quant_wins_share"):
        return share_text(value)
    return f"{value:.2f}"


def share_text(share: float) -> str:
    """A share in % to 1 decimal, never rounded to 0% or 100% unless it is exactly that."""
    if 0.0 < share < 0.001:
        return "<0.1%"
    if 0.999 < share < 1.0:
        return ">99.9%"
    return f"{100 * share:.1f}%"


def summary_markdown(table: pd.DataFrame) -> str:
    """The summary as a GitHub-flavoured markdown table (numbers right-aligned)."""
    columns = list(SUMMARY_COLUMNS)
    lines = [
        "| " + " | ".join(SUMMARY_HEADERS[column] for column in columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
    ]
    for row in table[columns].itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(column, value) for column, value in zip(columns, row)) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def bits_label(n_bits: int) -> str:
    """Legend text of a bit-width, e.g. ``INT4 vs 75% sparsity``."""
    return f"INT{n_bits} vs {100 * pruning_sparsity(n_bits):g}% sparsity"


def models_label(models: Sequence[str], max_names: int = 3) -> str:
    """The model names when there are at most ``max_names``, else their count."""
    names = sorted(set(models))
    return ", ".join(names) if len(names) <= max_names else f"{len(names)} models"


def bit_legend_handles(colors: dict[int, tuple]) -> list[Line2D]:
    """Opaque legend markers, one per bit-width."""
    return [
        Line2D([], [], linestyle="", marker="o", markersize=5, color=color, label=bits_label(n_bits))
        for n_bits, color in colors.items()
    ]


def finite_rows(frame: pd.DataFrame, columns: Sequence[str], figure_name: str) -> pd.DataFrame:
    """Rows whose ``columns`` are all finite; logs how many were left out of the figure."""
    keep = np.isfinite(frame[list(columns)].to_numpy(dtype=float)).all(axis=1)
    if not keep.all():
        log.warning(
            "%s: %d of %d tensors left out (non-finite %s)", figure_name, (~keep).sum(), keep.size, ", ".join(columns)
        )
    return frame[keep]


def scatter_by_bits(ax, frame: pd.DataFrame, x: np.ndarray, y: np.ndarray, colors: dict[int, tuple]) -> None:
    """One rasterized scatter call per bit-width; small, translucent points when there are many."""
    bits = frame["n_bits"].to_numpy()
    size, alpha = (16.0, 0.85) if len(bits) <= 2000 else (5.0, 0.55)
    for n_bits, color in colors.items():
        mask = bits == n_bits
        ax.scatter(x[mask], y[mask], s=size, color=color, alpha=alpha, linewidths=0, rasterized=True)


def sqnr_scatter_figure(frame: pd.DataFrame, pruning_column: str = "pruning_sqnr") -> Figure:
    """Quantization SQNR (x) against pruning SQNR (y) per tensor, coloured by bit-width, with ``y = x``.

    Points above the dashed line are tensors where pruning has the lower error.
    """
    corrected = pruning_column == "pruning_sqnr_corrected"
    frame = finite_rows(frame, ["quant_sqnr", pruning_column], "corrected scatter" if corrected else "scatter")
    x = frame["quant_sqnr"].to_numpy(dtype=float)
    y = frame[pruning_column].to_numpy(dtype=float)
    colors = bit_colors(frame["n_bits"].unique())

    fig = Figure(figsize=SCATTER_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    scatter_by_bits(ax, frame, x, y, colors)
    values = np.concatenate([x, y])
    diagonal_axes(ax, (values.min(), values.max()) if values.size else (0.0, 1.0), pad_share=0.04)

    ax.set_xlabel("quantization SQNR (dB)")
    ax.set_ylabel("pruning SQNR, corrected for natural sparsity (dB)" if corrected else "pruning SQNR (dB)")
    ax.set_title(f"Weight SQNR per tensor: {models_label(frame['model'])}", fontsize="medium")
    ax.grid(True, color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.legend(handles=bit_legend_handles(colors), loc="upper left", fontsize="small", framealpha=0.9)
    return fig


def diagonal_axes(ax, data_range: tuple[float, float], pad_share: float) -> None:
    """Equal square axes over ``data_range`` padded by ``pad_share`` of its span (at least 1 dB), with
    the dashed ``y = x`` line and which method wins on each side of it."""
    low, high = data_range
    pad = pad_share * max(high - low, 1.0)
    limits = (low - pad, high + pad)
    ax.plot(limits, limits, linestyle="--", color="0.3", linewidth=1.0, zorder=3)
    ax.set_xlim(limits)
    ax.set_ylim(limits)
    ax.set_aspect("equal", adjustable="box")
    label_diagonal(ax, limits)


def label_diagonal(ax, limits: tuple[float, float]) -> None:
    """Write which method wins on each side of the ``y = x`` line, near its upper end."""
    span = limits[1] - limits[0]
    at = limits[0] + 0.8 * span
    offset = 0.035 * span
    style = {"rotation": 45, "rotation_mode": "anchor", "ha": "center", "va": "center", **NOTE_STYLE}
    ax.text(at - offset, at + offset, "pruning better", **style)
    ax.text(at + offset, at - offset, "quantization better", **style)


def zero_line_legend_handles() -> list[Line2D]:
    """Legend entries for the dashed ``gap = 0`` line and which method wins on each side (never over data)."""
    blank = {"linestyle": "", "marker": ""}
    return [
        Line2D([], [], linestyle="--", color="0.3", linewidth=1.0, label="gap = 0"),
        Line2D([], [], label="above: quantization better", **blank),
        Line2D([], [], label="below: pruning better", **blank),
    ]


def gap_vs_kurtosis_figure(frame: pd.DataFrame) -> Figure:
    """SQNR gap (quantization - pruning, dB) against the tensors' excess kurtosis, coloured by bit-width.

    The x-axis is the excess kurtosis ``m4 / m2^2 - 3`` as stored (0 for a Gaussian, never below
    -2), on a symmetric log scale (linear within +-1) when it reaches 10 in magnitude. Which
    method wins above and below ``gap = 0`` is said in the legend, outside the axes.
    """
    frame = finite_rows(frame, ["quant_sqnr", "pruning_sqnr", "sample_kurtosis"], "gap vs kurtosis")
    kurtosis = frame["sample_kurtosis"].to_numpy(dtype=float)
    gap = (frame["quant_sqnr"] - frame["pruning_sqnr"]).to_numpy(dtype=float)
    colors = bit_colors(frame["n_bits"].unique())
    symlog_x = kurtosis.size > 0 and np.abs(kurtosis).max() >= 10.0

    fig = Figure(figsize=GAP_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    scatter_by_bits(ax, frame, kurtosis, gap, colors)
    ax.axhline(0.0, linestyle="--", color="0.3", linewidth=1.0, zorder=3)
    if symlog_x:
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = (min(gap.min(), 0.0), max(gap.max(), 0.0)) if gap.size else (-1.0, 1.0)
    pad = 0.05 * max(high - low, 1.0)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("excess kurtosis $m_4/m_2^2 - 3$" + (" (symmetric log scale)" if symlog_x else ""))
    ax.set_ylabel("SQNR gap: quantization $-$ pruning (dB)")
    ax.set_title(f"Quantization's SQNR advantage vs kurtosis: {models_label(frame['model'])}", fontsize="medium")
    ax.grid(True, which="major", color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    legend_at = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}
    handles = bit_legend_handles(colors) + zero_line_legend_handles()
    ax.legend(handles=handles, fontsize="small", frameon=False, **legend_at)
    return fig


def paper_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's table (:func:`studies.paper_data.read_paper_table`) in the layout of :func:`load_results`.

    Columns the paper did not record (``numel``, ``quant_step_size``) are NaN; its kurtosis is
    already excess kurtosis, like ours.
    """
    frame = pd.DataFrame({column: table.get(column, np.nan) for column in COLUMNS[4:]})
    frame = frame.astype(float)
    frame.insert(0, "model", table["model"].astype(object).to_numpy())
    frame.insert(1, "layer", table["layer"].astype(object).to_numpy())
    frame.insert(2, "n_bits", table["n_bits"].astype(np.int64).to_numpy())
    frame.insert(3, "sparsity", pruning_sparsity(frame["n_bits"]))
    return frame.sort_values(["model", "n_bits"], kind="stable", ignore_index=True)


def paper_scatter_figure(paper: pd.DataFrame, ours: pd.DataFrame) -> Figure:
    """The paper's Fig. 3 from its own data (small translucent dots), our tensors drawn over it (diamonds).

    Quantization SQNR (x) against pruning SQNR (y) per tensor, coloured by bit-width, with ``y = x``.
    """
    columns = ["quant_sqnr", "pruning_sqnr"]
    paper = finite_rows(paper, columns, "paper scatter")
    ours = finite_rows(ours, columns, "our scatter") if not ours.empty else ours
    colors = bit_colors(sorted(set(paper["n_bits"]) | set(ours["n_bits"])))

    fig = Figure(figsize=SCATTER_SIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    paper_bits, our_bits = paper["n_bits"].to_numpy(), ours["n_bits"].to_numpy()
    for n_bits, color in colors.items():
        mask = paper_bits == n_bits
        ax.scatter(
            paper["quant_sqnr"].to_numpy()[mask], paper["pruning_sqnr"].to_numpy()[mask],
            s=4.0, color=color, alpha=0.35, linewidths=0, rasterized=True,
        )  # fmt: skip
    for n_bits, color in colors.items():
        mask = our_bits == n_bits
        ax.scatter(
            ours["quant_sqnr"].to_numpy()[mask], ours["pruning_sqnr"].to_numpy()[mask],
            s=14.0, marker="D", color=color, edgecolors="black", linewidths=0.4, zorder=4, rasterized=True,
        )  # fmt: skip
    values = np.concatenate([frame[column].to_numpy(dtype=float) for frame in (paper, ours) for column in columns])
    diagonal_axes(ax, (min(values.min(), 0.0), values.max()) if values.size else (0.0, 1.0), pad_share=0.03)

    ax.set_xlabel("quantization SQNR (dB)")
    ax.set_ylabel("pruning SQNR (dB)")
    ax.set_title("Weight SQNR per tensor: the paper's data and ours", fontsize="medium")
    ax.grid(True, color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    sources = [
        Line2D([], [], linestyle="", marker="o", markersize=4, color="0.55",
               label=f"paper: {models_label(paper['model'])} (Kuzmin et al.)"),
        Line2D([], [], linestyle="", marker="D", markersize=4, markerfacecolor="white", markeredgecolor="black",
               label=f"ours: {models_label(ours['model'])}" if not ours.empty else "ours: none"),
    ]  # fmt: skip
    ax.legend(handles=bit_legend_handles(colors) + sources, loc="upper left", fontsize="x-small", framealpha=0.9)
    return fig


def comparison_table(paper: pd.DataFrame, ours: pd.DataFrame) -> pd.DataFrame:
    """The per-bit-width summaries of the paper's data and ours side by side (:data:`COMPARISON_COLUMNS`)."""
    parts = []
    for source, frame in (("paper", paper), ("ours", ours)):
        table = summary_table(frame) if not frame.empty else pd.DataFrame(columns=list(SUMMARY_COLUMNS))
        table = table.drop(columns="sparsity").set_index("n_bits").add_prefix(f"{source}_")
        parts.append(table)
    table = parts[0].join(parts[1], how="outer").reset_index()
    table["n_bits"] = table["n_bits"].astype(np.int64)
    table.insert(1, "sparsity", pruning_sparsity(table["n_bits"]))
    return table[list(COMPARISON_COLUMNS)]


def comparison_markdown(table: pd.DataFrame) -> str:
    """The side-by-side summary as a markdown table (numbers right-aligned)."""
    columns = list(COMPARISON_COLUMNS)
    lines = [
        "| " + " | ".join(comparison_header(column) for column in columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
    ]
    for row in table[columns].itertuples(index=False):
        cells = [format_cell(column.split("_", 1)[1] if column.startswith(("paper_", "ours_")) else column, value)
                 for column, value in zip(columns, row)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_header(column: str) -> str:
    """``paper_median_gap`` -> ``median gap (dB), paper``."""
    for source in ("paper", "ours"):
        if column.startswith(f"{source}_"):
            return f"{SUMMARY_HEADERS[column[len(source) + 1 :]]}, {source}"
    return SUMMARY_HEADERS[column]


# ----------------------------------------------------------------------------- output


def write_summary(table: pd.DataFrame, output_dir: str | os.PathLike) -> list[Path]:
    """Write the summary as CSV and as a markdown table, each atomically."""
    csv_path, md_path = Path(output_dir) / SUMMARY_CSV, Path(output_dir) / SUMMARY_MD
    write_csv(csv_path, table)
    with atomic_open(md_path) as handle:
        handle.write(summary_markdown(table))
    return [csv_path, md_path]


def write_paper_outputs(paper: pd.DataFrame, ours: pd.DataFrame, output_dir: str | os.PathLike) -> list[Path]:
    """Write the paper's Fig. 3 with our tensors over it and the side-by-side summary (CSV and markdown)."""
    output_dir = Path(output_dir)
    table = comparison_table(paper, ours)
    csv_path, md_path = output_dir / COMPARISON_CSV, output_dir / COMPARISON_MD
    write_csv(csv_path, table)
    with atomic_open(md_path) as handle:
        handle.write(comparison_markdown(table))
    return [csv_path, md_path] + save_figure(paper_scatter_figure(paper, ours), output_dir, PAPER_SCATTER_STEM)


def write_figures(frame: pd.DataFrame, output_dir: str | os.PathLike) -> list[Path]:
    """Write the two scatter plots and the gap-vs-kurtosis plot of ``frame`` into ``output_dir``."""
    output_dir = Path(output_dir)
    paths = save_figure(sqnr_scatter_figure(frame, "pruning_sqnr"), output_dir, SCATTER_STEM)
    paths += save_figure(sqnr_scatter_figure(frame, "pruning_sqnr_corrected"), output_dir, SCATTER_CORRECTED_STEM)
    paths += save_figure(gap_vs_kurtosis_figure(frame), output_dir, GAP_STEM)
    return paths
