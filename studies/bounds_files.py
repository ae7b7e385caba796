"""Result files of the post-training bounds runs (quantization and pruning): JSON, CSV, npz, figure.

Every file of a run is named from one stem by :class:`RunFiles` (stems hold dots, e.g.
``sparsity0.75``, so no name is ever built with ``Path.with_suffix``):

* ``<stem>.json``: the options and one summary per layer (:func:`studies.quant_bounds.quant_bounds_layer`):
  per scope (``chunk``: the chunked problems summed; ``whole_channel``) and per chunk the summed
  energy, certified lower bound, each method's error and the SQNRs in dB;
* ``<stem>.csv``: that flattened to one row per layer and scope and one per chunk;
* ``<stem>.png`` and ``<stem>.pdf``: the per-layer figure (:func:`plot_layer_bounds`);
* with ``--save-problems``, the folder ``<stem>_problems/``: one npz per finished layer
  (``<layer index>_<layer name>.npz``) and ``index.json`` naming them. Each npz stacks the
  layer's problems of a scope, zero-padded to the layer's largest size ``n``:
  ``P[i, :n[i], :n[i]]`` is problem ``i``; keys of whole-channel problems start with
  ``whole_channel_``. Each layer's file is written once, when the layer is done, and the index
  after it (both atomically), so a killed run leaves a consistent index of its finished layers.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils.io import read_json, write_bytes_atomic, write_csv, write_json

__all__ = [
    "RunFiles",
    "bar_shown",
    "best_of",
    "check_exact_limits",
    "csv_rows",
    "format_percent",
    "layer_problem_files",
    "padded_stack",
    "plot_layer_bounds",
    "problem_arrays",
    "problem_bar",
    "read_layer_problems",
    "reset_problems",
    "scope_summaries",
    "set_columns",
    "sqnr_db",
    "summarise",
    "write_layer_problems",
    "write_npz",
    "write_run",
]

PROBLEMS_INDEX = "index.json"


@dataclass(frozen=True)
class RunFiles:
    """Every output file of a bounds run, named from ``stem`` in ``output_dir`` (the one place that names them)."""

    output_dir: Path
    stem: str

    def _file(self, extension: str) -> Path:
        return self.output_dir / f"{self.stem}.{extension}"

    @property
    def json(self) -> Path:
        return self._file("json")

    @property
    def csv(self) -> Path:
        return self._file("csv")

    @property
    def figures(self) -> tuple[Path, Path]:
        """The figure as ``.png`` and ``.pdf``."""
        return self._file("png"), self._file("pdf")

    @property
    def problems_dir(self) -> Path:
        """The folder of the per-layer problem files (``--save-problems``)."""
        return self.output_dir / f"{self.stem}_problems"

    @property
    def problems_index(self) -> Path:
        return self.problems_dir / PROBLEMS_INDEX

    def layer_problems(self, index: int, layer: str) -> Path:
        """The npz of the layer at position ``index`` of the run (its name made file-safe)."""
        return self.problems_dir / f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]', '_', layer)}.npz"

    def written(self, save_problems: bool) -> list[str]:
        """The files a run writes, for messages (the per-layer npz as a pattern)."""
        names = [self.json.name, self.csv.name] + [path.name for path in self.figures]
        if save_problems:
            names += [f"{self.problems_dir.name}/{PROBLEMS_INDEX}", f"{self.problems_dir.name}/<index>_<layer>.npz"]
        return names


def bar_shown(progress) -> bool:
    """Whether ``progress`` (a caller's bar of problem sets, or None) is a shown tqdm bar."""
    return progress is not None and getattr(progress, "disable", True) is False


def problem_bar(progress, total: int, desc: str):
    """A tqdm bar of the problems inside a set, below the caller's bar of sets ``progress``.

    Shown only when :func:`bar_shown` of ``progress``; it leaves no line behind.
    """
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="problem", leave=False, disable=not bar_shown(progress))


def format_percent(fraction: float) -> str:
    """``fraction`` as a percentage with up to 4 significant digits: 0.875 -> ``87.5%``, 0.8125 -> ``81.25%``."""
    return f"{100 * fraction:.4g}%"


def check_exact_limits(node_limit: int | None, time_limit: float | None) -> None:
    """Raise ``ValueError`` unless the exact solvers' limits are None or valid (nodes >= 1, seconds > 0)."""
    if node_limit is not None and node_limit < 1:
        raise ValueError(f"node_limit must be None or at least 1, got {node_limit}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be None or positive, got {time_limit}")


