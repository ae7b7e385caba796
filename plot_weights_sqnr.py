"""Draw the paper's Fig. 3 from the weight study's results: per-tensor SQNR of quantization vs pruning.

Reads the ``<model>_<b>_bits_<estimator>[_per_channel].json`` files of the weight study (or the
paper's own flat files) and writes the scatter plots, the gap-vs-kurtosis plot and a
per-bit-width summary (CSV and markdown). ``--paper`` redraws Fig. 3 from the paper's published
data (bundled in ``data/``) with our results over it; ``--paper-artefacts`` counts the values of
that data that only the paper's float16 arithmetic or search grid explain.

Example::

    python plot_weights_sqnr.py --input-dir plots_data/weights_sqnr --output-dir plots/weights_sqnr
    python plot_weights_sqnr.py --paper
    python plot_weights_sqnr.py --paper-artefacts
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")

import pandas as pd  # after choosing the headless backend

from studies.paper_data import (
    BUNDLED_TABLE,
    artefact_counts,
    artefact_legend,
    artefact_markdown,
    float16_signatures,
    read_paper_table,
)
from studies.result_files import other_settings_hint, result_glob
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
from utils.cli import NameListType
from utils.io import ensure_writable_dir


def load_ours(input_dir: Path, range_estimator: str, per_channel: bool, required: bool) -> pd.DataFrame:
    """Our results of one setting; with ``required``, no results is a one-line error naming the options needed."""
    pattern = result_glob(range_estimator, per_channel)
    try:
        frame = load_results(input_dir, pattern)
    except NotADirectoryError as error:
        if required:
            raise click.ClickException(f"{error} (run the weight study first)") from None
        click.echo(f"{error}: drawing the paper's data alone", err=True)
        return load_results_empty()
    if frame.empty:
        hint = other_settings_hint(input_dir, range_estimator, per_channel)
        message = f"no complete result files ({pattern}) in '{input_dir}'" + (f"; {hint}" if hint else "")
        if required:
            raise click.ClickException(message)
        click.echo(f"{message}: drawing the paper's data alone", err=True)
    return frame


def load_results_empty() -> pd.DataFrame:
    """An empty result table with the usual columns."""
    return pd.DataFrame(columns=list(COLUMNS)).astype({"n_bits": "int64"})


def select(frame: pd.DataFrame, models: list[str] | None) -> pd.DataFrame:
    """:func:`select_models`, its error as a one-line message."""
    try:
        return select_models(frame, models)
    except ValueError as error:
        raise click.ClickException(str(error)) from None


def read_paper(paper_table: Path) -> pd.DataFrame:
    """The bundled paper table, its errors as a one-line message."""
    try:
        return read_paper_table(paper_table)
    except ValueError as error:
        raise click.ClickException(str(error)) from None


def write_outputs(write, output_dir: Path) -> list[Path]:
    """Check the output directory, then call ``write()``; file errors become one-line messages."""
    try:
        ensure_writable_dir(output_dir)
        return write()
    except OSError as error:
        raise click.ClickException(str(error)) from None


def echo_paths(paths: list[Path]) -> None:
    for path in paths:
        click.echo(f"  {path}")
    click.echo()


def plot_ours(input_dir: Path, output_dir: Path, models, range_estimator: str, per_channel: bool) -> None:
    """Figures and summary of our results."""
    frame = select(load_ours(input_dir, range_estimator, per_channel, required=True), models)
    table = summary_table(frame)
    paths = write_outputs(lambda: write_summary(table, output_dir) + write_figures(frame, output_dir), output_dir)
    n_models, n_bits = frame["model"].nunique(), frame["n_bits"].nunique()
    click.echo(f"{len(frame)} tensor results ({n_models} model(s), {n_bits} bit-width(s)) -> {output_dir}:")
    echo_paths(paths)
    click.echo(summary_markdown(table), nl=False)


def plot_paper(
    input_dir: Path, output_dir: Path, paper_table: Path, models, range_estimator: str, per_channel: bool
) -> None:
    """The paper's Fig. 3 from its data with ours over it, and both summaries side by side."""
    paper = paper_frame(read_paper(paper_table))
    ours = load_ours(input_dir, range_estimator, per_channel, required=False)
    if models:
        unknown = sorted(set(models) - set(paper["model"]) - set(ours["model"]))
        if unknown:
            raise click.ClickException(f"no results for model(s) {', '.join(unknown)} in the paper's data or ours")
        paper = paper[paper["model"].isin(models)].reset_index(drop=True)
        ours = ours[ours["model"].isin(models)].reset_index(drop=True)
    paths = write_outputs(lambda: write_paper_outputs(paper, ours, output_dir), output_dir)
    shared = sorted(set(paper["model"]) & set(ours["model"]))
    click.echo(
        f"paper: {len(paper)} tensor results ({paper['model'].nunique()} model(s)); ours: {len(ours)} "
        f"({ours['model'].nunique()} model(s): {', '.join(sorted(ours['model'].unique())) or 'none'}); "
        f"models in both: {', '.join(shared) or 'none'} -> {output_dir}:"
    )
    echo_paths(paths)
    click.echo(comparison_markdown(comparison_table(paper, ours)), nl=False)


