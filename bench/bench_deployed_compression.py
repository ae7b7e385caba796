"""Deployed compression: bytes and CPU latency of float, INT4 QAT, 75% pruning and both, in real runtimes.

The paper's equal-compression pair (INT4 weights against FP16 pruned to ``1 - 4/16 = 75%``) and their
combination, deployed through :mod:`deployment` for each model (``--models``):

* ``float``: the float32 model;
* ``INT4 QAT``: weights INT4 per output channel (first and last layer INT8: the paper's ``LSQ_paper``
  setup), activations 8-bit; run by the int8 kernels (an INT4 grid is an int8 grid with the same step; no
  runtime here has 4-bit CPU kernels);
* ``pruned 75% float``: every weight layer magnitude-pruned to 75% (per layer, as ``train-compressed``),
  run dense in float32;
* ``pruned 75% W8A8``: the same masks, weights INT8 per output channel, activations 8-bit, int8 kernels
  (the zeros are stored but not skipped: the kernels are dense);
* ``INT4 + pruned 75%``: both.

The models are made in-process (``compress_model``, magnitude masks, activation ranges from the offline
sample photos), not trained: latency does not depend on the accuracy, but the bytes of the sparse and packed
encodings do, through the zeros (INT4 rounds the smallest real weights to 0). The models in ``--pretrained``
(default EfficientNet-Lite0, whose ImageNet weights are bundled) start from their offline pretrained weights,
the others from random ones (CSV column ``weights``).

Bytes: the weights of the compressed layers in each encoding of :mod:`deployment.storage` (float32 for the
float deployments; the integer encodings for the integer ones), and the files the runtimes load (ONNX and
``.pt2``, scales, biases and graph included). Latency: CPU time (``time.process_time``, one thread) per batch
of sample photos at 224 px, of onnxruntime (float ONNX / int8 QDQ ONNX) and inductor (``torch.compile`` with
freezing of the float model / the PT2E int8 program); every deployment of a model is run once per repeat in
turn (interleaved, after two warm-up calls) and the median is kept. The check: the largest logit difference
between each runtime and the compressed (fake-quantized) model on that batch, relative to its largest logit.

Run: ``python bench/bench_deployed_compression.py`` (defaults: the three models, batches 1 and 16,
5 repeats, ``results/deployed_compression.csv`` and ``docs/deployed_compression.png``).
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployment import storage
from deployment.export import weight_storage
from deployment.integer_model import dense_folded_model, integer_layers, set_dequantized_weights
from deployment.onnx_qdq import export_float_onnx, inference_session, qdq_model, run_session, serialized
from deployment.pt2e_x86 import quantize_pt2e, serialized_program
from models.quantized import CompressionSpec, QuantSetup, calibrate_input_quantizers, compress_model
from models.registry import is_weights_available, list_models, load_model
from pruning.schedule import PruningScope, set_magnitude_masks
from quantization.fake_quant import QuantizerConfig
from quantization.granularity import Granularity
from quantization.quantizers import QuantScheme
from utils.images import sample_photo_batch
from utils.io import OutputPathError, check_output_path, write_csv

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "inductor")
IMAGE_SIZE = 224
WARMUP_CALLS = 2


@dataclass(frozen=True)
class Deployment:
    """A compressed model as deployed: ``weight_bits`` None runs float32 kernels, else int8 kernels (A8)."""

    name: str
    weight_bits: int | None
    sparsity: float

    @property
    def is_integer(self) -> bool:
        return self.weight_bits is not None


DEPLOYMENTS = (
    Deployment("float", None, 0.0),
    Deployment("INT4 QAT (W4A8)", 4, 0.0),
    Deployment("pruned 75% float", None, 0.75),
    Deployment("pruned 75% W8A8", 8, 0.75),
    Deployment("INT4 + pruned 75% (W4A8)", 4, 0.75),
)


def compressed_model(name: str, deployment: Deployment, photos: torch.Tensor, pretrained: bool = False) -> nn.Module:
    """``name`` (offline pretrained or random weights) compressed as ``deployment`` says (see the module doc); eval."""
    model = load_model(name, pretrained=pretrained, download=False).eval()
    weight_quant = act_quant = None
    if deployment.is_integer:
        weight_quant = QuantizerConfig(deployment.weight_bits, QuantScheme.SYMMETRIC, Granularity.per_channel(0))
        act_quant = QuantizerConfig(8, QuantScheme.ASYMMETRIC)
    spec = CompressionSpec(weight_quant=weight_quant, act_quant=act_quant, quant_setup=QuantSetup.LSQ_PAPER,
                           prune=deployment.sparsity > 0)  # fmt: skip
    layers = compress_model(model, spec)
    if deployment.sparsity > 0:
        set_magnitude_masks(layers, deployment.sparsity, PruningScope.LAYER)
    if deployment.is_integer:
        calibrate_input_quantizers(model, [photos])
    return model.eval()


@dataclass
class Deployed:
    """One deployment of one model: its runners (images -> logits) per runtime and what it measured."""

    reference: nn.Module
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    row: dict[str, object]


@torch.no_grad()
def deploy(name: str, deployment: Deployment, photos: torch.Tensor, pretrained: bool) -> Deployed:
    """Export ``deployment`` of model ``name`` to both runtimes; bytes of its weights and files, export times."""
    model = compressed_model(name, deployment, photos, pretrained)
    example = photos[:2]
    folded, pairs = dense_folded_model(model, example)
    layers = integer_layers(model, folded, pairs)  # float deployments: only for the weight counts
    sizes, per_layer = weight_storage(layers)
    numel = sum(layer["numel"] for layer in per_layer.values())
    if deployment.is_integer:
        zeros = sum(layer["sparsity"] * layer["numel"] for layer in per_layer.values()) / numel
        set_dequantized_weights(folded, layers)
    else:
        zeros = sum(int((folded.get_submodule(layer).weight == 0).sum()) for layer in layers) / numel
        sizes = {"float32": sizes["float32"]}
    start = time.perf_counter()
    onnx_model = export_float_onnx(folded, example)
    if deployment.is_integer:
        onnx_model = qdq_model(onnx_model, layers, [photos])
    onnx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if deployment.is_integer:
        program = quantize_pt2e(folded, layers, example, [photos])
    else:
        program = torch.export.export(folded, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    pt2e_seconds = time.perf_counter() - start
    session = inference_session(onnx_model, threads=1)
    runners = {"onnxruntime": partial(run_session, session),
               "inductor": torch.compile(program.module() if deployment.is_integer else copy.deepcopy(folded))}  # fmt: skip
    row = {"model": name, "weights": "pretrained" if pretrained else "random", "deployment": deployment.name,
           "weight_bits": deployment.weight_bits or 32,
           "kernels": "int8" if deployment.is_integer else "float32", "zeros": zeros,
           **{f"bytes_{encoding}": sizes.get(encoding, math.nan) for encoding in storage.ENCODINGS},
           "smallest_encoding": storage.smallest_encoding(sizes) if deployment.is_integer else "float32",
           "onnx_file_bytes": len(serialized(onnx_model)), "pt2_file_bytes": len(serialized_program(program)),
           "onnxruntime_export_s": onnx_seconds, "inductor_export_s": pt2e_seconds}  # fmt: skip
    return Deployed(model, runners, row)


def interleaved_cpu_ms(runs: Mapping[Hashable, Callable[[], object]], repeats: int) -> dict[Hashable, float]:
    """Median CPU milliseconds of each call in ``runs``: warm-up calls, then ``repeats`` rounds calling each once."""
    for run in runs.values():
        for _ in range(WARMUP_CALLS):
            run()
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in tqdm(range(repeats), desc="repeats", leave=False):
        for key, run in runs.items():
            start = time.process_time()
            run()
            times[key].append(time.process_time() - start)
    return {key: 1e3 * statistics.median(values) for key, values in times.items()}


def photo_batch(photos: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` sample photos, cycling through them."""
    return photos[torch.arange(batch_size) % len(photos)]


