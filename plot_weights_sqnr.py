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

matplotlib.use("Agg")  # headless, before anything imports pyplot

from studies.paper_data import BUNDLED_TABLE
from studies.result_files import UNSTRUCTURED, PruningStructureType
from studies.weight_sqnr_report import Report, ReportError, artefacts_report, ours_report, paper_report
from utils.cli import NameListType


def _echo(report: Report) -> None:
    click.echo(report.header)
    for path in report.paths:
        click.echo(f"  {path}")
    click.echo()
    click.echo(report.body, nl=False)


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
    "--pruning-structure",
    type=PruningStructureType(),
    default=UNSTRUCTURED,
    show_default=True,
    help="Which study setting to plot (as given to the study): 'unstructured' or '1xN:<N>'.",
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
    pruning_structure: str,
    paper: bool,
    paper_artefacts: bool,
    paper_table: Path,
) -> None:
    """Plot quantization vs pruning SQNR of every weight tensor (Kuzmin et al. 2023, Fig. 3)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if paper and paper_artefacts:
        raise click.UsageError("--paper and --paper-artefacts are separate tasks: give one")
    if paper and pruning_structure != UNSTRUCTURED:
        raise click.UsageError("--paper compares with the paper's unstructured pruning: leave out --pruning-structure")
    try:
        if paper_artefacts:
            report = artefacts_report(paper_table, models)
        elif paper:
            report = paper_report(input_dir, output_dir, paper_table, models, range_estimator.lower(), per_channel)
        else:
            report = ours_report(input_dir, output_dir, models, range_estimator.lower(), per_channel, pruning_structure)
    except ReportError as error:
        raise click.ClickException(str(error)) from None
    _echo(report)

if __name__ == "__main__":
    main()