def print_artefacts(paper_table: Path, models) -> None:
    """Counts of the paper's data artefacts per model and kind."""
    table = read_paper(paper_table)
    if models:
        unknown = sorted(set(models) - set(table["model"]))
        if unknown:
            raise click.ClickException(f"no model(s) {', '.join(unknown)} in the paper's data")
        table = table[table["model"].isin(models)].reset_index(drop=True)
    click.echo(f"Artefacts of the paper's published weight SQNRs ({paper_table}), rows = tensor x bit-width:")
    click.echo()
    click.echo(artefact_markdown(artefact_counts(table)))
    click.echo(artefact_legend())
    for what, (count, total) in float16_signatures(table).items():
        click.echo(f"{what}: {count} of {total} rows")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--input-dir",
    type=click.Path(path_type=Path),
    default=Path("plots_data/weights_sqnr"),
    show_default=True,
    help="Directory holding the weight study's result files (or the paper's flat files).",
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=Path("plots/weights_sqnr"),
    show_default=True,
    help="Where the figures (PNG and PDF) and the summary (CSV and markdown) go.",
)
@click.option("--models", type=NameListType(), default=None, help="Comma-separated models to include (default: all).")
@click.option(
    "--range-estimator",
    type=click.Choice(["mse", "minmax"], case_sensitive=False),
    default="mse",
    show_default=True,
    help="Which study setting to plot (as given to the study).",
)
@click.option(
    "--per-channel/--per-tensor",
    default=False,
    show_default=True,
    help="Which study setting to plot (as given to the study).",
)
@click.option(
    "--paper",
    is_flag=True,
    help="Redraw the paper's Fig. 3 from its published data (--paper-table) with our results from "
    "--input-dir drawn over it, and print both per-bit-width summaries side by side.",
)
@click.option(
    "--paper-artefacts",
    is_flag=True,
    help="Print, per model, the counts of the paper's data values that only its float16 arithmetic "
    "or its +0.5 search margin explain; writes nothing.",
)
@click.option(
    "--paper-table",
    type=click.Path(path_type=Path),
    default=BUNDLED_TABLE,
    show_default=True,
    help="The paper's data as one table (regenerate with bundle_paper_weights_sqnr.py).",
)
def main(
    input_dir: Path,
    output_dir: Path,
    models: list[str] | None,
    range_estimator: str,
    per_channel: bool,
    paper: bool,
    paper_artefacts: bool,
    paper_table: Path,
) -> None:
    """Plot quantization vs pruning SQNR of every weight tensor (Kuzmin et al. 2023, Fig. 3)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if paper and paper_artefacts:
        raise click.UsageError("--paper and --paper-artefacts are separate tasks: give one")
    if paper_artefacts:
        print_artefacts(paper_table, models)
    elif paper:
        plot_paper(input_dir, output_dir, paper_table, models, range_estimator.lower(), per_channel)
    else:
        plot_ours(input_dir, output_dir, models, range_estimator.lower(), per_channel)


if __name__ == "__main__":
    main()
