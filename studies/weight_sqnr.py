"""Per-tensor SQNR of INT-b quantization against magnitude pruning at equal compression.

For every weight tensor ``w`` (``n`` entries) of the Conv/ConvTranspose/Linear layers of a
model and every bit-width ``b``:

* quantization: symmetric signed INT-b, range from the MSE-optimal (or min-max) estimator,
  ``quant_mse = mean((w - Q(w))^2)``, ``quant_sparsity`` = share of entries quantized to 0;
* pruning: the ``round(s n)`` smallest magnitudes set to zero at ``s = 1 - b/16`` (a b-bit
  integer against a 16-bit float keeps the same number of bits as a ``b/16`` share of
  16-bit values); ``pruning_mse = mean of the pruned w^2``;
* corrected pruning: quantization's own zeros are free storage, so pruning may keep only
  ``(1 - quant_sparsity) * b / 16`` of the entries for the same bits;
* 1xN block pruning (``--pruning-structure 1xN:<N>``) instead of single weights: the
  ``floor(s B)`` of the tensor's ``B`` blocks (``N`` consecutive output channels x one input
  channel x the whole kernel) of lowest L1 norm zeroed (:func:`pruning.block_masks.one_by_n_mask`,
  blocks inside each group of a grouped convolution), ``pruning_mse`` = mean square of the zeroed
  weights (no refit, as for single weights); the corrected column the same at the corrected
  sparsity. A tensor with fewer than ``N`` output channels per group (every depthwise convolution
  when ``N > 1``), a grouped transposed convolution or a 1-D tensor has no 1xN blocks: its pruning
  values are null (counted in one logged line per model); its quantization values are kept;
* ``SQNR = 10 log10(mean(w^2) / mse)`` dB and the biased excess sample kurtosis
  ``m4 / m2^2 - 3``.

All sums run in float64 (float32 on MPS) whatever the weights' dtype. Each tensor is sorted once for
all bit-widths (:func:`prepare_tensor`); only the range search runs per bit-width, for the tensors of a
model together (:func:`search_ranges`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from models.layers import output_channel_axis, weight_layers
from pruning.block_masks import one_by_n_mask
from pruning.masks import magnitude_pruning_sse, sorted_magnitudes
from quantization.grid_error import SortedValues, accumulation_dtype, as_rows, grid_sse, sort_rows, zero_count
from quantization.quantizers import QuantScheme, params_from_range
from quantization.range_estimators import mse_range_search_many
from studies.compression import pruning_sparsity, sqnr_db
from studies.result_files import UNSTRUCTURED, result_file_name, result_glob, structure_block_size, table_file_name
from utils.io import read_json, write_csv, write_json

log = logging.getLogger(__name__)

RANGE_ESTIMATORS = ("mse", "minmax")
METRICS = (
    "sample_kurtosis", "quant_sqnr", "quant_mse", "quant_sparsity", "quant_step_size",
    "pruning_sqnr", "pruning_mse", "pruning_sqnr_corrected", "pruning_mse_corrected",
)  # fmt: skip
# Sorted tensors kept between bit-widths by iter_study_model (about 40 bytes per weight): up to 1 GiB.
PREPARED_CACHE_BYTES = 1 << 30
PRUNING_KEYS = ("pruning_sqnr", "pruning_mse", "pruning_sqnr_corrected", "pruning_mse_corrected")
# Weights of the layers whose ranges are searched together (all their tensors prepared and stored at once,
# about 40 bytes per weight: values, search keys, two prefix sums, the squares' prefix sum): up to 320 MiB.
SEARCH_GROUP_VALUES = 1 << 23
# Settings that result files written before they existed leave out, with the value those files were made with.
SETTING_DEFAULTS = {"pruning_structure": UNSTRUCTURED}


def excess_kurtosis(values: torch.Tensor) -> float:
    """Biased excess kurtosis ``m4 / m2^2 - 3`` (``scipy.stats.kurtosis`` defaults); NaN if constant."""
    centered = values - values.mean()
    m2 = (centered * centered).mean()
    m4 = (centered**4).mean()
    return float(m4 / (m2 * m2) - 3.0) if m2 > 0 else math.nan


@dataclass(frozen=True)
class PreparedTensor:
    """What every bit-width of one weight tensor's study needs, computed once: its sorts, prefix sums and moments.

    ``sorted_rows``: the rows (one, or one per channel) sorted, with their prefix sums;
    ``squares_prefix``: ``[0, cumsum(sort(w^2))]`` over the whole tensor (magnitude pruning);
    the tensor's size, mean square and excess kurtosis; ``per_channel``: one row per channel.
    """

    sorted_rows: SortedValues
    squares_prefix: torch.Tensor
    numel: int
    mean_square: float
    kurtosis: float
    per_channel: bool

    @property
    def nbytes(self) -> int:
        """Bytes held by its tensors (the stored sorted rows in full, also where other tensors share them)."""
        return self.sorted_rows.nbytes + self.squares_prefix.numel() * self.squares_prefix.element_size()


def prepare_tensor(weight: torch.Tensor, ch_axis: int | None = None) -> PreparedTensor:
    """Sort ``weight`` (per channel of ``ch_axis``, else as one row) and take what every bit-width needs."""
    return prepare_group([(weight, ch_axis)])[0]


def prepare_group(weights: Sequence[tuple[torch.Tensor, int | None]]) -> list[PreparedTensor]:
    """:func:`prepare_tensor` of each ``(weight, ch_axis)``, their sorted rows stored together
    (:meth:`SortedValues.from_row_sets`), so that one search over all of them (:func:`search_ranges`)
    reads them without a copy."""
    row_sets = [as_rows(weight.detach(), ch_axis) for weight, ch_axis in weights]
    joined = SortedValues.from_row_sets(row_sets)
    prepared = []
    row, offset = 0, 0
    for (weight, ch_axis), rows in zip(weights, row_sets):
        sorted_rows = joined.select(torch.arange(row, row + rows.shape[0], device=joined.device))
        numel = rows.numel()
        flat = joined.flat_values[offset:offset + numel]  # the tensor's values, in another order
        if ch_axis is None:  # the one sorted row holds the magnitudes in two runs
            squares = sorted_magnitudes(flat) ** 2
        else:
            squares = sort_rows(weight.detach().abs().reshape(1, -1))[0] ** 2
        prepared.append(PreparedTensor(
            sorted_rows=sorted_rows,
            squares_prefix=torch.cat([squares.new_zeros(1), squares.cumsum(0)]),
            numel=numel,
            mean_square=float(sorted_rows.energy.sum()) / numel,
            kurtosis=excess_kurtosis(flat),
            per_channel=ch_axis is not None,
        ))  # fmt: skip
        row, offset = row + rows.shape[0], offset + numel
    return prepared


def group_nbytes(prepared: Sequence[PreparedTensor]) -> int:
    """Bytes held by a group's prepared tensors (:func:`prepare_group`), shared stored rows counted once."""
    stored = {id(p.sorted_rows.flat_values): p.sorted_rows.nbytes for p in prepared}
    return sum(stored.values()) + sum(p.nbytes - p.sorted_rows.nbytes for p in prepared)


