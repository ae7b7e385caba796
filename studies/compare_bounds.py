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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from studies import prune_bounds, quant_bounds
from studies.bounds_files import RunFiles, check_exact_limits
from studies.bounds_run import RunSetup, run_layers, sets_bar
from studies.compression import pruning_sparsity
from studies.layer_problems import LayerData, problem_set_count
from studies.problem_sets import config_record
from utils.io import write_csv

__all__ = [
    "CompareBoundsConfig",
    "NoComparisonError",
    "comparison_rows",
    "plot_comparison",
    "run_compare_bounds",
    "run_stem",
    "side_stem",
]


class NoComparisonError(RuntimeError):
    """No layer finished on both sides of the comparison."""


@dataclass(frozen=True)
class CompareBoundsConfig:
    """Options of the comparison (the CLI's ``compare-bounds``, minus I/O).

    Per bit-width ``b`` of ``bit_widths`` both sides run on the chunks only (no whole channels):
    quantization at ``b`` bits, exact where ``0 < opt_dim <= max_exact_dim``, and pruning at the
    equal compression :func:`studies.compression.pruning_sparsity`, exact on chunks of at most
    ``max_exact_dim`` inputs. ``node_limit`` and ``time_limit`` apply to both exact solvers
    (None: each solver's default node limit, no time limit).
    """

    bit_widths: tuple[int, ...] = tuple(range(2, 9))
    opt_dim: int = 32
    max_exact_dim: int = 48
    node_limit: int | None = None
    time_limit: float | None = None
    num_output_channels: int = -1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.bit_widths:
            raise ValueError("bit_widths must not be empty")
        check_exact_limits(self.node_limit, self.time_limit)

    def quant_config(self, n_bits: int) -> quant_bounds.QuantBoundsConfig:
        """The quantization side at ``n_bits``."""
        return quant_bounds.QuantBoundsConfig(
            n_bits=n_bits, opt_dim=self.opt_dim, max_whole_dim=0, node_limit=self.node_limit,
            time_limit=self.time_limit, exact=0 < self.opt_dim <= self.max_exact_dim,
            num_output_channels=self.num_output_channels, seed=self.seed,
        )

    def prune_config(self, n_bits: int) -> prune_bounds.PruneBoundsConfig:
        """The pruning side at the compression of ``n_bits``."""
        return prune_bounds.PruneBoundsConfig(
            sparsity=pruning_sparsity(n_bits), opt_dim=self.opt_dim, node_limit=self.node_limit,
            time_limit=self.time_limit, max_exact_dim=self.max_exact_dim, max_whole_dim=0,
            num_output_channels=self.num_output_channels,
        )


def run_stem(model_name: str, opt_dim: int) -> str:
    """The name of the comparison's table and figure: ``compare_bounds_<model>_opt<d>``."""
    return f"compare_bounds_{model_name}_opt{opt_dim}"


def side_stem(kind: str, model_name: str, n_bits: int, opt_dim: int) -> str:
    """The name of one side's run files at bit-width ``n_bits``: ``<kind>_bounds_<model>_<b>bits_opt<d>``
    (``kind``: ``quant`` or ``prune``; pruning at sparsity ``1 - b/16``)."""
    return f"{kind}_bounds_{model_name}_{n_bits}bits_opt{opt_dim}"


def run_compare_bounds(
    layers: dict[str, LayerData], config: CompareBoundsConfig, setup: RunSetup
) -> tuple[pd.DataFrame, RunFiles]:
    """The comparison of ``layers`` (the CLI's ``compare-bounds``): both sides' runs per bit-width (files named by
    :func:`side_stem`), then the table (:func:`comparison_rows`) as ``<stem>.csv`` and its figure, ``<stem>`` from
    :func:`run_stem`. One bar counts the problem sets of all runs when ``setup.progress``.

    Returns the table and the comparison's files; raises :class:`NoComparisonError` when no layer finished on
    both sides.
    """
    results = []
    total = 2 * len(config.bit_widths) * problem_set_count(layers.values(), config.opt_dim, 0)
    with sets_bar(total, setup.progress) as bar:
        for n_bits in config.bit_widths:
            quant, prune = config.quant_config(n_bits), config.prune_config(n_bits)
            sides = []
            for kind, side_config, solve, label in (
                ("quant", quant, quant_bounds.quant_bounds_layer, quant_bounds.plot_label(quant)),
                ("prune", prune, prune_bounds.prune_bounds_layer, prune_bounds.plot_label(prune)),
            ):
                sides.append(run_layers(
                    layers, lambda data, c=side_config, f=solve: f(data, c, bar), setup.save_problems,
                    setup.header(kind, config_record(side_config)),
                    setup.files(side_stem(kind, setup.model_name, n_bits, config.opt_dim)), label,
                ))
            prune_by_layer = {layer["layer"]: layer for layer in sides[1]["layers"]}
            results.extend(
                (n_bits, layer, prune_by_layer[layer["layer"]])
                for layer in sides[0]["layers"] if layer["layer"] in prune_by_layer
            )
    if not results:
        raise NoComparisonError("no layer finished on both sides; see the log")
    table = comparison_rows(results)
    files = setup.files(run_stem(setup.model_name, config.opt_dim))
    write_csv(files.csv, table)
    plot_comparison(table, files.figures, f"{setup.model_name}: post-training quantization vs pruning")
    return table, files


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
