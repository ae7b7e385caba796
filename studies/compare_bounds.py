"""The paper's post-training comparison (Sec. 4, Fig. 5): per layer and bit-width, quantization's and pruning's SQNR ranges.

For bit-width ``b`` quantization (INT-b) is compared with pruning at the same compression,
sparsity ``1 - b/16``. Per layer each side has a range of SQNRs on the chunked problems:

* quantization: ``[best PTQ method, certified bound]`` (the optimum lies inside);
* pruning: ``[best pruning method, certified bound]``.

Where the exact solvers proved every chunk optimal, a range collapses onto the exact optimum; the
relaxations' own bounds (the paper's SDP bound for quantization) are kept in the
``*_relaxation_bound_db`` columns.

If pruning's certified bound is below quantization's best method, quantization provably wins on
that layer at that bit-width (and vice versa).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["comparison_rows", "plot_comparison", "run_stem", "side_stem"]


def run_stem(model_name: str, opt_dim: int) -> str:
    """The name of the comparison's table and figure: ``compare_bounds_<model>_opt<d>``."""
    return f"compare_bounds_{model_name}_opt{opt_dim}"


def side_stem(kind: str, model_name: str, n_bits: int, opt_dim: int) -> str:
    """The name of one side's run files at bit-width ``n_bits``: ``<kind>_bounds_<model>_<b>bits_opt<d>``
    (``kind``: ``quant`` or ``prune``; pruning at sparsity ``1 - b/16``)."""
    return f"{kind}_bounds_{model_name}_{n_bits}bits_opt{opt_dim}"


def _side(summary: dict, prefix: str) -> dict:
    scope = summary["scopes"]["chunk"]
    return {
        f"{prefix}_best_db": scope["sqnr_db"]["best"],
        f"{prefix}_bound_db": scope["sqnr_upper_bound_db"],
        f"{prefix}_relaxation_bound_db": scope["sqnr_relaxation_bound_db"],
        f"{prefix}_best_method": min(
            (m for m in scope["errors"] if m != "best"), key=lambda m: scope["errors"][m]
        ),
        f"{prefix}_status": ";".join(f"{k}:{v}" for k, v in sorted(scope["status"].items())),
    }


def comparison_rows(results: Sequence[tuple[int, dict, dict]]) -> pd.DataFrame:
    """Rows ``(layer, n_bits, sparsity, quant_*, prune_*, verdict)`` from ``(n_bits, quant summary, prune summary)``."""
    rows = []
    for n_bits, quant, prune in results:
        row = {"layer": quant["layer"], "n_bits": n_bits, "sparsity": prune["sparsity"]}
        row.update(_side(quant, "quant"))
        row.update(_side(prune, "prune"))
        if row["prune_bound_db"] is not None and row["quant_best_db"] is not None and (
            row["prune_bound_db"] < row["quant_best_db"]
        ):
            verdict = "quantization"
        elif row["quant_bound_db"] is not None and row["prune_best_db"] is not None and (
            row["quant_bound_db"] < row["prune_best_db"]
        ):
            verdict = "pruning"
        else:
            verdict = "ranges overlap"
        row["provably_better"] = verdict
        rows.append(row)
    return pd.DataFrame(rows)


def plot_comparison(table: pd.DataFrame, paths: Sequence[Path], title: str) -> None:
    """One panel per layer: SQNR vs bit-width, each side's range as a band between its best method and its bound.

    The quantization SDP relaxation's own bound (the paper's) is drawn dotted. The legend sits
    below the panels (it covers no curve). Saved to every path of ``paths``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(table["layer"]))
    columns = min(3, len(layers))
    rows = (len(layers) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        part = table[table["layer"] == layer].sort_values("n_bits")
        bits = part["n_bits"].to_numpy()
        for prefix, label, color in (("quant", "quantization", "C0"), ("prune", "pruning", "C3")):
            best = part[f"{prefix}_best_db"].astype(float).to_numpy()
            bound = part[f"{prefix}_bound_db"].astype(float).to_numpy()
            ax.fill_between(bits, best, bound, color=color, alpha=0.25)
            ax.plot(bits, best, color=color, marker="o", markersize=3, label=f"{label}: best method")
            ax.plot(bits, bound, color=color, linestyle="--", label=f"{label}: certified bound")
        relaxation = part["quant_relaxation_bound_db"].astype(float).to_numpy()
        ax.plot(bits, relaxation, color="C0", linestyle=":", label="quantization: SDP bound alone (paper)")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("bits (pruning: sparsity 1 - b/16)")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)), fontsize=8,
               frameon=False)
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