def check_range_estimator(range_estimator: str) -> None:
    """Raise ValueError unless ``range_estimator`` is one of :data:`RANGE_ESTIMATORS`."""
    if range_estimator not in RANGE_ESTIMATORS:
        raise ValueError(f"range_estimator must be one of {RANGE_ESTIMATORS}, got {range_estimator!r}")


def search_ranges(prepared: Sequence[PreparedTensor], n_bits: int, range_estimator: str = "mse") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The symmetric INT-``n_bits`` quantizer's range ``(min, max)`` per row of each prepared tensor.

    ``mse``: the MSE-optimal ranges, the tensors searched together
    (:func:`quantization.range_estimators.mse_range_search_many`); ``minmax``: the rows' extremes.
    """
    check_range_estimator(range_estimator)
    if range_estimator == "mse":
        return mse_range_search_many([p.sorted_rows for p in prepared], n_bits, QuantScheme.SYMMETRIC)
    return [(p.sorted_rows.smallest, p.sorted_rows.largest) for p in prepared]


def metrics_at_range(
    prepared: PreparedTensor, n_bits: int, min_val: torch.Tensor, max_val: torch.Tensor
) -> dict[str, float | list[float]]:
    """The study's metrics of one prepared weight tensor (:func:`prepare_tensor`) quantized to INT-``n_bits``
    with the range ``[min_val, max_val]`` (per row)."""
    return group_metrics([prepared], n_bits, [(min_val, max_val)])[0]


def group_metrics(
    prepared: Sequence[PreparedTensor], n_bits: int, ranges: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[dict[str, float | list[float]]]:
    """:func:`metrics_at_range` of each prepared tensor with its ranges, the quantization errors and
    zeros of all their rows counted at once."""
    rows = SortedValues.stack([p.sorted_rows for p in prepared])
    low, high = (torch.cat(list(ends)) for ends in zip(*ranges))
    params = params_from_range(low, high, n_bits, QuantScheme.SYMMETRIC)
    sse = grid_sse(rows, params.step_size[:, None], params.zero_point[:, None], params.q_min, params.q_max)[:, 0]
    zeros = zero_count(rows, params.step_size)
    sizes = [p.sorted_rows.n_rows for p in prepared]
    parts = zip(prepared, sse.split(sizes), zeros.split(sizes), params.step_size.split(sizes))
    return [_metrics(p, n_bits, float(part_sse.sum()), float(part_zeros.sum()), steps.tolist()) for p, part_sse, part_zeros, steps in parts]


def _metrics(prepared: PreparedTensor, n_bits: int, sse: float, zeros: float, step_size: list[float]) -> dict[str, float | list[float]]:
    """The metrics of a tensor from its quantization's squared error, zero count and step sizes (per row)."""
    numel, mean_square = prepared.numel, prepared.mean_square
    quant_mse = sse / numel
    quant_sparsity = zeros / numel
    sparsity = pruning_sparsity(n_bits)
    corrected_sparsity = 1.0 - (1.0 - quant_sparsity) * n_bits / 16.0
    pruning_mse = float(magnitude_pruning_sse(prepared.squares_prefix, sparsity)) / numel
    pruning_mse_corrected = float(magnitude_pruning_sse(prepared.squares_prefix, corrected_sparsity)) / numel
    return {
        "sample_kurtosis": prepared.kurtosis,
        "quant_sqnr": sqnr_db(mean_square, quant_mse),
        "quant_mse": quant_mse,
        "quant_sparsity": quant_sparsity,
        "quant_step_size": step_size if prepared.per_channel else step_size[0],
        "pruning_sqnr": sqnr_db(mean_square, pruning_mse),
        "pruning_mse": pruning_mse,
        "pruning_sqnr_corrected": sqnr_db(mean_square, pruning_mse_corrected),
        "pruning_mse_corrected": pruning_mse_corrected,
    }


