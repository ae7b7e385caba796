"""``main.py export``: a train-compressed checkpoint as a real integer (or dense float) model, checked and measured.

Formats (:class:`ExportFormat`):

* ``onnx-int8`` - the int8 QDQ ONNX graph (:mod:`deployment.onnx_qdq`), run by onnxruntime's int8 kernels;
* ``pt2e-x86`` - torchao's PT2E flow with ``X86InductorQuantizer`` (:mod:`deployment.pt2e_x86`), saved as
  a ``torch.export`` program (``.pt2``) for ``torch.compile`` with inductor (oneDNN int8 kernels);
* ``onnx-fp32`` - the dense folded float model (masks multiplied in, batch norm folded, the
  fake-quantized weights ``s q`` where the checkpoint quantizes them) as ONNX.

The checks after export, on ``--images-dir``'s validation split:

* the kernels against the simulation (``kernel_check`` in the report): the int8 model against a float
  simulation of exactly its quantization (the same weight integers and scales, the same activation scales and
  zero points). ``onnx-int8``: :mod:`deployment.kernel_check` runs onnxruntime's fused integer kernels and the
  literal QDQ graph cut at every quantized tensor; they may differ only by float rounding, a derived bound (at
  most 1 step per quantized value, ``gamma_(K+8) T`` per logit); above it the export fails. ``pt2e-x86``: the
  program compiled by inductor with freezing (oneDNN int8 kernels) against the same program run eagerly
  (quantize/dequantize and float operators); inductor's graph cannot be cut, so the end-to-end difference is
  reported (top-1 agreement, logit difference), without a bound;
* the expected error (``check``): top-1 of the exported model (in its runtime) and of the checkpoint's
  fake-quantized model, the share of images where their top-1 classes agree, and the logit differences. The
  int8 model adds 8-bit quantizers where the checkpoint has none (outputs of the layers, the additions), so
  its logits differ from the fake-quantized ones by their rounding noise: reported, not bounded; only a top-1
  accuracy more than :data:`MAX_TOP1_GAP` points away fails the export.

Nothing is written when a check fails.

The JSON report beside the output (``PATH.json``) holds both checks, the layers whose weights oneDNN's int8
kernels can saturate on this CPU (``saturating_layers``, ``pt2e-x86`` only:
:func:`deployment.pt2e_x86.saturating_layers`), the per-layer sparsity of the int8 weights, the bytes of the
weights in each encoding of :mod:`deployment.storage`, and the export time; ``--pack`` writes the weights in
the smallest encoding to ``PATH.weights.npz``.
"""
from __future__ import annotations

import enum
import importlib.util
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployment import storage
from deployment.cpu_features import MAX_UNSATURATED_WEIGHT
from deployment.integer_model import (
    MAX_BITS,
    ExportError,
    IntegerLayer,
    dense_folded_model,
    has_weight_quantization,
    integer_layers,
    set_dequantized_weights,
)
from training.checkpoint import CheckpointError
from training.data import ImageFolderError, TrainUse, build_loaders
from training.run import TrainingError, restore_model
from utils.io import check_output_path, write_bytes_atomic, write_json

logger = logging.getLogger(__name__)

MAX_TOP1_GAP = 5.0  # percentage points


class ExportFormat(str, enum.Enum):
    ONNX_INT8 = "onnx-int8"
    PT2E_X86 = "pt2e-x86"
    ONNX_FP32 = "onnx-fp32"

    @property
    def packages(self) -> tuple[str, ...]:
        """The Python packages the format needs."""
        if self is ExportFormat.PT2E_X86:
            return ("torchao",)
        return ("onnx", "onnxscript", "onnxruntime")

    @property
    def is_integer(self) -> bool:
        return self is not ExportFormat.ONNX_FP32


@dataclass(frozen=True)
class ExportSettings:
    checkpoint: Path
    format: ExportFormat
    output: Path
    images_dir: Path | None = None
    calibration_batches: int = 4
    batch_size: int = 32
    pack: bool = False


def report_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def packed_path(output: Path) -> Path:
    return output.with_name(output.name + ".weights.npz")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _check_settings(settings: ExportSettings) -> None:
    missing = [name for name in settings.format.packages if not installed(name)]
    if missing:
        raise ExportError(f"--format {settings.format.value} needs {', '.join(missing)}, which is not installed")
    outputs = [settings.output, report_path(settings.output)] + ([packed_path(settings.output)] if settings.pack else [])
    for path in outputs:
        check_output_path(path, "file")


