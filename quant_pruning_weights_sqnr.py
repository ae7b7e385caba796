#!/usr/bin/env python
"""Weight study: per-tensor SQNR of INT-b quantization vs magnitude pruning at sparsity 1 - b/16."""
from __future__ import annotations

from pathlib import Path

import click

from studies.result_files import UNSTRUCTURED, PruningStructureType, table_file_name
from utils.cli import DeviceType, IntListType, NameListType, default_device, setup_logging

# Real ImageNet models whose weights ship in pip packages (requirements.txt): studied offline by default.
DEFAULT_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def resolve_models(requested: list[str] | None) -> list[str]:
    """Expand the ``--models`` choice into registry names (the default: the bundled models + every model at hand)."""
    from models.registry import UnknownModelError, check_model_name, is_weights_available, list_models

    known = list_models()
    if requested is None:
        return list(DEFAULT_MODELS) + [n for n in known if n not in DEFAULT_MODELS and is_weights_available(n)]
    if "all" in requested:
        return known
    for name in requested:
        try:
            check_model_name(name)
        except UnknownModelError as error:
            raise click.BadParameter(f"{error} (or 'all' for the whole zoo)", param_hint="'--models'") from None
    return requested


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--models",
    type=NameListType(),
    default=None,
    help="Comma-separated model names, or 'all' for the whole zoo (downloads missing weights). "
    "Default: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 (weights in pip packages) plus every "
    "zoo model whose weights are in the local torch hub cache.",
)
@click.option("--bits", type=IntListType(2, 16), default="2,3,4,5,6,7,8", show_default=True,
              help="Bit-widths b, as a list (2,4,8) or a range (2-8); pruning uses sparsity 1 - b/16.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("plots_data/weights_sqnr"), show_default=True)
@click.option("--range-estimator", type=click.Choice(["mse", "minmax"], case_sensitive=False),
              default="mse", show_default=True, help="Clipping range of the quantizer.")
@click.option("--per-channel/--per-tensor", default=False, show_default=True,
              help="One quantization step per output channel instead of per tensor.")
@click.option("--pruning-structure", type=PruningStructureType(), default=UNSTRUCTURED, show_default=True,
              help="The pruning compared with: 'unstructured' (single weights of lowest magnitude) or '1xN:<N>' "
              "(blocks of N consecutive output channels x 1 input channel x the kernel, lowest L1 norm first). "
              "Tensors without 1xN blocks (e.g. depthwise) get null pruning values.")
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
@click.option("--random-init", is_flag=True,
              help="Analyse randomly initialised models instead of pretrained ones (for testing only).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def main(models, bits, output_dir, range_estimator, per_channel, pruning_structure, device, random_init, progress) -> None:
    """Compare INT-b quantization with magnitude pruning on every weight tensor of each model.

    Writes OUTPUT_DIR/<model>_<b>_bits_<estimator>[_per_channel][_1x<N>].json per model and
    bit-width and the tidy table OUTPUT_DIR/weights_sqnr_<estimator>[_per_channel][_1x<N>].csv of
    every result of the setting in OUTPUT_DIR. Complete files from an earlier run are reused.
    """
    from studies.weight_sqnr import run_study
    from utils.io import ensure_writable_dir

    setup_logging()
    model_names = resolve_models(models)
    try:
        ensure_writable_dir(output_dir)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    results, skipped = run_study(
        model_names, bits, output_dir, range_estimator.lower(), per_channel, device, not random_init, progress,
        pruning_structure,
    )
    studied = sorted({result["model"] for result in results})
    if skipped:
        click.echo(f"skipped {len(skipped)} model(s) without weights: {', '.join(skipped)}")
    if not studied:
        raise click.ClickException("no model could be studied")
    click.echo(f"studied {len(studied)} model(s) at bits {','.join(map(str, bits))}: {', '.join(studied)}")
    table = output_dir / table_file_name(range_estimator.lower(), per_channel, pruning_structure)
    click.echo(f"results in {output_dir}/ (table: {table})")

if __name__ == "__main__":
    main()
