"""Draw the paper's Fig. 3 from the weight study's results: per-tensor SQNR of quantization vs pruning.

Reads the ``<model>_<b>_bits_<estimator>[_per_channel].json`` files of the weight study and writes the scatter
plots, the gap-vs-kurtosis plot and a per-bit-width summary (CSV and markdown).

Example::

    python plot_weights_sqnr.py --input-dir plots_data/weights_sqnr --output-dir plots/weights_sqnr
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")

from studies.result_files import result_glob  # noqa: E402  (after choosing the headless backend)
from studies.weight_sqnr_plots import (  # noqa: E402
    load_results,
    select_models,
    summary_markdown,
    summary_table,
    write_figures,
    write_summary,
)
from utils.cli import NameListType  # noqa: E402
from utils.io import ensure_writable_dir  # noqa: E402


@click.command()
@click.option(
    "--input-dir",
    type=click.Path(path_type=Path),
    default=Path("plots_data/weights_sqnr"),
    show_default=True,
    help="Directory holding the weight study's result files.",
)
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=Path("plots/weights_sqnr"),
    show_default=True,
    help="Where the figures (PNG and PDF) and the summary (CSV and markdown) go.",
)
@click.option("--models", type=NameListType(), default=None, help="Comma-separated models to include (default: all).")
@click.option("--range-estimator", type=click.Choice(["mse", "minmax"], case_sensitive=False), default="mse",
              show_default=True, help="Which study setting to plot (as given to the study).")
@click.option("--per-channel/--per-tensor", default=False, show_default=True,
              help="Which study setting to plot (as given to the study).")
def main(input_dir: Path, output_dir: Path, models: list[str] | None, range_estimator: str, per_channel: bool) -> None:
    """Plot quantization vs pruning SQNR of every weight tensor (Kuzmin et al. 2023, Fig. 3)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    pattern = result_glob(range_estimator.lower(), per_channel)
    try:
        frame = load_results(input_dir, pattern)
    except NotADirectoryError as error:
        raise click.ClickException(f"{error} (run the weight study first)") from None
    if frame.empty:
        raise click.ClickException(f"no complete result files ({pattern}) in '{input_dir}'")
    try:
        frame = select_models(frame, models)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    table = summary_table(frame)
    try:
        ensure_writable_dir(output_dir)
        paths = write_summary(table, output_dir) + write_figures(frame, output_dir)
    except OSError as error:
        raise click.ClickException(str(error)) from None

    n_models, n_bits = frame["model"].nunique(), frame["n_bits"].nunique()
    click.echo(f"{len(frame)} tensor results ({n_models} model(s), {n_bits} bit-width(s)) -> {output_dir}:")
    for path in paths:
        click.echo(f"  {path}")
    click.echo()
    click.echo(summary_markdown(table), nl=False)


if __name__ == "__main__":
    main()
