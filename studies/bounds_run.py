"""Running a post-training bounds study layer by layer, keeping every finished layer on disk."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from studies.bounds_files import plot_layer_bounds, write_npz, write_run
from studies.layer_problems import LayerData

__all__ = ["run_layers"]

logger = logging.getLogger(__name__)

LayerSolver = Callable[[LayerData], dict]
ArrayBuilder = Callable[[list, list[str]], dict[str, np.ndarray]]


def run_layers(
    layers: dict[str, LayerData],
    solve_layer: LayerSolver,
    problem_arrays: ArrayBuilder | None,
    header: dict,
    output_dir: Path,
    name: str,
    plot_label: str,
) -> dict:
    """Solve every layer and rewrite ``<name>.json``/``.csv`` (and ``.npz`` with ``problem_arrays``) after each.

    ``solve_layer(data)`` returns ``{"summary": dict, "sets": [...]}``. An exception in one layer
    is logged and recorded under ``failed_layers`` (type and message); the other layers go on and
    the finished ones stay in the files. At the end the per-layer figure ``<name>.png`` is drawn.
    """
    record = {**header, "layers": [], "failed_layers": []}
    layer_names = list(layers)
    kept_sets: list = []
    for index, (layer_name, data) in enumerate(layers.items()):
        start = time.perf_counter()
        try:
            result = solve_layer(data)
        except Exception as error:  # noqa: BLE001 - one failed layer must not lose the finished ones
            logger.exception("layer %s failed", layer_name)
            record["failed_layers"].append({"layer": layer_name, "error": f"{type(error).__name__}: {error}"})
        else:
            result["summary"]["seconds"] = time.perf_counter() - start
            record["layers"].append(result["summary"])
            if problem_arrays is not None:
                kept_sets.extend((index, problem_set) for problem_set in result["sets"])
        write_run(output_dir, name, record)
        if problem_arrays is not None:
            write_npz(output_dir / f"{name}.npz", problem_arrays(kept_sets, layer_names))
    if record["layers"]:
        series = [{"label": plot_label, "layers": [_plot_entry(layer) for layer in record["layers"]]}]
        plot_layer_bounds(series, output_dir / name, f"{header.get('model', '')}: {plot_label}")
    return record


def _plot_entry(layer: dict) -> tuple[str, float | None, float | None, dict]:
    scope = layer["scopes"]["chunk"]
    methods = {method: value for method, value in scope["sqnr_db"].items() if method != "best"}
    return layer["layer"], scope["sqnr_upper_bound_db"], scope["sqnr_db"]["best"], methods
