#!/usr/bin/env python
"""Post-training, per-layer analysis of quantization and pruning with real layer inputs (paper Sec. 4)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from utils.cli import DeviceType, IntListType, NameListType, default_device, setup_logging

DEFAULT_MODEL = "efficientnet_lite0"

# For the help and the option checks only, so that --help does not import torch's solvers: the methods of
# studies.quant_bounds.METHODS and pruning.sparse_ls_heuristics.METHODS, and studies.layer_problems'
# DEFAULT_MAX_WHOLE_DIM (the configs' default, which the CLI leaves in place unless given;
# tests/test_quant_bounds.py checks all three agree).
QUANT_METHODS = ("rtn", "sdp_rounding", "gptq", "adaround")
PRUNE_METHODS = ("magnitude", "magnitude_refit", "obs", "iht", "swap")
BLOCK_PRUNE_METHODS = ("magnitude", "magnitude_refit", "obs", "swap")  # pruning.group_sparse_ls.METHODS
MAX_WHOLE_DIM = 128


class MethodListType(NameListType):
    """A comma-separated subset of ``choices`` (e.g. ``rtn,gptq``); an unknown name fails with the choices listed."""

    name = "method-list"

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def convert(self, value, param, ctx) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = super().convert(value, param, ctx)
        unknown = [name for name in names if name not in self.choices]
        if unknown:
            self.fail(f"unknown method {unknown[0]!r}; choose from {', '.join(self.choices)} (comma-separated)",
                      param, ctx)
        return tuple(name for name in self.choices if name in names)


def _methods_option(choices: tuple[str, ...], what: str) -> Callable[[Callable], Callable]:
    return click.option(
        "--methods", type=MethodListType(choices), default=None,
        help=f"Comma-separated {what} to run and report: {', '.join(choices)} [default: all].",
    )


def _max_whole_dim_option(what: str) -> Callable[[Callable], Callable]:
    return click.option(
        "--max-whole-dim", type=click.IntRange(0), default=None,
        help=f"Also {what} whole channels (one problem each) when the fan-in is at most this [default: {MAX_WHOLE_DIM}].",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Per-layer post-training quantization and pruning on calibration data."""
    setup_logging()


def _load_model(model_name: str):
    from models import UnknownModelError, WeightsUnavailableError, load_model

    try:
        return load_model(model_name)
    except UnknownModelError as error:
        raise click.BadParameter(str(error), param_hint="'--model-name'") from None
    except WeightsUnavailableError as error:
        raise click.ClickException(str(error)) from None


def _echo_layers(model) -> None:
    from models.layers import weight_layers

    for name, module in weight_layers(model):
        click.echo(f"{name:50s} {type(module).__name__:16s} {tuple(module.weight.shape)}")


@cli.command("list-layers")
@click.option("--model-name", default=DEFAULT_MODEL, show_default=True)
def list_layers(model_name: str) -> None:
    """Print the name, type and weight shape of every Conv/Linear layer of a model."""
    _echo_layers(_load_model(model_name))


