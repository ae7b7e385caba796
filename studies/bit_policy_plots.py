"""Figures of mixed-precision bit policies and of the layer importance indicators they come from.

* :func:`bit_policy_figure`: the weight and input bit-widths of every layer of a
  :class:`models.bit_policy.BitPolicy` as two bar series over the layers (in the policy's order);
  with a second policy (e.g. learned against data-free indicators, or the official against the
  floored geometry) the two are drawn one above the other on shared axes and the layers where they
  differ are shaded in both, their names set in red. A layer kept in floating point (``None``) has
  no bar and a cross at the bottom of the axes.
* :func:`indicators_figure`: LIMPQ's indicators plot: one line per candidate bit-width over the
  layers, weights and activations in two panels (:class:`studies.indicators.Indicators`, learned
  step sizes or :mod:`studies.data_free_indicators`).

Figures are built with :class:`matplotlib.figure.Figure` (never ``pyplot``); :func:`write_bit_policy_figure`
and :func:`write_indicators_figure` write PNG and PDF, each atomically
(:func:`studies.figures.save_figure`), laid out once for both (:func:`fix_layout`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from models.bit_policy import MAX_BITS, BitPolicy
from studies.figures import DPI, bit_colors, save_figure
from studies.indicators import Indicators

__all__ = [
    "BIT_POLICY_STEM",
    "INDICATORS_STEM",
    "bit_policy_figure",
    "differing_layers",
    "fix_layout",
    "indicators_figure",
    "write_bit_policy_figure",
    "write_indicators_figure",
]

BIT_POLICY_STEM = "bit_policy"
INDICATORS_STEM = "indicators"
SERIES_COLORS = {"weights": "tab:blue", "activations": "tab:orange"}
BAR_WIDTH = 0.4  # of a layer's unit slot, per series
DIFFERENCE_STYLE = {"color": "tab:red", "alpha": 0.15, "linewidth": 0, "zorder": 0}
FLOAT_MARKER = {"marker": "x", "linestyle": "", "markersize": 5, "zorder": 3}
PANEL_HEIGHT_IN = 2.6
MIN_WIDTH_IN = 6.4
WIDTH_PER_LAYER_IN = 0.2


def _figure_width(n_layers: int) -> float:
    """Room for a rotated layer name under each layer."""
    return max(MIN_WIDTH_IN, 1.5 + WIDTH_PER_LAYER_IN * n_layers)


def _float_heights(bits: Sequence[int | None]) -> np.ndarray:
    """Bit-widths as bar heights: ``NaN`` (no bar) for a layer kept in floating point."""
    return np.array([np.nan if b is None else b for b in bits], dtype=np.float64)


def differing_layers(first: BitPolicy, second: BitPolicy) -> list[int]:
    """Indices of the layers whose weight or input bit-width differs between two policies of the same layers.

    Raises:
        ValueError: the policies have different lengths or name different layers (one line,
            naming the first difference).
    """
    if len(first.layers) != len(second.layers):
        raise ValueError(f"cannot compare bit policies of different lengths: {len(first.layers)} and "
                         f"{len(second.layers)} layers")  # fmt: skip
    for index, (a, b) in enumerate(zip(first.layers, second.layers)):
        if a != b:
            raise ValueError(f"cannot compare bit policies of different layers: layer {index} is {a!r} in one, {b!r} in the other")
    return [
        index
        for index, pair in enumerate(zip(first.weight_bits, second.weight_bits, first.act_bits, second.act_bits))
        if pair[0] != pair[1] or pair[2] != pair[3]
    ]


def _draw_policy(ax: Axes, policy: BitPolicy, title: str) -> None:
    """Weight bars left of each layer's slot, input bars right of it; crosses at the bottom for float tensors."""
    x = np.arange(len(policy.layers), dtype=np.float64)
    for offset, (series, bits) in zip((-0.5, 0.5), (("weights", policy.weight_bits), ("activations", policy.act_bits))):
        heights = _float_heights(bits)
        ax.bar(x + offset * BAR_WIDTH, heights, BAR_WIDTH, color=SERIES_COLORS[series], label=series, zorder=2)
        kept_float = np.isnan(heights)
        if kept_float.any():
            ax.plot(x[kept_float] + offset * BAR_WIDTH, np.full(kept_float.sum(), 0.3), color=SERIES_COLORS[series],
                    label=f"{series} in float", **FLOAT_MARKER)  # fmt: skip
    ax.set_title(title, fontsize="medium", loc="left")
    ax.set_ylabel("bits")
    ax.set_ylim(0, MAX_BITS + 0.5)
    ax.set_yticks(range(0, MAX_BITS + 1, 2))
    ax.grid(axis="y", color="0.9", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)