def sqnr_db(energy: float, error: float) -> float | None:
    """``10 log10(energy / error)``; None (JSON null) when undefined or infinite (``error <= 0``)."""
    if not (error > 0 and energy > 0 and math.isfinite(error)):
        return None
    return 10.0 * math.log10(energy / error)


def summarise(sets: Sequence) -> dict:
    """Sums over problem sets (:class:`studies.problem_sets.ProblemSet`): energy, bounds, each method's error, SQNRs
    in dB, the counts of ``status`` (and of ``exact_status`` where kept) and the ``seconds`` per stage.

    Methods missing from some set (e.g. ``exact`` above a size limit) are left out.
    """
    energy = sum(float(s.energy.sum()) for s in sets)
    relaxation = sum(float(s.relaxation_lb.sum()) for s in sets)
    lower = sum(float(s.best_lb.sum()) for s in sets)
    methods = [m for m in sets[0].errors if all(m in s.errors for s in sets)]
    errors = {m: sum(float(s.errors[m].sum()) for s in sets) for m in methods}
    best = sum(float(s.ub.sum()) for s in sets)
    record = {
        "problems": sum(len(s.energy) for s in sets),
        "energy": energy,
        "lower_bound": lower,
        "relaxation_lower_bound": relaxation,
        "errors": {**errors, "best": best},
        "sqnr_upper_bound_db": sqnr_db(energy, lower),
        "sqnr_relaxation_bound_db": sqnr_db(energy, relaxation),
        "sqnr_db": {**{m: sqnr_db(energy, e) for m, e in errors.items()}, "best": sqnr_db(energy, best)},
        "status": dict(Counter(status for s in sets for status in s.status)),
        "seconds": {},
    }
    if sets[0].exact_status:
        record["exact_status"] = dict(Counter(status for s in sets for status in s.exact_status))
    for s in sets:
        for stage, value in s.seconds.items():
            record["seconds"][stage] = record["seconds"].get(stage, 0.0) + value
    return record


def _row(layer: str, scope: str, record: dict, chunk: dict | None = None) -> dict:
    row = {
        "layer": layer,
        "scope": scope,
        "chunk": "" if chunk is None else chunk["chunk"],
        "inputs": "" if chunk is None else f"{chunk['inputs'][0]}-{chunk['inputs'][1]}",
        "n": "" if chunk is None else chunk["n"],
        "problems": record["problems"],
        "energy": record["energy"],
        "lower_bound": record["lower_bound"],
        "relaxation_lower_bound": record["relaxation_lower_bound"],
    }
    row.update({f"error_{method}": value for method, value in record["errors"].items()})
    row["sqnr_upper_bound_db"] = record["sqnr_upper_bound_db"]
    row["sqnr_relaxation_bound_db"] = record["sqnr_relaxation_bound_db"]
    row.update({f"sqnr_{method}_db": value for method, value in record["sqnr_db"].items()})
    row["status"] = ";".join(f"{status}:{count}" for status, count in sorted(record["status"].items()))
    if "exact_status" in record:
        row["exact_status"] = ";".join(f"{status}:{count}" for status, count in sorted(record["exact_status"].items()))
    row["seconds"] = sum(record["seconds"].values())
    return row


def csv_rows(layers: Iterable[dict]) -> pd.DataFrame:
    """One row per layer and scope (``chunk`` = the chunks summed, ``whole_channel``) and one per chunk."""
    rows = []
    for layer in layers:
        for scope, record in layer["scopes"].items():
            rows.append(_row(layer["layer"], f"layer_{scope}", record))
        rows.extend(_row(layer["layer"], "chunk", chunk, chunk) for chunk in layer["chunks"])
    return pd.DataFrame(rows)


def padded_stack(tensors: Sequence[torch.Tensor], size: int) -> np.ndarray:
    """Stack ``(B_k, n_k[, n_k])`` tensors into ``(sum B_k, size[, size])`` float64, zero-padded."""
    blocks = []
    for tensor in tensors:
        pad = [0, size - tensor.shape[-1]] * (tensor.dim() - 1)
        blocks.append(torch.nn.functional.pad(tensor.to(torch.float64), pad).numpy())
    return np.concatenate(blocks) if blocks else np.zeros((0,) + (size,) * 1)


