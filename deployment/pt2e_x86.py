"""torchao's PT2E int8 flow for x86 CPUs, on the folded float model with the checkpoint's integers.

``torch.export`` (dynamic batch) -> ``X86InductorQuantizer`` (``prepare_pt2e``: activations uint8 per
tensor, weights int8 per output channel) -> calibration -> ``convert_pt2e``; ``torch.compile`` with
inductor and ``freezing`` then runs oneDNN int8 kernels.

Two things are changed in that flow:

* torchvision's ResNets call one ``nn.ReLU`` module twice per block; ``torch.export`` records both calls
  under the same module in ``nn_module_stack``, so the quantizer's source partition of that ReLU has two
  output nodes and ``prepare_pt2e`` raises "Input partition has more than one output node".
  :func:`split_reused_modules` gives each call of such a module its own partition (a suffix on the
  module path in the node metadata, for modules whose nodes repeat one operator).
* the observers' parameters are replaced where the checkpoint has learned ones: every weight observer of
  an exported layer returns the layer's per-channel scales (its int8 weights are then exactly the
  checkpoint's integers), and the input observer of a layer with a learned input quantizer its step and
  zero point (a signed quantizer becomes uint8 with zero point 128, the same grid). The other activations
  keep the quantizer's calibrated observers.
"""
from __future__ import annotations

import io
import logging
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from deployment.cpu_features import MAX_UNSATURATED_WEIGHT, onednn_saturates
from deployment.integer_model import ActivationQuant, IntegerLayer

logger = logging.getLogger(__name__)

LAYER_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
UINT8_SIGNED_ZERO_POINT = 128


def saturating_layers(layers: Mapping[str, IntegerLayer]) -> list[str]:
    """The layers whose weight integers oneDNN's int8 kernels may saturate on this CPU: beyond
    ``+-MAX_UNSATURATED_WEIGHT`` where :func:`deployment.cpu_features.onednn_saturates` (none elsewhere).

    PT2E stores weights as int8 whatever their bit-width, so unlike ``onnx-int8`` (uint8 weights for such
    layers) nothing avoids it: the program is right on CPUs with VNNI and wrong here.
    """
    return layers_beyond_unsaturated(layers) if onednn_saturates() else []


def layers_beyond_unsaturated(layers: Mapping[str, IntegerLayer]) -> list[str]:
    """The layers with a weight integer beyond ``+-MAX_UNSATURATED_WEIGHT``, whatever the CPU."""
    return [name for name, layer in layers.items() if int(layer.int_weight.abs().max()) > MAX_UNSATURATED_WEIGHT]


def split_reused_modules(graph_module: torch.fx.GraphModule) -> int:
    """Give every call of a module called more than once its own source partition; returns the calls split."""
    calls: Counter[tuple[str, object]] = Counter()
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            calls[(list(stack.values())[-1][0], node.target)] += 1
    split = 0
    for index, node in enumerate(graph_module.graph.nodes):
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key = list(stack)[-1]
        path, cls = stack[key]
        if calls[(path, node.target)] > 1:
            stack[key] = (f"{path}#call{index}", cls)
            split += 1
    return split


def _fixed_qparams(scale: torch.Tensor, zero_point: torch.Tensor):
    def calculate_qparams() -> tuple[torch.Tensor, torch.Tensor]:
        return scale, zero_point

    return calculate_qparams


def _observer(prepared: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = prepared.get_submodule(node.target)
    return module if hasattr(module, "calculate_qparams") else None


def _uint8_params(quant: ActivationQuant) -> tuple[torch.Tensor, torch.Tensor]:
    zero_point = quant.zero_point + (UINT8_SIGNED_ZERO_POINT if quant.signed else 0)
    return torch.tensor([quant.scale], dtype=torch.float32), torch.tensor([zero_point], dtype=torch.int32)


def set_learned_qparams(prepared: torch.fx.GraphModule, layers: Mapping[str, IntegerLayer]) -> int:
    """Make the observers of the exported layers return the checkpoint's parameters; returns the layers matched."""
    by_weight = {(tuple(layer.int_weight.shape), name): layer.dequantized_weight() for name, layer in layers.items()}
    matched = 0
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in LAYER_OPS:
            continue
        weight_observer, input_observer = _observer(prepared, node.args[1]), _observer(prepared, node.args[0])
        if weight_observer is None or node.args[1].args[0].op != "get_attr":
            continue
        weight = operator.attrgetter(node.args[1].args[0].target)(prepared)
        name = next((name for (shape, name), value in by_weight.items()
                     if shape == tuple(weight.shape) and torch.equal(value, weight)), None)  # fmt: skip
        if name is None:
            continue
        layer = layers[name]
        scale = layer.scale.to(torch.float32)
        weight_observer.calculate_qparams = _fixed_qparams(scale, torch.zeros(scale.shape, dtype=torch.int64))
        if input_observer is not None and layer.input_quant is not None:
            input_observer.calculate_qparams = _fixed_qparams(*_uint8_params(layer.input_quant))
        matched += 1
    return matched


@torch.no_grad()
def quantize_pt2e(folded: nn.Module, layers: Mapping[str, IntegerLayer], example_input: torch.Tensor,
                  calibration: Iterable[torch.Tensor]) -> torch.export.ExportedProgram:  # fmt: skip
    """The converted int8 program of the folded float model (see the module doc), exported again for saving."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    dynamic = ({0: torch.export.Dim("batch")},)
    graph_module = torch.export.export(folded.eval(), (example_input,), dynamic_shapes=dynamic).module()
    split = split_reused_modules(graph_module)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph_module, quantizer)
    for batch in calibration:
        prepared(batch)
    matched = set_learned_qparams(prepared, layers)
    logger.info("PT2E: %d reused-module calls split, learned parameters set on %d of %d layers", split, matched,
                len(layers))  # fmt: skip
    converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return torch.export.export(converted, (example_input,), dynamic_shapes=dynamic)


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Remove the float weights that the int8 constants replaced (else the saved program keeps both)."""
    graph_module.graph.eliminate_dead_code()
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name in [name for name, _ in graph_module.named_parameters()] + [name for name, _ in graph_module.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attribute)
    graph_module.recompile()


def compiled_program(program: torch.export.ExportedProgram) -> Callable[[torch.Tensor], torch.Tensor]:
    """``program`` as inductor runs it on int8 kernels: ``torch.compile`` under ``torch._inductor.config.freezing``.

    Freezing is required: inductor's passes that replace ``dequantize -> convolution/linear`` by oneDNN's int8
    kernels with prepacked weights are freezing patterns (``torch/_inductor/fx_passes/quantization.py``);
    without it the program runs as float operators between quantize/dequantize (the simulation). It must be set
    while dynamo traces (each call may compile: a new batch size), not only as a ``torch.compile`` option (that
    fails in fake-tensor tracing of ``onednn.qconv_prepack``).
    """
    compiled = torch.compile(program.module())

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return compiled(images)

    return run


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """A ``.pt2`` file of :func:`serialized_program` (its quantize/dequantize operators registered first)."""
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401 - registers the quantized_decomposed operators

    return torch.export.load(path)


def serialized_program(program: torch.export.ExportedProgram) -> bytes:
    """The ``.pt2`` archive of ``program`` (``torch.export.save``; load with ``torch.export.load``)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
