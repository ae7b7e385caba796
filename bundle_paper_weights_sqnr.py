"""Regenerate ``data/paper_weights_sqnr.csv.gz`` (and its LICENSE copy) from the paper's published folder.

The folder holds the 315 flat JSON files ``<model>_<b>_bits_mse.json`` that Kuzmin et al. (2023)
published (repository Qualcomm-AI-research/pruning-vs-quantization, ``plots_data/weights_sqnr/``)
and their LICENSE. The output is byte-reproducible.

Example::

    python bundle_paper_weights_sqnr.py --source-dir ../shared/data/paper_weights_sqnr
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from studies.paper_data import BUNDLED_LICENSE, BUNDLED_TABLE, DEFAULT_SOURCE_DIR, bundle_paper_data


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--source-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_SOURCE_DIR,
    show_default=True,
    help="The paper's folder of <model>_<b>_bits_mse.json files and its LICENSE.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=BUNDLED_TABLE,
    show_default=True,
    help="The table to write (gzip CSV); the LICENSE is copied beside it as <name>.LICENSE.",
)
def main(source_dir: Path, output: Path) -> None:
    """Bundle the paper's per-tensor weight SQNRs as one compact table, its licence notice beside it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    license_path = (
        BUNDLED_LICENSE if output == BUNDLED_TABLE else output.with_name(output.name.split(".")[0] + ".LICENSE")
    )
    try:
        frame, paths = bundle_paper_data(source_dir, output, license_path)
    except (OSError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"{len(frame)} rows: {frame['model'].nunique()} models, bits {', '.join(map(str, sorted(frame['n_bits'].unique())))}"
    )
    for path in paths:
        click.echo(f"  {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