def best_of(points: dict[str, torch.Tensor], errors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem, the point of least error among ``points`` (``(B, n)`` each) and that error (``(B,)``).

    Ties go to the point listed first.
    """
    stacked = torch.stack([errors[name] for name in points])
    best = stacked.argmin(0)
    chosen = torch.stack(list(points.values()))[best, torch.arange(stacked.shape[1], device=stacked.device)]
    return chosen, stacked.min(0).values


def scope_summaries(sets: Sequence) -> dict[str, dict]:
    """:func:`summarise` per scope present among ``sets`` (``chunk``, ``whole_channel``)."""
    return {
        scope: summarise([s for s in sets if s.scope == scope])
        for scope in ("chunk", "whole_channel")
        if any(s.scope == scope for s in sets)
    }


def set_columns(chosen: Sequence[tuple[int, object]]) -> dict[str, np.ndarray]:
    """Per-problem index columns of ``(layer index, problem set)`` pairs: ``n``, ``layer``, ``channel``,
    ``chunk``, ``status`` and ``error_<method>`` for the methods every set has."""
    sets = [s for _, s in chosen]
    columns = {
        "n": np.concatenate([np.full(s.batch_size, s.n) for s in sets]),
        "layer": np.concatenate([np.full(s.batch_size, index) for index, s in chosen]),
        "channel": np.concatenate([s.channels.numpy() for s in sets]),
        "chunk": np.concatenate([np.full(s.batch_size, s.chunk) for s in sets]),
        "status": np.array([status for s in sets for status in s.status], dtype=str),
    }
    for method in [m for m in sets[0].errors if all(m in s.errors for s in sets)]:
        columns[f"error_{method}"] = np.concatenate([s.errors[method].numpy() for s in sets])
    return columns


def problem_arrays(layer_sets: Sequence[tuple[int, object]], layer_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every problem of ``(layer index, problem set)`` pairs as stacked arrays for the npz (module doc).

    Per scope (keys of whole-channel problems start with ``whole_channel_``): each set's own
    columns (:meth:`studies.problem_sets.ProblemSet.arrays`; ``(B, n[, n])`` ones zero-padded to the
    scope's largest ``n``), then :func:`set_columns`; ``layer_names`` are the run's layers.
    """
    arrays: dict[str, np.ndarray] = {"layer_names": np.array(layer_names, dtype=str)}
    for scope, prefix in (("chunk", ""), ("whole_channel", "whole_channel_")):
        chosen = [(index, s) for index, s in layer_sets if s.scope == scope]
        if not chosen:
            continue
        size = max(s.n for _, s in chosen)
        own = [s.arrays() for _, s in chosen]
        stacked = {key: _stacked([columns[key] for columns in own], size) for key in own[0]}
        stacked.update(set_columns(chosen))
        arrays.update({prefix + key: value for key, value in stacked.items()})
    return arrays


def _stacked(parts: Sequence[torch.Tensor | np.ndarray], size: int) -> np.ndarray:
    if isinstance(parts[0], torch.Tensor) and parts[0].dim() > 1:
        return padded_stack(parts, size)
    return np.concatenate([part.numpy() if isinstance(part, torch.Tensor) else part for part in parts])


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` atomically (plain arrays only: strings as fixed-width unicode, no pickle)."""
    for key, value in arrays.items():
        if value.dtype == object:
            raise ValueError(f"array {key!r} holds Python objects; npz files here never need pickle")
    write_bytes_atomic(path, lambda handle: np.savez_compressed(handle, **arrays))


def write_run(files: RunFiles, record: dict) -> None:
    """Write ``<stem>.json`` (the whole record) and ``<stem>.csv`` (:func:`csv_rows` of its layers)."""
    write_json(files.json, record)
    write_csv(files.csv, csv_rows(record["layers"]))


def reset_problems(files: RunFiles, layer_names: Sequence[str]) -> dict:
    """Start the per-layer problem files of a run: remove those an earlier run of the same stem listed, and
    write an index without layers. Returns the index (``run``, ``layer_names``, ``layers``) to extend."""
    old = read_json(files.problems_index)
    if isinstance(old, dict):
        for entry in old.get("layers", []):
            name = Path(str(entry.get("file", ""))).name  # a bare file name: never outside the folder
            if name.endswith(".npz"):
                (files.problems_dir / name).unlink(missing_ok=True)
    index = {"run": files.stem, "layer_names": list(layer_names), "layers": []}
    write_json(files.problems_index, index)
    return index


def write_layer_problems(
    files: RunFiles, index: dict, layer_index: int, layer: str, arrays: dict[str, np.ndarray]
) -> Path:
    """Write one layer's npz, then the index with its entry (``index`` is updated in place); return the npz path."""
    path = files.layer_problems(layer_index, layer)
    write_npz(path, arrays)
    index["layers"].append(
        {
            "index": layer_index,
            "layer": layer,
            "file": path.name,
            "problems": len(arrays["n"]) if "n" in arrays else 0,
            "whole_channel_problems": len(arrays["whole_channel_n"]) if "whole_channel_n" in arrays else 0,
        }
    )
    write_json(files.problems_index, index)
    return path


def layer_problem_files(files: RunFiles) -> dict[str, Path]:
    """``{layer: npz path}`` of the finished layers listed in the run's index (empty without one)."""
    index = read_json(files.problems_index)
    if not isinstance(index, dict):
        return {}
    return {entry["layer"]: files.problems_dir / entry["file"] for entry in index.get("layers", [])}


def read_layer_problems(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one per-layer npz (no pickle)."""
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


def plot_layer_bounds(series: Sequence[dict], paths: Sequence[Path], title: str) -> None:
    """Per layer: each series' open range ``[best found, certified bound]`` as a bar, its methods as markers.

    ``series``: dicts with ``label`` (e.g. ``"INT4"`` or ``"pruning 75%"``) and ``layers``: a list
    of ``(layer name, sqnr_upper_bound_db or None, best sqnr_db, {method: sqnr_db})``. Series are drawn side by
    side at every layer, so quantization and pruning bounds can share one figure. The methods'
    markers are spread across their bar so that close values do not hide each other; the method
    ``exact`` (the proven optimum), in the middle, is drawn on top of everything as a large black-edged star. The
    legend sits right of the axes and the y-range has a margin, so no marker or bound is covered
    or clipped. The figure is saved to every path of ``paths`` (format from the extension).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(entry[0] for s in series for entry in s["layers"]))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * max(1, len(series))) + 2.5, 4.5))
    markers = ["o", "s", "^", "v", "D", "P", "X", "h"]
    method_marker: dict[str, str] = {}
    values: list[float] = []
    for k, s in enumerate(series):
        color = f"C{k}"
        for layer, upper, best, methods in s["layers"]:
            x = names.index(layer) + (k - (len(series) - 1) / 2) * width
            if upper is not None and best is not None and math.isfinite(best):
                ax.bar(x, upper - best, bottom=best, width=width * 0.9, color=color, alpha=0.25, zorder=1)
                ax.hlines(upper, x - width * 0.45, x + width * 0.45, color=color, linewidth=2, zorder=2)
                values.append(upper)
            slots = [method for method in methods if method != "exact"]  # one x position per method, exact central
            if "exact" in methods:
                slots.insert(len(slots) // 2, "exact")
            for method, value in methods.items():
                if value is None or not math.isfinite(value):
                    continue
                values.append(value)
                offset = (slots.index(method) - (len(slots) - 1) / 2) * width * 0.7 / max(1, len(slots))
                if method == "exact":
                    ax.plot(x + offset, value, marker="*", markersize=13, markerfacecolor=color, markeredgecolor="black",
                            markeredgewidth=1.0, linestyle="none", zorder=5)
                    continue
                marker = method_marker.setdefault(method, markers[len(method_marker) % len(markers)])
                ax.plot(x + offset, value, marker=marker, color=color, linestyle="none", markersize=5, zorder=3)
        ax.bar(0, 0, color=color, alpha=0.25, label=f"{s['label']}: [best found, certified bound]")
    for method, marker in method_marker.items():
        ax.plot([], [], marker=marker, color="gray", linestyle="none", label=method)
    if any("exact" in methods for s in series for *_, methods in s["layers"]):
        ax.plot([], [], marker="*", markersize=11, markerfacecolor="gray", markeredgecolor="black",
                linestyle="none", label="exact (proven optimum)")
    if values:
        low, high = min(values), max(values)
        margin = max(1.0, 0.08 * (high - low))
        ax.set_ylim(low - margin, high + margin)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("SQNR of the layer output (dB)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
