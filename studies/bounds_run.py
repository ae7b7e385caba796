"""Running a post-training bounds study layer by layer, keeping every finished layer on disk."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from studies.bounds_files import (
    RunFiles,
    plot_layer_bounds,
    problem_arrays,
    reset_problems,
    write_layer_problems,
    write_run,
)
from studies.layer_problems import LayerData, problem_set_count
from studies.problem_sets import BoundsConfig, config_record

__all__ = ["BoundsStudy", "RunSetup", "run_layers", "run_study", "sets_bar"]

logger = logging.getLogger(__name__)

LayerSolver = Callable[[LayerData], dict]


@dataclass(frozen=True)
class RunSetup:
    """What a bounds study needs besides its config: where it writes and what its files record.

    ``calibration`` describes the calibration data (recorded as is); ``save_problems`` also writes
    every problem (:func:`run_layers`); ``progress`` shows a bar of problem sets.
    """

    model_name: str
    output_dir: Path
    calibration: dict
    device: str
    save_problems: bool = False
    progress: bool = False

    def files(self, stem: str) -> RunFiles:
        """The files of the run named ``stem`` in ``output_dir``."""
        return RunFiles(self.output_dir, stem)

    def header(self, kind: str, config: dict) -> dict:
        """What a bounds run's JSON records besides its layers (``config``: the config as a JSON-ready dict)."""
        return {"kind": kind, "model": self.model_name, "config": config, "calibration": self.calibration,
                "device": self.device}


def sets_bar(total: int, shown: bool):
    """A tqdm bar of ``total`` problem sets (hidden unless ``shown``), for the studies' layer functions."""
    from tqdm import tqdm

    return tqdm(total=total, desc="problem sets", unit="set", disable=not shown)


def run_layers(
    layers: dict[str, LayerData],
    solve_layer: LayerSolver,
    save_problems: bool,
    header: dict,
    files: RunFiles,
    plot_label: str,
) -> dict:
    """Solve every layer; after each rewrite the run's JSON and CSV (and with ``save_problems`` write the layer's npz,
    :func:`studies.bounds_files.problem_arrays`, and the problems index), all named by ``files``.

    ``solve_layer(data)`` returns ``{"summary": dict, "sets": [...]}``. An exception in one layer
    is logged and recorded under ``failed_layers`` (type and message); the other layers go on and
    the finished ones stay in the files. Each layer's npz holds only its own problems (written once:
    the work per layer does not grow with the layer count); its ``layer`` column indexes
    ``layer_names``, the run's layers. At the end the per-layer figure is drawn.
    """
    record = {**header, "layers": [], "failed_layers": []}
    layer_names = list(layers)
    index = reset_problems(files, layer_names) if save_problems else None
    for layer_index, (layer_name, data) in enumerate(layers.items()):
        start = time.perf_counter()
        try:
            result = solve_layer(data)
        except Exception as error:  # one failed layer must not lose the finished ones
            logger.exception("layer %s failed", layer_name)
            record["failed_layers"].append({"layer": layer_name, "error": f"{type(error).__name__}: {error}"})
        else:
            result["summary"]["seconds"] = time.perf_counter() - start
            record["layers"].append(result["summary"])
            if save_problems:
                arrays = problem_arrays([(layer_index, s) for s in result["sets"]], layer_names)
                write_layer_problems(files, index, layer_index, layer_name, arrays)
        write_run(files, record)
    if record["layers"]:
        series = [{"label": plot_label, "layers": [_plot_entry(layer) for layer in record["layers"]]}]
        plot_layer_bounds(series, files.figures, f"{header.get('model', '')}: {plot_label}")
    return record


def _plot_entry(layer: dict) -> tuple[str, float | None, float | None, dict]:
    scope = layer["scopes"]["chunk"]
    methods = {method: value for method, value in scope["sqnr_db"].items() if method != "best"}
    return layer["layer"], scope["sqnr_upper_bound_db"], scope["sqnr_db"]["best"], methods


@dataclass(frozen=True)
class BoundsStudy:
    """One bounds study (quantization, pruning, block pruning): what :func:`run_study` needs of it.

    ``kind`` is recorded in the run's JSON; ``run_stem(model_name, config)`` names its files;
    ``solve_layer(data, config, bar)`` solves one layer (updating the bar of problem sets);
    ``plot_label(config)`` labels its figure.
    """

    kind: str
    run_stem: Callable[[str, BoundsConfig], str]
    solve_layer: Callable[..., dict]
    plot_label: Callable[[BoundsConfig], str]


def run_study(study: BoundsStudy, layers: dict[str, LayerData], config: BoundsConfig, setup: RunSetup
              ) -> tuple[dict, RunFiles]:  # fmt: skip
    """Run ``study`` on ``layers``: every layer solved and written as it finishes (:func:`run_layers`), a bar of
    problem sets when ``setup.progress``. Returns the run's record and its files (named by ``study.run_stem``)."""
    files = setup.files(study.run_stem(setup.model_name, config))
    header = setup.header(study.kind, config_record(config))
    with sets_bar(problem_set_count(layers.values(), config.opt_dim, config.max_whole_dim), setup.progress) as bar:
        record = run_layers(layers, lambda data: study.solve_layer(data, config, bar), setup.save_problems, header,
                            files, study.plot_label(config))  # fmt: skip
    return record, files