def study_prepared(
    prepared: PreparedTensor,
    bits: Sequence[int],
    range_estimator: str = "mse",
    ranges: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[int, dict[str, float | list[float]]]:
    """The study's metrics of one prepared weight tensor (:func:`prepare_tensor`) for each bit-width in ``bits``.

    ``ranges``: the quantizer's ranges already searched (:func:`search_ranges`), per bit-width; the others are searched here.
    """
    check_range_estimator(range_estimator)
    ranges = ranges or {}
    return {
        n_bits: metrics_at_range(prepared, n_bits, *(ranges.get(n_bits) or search_ranges([prepared], n_bits, range_estimator)[0]))
        for n_bits in bits
    }


def block_pruning_sse(weight: torch.Tensor, block_size: int, sparsity: float, groups: int = 1) -> float:
    """Energy ``sum w^2`` of the weights that 1xN pruning at ``sparsity`` zeroes (:func:`one_by_n_mask`).

    ``weight`` is ``(C_out, C_in / groups, *kernel)``; a sparsity of 1 zeroes every block.
    """
    squares = weight.detach().to(accumulation_dtype(weight.device)) ** 2
    if sparsity >= 1.0:
        return float(squares.sum())
    return float(squares[~one_by_n_mask(weight.detach(), block_size, sparsity, groups)].sum())


def block_pruning_metrics(
    weight: torch.Tensor, block_size: int, n_bits: int, quant_sparsity: float, mean_square: float, groups: int = 1
) -> dict[str, float | None]:
    """The pruning metrics (:data:`PRUNING_KEYS`) of 1xN block pruning at ``1 - b/16`` and at the corrected sparsity.

    ``weight`` is ``(C_out, C_in / groups, *kernel)``. All None when it has no 1xN blocks: fewer than
    2 dimensions or fewer than ``block_size`` output channels per group.
    """
    if weight.dim() < 2 or weight.shape[0] // groups < block_size:
        return dict.fromkeys(PRUNING_KEYS)
    numel = weight.numel()
    pruning_mse = block_pruning_sse(weight, block_size, pruning_sparsity(n_bits), groups) / numel
    corrected_sparsity = 1.0 - (1.0 - quant_sparsity) * n_bits / 16.0
    pruning_mse_corrected = block_pruning_sse(weight, block_size, corrected_sparsity, groups) / numel
    return {
        "pruning_sqnr": sqnr_db(mean_square, pruning_mse),
        "pruning_mse": pruning_mse,
        "pruning_sqnr_corrected": sqnr_db(mean_square, pruning_mse_corrected),
        "pruning_mse_corrected": pruning_mse_corrected,
    }


def block_layout(module: nn.Module) -> tuple[torch.Tensor | None, int]:
    """``(weight as (C_out, C_in / groups, *kernel), groups)`` of a layer; ``(None, 1)`` for a grouped transposed conv."""
    weight, groups = module.weight.detach(), getattr(module, "groups", 1)
    if output_channel_axis(module) != 0:
        if groups != 1:
            return None, 1
        weight = weight.transpose(0, 1)
    return weight, groups


def study_tensor(
    weight: torch.Tensor,
    bits: Sequence[int],
    range_estimator: str = "mse",
    ch_axis: int | None = None,
    block_size: int | None = None,
    groups: int = 1,
) -> dict[int, dict[str, float | list[float] | None]]:
    """The study's metrics of one weight tensor for each bit-width in ``bits`` (sorted once).

    Args:
        weight: any shape and float dtype, on any device.
        range_estimator: ``mse`` (MSE-optimal clipping) or ``minmax``.
        ch_axis: quantize per channel along this axis; None for one quantizer per tensor.
        block_size: compare with 1xN block pruning of this ``N`` (``weight`` then laid out as
            ``(C_out, C_in / groups, *kernel)``); None for unstructured magnitude pruning.
    """
    check_range_estimator(range_estimator)
    prepared = prepare_tensor(weight, ch_axis)
    results = study_prepared(prepared, bits, range_estimator)
    if block_size is not None:
        for n_bits, metrics in results.items():
            metrics.update(
                block_pruning_metrics(weight, block_size, n_bits, metrics["quant_sparsity"], prepared.mean_square, groups)
            )
    return results


def iter_study_model(
    model: nn.Module,
    bits: Sequence[int],
    range_estimator: str = "mse",
    per_channel: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cache_bytes: int = PREPARED_CACHE_BYTES,
    structure: str = UNSTRUCTURED,
) -> Iterator[tuple[int, dict[str, dict]]]:
    """Yield ``(b, {module name: metrics + shape + numel})`` for each bit-width as soon as it is done.

    Bit-widths are studied one after the other (every tensor at ``b``, then the next ``b``), so a
    caller can save each one before the next starts. The layers go in runs of consecutive layers of at
    most :data:`SEARCH_GROUP_VALUES` weights: the tensors of a run are sorted and stored together
    (:func:`prepare_group`), their ranges searched at once (:func:`search_ranges`), and the run is kept
    for the next bit-widths while the kept runs hold at most ``cache_bytes``; the runs beyond are
    prepared again for each bit-width. With a ``1xN:<N>``
    ``structure`` the pruning metrics are those of 1xN block pruning (:func:`block_pruning_metrics`).
    """
    check_range_estimator(range_estimator)
    block_size = structure_block_size(structure)
    layers = list(weight_layers(model))
    runs = list(layer_groups(layers, SEARCH_GROUP_VALUES))
    kept: dict[int, list[PreparedTensor]] = {}
    kept_bytes = 0
    with tqdm(total=len(bits) * len(layers), desc="tensors x bits", leave=False, disable=not progress) as bar:
        for position, n_bits in enumerate(bits):
            last = position == len(bits) - 1
            per_layer: dict[str, dict] = {}
            for group_index, group in enumerate(runs):
                prepared_group = kept.get(group_index)
                if prepared_group is None:
                    prepared_group = prepare_group([
                        (module.weight.detach().to(device), output_channel_axis(module) if per_channel else None)
                        for _, module in group
                    ])
                    size = group_nbytes(prepared_group)
                    if not last and kept_bytes + size <= cache_bytes:
                        kept[group_index] = prepared_group
                        kept_bytes += size
                ranges = search_ranges(prepared_group, n_bits, range_estimator)
                group_results = group_metrics(prepared_group, n_bits, ranges)
                for (name, module), prepared, metrics in zip(group, prepared_group, group_results):
                    if block_size is not None:
                        weight, groups = block_layout(module)
                        if weight is None:
                            metrics.update(dict.fromkeys(PRUNING_KEYS))
                        else:
                            metrics.update(block_pruning_metrics(
                                weight.to(device), block_size, n_bits, metrics["quant_sparsity"], prepared.mean_square,
                                groups,
                            ))  # fmt: skip
                    per_layer[name] = {"shape": list(module.weight.shape), "numel": prepared.numel, **metrics}
                    bar.update()
            yield n_bits, per_layer


def layer_groups(layers: Sequence[tuple[str, nn.Module]], max_values: int) -> Iterator[list[tuple[str, nn.Module]]]:
    """Runs of consecutive layers holding at most ``max_values`` weights together (a larger layer alone)."""
    group: list[tuple[str, nn.Module]] = []
    size = 0
    for name, module in layers:
        numel = module.weight.numel()
        if group and size + numel > max_values:
            yield group
            group, size = [], 0
        group.append((name, module))
        size += numel
    if group:
        yield group


def log_blockless(model_name: str, structure: str, layers: dict[str, dict]) -> int:
    """Log (one line) and return how many of a model's tensors got null pruning values (no 1xN blocks)."""
    count = sum(1 for metrics in layers.values() if metrics["pruning_mse"] is None)
    if count:
        log.info(
            "%s, %s: %d of %d tensors have no 1xN blocks (fewer than N output channels per group, e.g. depthwise, "
            "or grouped transposed): null pruning values", model_name, structure, count, len(layers),
        )  # fmt: skip
    return count


def study_model(
    model: nn.Module,
    bits: Sequence[int],
    range_estimator: str = "mse",
    per_channel: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    structure: str = UNSTRUCTURED,
) -> dict[int, dict[str, dict]]:
    """``{b: {module name: metrics + shape + numel}}`` for every studied weight tensor of ``model``
    (:func:`iter_study_model`, collected)."""
    return dict(iter_study_model(model, bits, range_estimator, per_channel, device, progress, structure=structure))


def result_path(
    output_dir: Path, model_name: str, n_bits: int, range_estimator: str, per_channel: bool, structure: str = UNSTRUCTURED
) -> Path:
    """Where the result of one model, bit-width and setting is written."""
    return output_dir / result_file_name(model_name, n_bits, range_estimator, per_channel, structure)


def check_result_file(path: Path, config: dict) -> tuple[dict | None, str | None]:
    """``(data, None)`` if the result file at ``path`` is complete and was made with ``config``.

    Otherwise ``(None, why)``: ``why`` is None for a missing file, else a few words on why the
    existing file cannot be reused (truncated or corrupt, incomplete, other settings).
    """
    if not path.exists():
        return None, None
    data = read_json(path)
    if not isinstance(data, dict):
        return None, "truncated or corrupt (not a JSON object)"
    if data.get("complete") is not True or not isinstance(data.get("layers"), dict):
        return None, "incomplete (no 'complete': true or no layers)"
    def setting(key: str):
        return data.get(key, SETTING_DEFAULTS.get(key))

    changed = [key for key, value in config.items() if setting(key) != value]
    if changed:
        key = changed[0]
        return None, f"made with other settings ({key} {setting(key)!r}, now {config[key]!r})"
    return data, None


def load_complete_result(path: Path, config: dict) -> dict | None:
    """The result file at ``path`` if it is complete and was made with ``config``, else None."""
    return check_result_file(path, config)[0]


def results_frame(results: Sequence[dict]) -> pd.DataFrame:
    """Tidy table: one row per model, bit-width and layer."""
    rows = []
    for result in results:
        for layer, metrics in result["layers"].items():
            step_size = metrics["quant_step_size"]
            rows.append(
                {
                    "model": result["model"],
                    "layer": layer,
                    "n_bits": result["n_bits"],
                    "sparsity": result["sparsity"],
                    "shape": "x".join(str(d) for d in metrics["shape"]),
                    "numel": metrics["numel"],
                    **{key: metrics[key] for key in METRICS if key != "quant_step_size"},
                    "quant_step_size": step_size if not isinstance(step_size, list) else None,
                }
            )
    return pd.DataFrame(rows)


def write_results_table(
    output_dir: Path, range_estimator: str, per_channel: bool, weights: str, structure: str = UNSTRUCTURED
) -> Path:
    """Gather every complete result file of this setting in ``output_dir`` into one tidy CSV."""
    config = {"range_estimator": range_estimator, "per_channel": per_channel, "weights": weights,
              "pruning_structure": structure}  # fmt: skip
    results = [
        result
        for path in sorted(output_dir.glob(result_glob(range_estimator, per_channel, structure)))
        if (result := load_complete_result(path, config)) is not None
    ]
    path = output_dir / table_file_name(range_estimator, per_channel, structure)
    write_csv(path, results_frame(results))
    return path


def result_config(
    n_bits: int, range_estimator: str, per_channel: bool, weights: str, structure: str = UNSTRUCTURED
) -> dict:
    """The fields that identify how a result file was made (checked on resume)."""
    return {
        "n_bits": n_bits,
        "sparsity": pruning_sparsity(n_bits),
        "range_estimator": range_estimator,
        "per_channel": per_channel,
        "pruning_structure": structure,
        "weights": weights,
    }


def write_bits_result(
    output_dir: Path, model_name: str, n_bits: int, layers: dict[str, dict], range_estimator: str, per_channel: bool,
    weights: str, structure: str = UNSTRUCTURED,
) -> dict:  # fmt: skip
    """Write (atomically) the JSON file of one model and bit-width and return its contents."""
    data = {
        "model": model_name,
        **result_config(n_bits, range_estimator, per_channel, weights, structure),
        "complete": True,
        "layers": layers,
    }
    write_json(result_path(output_dir, model_name, n_bits, range_estimator, per_channel, structure), data)
    return data


def write_model_results(
    output_dir: Path, model_name: str, per_bits: dict[int, dict[str, dict]], range_estimator: str, per_channel: bool,
    weights: str, structure: str = UNSTRUCTURED,
) -> list[dict]:  # fmt: skip
    """Write one JSON file per bit-width (atomically) and return their contents."""
    return [
        write_bits_result(output_dir, model_name, n_bits, layers, range_estimator, per_channel, weights, structure)
        for n_bits, layers in per_bits.items()
    ]


def run_study(
    model_names: Sequence[str],
    bits: Sequence[int],
    output_dir: Path,
    range_estimator: str = "mse",
    per_channel: bool = False,
    device: torch.device | str = "cpu",
    pretrained: bool = True,
    progress: bool = True,
    structure: str = UNSTRUCTURED,
) -> tuple[list[dict], list[str]]:
    """Study every model, reusing complete result files, and write the tidy CSV.

    The CSV (:func:`write_results_table`) holds every complete result of the same setting in
    ``output_dir``, also those of models studied by earlier runs.

    Each bit-width's file is written as soon as that bit-width is done, so a killed run loses
    at most the bit-width in progress. A model whose result files all exist, are complete and
    were made with the same settings is not loaded again; the missing bit-widths of a model
    are computed, and a file that is truncated, corrupt, incomplete or made with other
    settings is recomputed (with one logged line naming it). Models whose pretrained weights
    cannot be had are skipped with one logged line. ``structure`` (``unstructured`` or
    ``1xN:<N>``) is the pruning compared with; it is part of the setting and of the file names.

    Returns:
        The results (one dict per model and bit-width) and the names of the skipped models.
    """
    from models.registry import WeightsUnavailableError, load_model

    weights = "pretrained" if pretrained else "random"
    results, skipped = [], []
    for model_name in tqdm(model_names, desc="models", disable=not progress):
        found: dict[int, dict | None] = {}
        for n_bits in bits:
            path = result_path(output_dir, model_name, n_bits, range_estimator, per_channel, structure)
            config = {"model": model_name, **result_config(n_bits, range_estimator, per_channel, weights, structure)}
            found[n_bits], why = check_result_file(path, config)
            if why is not None:
                log.warning("recomputing %s: %s", path, why)
        missing = [n_bits for n_bits, result in found.items() if result is None]
        if missing:
            try:
                model = load_model(model_name, pretrained=pretrained)
            except WeightsUnavailableError as error:
                log.warning("skipped %s", error)
                skipped.append(model_name)
                continue
            studied = iter_study_model(model, missing, range_estimator, per_channel, device, progress, structure=structure)
            for position, (n_bits, layers) in enumerate(studied):
                if position == 0 and structure != UNSTRUCTURED:
                    log_blockless(model_name, structure, layers)
                found[n_bits] = write_bits_result(
                    output_dir, model_name, n_bits, layers, range_estimator, per_channel, weights, structure
                )
            del model
        else:
            log.info("%s: complete results found, skipped", model_name)
        results.extend(found[n_bits] for n_bits in bits)
    if results:
        write_results_table(output_dir, range_estimator, per_channel, weights, structure)
    return results, skipped
