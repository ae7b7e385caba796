"""Weight histograms of a PSGD model beside a plain one, the targets marked (the PSGD paper's visualisation).

For each chosen layer a row of two panels: the weight distribution of the plain checkpoint and of the
PSGD checkpoint (same bins), each with its targets drawn as vertical lines:

* PSGD toward the grid: the restricted symmetric ``b``-bit grid ``delta * k``, ``k = -(2^(b-1) - 1) ..
  2^(b-1) - 1``, with ``delta`` from the moving range the PSGD run tracked (stored in its checkpoint;
  :class:`quantization.position_scaling.SymmetricRangeTracker`), ``b`` the layer's PSGD bit-width (8 for
  the first and last layer below 4 bits). The plain model gets the same kind of grid from its current
  range (what post-hoc quantization uses);
* PSGD toward zero: the single target 0, on both panels.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from quantization.position_scaling import grid_step_size, restricted_level_max, zero_including_range
from studies.figures import save_figure
from training.builders import build_float_model, load_float_weights, psgd_tensor_bits
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, saved_config

__all__ = ["HistogramError", "default_layers", "grid_points", "histogram_figure", "write_weight_histograms"]

BINS = 120
DEFAULT_LAYER_COUNT = 3
WEIGHT_SUFFIX = ".weight"


class HistogramError(ValueError):
    """Checkpoints or layers the histograms cannot be drawn from (one-line message)."""


def grid_points(step_size: torch.Tensor, n_bits: int) -> np.ndarray:
    """``delta * k`` for ``k = -(2^(b-1) - 1) .. 2^(b-1) - 1`` (float64)."""
    level_max = restricted_level_max(n_bits)
    return float(step_size) * np.arange(-level_max, level_max + 1, dtype=np.float64)


def _float_model(path: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The float model of the train-compressed checkpoint ``path``, its options and its PSGD range states."""
    checkpoint = load_checkpoint(Path(path))
    try:
        config = saved_config(checkpoint["options"])
    except ValueError as error:
        raise HistogramError(f"{path}: {error}") from None
    model = build_float_model(config, pretrained=False, for_state_dict=True, num_classes=checkpoint.get("num_classes"))
    load_float_weights(model, path, config)
    return model, config, checkpoint.get("method", {}).get("psgd") or {}


def default_layers(layer_bits: dict[str, int | None]) -> list[str]:
    """A few layers of the body: the second, the middle and the second-to-last scaled weight (all if fewer)."""
    names = list(layer_bits)
    if len(names) <= DEFAULT_LAYER_COUNT:
        return names
    return list(dict.fromkeys([names[1], names[len(names) // 2], names[-2]]))


def histogram_figure(psgd_path: str | Path, plain_path: str | Path,
                     layers: Sequence[str] | None = None) -> tuple[Figure, dict[str, dict[str, np.ndarray]]]:  # fmt: skip
    """The figure and, per layer, the targets drawn on each panel (``{"plain": points, "psgd": points}``).

    ``layers``: module names of layers whose weight PSGD scaled (default :func:`default_layers`).
    """
    psgd_model, psgd_config, ranges = _float_model(psgd_path)
    if not psgd_config.psgd.enabled:
        raise HistogramError(f"{psgd_path} was trained without --psgd-target")
    plain_model, plain_config, _ = _float_model(plain_path)
    if plain_config.model.base_architecture != psgd_config.model.base_architecture:
        raise HistogramError(f"{plain_path} holds a {plain_config.model.architecture}, {psgd_path} a "
                             f"{psgd_config.model.architecture}")  # fmt: skip
    layer_bits = {name.removesuffix(WEIGHT_SUFFIX): bits for name, bits in psgd_tensor_bits(psgd_model, psgd_config).items()
                  if name.endswith(WEIGHT_SUFFIX)}  # fmt: skip
    layers = list(layers) if layers else default_layers(layer_bits)
    unknown = [name for name in layers if name not in layer_bits]
    if unknown:
        raise HistogramError(f"not a layer PSGD scaled: {', '.join(unknown)} (they are {', '.join(layer_bits)})")
    psgd_weights, plain_weights = dict(psgd_model.named_parameters()), dict(plain_model.named_parameters())
    fig = Figure(figsize=(9.0, 2.6 * len(layers)), layout="constrained")
    axes = fig.subplots(len(layers), 2, squeeze=False)
    targets: dict[str, dict[str, np.ndarray]] = {}
    for row, name in enumerate(layers):
        bits = layer_bits[name]
        weights = {"plain": plain_weights[name + WEIGHT_SUFFIX].detach(), "psgd": psgd_weights[name + WEIGHT_SUFFIX].detach()}
        if bits is None:
            targets[name] = {"plain": np.zeros(1), "psgd": np.zeros(1)}
            what = "zero"
        else:
            state = ranges.get(name + WEIGHT_SUFFIX)
            if not state:
                raise HistogramError(f"{psgd_path} has no PSGD range of {name}")
            targets[name] = {"plain": grid_points(grid_step_size(*zero_including_range(weights["plain"]), bits), bits),
                             "psgd": grid_points(grid_step_size(state["low"], state["high"], bits), bits)}  # fmt: skip
            what = f"{bits}-bit grid"
        values = {kind: weight.double().flatten().numpy() for kind, weight in weights.items()}
        low = min(float(v.min()) for v in values.values())
        high = max(float(v.max()) for v in values.values())
        bins = np.linspace(low, high, BINS + 1)
        for column, kind in enumerate(("plain", "psgd")):
            ax = axes[row, column]
            ax.hist(values[kind], bins=bins, color="tab:blue" if kind == "plain" else "tab:orange")
            for point in targets[name][kind]:
                ax.axvline(point, color="tab:red", linewidth=0.6, alpha=0.7, gid="target")
            ax.set_yscale("log")
            ax.set_title(f"{name}: {'plain' if kind == 'plain' else 'PSGD'} ({what} marked)", fontsize=9)
            ax.set_xlabel("weight")
    return fig, targets


def write_weight_histograms(psgd_path: str | Path, plain_path: str | Path, output_dir: str | Path, stem: str,
                            layers: Sequence[str] | None = None) -> list[Path]:  # fmt: skip
    """Draw :func:`histogram_figure` into ``<output_dir>/<stem>.png`` and ``.pdf``; returns their paths."""
    fig, _ = histogram_figure(psgd_path, plain_path, layers)
    return save_figure(fig, Path(output_dir), stem)
