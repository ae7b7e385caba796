"""The three tasks of ``plot_weights_sqnr.py``: our figures, the paper's Fig. 3 with ours over it, the paper's artefacts.

Each task reads its inputs, writes its files and returns a :class:`Report` (the files written
and the text to show). A defect the user must fix (no results, an unknown model, an unreadable
table, an output folder that cannot be written) raises :class:`ReportError` with one line.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from studies.paper_data import artefact_counts, artefact_legend, artefact_markdown, float16_signatures, read_paper_table
from studies.result_files import UNSTRUCTURED, other_settings_hint, result_glob
from studies.weight_sqnr_plots import (
    COLUMNS,
    comparison_markdown,
    comparison_table,
    load_results,
    paper_frame,
    select_models,
    summary_markdown,
    summary_table,
    write_figures,
    write_paper_outputs,
    write_summary,
)
from utils.io import ensure_writable_dir

__all__ = ["Report", "ReportError", "artefacts_report", "ours_report", "paper_report"]

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """An input or output the user must fix (one-line message)."""


@dataclass(frozen=True)
class Report:
    """What a task wrote and what it has to say (a header line, then tables)."""

    paths: tuple[Path, ...]
    header: str
    body: str


def _empty_results() -> pd.DataFrame:
    return pd.DataFrame(columns=list(COLUMNS)).astype({"n_bits": "int64"})


def load_ours(
    input_dir: Path, range_estimator: str, per_channel: bool, required: bool, structure: str = UNSTRUCTURED
) -> pd.DataFrame:
    """Our results of one setting; with ``required``, none is an error naming the options that would find some."""
    pattern = result_glob(range_estimator, per_channel, structure)
    try:
        frame = load_results(input_dir, pattern)
    except NotADirectoryError as error:
        if required:
            raise ReportError(f"{error} (run the weight study first)") from None
        logger.warning("%s: drawing the paper's data alone", error)
        return _empty_results()
    if frame.empty:
        hint = other_settings_hint(input_dir, range_estimator, per_channel, structure)
        message = f"no complete result files ({pattern}) in '{input_dir}'" + (f"; {hint}" if hint else "")
        if required:
            raise ReportError(message)
        logger.warning("%s: drawing the paper's data alone", message)
    return frame


def _read_paper(paper_table: Path) -> pd.DataFrame:
    try:
        return read_paper_table(paper_table)
    except ValueError as error:
        raise ReportError(str(error)) from None


def _write(write: Callable[[], list[Path]], output_dir: Path) -> tuple[Path, ...]:
    """Check the output folder, then write; file errors become :class:`ReportError`."""
    try:
        ensure_writable_dir(output_dir)
        return tuple(write())
    except OSError as error:
        raise ReportError(str(error)) from None


def _only_models(frames: Sequence[pd.DataFrame], models: Sequence[str] | None, where: str) -> list[pd.DataFrame]:
    """The rows of ``models`` in each frame; a model in none of them is an error."""
    if not models:
        return list(frames)
    known = set().union(*(set(frame["model"]) for frame in frames))
    unknown = sorted(set(models) - known)
    if unknown:
        raise ReportError(f"no results for model(s) {', '.join(unknown)} in {where}")
    return [frame[frame["model"].isin(models)].reset_index(drop=True) for frame in frames]


def ours_report(input_dir: Path, output_dir: Path, models: Sequence[str] | None, range_estimator: str,
                per_channel: bool, structure: str = UNSTRUCTURED) -> Report:  # fmt: skip
    """Figures and per-bit-width summary of our results (pruning: ``structure``)."""
    frame = load_ours(input_dir, range_estimator, per_channel, required=True, structure=structure)
    try:
        frame = select_models(frame, models)
    except ValueError as error:
        raise ReportError(str(error)) from None
    table = summary_table(frame)
    paths = _write(lambda: write_summary(table, output_dir) + write_figures(frame, output_dir), output_dir)
    header = (f"{len(frame)} tensor results ({frame['model'].nunique()} model(s), {frame['n_bits'].nunique()} "
              f"bit-width(s)) -> {output_dir}:")  # fmt: skip
    if structure != UNSTRUCTURED:
        blockless = int(frame["pruning_sqnr"].isna().sum())
        header = f"{header[:-1]}, pruning {structure} ({blockless} tensor result(s) without 1xN blocks: no pruning value):"
    return Report(paths, header, summary_markdown(table))


def paper_report(input_dir: Path, output_dir: Path, paper_table: Path, models: Sequence[str] | None,
                 range_estimator: str, per_channel: bool) -> Report:  # fmt: skip
    """The paper's Fig. 3 from its data with ours over it, and both summaries side by side."""
    paper = paper_frame(_read_paper(paper_table))
    ours = load_ours(input_dir, range_estimator, per_channel, required=False)
    paper, ours = _only_models([paper, ours], models, "the paper's data or ours")
    paths = _write(lambda: write_paper_outputs(paper, ours, output_dir), output_dir)
    shared = sorted(set(paper["model"]) & set(ours["model"]))
    header = (
        f"paper: {len(paper)} tensor results ({paper['model'].nunique()} model(s)); ours: {len(ours)} "
        f"({ours['model'].nunique()} model(s): {', '.join(sorted(ours['model'].unique())) or 'none'}); "
        f"models in both: {', '.join(shared) or 'none'} -> {output_dir}:"
    )
    return Report(paths, header, comparison_markdown(comparison_table(paper, ours)))


def artefacts_report(paper_table: Path, models: Sequence[str] | None) -> Report:
    """Counts of the paper's data artefacts per model and kind (nothing written)."""
    (table,) = _only_models([_read_paper(paper_table)], models, "the paper's data")
    signatures = [f"{what}: {count} of {total} rows" for what, (count, total) in float16_signatures(table).items()]
    body = "\n".join([artefact_markdown(artefact_counts(table)), artefact_legend(), *signatures]) + "\n"
    header = f"Artefacts of the paper's published weight SQNRs ({paper_table}), rows = tensor x bit-width:"
    return Report((), header, body)