def layer_data_options(command: Callable) -> Callable:
    """The options shared by the bounds commands: model, layers, calibration data, device, outputs."""
    options = [
        click.option("--model-name", default=DEFAULT_MODEL, show_default=True, help="A model of the zoo."),
        click.option("--layer-name", "layer_names", multiple=True,
                     help="A Conv/Linear layer (repeatable; default: every one; see --list-layers)."),
        click.option("--list-layers", "list_only", is_flag=True,
                     help="Print name, type and weight shape of every layer, then exit."),
        click.option("--opt-dim", type=click.IntRange(0), default=32, show_default=True,
                     help="Inputs per chunk problem (whole input channels: opt-dim // kernel size of them); "
                     "0: one chunk per channel."),
        click.option("--num-output-channels", type=click.IntRange(-1), default=-1, show_default=True,
                     help="Output channels per layer (the first ones; -1: all)."),
        click.option("--num-samples", type=click.IntRange(1), default=None,
                     help="Calibration images [default: 64 from --images-dir, else all 5 sample photos]."),
        click.option("--images-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="ImageNet-style folder of class folders; images drawn with --seed across classes. "
                     "Default: scikit-image's sample photos."),
        click.option("--device", type=DeviceType(), default=default_device(), show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--save-problems", is_flag=True,
                     help="Also write every problem and its solutions: OUTPUT_DIR/<run>_problems/ holds one "
                     "<index>_<layer>.npz per finished layer and index.json naming them."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


# The exact solvers' default work limits (quantization.qp_exact / pruning.sparse_ls DEFAULT_NODE_LIMIT), for the help
# only: the CLI passes None and the solvers apply their own (tests/test_bounds_determinism.py checks these agree).
QUANT_NODE_LIMIT = 10_000_000
PRUNE_NODE_LIMIT = 100_000
BLOCK_PRUNE_NODE_LIMIT = 20_000  # pruning.group_sparse_ls.DEFAULT_NODE_LIMIT


def exact_limit_options(default_nodes: str) -> Callable[[Callable], Callable]:
    """``--node-limit`` (deterministic work limit) and ``--time-limit`` (optional wall clock) of the exact solvers.

    ``default_nodes`` names the node limit's default in the help; the option is None then (the solver's own).
    """
    options = [
        click.option("--node-limit", type=click.IntRange(1), default=None,
                     help="Work limit per problem of the exact solver (branch-and-bound nodes); deterministic. "
                     f"Default: {default_nodes}."),
        click.option("--time-limit", type=click.FloatRange(0, min_open=True), default=None,
                     help="Optional wall-clock limit per problem in seconds (default: none); results then depend "
                     "on machine load."),
    ]

    def decorate(command: Callable) -> Callable:
        return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)

    return decorate


def _listed_only(model_name: str, list_only: bool, num_output_channels: int) -> bool:
    """Check the shared options; with --list-layers print the layers and return True (the command ends)."""
    if num_output_channels == 0:
        raise click.BadParameter("must be -1 (all) or at least 1", param_hint="'--num-output-channels'")
    if list_only:
        _echo_layers(_load_model(model_name))
    return list_only


def prepare_run(model_name, layer_names, num_samples, images_dir, device, seed, output_dir, save_problems, progress):
    """The layers' data (model and calibration images loaded) and the run's setup, with one-line errors for bad
    input: ``(layers, studies.bounds_run.RunSetup)``."""
    import torch

    from models.layer_inputs import PatchMismatchError, resolve_layers
    from models.layers import weight_layers
    from studies.bounds_run import RunSetup
    from studies.layer_problems import collect_layer_data
    from utils.calibration import load_calibration_images
    from utils.io import ensure_writable_dir

    torch.manual_seed(seed)
    model = _load_model(model_name).to(device)
    names = list(layer_names) or [name for name, _ in weight_layers(model)]
    try:
        resolve_layers(model, names)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--layer-name'") from None
    try:
        ensure_writable_dir(output_dir)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    count = num_samples or (64 if images_dir is not None else 5)
    try:
        images = load_calibration_images(images_dir, count, seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--images-dir'") from None
    try:
        layers = collect_layer_data(model, names, images)
    except (ValueError, PatchMismatchError) as error:
        raise click.ClickException(str(error)) from None
    calibration = {"images_dir": None if images_dir is None else str(images_dir), "images": len(images), "seed": seed}
    return layers, RunSetup(model_name, output_dir, calibration, str(device), save_problems, progress)


@cli.command("quant-bounds-data-opt")
@layer_data_options
@exact_limit_options(f"the solver's, {QUANT_NODE_LIMIT:,}")
@click.option("--n-bits", type=click.IntRange(2, 8), default=4, show_default=True, help="Weight bit-width b.")
@click.option("--range-search-method", type=click.Choice(["mse", "minmax"], case_sensitive=False), default="mse",
              show_default=True, help="Range of the layer's weight quantizer (gives the step s).")
@click.option("--per-channel/--per-tensor", default=False, show_default=True, help="One step per output channel.")
@click.option("--box/--no-box", default=False, show_default=True,
              help="Tighten the relaxation with the b-bit box (the paper's has none).")
@click.option("--solver", type=click.Choice(["ours", "clarabel", "scs"], case_sensitive=False), default="ours",
              show_default=True, help="SDP backend: our batched torch solver, or cvxpy per problem (the reference).")
@click.option("--exact", is_flag=True, help="Also prove the true minimum of every chunk by branch and bound.")
@_methods_option(QUANT_METHODS, "PTQ methods (feasible points)")
@_max_whole_dim_option("solve")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("plots_data/quant_bounds"), show_default=True)
def quant_bounds_data_opt(
    model_name, layer_names, list_only, opt_dim, num_output_channels, num_samples, images_dir, node_limit, time_limit,
    device, seed, save_problems, progress, n_bits, range_search_method, per_channel, box, solver, exact, methods,
    max_whole_dim, output_dir,
) -> None:
    """Certified bounds on the post-training quantization error of each layer, beside real PTQ methods.

    Per output channel and chunk of inputs, the error ||A w - s A z||^2 of integer weights z is an
    integer QP; its SDP relaxation gives a certified lower bound (an upper bound on any method's
    SQNR), and round-to-nearest, the paper's SDP rounding, GPTQ and AdaRound (--methods) give
    feasible points.

    Writes OUTPUT_DIR/<run>.json, <run>.csv, <run>.png and <run>.pdf (with --save-problems also
    <run>_problems/), <run> = quant_bounds_<model>_<b>bits_opt<d>_<range> followed by _per_channel,
    _box, _<solver>, _exact and _methods-<m1>+<m2> where those options differ from the defaults.
    """
    if _listed_only(model_name, list_only, num_output_channels):
        return
    if not exact and (node_limit is not None or time_limit is not None):
        raise click.UsageError("--node-limit and --time-limit limit the exact solver: give --exact")
    from studies.quant_bounds import QuantBoundsConfig, run_quant_bounds

    config = QuantBoundsConfig(
        n_bits=n_bits, opt_dim=opt_dim, range_method=range_search_method.lower(), per_channel=per_channel, box=box,
        solver=solver.lower(), exact=exact, node_limit=node_limit, time_limit=time_limit,
        num_output_channels=num_output_channels, seed=seed,
        **_given(methods=methods, max_whole_dim=max_whole_dim),
    )
    layers, setup = prepare_run(model_name, layer_names, num_samples, images_dir, device, seed, output_dir, save_problems,
                                progress)
    record, files = run_quant_bounds(layers, config, setup)
    _echo_summary(record, files, save_problems)


def _given(**options) -> dict:
    """The options that were given (not None): the others keep the config's defaults."""
    return {key: value for key, value in options.items() if value is not None}


def _sparsity(n_bits: int | None, sparsity: float | None) -> float:
    """``--sparsity``, or the compression of ``--n-bits`` (default 4)."""
    from studies.compression import pruning_sparsity

    if n_bits is not None and sparsity is not None:
        raise click.UsageError("give --n-bits or --sparsity, not both")
    return pruning_sparsity(4 if n_bits is None else n_bits) if sparsity is None else sparsity


@cli.command("prune-bounds-data-opt")
@layer_data_options
@exact_limit_options(f"the solver's, {PRUNE_NODE_LIMIT:,}")
@click.option("--n-bits", type=click.IntRange(2, 8), default=None,
              help="Prune at the compression of INT-b: sparsity 1 - b/16 [default: 4, i.e. 75%].")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of the weights removed from every chunk (instead of --n-bits).")
@click.option("--max-exact-dim", type=click.IntRange(0), default=48, show_default=True,
              help="Solve chunks of at most this many inputs exactly (larger ones: certified bound only).")
@_methods_option(PRUNE_METHODS, "pruning methods (feasible points; swap starts from the best of the other four)")
@_max_whole_dim_option("bound")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("plots_data/prune_bounds"), show_default=True)
def prune_bounds_data_opt(
    model_name, layer_names, list_only, opt_dim, num_output_channels, num_samples, images_dir, node_limit, time_limit,
    device, seed, save_problems, progress, n_bits, sparsity, max_exact_dim, methods, max_whole_dim, output_dir,
) -> None:
    """Exact post-training pruning of each layer (sparse least squares), certified bounds and real methods.

    Per output channel and chunk of inputs, the best k-sparse weights minimise ||A (w - x)||^2; the
    branch and bound proves the optimum (or reports the gap at its limit), the perspective
    relaxation bounds it, and magnitude pruning (with and without refit), OBS, IHT and a swap
    search (--methods) are compared.

    Writes OUTPUT_DIR/<run>.json, <run>.csv, <run>.png and <run>.pdf (with --save-problems also
    <run>_problems/), <run> = prune_bounds_<model>_sparsity<s>_opt<d> (e.g. sparsity0.875),
    followed by _methods-<m1>+<m2> when not all methods run.
    """
    if _listed_only(model_name, list_only, num_output_channels):
        return
    from studies.prune_bounds import PruneBoundsConfig, run_prune_bounds

    config = PruneBoundsConfig(
        sparsity=_sparsity(n_bits, sparsity), opt_dim=opt_dim, node_limit=node_limit, time_limit=time_limit,
        max_exact_dim=max_exact_dim, num_output_channels=num_output_channels,
        **_given(methods=methods, max_whole_dim=max_whole_dim),
    )
    layers, setup = prepare_run(model_name, layer_names, num_samples, images_dir, device, seed, output_dir, save_problems,
                                progress)
    record, files = run_prune_bounds(layers, config, setup)
    _echo_summary(record, files, save_problems)