@torch.no_grad()
def measure_model(name: str, photos: torch.Tensor, batch_sizes: list[int], repeats: int, pretrained: bool
                  ) -> list[dict[str, object]]:  # fmt: skip
    """One row per deployment of ``name``: bytes, export times, CPU ms and relative logit error per runtime/batch."""
    deployed = [deploy(name, deployment, photos, pretrained) for deployment in tqdm(DEPLOYMENTS, desc=f"export {name}")]
    for batch_size in batch_sizes:
        images = photo_batch(photos, batch_size)
        runs = {(index, runtime): partial(runner, images)
                for index, item in enumerate(deployed) for runtime, runner in item.runners.items()}  # fmt: skip
        milliseconds = interleaved_cpu_ms(runs, repeats)
        for index, item in enumerate(deployed):
            reference = item.reference(images).double()
            for runtime, runner in item.runners.items():
                error = (runner(images).double() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
                item.row[f"{runtime}_b{batch_size}_ms"] = milliseconds[(index, runtime)]
                item.row[f"{runtime}_b{batch_size}_rel_logit_error"] = float(error)
    return [item.row for item in deployed]


def print_table(frame: pd.DataFrame, batch_sizes: list[int], repeats: int) -> None:
    """Bytes in MB (10^6) and CPU ms per batch with the speed-up over the float deployment in the same runtime."""
    pretrained = sorted(set(frame.model[frame.weights == "pretrained"]))
    print(f"\nCPU time per batch (1 thread, {IMAGE_SIZE} px, median of {repeats} interleaved repeats); "
          f"x = float ms / ms in the same runtime; weights in MB; pretrained weights: {', '.join(pretrained) or 'none'}, "
          "random for the others")  # fmt: skip
    integer_encodings = [encoding for encoding in storage.ENCODINGS if encoding != "float32"]
    header = f"{'model':18s} {'deployment':25s} {'zeros':>5s} " + " ".join(f"{e:>14s}" for e in storage.ENCODINGS)
    header += f" {'onnx MB':>8s} {'pt2 MB':>7s}"
    for batch_size in batch_sizes:
        header += " " + " ".join(f"{f'{runtime} b{batch_size}':>20s}" for runtime in RUNTIMES)
    print(header)
    for _, row in frame.iterrows():
        float_row = frame[(frame.model == row.model) & (frame.deployment == DEPLOYMENTS[0].name)].iloc[0]
        text = f"{row.model:18s} {row.deployment:25s} {100 * row.zeros:4.0f}% {row.bytes_float32 / 1e6:14.2f} "
        text += " ".join(f"{row[f'bytes_{e}'] / 1e6:14.2f}" if not math.isnan(row[f"bytes_{e}"]) else f"{'-':>14s}"
                         for e in integer_encodings)  # fmt: skip
        text += f" {row.onnx_file_bytes / 1e6:8.2f} {row.pt2_file_bytes / 1e6:7.2f}"
        for batch_size in batch_sizes:
            for runtime in RUNTIMES:
                column = f"{runtime}_b{batch_size}_ms"
                text += f" {row[column]:10.1f} ({float_row[column] / row[column]:4.2f}x)"
        print(text)


def plot(frame: pd.DataFrame, batch_sizes: list[int], path: Path) -> None:
    """Per model (columns): weight bytes per encoding, then CPU ms per runtime for each batch size (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(frame.model))
    names = [deployment.name for deployment in DEPLOYMENTS]
    figure, axes = plt.subplots(1 + len(batch_sizes), len(models), figsize=(5.5 * len(models), 3.6 * (1 + len(batch_sizes))),
                                squeeze=False)  # fmt: skip
    positions = range(len(names))
    for column, model in enumerate(models):
        rows = frame[frame.model == model].set_index("deployment").loc[names]
        label = f"{model} ({rows.weights.iloc[0]} weights)"
        width = 0.8 / len(storage.ENCODINGS)
        for offset, encoding in enumerate(storage.ENCODINGS):
            axes[0, column].bar([p + (offset - 2.5) * width for p in positions], rows[f"bytes_{encoding}"] / 1e6, width,
                                label=encoding)  # fmt: skip
        axes[0, column].set_title(f"{label}: weights")
        axes[0, column].set_ylabel("MB")
        for row, batch_size in enumerate(batch_sizes, start=1):
            width = 0.8 / len(RUNTIMES)
            for offset, runtime in enumerate(RUNTIMES):
                axes[row, column].bar([p + (offset - 0.5) * width for p in positions], rows[f"{runtime}_b{batch_size}_ms"],
                                      width, label=runtime)  # fmt: skip
            axes[row, column].set_title(f"{label}: CPU ms per batch of {batch_size} (1 thread)")
            axes[row, column].set_ylabel("ms")
        for ax in axes[:, column]:
            ax.set_xticks(list(positions), [name.replace(" (", "\n(") for name in names], fontsize=7)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_list(value: str, parse: Callable[[str], object], what: str) -> list:
    try:
        items = [parse(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of {what}") from None
    if not items:
        raise click.BadParameter(f"no {what} given")
    return items


def run_bench(models: list[str], pretrained: set[str], batch_sizes: list[int], repeats: int, output_csv: Path,
              figure: Path) -> pd.DataFrame:  # fmt: skip
    """Measure every deployment of every model (``pretrained``: those with offline pretrained weights), report."""
    torch.set_num_threads(1)
    torch._inductor.config.freezing = True
    photos = sample_photo_batch(image_size=IMAGE_SIZE)
    rows = []
    for name in models:
        rows.extend(measure_model(name, photos, batch_sizes, repeats, name in pretrained))
        write_csv(output_csv, pd.DataFrame(rows))  # the models measured so far
    frame = pd.DataFrame(rows)
    print_table(frame, batch_sizes, repeats)
    plot(frame, batch_sizes, figure)
    return frame


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--models", default="resnet18,mobilenet_v2,efficientnet_lite0", show_default=True,
              help="Comma-separated registered model names.")
@click.option("--pretrained", default="efficientnet_lite0", show_default=True,
              help="Comma-separated models of --models to start from their offline pretrained weights ('' for none).")
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True,
              help="Interleaved timed rounds (the median is kept).")
@click.option("--output-csv", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("results/deployed_compression.csv"), show_default=True)
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/deployed_compression.png"),
              show_default=True)
def main(models: str, pretrained: str, batch_sizes: str, repeats: int, output_csv: Path, figure: Path) -> None:
    names = parse_list(models, str, "model names")
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        raise click.BadParameter(f"unknown models {', '.join(unknown)}", param_hint="--models")
    pretrained_names = set(parse_list(pretrained, str, "model names")) if pretrained.strip() else set()
    if pretrained_names - set(names):
        raise click.BadParameter(f"{', '.join(sorted(pretrained_names - set(names)))} not in --models",
                                 param_hint="--pretrained")  # fmt: skip
    offline = sorted(name for name in pretrained_names if not is_weights_available(name))
    if offline:
        raise click.BadParameter(f"no offline pretrained weights for {', '.join(offline)}", param_hint="--pretrained")
    sizes = parse_list(batch_sizes, int, "integers")
    if min(sizes) < 1:
        raise click.BadParameter("batch sizes must be >= 1", param_hint="--batch-sizes")
    for option, path in (("--output-csv", output_csv), ("--figure", figure)):
        try:
            check_output_path(path, "file")
        except OutputPathError as error:
            raise click.BadParameter(str(error), param_hint=option) from None
    logging.basicConfig(level=logging.WARNING)
    run_bench(names, pretrained_names, sizes, repeats, output_csv, figure)


if __name__ == "__main__":
    main()
