#!/usr/bin/env python
"""The analytical study (paper Sec. 2): expected SQNR of INT-b quantization vs pruning for known distributions.

Example::

    python analytical_sqnr.py --output-dir plots/analytical_sqnr --weights-dir plots_data/weights_sqnr
"""
from __future__ import annotations

from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")

# imported after choosing the headless backend
from studies.analytical_sqnr import (
    SPEC_USAGE,
    SWEEP_NU,
    Distribution,
    comparison_table,
    crossover_table,
    kurtosis_sweep,
    parse_distribution,
)
from studies.analytical_sqnr_plots import crossover_summary, write_outputs
from studies.weight_sqnr_plots import load_results
from utils.cli import IntListType, setup_logging
from utils.io import ensure_writable_dir

DEFAULT_DISTRIBUTIONS = "gaussian,laplace,uniform,student_t:3,student_t:5,truncated_student_t:3:10"


def parse_distributions(ctx: click.Context, param: click.Parameter, value: str) -> list[Distribution]:
    """``gaussian,student_t:3`` -> distributions, duplicates dropped; a bad spec is a usage error."""
    specs = [spec.strip() for spec in value.split(",")]
    if not all(specs):
        raise click.BadParameter(f"'{value}' is not a comma-separated list of distributions ({SPEC_USAGE})")
    try:
        distributions = [parse_distribution(spec) for spec in specs]
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return list(dict.fromkeys(distributions))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("plots/analytical_sqnr"), show_default=True,
              help="Where the tables (CSV) and figures (PNG and PDF) go.")
@click.option("--bits", type=IntListType(2, 16), default="2,3,4,5,6,7,8", show_default=True,
              help="Bit-widths b, as a list (2,4,8) or a range (2-8); pruning uses sparsity 1 - b/16.")
@click.option("--distributions", default=DEFAULT_DISTRIBUTIONS, show_default=True, callback=parse_distributions,
              metavar="SPEC,...",
              help=f"Comma-separated distributions for the table and the SQNR-vs-bits figure: {SPEC_USAGE}.")
@click.option("--weights-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The weight study's output directory (e.g. plots_data/weights_sqnr): overlay its "
              "per-tensor SQNR gaps on the analytical curves.")  # fmt: skip
def main(output_dir: Path, bits: list[int], distributions: list[Distribution], weights_dir: Path | None) -> None:
    """Expected SQNR of INT-b quantization (MSE-optimal clipping) against magnitude pruning at 1 - b/16.

    Integrates the errors over each distribution's density, sweeps the kurtosis with a
    Student-t truncated at +-c, and writes OUTPUT_DIR/analytical_sqnr.csv, the sweep and
    crossover tables, and the figures.
    """
    setup_logging()
    weights, overlay_bits = None, []
    if weights_dir is not None:
        weights = load_results(weights_dir)
        if weights.empty:
            message = f"no complete weight-study results in '{weights_dir}'"
            raise click.BadParameter(message, param_hint="'--weights-dir'")
        overlay_bits = sorted(set(bits) & set(weights["n_bits"]))
        if not overlay_bits:
            found = ",".join(str(b) for b in sorted(weights["n_bits"].unique()))
            raise click.BadParameter(f"the results in '{weights_dir}' are for bits {found}, none of --bits",
                                     param_hint="'--weights-dir'")  # fmt: skip
    try:
        ensure_writable_dir(output_dir)
    except OSError as error:
        raise click.ClickException(str(error)) from None

    table = comparison_table(distributions, bits)
    sweep = kurtosis_sweep(bits)
    crossovers = crossover_table(bits)
    paths = write_outputs(output_dir, table, distributions, sweep, crossovers, weights, overlay_bits)

    click.echo(f"wrote {len(paths)} files to {output_dir}:")
    for path in paths:
        click.echo(f"  {path}")
    kurtosis_range = f"{sweep['kurtosis'].min():.2g} to {sweep['kurtosis'].max():.3g}"
    click.echo(f"kurtosis sweep, Student-t (nu={SWEEP_NU:g}) truncated at +-c, excess kurtosis {kurtosis_range}:")
    for line in crossover_summary(sweep, crossovers):
        click.echo(f"  {line}")


if __name__ == "__main__":
    main()