@cli.command("block-prune-bounds-data-opt")
@layer_data_options
@exact_limit_options(f"the solver's, {BLOCK_PRUNE_NODE_LIMIT:,}")
@click.option("--block-size", type=click.IntRange(1), default=4, show_default=True,
              help="N: output channels per 1xN block (a block: N channels x one input channel x the kernel).")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="p: share of the blocks removed from every block row and chunk (floor(p m) of m).")
@click.option("--max-exact-dim", type=click.IntRange(0), default=48, show_default=True,
              help="Solve chunks of at most this many inputs exactly (larger ones: certified bounds only).")
@_methods_option(BLOCK_PRUNE_METHODS, "1xN pruning methods (feasible points; swap starts from the best of the others)")
@_max_whole_dim_option("bound")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("plots_data/block_prune_bounds"), show_default=True)
def block_prune_bounds_data_opt(
    model_name, layer_names, list_only, opt_dim, num_output_channels, num_samples, images_dir, node_limit, time_limit,
    device, seed, save_problems, progress, block_size, sparsity, max_exact_dim, methods, max_whole_dim, output_dir,
) -> None:
    """Exact post-training 1xN block pruning of each layer, certified bounds and real methods.

    Per block row (N consecutive output channels) and chunk of whole input channels, the best
    blocks to keep (the same input channels for the N channels, refit) minimise the summed
    ||A (w_c - x_c)||^2; a branch and bound over input channels proves the optimum (or reports the
    gap at its limit), the unstructured and the group perspective relaxations bound it, and the
    1xN magnitude mask (with and without refit), group OBS and a swap search (--methods) are
    compared. Default layers: those 1xN pruning prunes (not the first conv, no depthwise conv, no
    classifier). --num-output-channels is rounded up to whole block rows.

    Writes OUTPUT_DIR/<run>.json, <run>.csv, <run>.png and <run>.pdf (with --save-problems also
    <run>_problems/), <run> = block_prune_bounds_<model>_1x<N>_sparsity<p>_opt<d>, followed by
    _methods-<m1>+<m2> when not all methods run.
    """
    if _listed_only(model_name, list_only, num_output_channels):
        return
    from pruning.block_masks import prunable_layers
    from studies.block_prune_bounds import BlockPruneBoundsConfig, run_block_prune_bounds

    config = BlockPruneBoundsConfig(
        block_size=block_size, sparsity=sparsity, opt_dim=opt_dim, node_limit=node_limit, time_limit=time_limit,
        max_exact_dim=max_exact_dim, num_output_channels=num_output_channels,
        **_given(methods=methods, max_whole_dim=max_whole_dim),
    )
    names = layer_names or tuple(prunable_layers(_load_model(model_name)))
    layers, setup = prepare_run(model_name, names, num_samples, images_dir, device, seed, output_dir, save_problems,
                                progress)
    record, files = run_block_prune_bounds(layers, config, setup)
    _echo_summary(record, files, save_problems)