def _batches(loader: torch.utils.data.DataLoader, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    count = 0
    for batch in loader:
        if batch.targets.numel() == 0:
            continue
        yield batch.images, batch.targets
        count += 1
        if limit is not None and count == limit:
            return


def storage_bits(int_weight: torch.Tensor, n_bits: int) -> int:
    """The fewest bits ``>= n_bits`` of a symmetric grid holding the integers (a folded negative scale flips signs)."""
    low, high = int(int_weight.min()), int(int_weight.max())
    bits = max(n_bits, storage.MIN_BITS)
    while bits < MAX_BITS and not (-(2 ** (bits - 1)) <= low and high <= 2 ** (bits - 1) - 1):
        bits += 1
    return bits


def weight_storage(layers: dict[str, IntegerLayer]) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Bytes of the int8 weights in each encoding, and per layer its bits, size and sparsity (share of zeros)."""
    int_weights = {name: layer.int_weight for name, layer in layers.items()}
    bits = {name: storage_bits(layer.int_weight, layer.n_bits) for name, layer in layers.items()}
    per_layer = {name: {"weight_bits": layer.n_bits, "storage_bits": bits[name], "numel": layer.int_weight.numel(),
                        "sparsity": float((layer.int_weight == 0).sum()) / layer.int_weight.numel()}
                 for name, layer in layers.items()}  # fmt: skip
    return storage.encoded_sizes(int_weights, bits), per_layer


@torch.no_grad()
def compare_on_images(reference: nn.Module, exported, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, float]:  # fmt: skip
    """Top-1 (percent) of both models, top-1 agreement (percent) and the logit differences on ``batches``.

    ``exported`` maps a batch of images to logits.
    """
    count = correct_ref = correct_exp = agree = 0
    max_error = max_logit = 0.0
    error_sum = 0.0
    for images, targets in batches:
        ref, out = reference(images).double(), exported(images).double()
        ref_top, out_top = ref.argmax(1), out.argmax(1)
        count += targets.numel()
        correct_ref += int((ref_top == targets).sum())
        correct_exp += int((out_top == targets).sum())
        agree += int((ref_top == out_top).sum())
        max_error = max(max_error, float((ref - out).abs().max()))
        error_sum += float((ref - out).abs().mean()) * targets.numel()
        max_logit = max(max_logit, float(ref.abs().max()))
    if count == 0:
        raise ExportError("no readable validation images to check the exported model on")
    return {"images": count, "top1_reference": 100.0 * correct_ref / count, "top1_exported": 100.0 * correct_exp / count,
            "top1_agreement": 100.0 * agree / count, "max_logit_error": max_error,
            "mean_logit_error": error_sum / count, "max_abs_logit": max_logit,
            "relative_max_logit_error": max_error / max(max_logit, 1e-12)}  # fmt: skip


def _check_result(check: dict[str, float]) -> None:
    if abs(check["top1_exported"] - check["top1_reference"]) > MAX_TOP1_GAP:
        raise ExportError(f"the exported model is off: top-1 {check['top1_exported']:.2f}% vs "
                          f"{check['top1_reference']:.2f}% fake-quantized (more than {MAX_TOP1_GAP:g} points); "
                          "nothing written")  # fmt: skip


def export_checkpoint(settings: ExportSettings) -> dict[str, Any]:
    """Export, check and measure (see the module doc); returns the report (also written to ``PATH.json``)."""
    _check_settings(settings)
    started = time.perf_counter()
    try:
        model, config = restore_model(settings.checkpoint)
    except (CheckpointError, TrainingError) as error:
        raise ExportError(str(error)) from None
    if settings.format.is_integer and settings.images_dir is None:
        reason = ("has no weight quantization: it is quantized post training" if not has_weight_quantization(model)
                  else "has activations to calibrate at 8 bits")  # fmt: skip
        raise ExportError(f"{settings.checkpoint} {reason}; --format {settings.format.value} needs --images-dir "
                          "(its train split calibrates, its val split checks the exported model)")  # fmt: skip
    loaders = None
    if settings.images_dir is not None:
        try:
            loaders = build_loaders(settings.images_dir, config.data.image_size, settings.batch_size, 0,
                                    config.runtime.seed, train_use=TrainUse.ESTIMATION)  # fmt: skip
        except ImageFolderError as error:
            raise ExportError(str(error)) from None
    size = config.data.image_size
    example = (next(_batches(loaders.estimation, 1))[0][:2] if loaders is not None
               else torch.zeros(2, 3, size, size))  # fmt: skip
    folded, pairs = dense_folded_model(model, example)
    layers = integer_layers(model, folded, pairs)
    calibration = ([images for images, _ in _batches(loaders.estimation, settings.calibration_batches)]
                   if loaders is not None else [])  # fmt: skip
    if settings.format.is_integer:
        set_dequantized_weights(folded, layers)
    written, run_exported, against_simulation = _export(settings.format, folded, layers, example, calibration)
    saturating = []
    if settings.format is ExportFormat.PT2E_X86:
        from deployment.pt2e_x86 import saturating_layers

        saturating = saturating_layers(layers)
        if saturating:
            listed = ", ".join(saturating[:3]) + (", ..." if len(saturating) > 3 else "")
            logger.warning("pt2e-x86: %d layers (%s) have weight integers beyond +-%d, which oneDNN's int8 kernels "
                           "without VNNI can saturate: the compiled program may differ from its simulation (see "
                           "kernel_check in the report); onnx-int8 avoids it, CPUs with VNNI run it exactly",
                           len(saturating), listed, MAX_UNSATURATED_WEIGHT)  # fmt: skip
    export_seconds = time.perf_counter() - started
    check = kernel_check = None
    if loaders is not None:
        check = compare_on_images(model, run_exported, _batches(loaders.val))
        if against_simulation is not None:
            kernel_check = against_simulation(_batches(loaders.val))
        if settings.format.is_integer:
            _check_result(check)
    sizes, per_layer = weight_storage(layers)
    smallest = storage.smallest_encoding(sizes)
    report = {
        "checkpoint": str(settings.checkpoint), "format": settings.format.value, "output": str(settings.output),
        "architecture": config.model.architecture, "export_seconds": export_seconds,
        "output_bytes": len(written), "folded_batch_norms": len(pairs), "check": check,
        "kernel_check": kernel_check, "saturating_layers": saturating,
        "weight_bytes": sizes, "smallest_encoding": smallest,
        "packed_file": str(packed_path(settings.output)) if settings.pack else None, "layers": per_layer,
    }  # fmt: skip
    write_bytes_atomic(settings.output, lambda handle: handle.write(written))
    if settings.pack:
        storage.save_encoded(packed_path(settings.output), {name: layer.int_weight for name, layer in layers.items()},
                             {name: layer["storage_bits"] for name, layer in per_layer.items()},
                             {name: layer.scale for name, layer in layers.items()}, smallest)  # fmt: skip
    write_json(report_path(settings.output), report)
    return report


def _export(fmt: ExportFormat, folded: nn.Module, layers: dict[str, IntegerLayer], example: torch.Tensor,
            calibration: list[torch.Tensor]):  # fmt: skip
    """``(file bytes, images -> logits in the format's runtime, batches -> kernel check or None)``.

    The kernel check (see the module doc) raises :class:`ExportError` when the kernels break its bound.
    """
    if fmt is ExportFormat.PT2E_X86:
        from deployment.pt2e_x86 import compiled_program, quantize_pt2e, serialized_program

        program = quantize_pt2e(folded, layers, example, calibration)
        compiled = compiled_program(program)
        simulation = program.module()

        def against_simulation(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
            return compare_on_images(simulation, compiled, batches)

        return serialized_program(program), compiled, against_simulation
    from deployment.kernel_check import MAX_INTEGER_DIFFERENCE, check_kernels
    from deployment.onnx_qdq import export_float_onnx, inference_session, qdq_model, run_session, serialized

    onnx_model = export_float_onnx(folded, example)
    against_simulation = None
    if fmt is ExportFormat.ONNX_INT8:
        onnx_model = qdq_model(onnx_model, layers, calibration)

        def against_simulation(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
            result = check_kernels(onnx_model, (images for images, _ in batches))
            if not result.passed:
                raise ExportError(f"the int8 kernels do not compute the QDQ graph: up to {result.max_integer_difference} "
                                  f"steps from the simulation (bound {MAX_INTEGER_DIFFERENCE}), logits up to "
                                  f"{result.max_logit_difference_to_bound:.3g}x their rounding bound; nothing written")  # fmt: skip
            return asdict(result)

    data = serialized(onnx_model)
    session = inference_session(data)
    return data, lambda images: run_session(session, images), against_simulation
