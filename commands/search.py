"""LIMPQ's search of a per-layer bit policy: ``search-bit-policy`` (imports no torch with bundled geometry)."""
from __future__ import annotations

from pathlib import Path

import click

from commands.common import check_output
from utils.cli import IntListType


@click.command("search-bit-policy")
@click.option("--architecture", default="resnet50", show_default=True, help="A classifier of the model zoo.")
@click.option("--indicators", default=None,
              help="Importance indicators: a JSON file or LIMPQ's pickle ({'weight', 'act', 'layer_name'}), or "
                   "weight-mse / output-mse to compute data-free ones from the pretrained model. Default: the "
                   "published ResNet-50 indicators (data/limpq/resnet50_indicators.json).")  # fmt: skip
@click.option("--bits", type=IntListType(2, 8, distinct=True, descending=True), default="6,5,4,3,2", show_default=True,
              help="Candidate bit-widths (distinct; a list or a range like 2-6).")
@click.option("--wb", type=click.IntRange(1, 32), default=3, show_default=True,
              help="BitOPs budget: that of every searched layer at WB-bit weights ...")
@click.option("--ab", type=click.IntRange(1, 32), default=4, show_default=True, help="... and AB-bit inputs.")
@click.option("--compression-ratio", type=click.FloatRange(min=0), default=12.2, show_default=True,
              help="The model's weights at most 32-bit size / CR (first conv and classifier at 8 bits); 0: off.")
@click.option("--bitops/--no-bitops", default=True, show_default=True, help="The BitOPs constraint.")
@click.option("--alpha", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Weight of the weight indicators in the objective.")
@click.option("--bitops-geometry", type=click.Choice(["floored", "official"]), default="floored", show_default=True,
              help="MACs from the real (floored) output sizes, or LIMPQ's true-division count.")
@click.option("--image-size", type=click.IntRange(16, 4096), default=224, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The policy file to write (a valid --bit-policy file); its figure goes beside it (.png, .pdf).")
@click.option("--compare-with", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Another policy file of the same layers, drawn below the new one in the figure.")
@click.option("--figure/--no-figure", default=True, show_default=True,
              help="Draw the policy beside the file (<output stem>.png, .pdf); --no-figure saves a second or two.")
def search_bit_policy(output: Path, indicators: str | None, bits: list[int], bitops_geometry: str,
                      compare_with: Path | None, figure: bool, **options) -> None:  # fmt: skip
    """LIMPQ's ILP search of per-layer weight and activation bit-widths (every conv but the first)."""
    from studies.bit_policy_search import (
        BUNDLED_INDICATORS,
        BitPolicySearchError,
        SearchSettings,
        run_bit_policy_search,
    )

    check_output(output, "file", "--output")
    settings = SearchSettings(indicators=indicators or str(BUNDLED_INDICATORS), bits=tuple(bits),
                              geometry=bitops_geometry, **options)  # fmt: skip
    try:
        policy = run_bit_policy_search(settings, output, compare_with, figure)
    except BitPolicySearchError as error:
        if error.option:
            raise click.BadParameter(str(error), param_hint=f"'{error.option}'") from None
        raise click.ClickException(str(error)) from None
    target = f" (target {policy['bitops_target']:.4g})" if policy["bitops_target"] is not None else ""
    click.echo(f"{policy['status']}: {len(policy['layers'])} layers, objective {policy['objective']:.6g}, "
               f"BitOPs {policy['bitops']:.4g}{target}, compression ratio {policy['compression_ratio']:.3f}, "
               f"solved in {policy['solve_seconds'] * 1e3:.0f} ms -> {output}")  # fmt: skip