def bit_policy_figure(
    policy: BitPolicy, other: BitPolicy | None = None, labels: tuple[str, str] = ("policy", "other policy")
) -> Figure:
    """The bit-widths of ``policy`` per layer (and of ``other`` below it, differing layers shaded).

    ``labels`` title the panels (the second only with ``other``). Raises :class:`ValueError` for
    an ``other`` of different layers (:func:`differing_layers`).
    """
    policies = [policy] if other is None else [policy, other]
    differing = [] if other is None else differing_layers(policy, other)
    n_layers = len(policy.layers)
    fig = Figure(figsize=(_figure_width(n_layers), 1.6 + PANEL_HEIGHT_IN * len(policies)), layout="constrained")
    axes = fig.subplots(len(policies), 1, sharex=True, squeeze=False)[:, 0]
    for ax, shown, label in zip(axes, policies, labels):
        _draw_policy(ax, shown, label)
        for index in differing:
            ax.axvspan(index - 0.5, index + 0.5, **DIFFERENCE_STYLE)
    axes[-1].set_xticks(np.arange(n_layers), policy.layers, rotation=90, fontsize="x-small")
    for index in differing:
        axes[-1].get_xticklabels()[index].set_color(DIFFERENCE_STYLE["color"])
    axes[-1].set_xlim(-0.6, n_layers - 0.4)
    axes[-1].set_xlabel("layer")
    handles, names = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # float markers that only the second policy has
        for handle, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    if other is not None:
        handles.append(Patch(facecolor=DIFFERENCE_STYLE["color"], alpha=DIFFERENCE_STYLE["alpha"]))
        names.append(f"differs ({len(differing)} of {n_layers} layers)")
    fig.legend(handles, names, loc="outside upper center", ncols=min(len(names), 4), fontsize="small", frameon=False)
    return fig


def indicators_figure(indicators: Indicators, log_scale: bool | None = None) -> Figure:
    """One line per bit-width over the layers: weight indicators above, activation indicators below.

    ``log_scale``: a logarithmic y axis (default: when every value is positive, as for
    quantization errors that span decades).
    """
    layers, bits = indicators.layers, indicators.bits
    tables = {"weights": np.asarray(indicators.weight, dtype=np.float64),
              "activations": np.asarray(indicators.act, dtype=np.float64)}  # fmt: skip
    for name, table in tables.items():
        if table.shape != (len(layers), len(bits)):
            raise ValueError(f"{name} indicators of shape {table.shape} for {len(layers)} layers and {len(bits)} bit-widths")
    if log_scale is None:
        log_scale = all(bool((table > 0).all()) for table in tables.values())
    colors = bit_colors(bits)
    fig = Figure(figsize=(_figure_width(len(layers)), 1.6 + 2 * PANEL_HEIGHT_IN), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(layers))
    for ax, (name, table) in zip(axes, tables.items()):
        for column, n_bits in enumerate(bits):
            ax.plot(x, table[:, column], marker="o", markersize=3, linewidth=1.2, color=colors[n_bits], label=f"{n_bits} bits")
        ax.set_title(name, fontsize="medium", loc="left")
        ax.set_ylabel("indicator")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(color="0.9", linewidth=0.6)
    axes[-1].set_xticks(x, layers, rotation=90, fontsize="x-small")
    axes[-1].set_xlabel("layer")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncols=len(bits), fontsize="small", frameon=False)
    return fig


def fix_layout(fig: Figure) -> Figure:
    """Run the figure's constrained layout once (at the saved DPI) and keep it; returns ``fig``.

    With a layout engine, every ``savefig`` lays the figure out and draws it twice (a dry draw for
    the layout, then the real one); fixed, each format is drawn once (about 10 % of the time of
    writing a bit-policy figure as PNG and PDF).
    """
    engine = fig.get_layout_engine()
    if engine is not None:
        fig.set_dpi(DPI)
        engine.execute(fig)
        fig.set_layout_engine(None)  # no engine: not even a placeholder, which would still cost a dry draw
    return fig


def write_bit_policy_figure(
    policy: BitPolicy,
    output_dir: str | os.PathLike,
    other: BitPolicy | None = None,
    labels: tuple[str, str] = ("policy", "other policy"),
    stem: str = BIT_POLICY_STEM,
) -> list[Path]:
    """Write :func:`bit_policy_figure` as ``<stem>.png`` and ``<stem>.pdf`` in ``output_dir``."""
    return save_figure(fix_layout(bit_policy_figure(policy, other, labels)), Path(output_dir), stem)


def write_indicators_figure(
    indicators: Indicators, output_dir: str | os.PathLike, stem: str = INDICATORS_STEM, log_scale: bool | None = None
) -> list[Path]:
    """Write :func:`indicators_figure` as ``<stem>.png`` and ``<stem>.pdf`` in ``output_dir``."""
    return save_figure(fix_layout(indicators_figure(indicators, log_scale)), Path(output_dir), stem)