@cli.command("compare-bounds")
@layer_data_options
@exact_limit_options(f"each solver's own: {QUANT_NODE_LIMIT:,} for quantization, {PRUNE_NODE_LIMIT:,} for pruning")
@click.option("--n-bits", "bit_widths", type=IntListType(2, 8), default="2-8", show_default=True,
              help="Bit-widths b (pruning at sparsity 1 - b/16), as a list (2,4,8) or a range (2-8).")
@click.option("--max-exact-dim", type=click.IntRange(0), default=48, show_default=True,
              help="Both sides solve chunks of at most this many inputs exactly (--opt-dim above it: bounds only).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("plots_data/compare_bounds"), show_default=True)
def compare_bounds(
    model_name, layer_names, list_only, opt_dim, num_output_channels, num_samples, images_dir, node_limit, time_limit,
    device, seed, save_problems, progress, bit_widths, max_exact_dim, output_dir,
) -> None:
    """The paper's comparison: per layer and bit-width, quantization's SQNR range against pruning's.

    Runs both bounds (whole channels skipped) for every b and writes the comparison
    OUTPUT_DIR/compare_bounds_<model>_opt<d>.csv, .png and .pdf, plus each side's run files per b:
    <side>_bounds_<model>_<b>bits_opt<d>.json, .csv, .png and .pdf with <side> quant and prune
    (with --save-problems also <side>_bounds_<model>_<b>bits_opt<d>_problems/).
    """
    if _listed_only(model_name, list_only, num_output_channels):
        return
    from studies.bounds_files import format_percent
    from studies.compare_bounds import CompareBoundsConfig, NoComparisonError, run_compare_bounds

    config = CompareBoundsConfig(
        bit_widths=tuple(bit_widths), opt_dim=opt_dim, max_exact_dim=max_exact_dim, node_limit=node_limit,
        time_limit=time_limit, num_output_channels=num_output_channels, seed=seed,
    )
    layers, setup = prepare_run(model_name, layer_names, num_samples, images_dir, device, seed, output_dir, save_problems,
                                progress)
    try:
        table, files = run_compare_bounds(layers, config, setup)
    except NoComparisonError as error:
        raise click.ClickException(str(error)) from None
    for _, row in table.iterrows():
        click.echo(
            f"{row['layer']} INT{row['n_bits']} vs {format_percent(row['sparsity'])} sparse: quantization "
            f"[{_db(row['quant_best_db'])}, {_db(row['quant_bound_db'])}], pruning "
            f"[{_db(row['prune_best_db'])}, {_db(row['prune_bound_db'])}] -> {row['provably_better']}"
        )
    names = [files.csv.name] + [path.name for path in files.figures]
    click.echo(f"results in {output_dir}: {', '.join(names)} (and each side's run files per bit-width)")


def _echo_summary(record: dict, files, save_problems: bool) -> None:
    for layer in record["layers"]:
        scope = layer["scopes"]["chunk"]
        upper, best = scope["sqnr_upper_bound_db"], scope["sqnr_db"]["best"]
        click.echo(
            f"{layer['layer']}: SQNR best method {_db(best)}, certified bound {_db(upper)} "
            f"({scope['problems']} problems, {layer['dead_channels']} dead channels)"
        )
    for failed in record["failed_layers"]:
        click.echo(f"{failed['layer']}: FAILED ({failed['error']})")
    click.echo(f"results in {files.output_dir}: {', '.join(files.written(save_problems))}")


def _db(value: float | None) -> str:
    return "inf dB" if value is None else f"{value:.2f} dB"


if __name__ == "__main__":
    cli()
