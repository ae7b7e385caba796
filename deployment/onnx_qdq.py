"""ONNX export: the dense folded float model, and its int8 QDQ form for onnxruntime.

The float model is exported with ``torch.onnx.export(dynamo=True)`` (dynamic batch, input ``x``, output
``logits``). Its int8 form is the same graph where:

* every exported layer (a Conv or Gemm whose weight initializer is ``<layer>.weight``) takes its weight
  as an int8 initializer with per-output-channel scales through ``DequantizeLinear``, and its bias as
  int32 with scale ``s_in * s_w`` per channel, ``b_int = round(b / (s_in * s_w))`` (onnxruntime's
  int8 kernels take it so), with room left in int32 for the accumulation (:func:`fit_bias_in_int32`);
* every tensor an integer kernel reads or writes is quantized once (``QuantizeLinear`` ->
  ``DequantizeLinear`` after its producer): the inputs of the layers, with the layer's learned
  quantizer (the first such layer's when several read one tensor); the layers' outputs and the inputs
  and outputs of ``Add`` (after a single following ``Relu`` or ``Clip``, which the kernels absorb), with 8-bit
  quantizers calibrated on training batches (min/max of the float model's tensors); the input of a
  ``MaxPool`` takes its output's quantizer (they commute), so the pooling runs on uint8; the logits
  stay float.

x86 CPUs without VNNI run onnxruntime's u8s8 kernels with 16-bit pair sums that saturate: a layer with
weight integers beyond +-64 (8-bit weights) is stored as uint8 ``q + 128`` with zero point 128 (the same
grid; onnxruntime's u8u8 kernels do not saturate). INT4 layers keep int8 weights.

onnxruntime (graph optimizations on) fuses ``DQ -> Conv -> Q`` into ``QLinearConv``,
``DQ -> Gemm -> Q`` into ``QGemm`` and ``DQ, DQ -> Add -> Q`` into ``QLinearAdd``.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deployment.cpu_features import MAX_UNSATURATED_WEIGHT
from deployment.integer_model import ActivationQuant, ExportError, IntegerLayer, activation_quant_from_range

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
MAX_INPUT_INTEGER = 255  # the largest |q_x - z_x| of an 8-bit activation
UINT8_WEIGHT_ZERO_POINT = 128
INPUT_NAME, OUTPUT_NAME = "x", "logits"


def export_float_onnx(model: nn.Module, example_input: torch.Tensor) -> onnx.ModelProto:
    """``model`` (eval) as ONNX with a dynamic batch dimension."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(model.eval(), (example_input,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)  # fmt: skip
    except torch.onnx.errors.OnnxExporterError as error:
        raise ExportError(f"torch.onnx.export failed: {str(error).splitlines()[0]}") from None
    return program.model_proto


def serialized(model: onnx.ModelProto) -> bytes:
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    return buffer.getvalue()


def inference_session(model: onnx.ModelProto | bytes, threads: int = 1, optimize: bool = True
                      ) -> onnxruntime.InferenceSession:  # fmt: skip
    """An onnxruntime CPU session with all graph optimizations (QDQ fusion into integer kernels), or none.

    Without optimizations a QDQ graph runs literally, each operator in float32 (the simulation of
    :mod:`deployment.kernel_check`).
    """
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)  # fmt: skip
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else serialized(model)
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_session(session: onnxruntime.InferenceSession, batch: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {INPUT_NAME: batch.numpy()})[0])


def _layer_of_node(node: onnx.NodeProto, layers: Mapping[str, IntegerLayer]) -> str | None:
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or not node.input[1].endswith(".weight"):
        return None
    name = node.input[1][: -len(".weight")]
    return name if name in layers else None


def _after_activation(tensor: str, consumers: Mapping[str, list[onnx.NodeProto]]) -> str:
    """The output of the ``Relu`` or ``Clip`` (ReLU6) that alone reads ``tensor``, else ``tensor``."""
    users = consumers.get(tensor, [])
    return users[0].output[0] if len(users) == 1 and users[0].op_type in ("Relu", "Clip") else tensor


def _tensors_to_quantize(graph: onnx.GraphProto, layers: Mapping[str, IntegerLayer]) -> dict[str, ActivationQuant | None]:
    """Tensor -> its learned quantizer, or ``None`` where it is to be calibrated (see the module doc)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    outputs = {output.name for output in graph.output}
    learned: dict[str, ActivationQuant | None] = {}
    for node in graph.node:
        name = _layer_of_node(node, layers)
        if name is not None and (node.input[0] not in learned or learned[node.input[0]] is None):
            learned[node.input[0]] = layers[name].input_quant
    calibrated = []
    for node in graph.node:
        if _layer_of_node(node, layers) is not None:
            calibrated.append(_after_activation(node.output[0], consumers))
        elif node.op_type == "Add":
            calibrated.extend(node.input)
            calibrated.append(_after_activation(node.output[0], consumers))
    initializers = {init.name for init in graph.initializer}
    for tensor in calibrated:
        if tensor not in learned and tensor not in outputs and tensor not in initializers:
            learned[tensor] = None
    return learned


@torch.no_grad()
def _calibrate(float_model: onnx.ModelProto, tensors: list[str], batches: Iterable[torch.Tensor]
               ) -> dict[str, ActivationQuant]:  # fmt: skip
    """8-bit quantizers of ``tensors`` from their min/max when the float model runs on ``batches``."""
    if not tensors:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(tensor) for tensor in tensors)
    session = inference_session(probe)
    low = dict.fromkeys(tensors, np.inf)
    high = dict.fromkeys(tensors, -np.inf)
    count = 0
    for batch in batches:
        values = session.run(tensors, {INPUT_NAME: batch.numpy()})
        for tensor, value in zip(tensors, values):
            low[tensor], high[tensor] = min(low[tensor], float(value.min())), max(high[tensor], float(value.max()))
        count += 1
    if count == 0:
        raise ExportError("no calibration batches for the activations without a learned quantizer")
    return {tensor: activation_quant_from_range(low[tensor], high[tensor]) for tensor in tensors}


def _quant_pair(nodes: list[onnx.NodeProto], inits: list[TensorProto], tensor: str, quant: ActivationQuant) -> str:
    """Append ``QuantizeLinear -> DequantizeLinear`` of ``tensor``; returns the dequantized tensor's name."""
    dtype = np.int8 if quant.signed else np.uint8
    prefix = f"{tensor}.q"
    inits.append(numpy_helper.from_array(np.array(quant.scale, dtype=np.float32), f"{prefix}.scale"))
    inits.append(numpy_helper.from_array(np.array(quant.zero_point, dtype=dtype), f"{prefix}.zero_point"))
    params = [f"{prefix}.scale", f"{prefix}.zero_point"]
    nodes.append(helper.make_node("QuantizeLinear", [tensor, *params], [f"{prefix}.int"], name=f"{prefix}.quantize"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}.int", *params], [f"{prefix}.dequantized"],
                                  name=f"{prefix}.dequantize"))  # fmt: skip
    return f"{prefix}.dequantized"


def _dequantized_constant(nodes: list[onnx.NodeProto], inits: list[TensorProto], prefix: str, values: np.ndarray,
                          scale: np.ndarray, axis: int, zero_point: int = 0) -> str:  # fmt: skip
    """``DequantizeLinear`` of an integer initializer with per-axis ``scale`` and one ``zero_point``."""
    inits.append(numpy_helper.from_array(values, f"{prefix}.int"))
    inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{prefix}.scale"))
    inits.append(numpy_helper.from_array(np.full(scale.shape, zero_point, dtype=values.dtype), f"{prefix}.zero_point"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}.int", f"{prefix}.scale", f"{prefix}.zero_point"],
                                  [f"{prefix}.dequantized"], name=f"{prefix}.dequantize", axis=axis))  # fmt: skip
    return f"{prefix}.dequantized"


def accumulator_headroom(layer: IntegerLayer) -> torch.Tensor:
    """``255 sum_i |q_i|`` per output channel: the largest ``|sum_i (x_i - z_x) q_i|`` for 8-bit inputs."""
    return MAX_INPUT_INTEGER * layer.int_weight.to(torch.float64).abs().reshape(layer.int_weight.shape[0], -1).sum(1)


def fit_bias_in_int32(name: str, layer: IntegerLayer, input_scale: float) -> IntegerLayer:
    """``layer`` with every output channel's int32 bias leaving room for its accumulation, at the scale ``s_in * s_w``.

    The integer kernels add ``b_int = round(b / (s_in s_w))`` to the int32 accumulator ``sum_i (x_i - z_x) q_i``;
    the sum must fit: ``|b_int| + 255 sum_i |q_i| <= 2^31 - 1`` (else it wraps around). A channel whose folded
    weight scale is tiny (a batch norm with ``gamma`` near 0) can break this; its scale is raised to
    ``s_w' = |b| / (s_in (2^31 - 1 - 255 sum_i |q_i|))`` and its integers re-rounded, ``q' = round(q s_w / s_w')``
    (``|q'| <= |q|``: still on the grid's range, and the room left suffices). Such a channel computes almost
    only its bias; the change to its weights is at most ``s_w' / 2`` each, and is logged. Other channels are
    unchanged (exact).
    """
    needed = layer.bias.abs() / (input_scale * (INT32_MAX - accumulator_headroom(layer)))
    raise_scale = needed > layer.scale
    if not bool(raise_scale.any()):
        return layer
    scale = torch.where(raise_scale, needed * (1 + 1e-9), layer.scale)
    view = (-1,) + (1,) * (layer.int_weight.dim() - 1)
    requantized = torch.round(layer.int_weight.to(torch.float64) * (layer.scale / scale).reshape(view))
    int_weight = torch.where(raise_scale.reshape(view), requantized, layer.int_weight.to(torch.float64))
    logger.warning("layer %s: %d output channel(s) with a tiny weight scale and a large bias: their weight scale raised "
                   "so that the bias fits in int32 (their weights re-rounded)", name, int(raise_scale.sum()))  # fmt: skip
    return dataclasses.replace(layer, int_weight=int_weight.to(layer.int_weight.dtype), scale=scale)


def int32_bias(name: str, layer: IntegerLayer, input_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(round(b / (s_in * s_w)), s_in * s_w)`` per output channel (``layer`` from :func:`fit_bias_in_int32`)."""
    scale = (input_scale * layer.scale).numpy()
    values = np.round(layer.bias.numpy() / scale)
    if (np.abs(values) + accumulator_headroom(layer).numpy()).max(initial=0) > INT32_MAX:
        raise ExportError(f"layer {name}: its bias and accumulation do not fit in int32 at scale s_in * s_w")
    return values.astype(np.int32), scale


def qdq_model(float_model: onnx.ModelProto, layers: Mapping[str, IntegerLayer],
              batches: Iterable[torch.Tensor]) -> onnx.ModelProto:  # fmt: skip
    """The int8 QDQ form of ``float_model`` (the export of the folded float model; see the module doc).

    ``batches`` (training images) calibrate the tensors without a learned quantizer.
    """
    source = onnx.ModelProto()
    source.CopyFrom(float_model)  # its nodes are rewired in place
    graph = source.graph
    wanted = _tensors_to_quantize(graph, layers)
    calibrated = _calibrate(float_model, [tensor for tensor, quant in wanted.items() if quant is None], batches)
    quants = {tensor: quant if quant is not None else calibrated[tensor] for tensor, quant in wanted.items()}
    for node in graph.node:  # max pooling commutes with a quantizer: one quantizer on both sides, an int8 kernel
        if node.op_type == "MaxPool" and node.input[0] in quants and node.output[0] in quants:
            quants[node.input[0]] = quants[node.output[0]]
    initializers = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    dequantized: dict[str, str] = {}
    replaced: set[str] = set()
    found: set[str] = set()
    if INPUT_NAME in quants:
        dequantized[INPUT_NAME] = _quant_pair(nodes, new_inits, INPUT_NAME, quants[INPUT_NAME])
    for node in graph.node:
        input_quant = quants[node.input[0]] if node.input and node.input[0] in quants else None
        node.input[:] = [dequantized.get(tensor, tensor) for tensor in node.input]
        name = _layer_of_node(node, layers)
        if name is not None:
            layer = fit_bias_in_int32(name, layers[name], input_quant.scale)
            found.add(name)
            int_weight = layer.int_weight.numpy()
            transposed = tuple(initializers[node.input[1]].dims) != int_weight.shape
            int_weight = int_weight.T if transposed else int_weight
            zero_point = 0
            if np.abs(int_weight.astype(np.int32)).max(initial=0) > MAX_UNSATURATED_WEIGHT:
                int_weight, zero_point = (int_weight.astype(np.int32) + UINT8_WEIGHT_ZERO_POINT).astype(np.uint8), 128
            weight = _dequantized_constant(nodes, new_inits, f"{name}.weight", int_weight, layer.scale.numpy(),
                                           axis=1 if transposed else 0, zero_point=zero_point)  # fmt: skip
            bias_values, bias_scale = int32_bias(name, layer, input_quant.scale)
            bias = _dequantized_constant(nodes, new_inits, f"{name}.bias", bias_values, bias_scale, axis=0)
            replaced.update(node.input[1:3])
            node.input[:] = [node.input[0], weight, bias]
        nodes.append(node)
        for tensor in node.output:
            if tensor in quants:
                dequantized[tensor] = _quant_pair(nodes, new_inits, tensor, quants[tensor])
    missing = set(layers) - found
    if missing:
        raise ExportError(f"layers not found in the exported ONNX graph (by their weight name): {sorted(missing)}")
    used = {tensor for node in nodes for tensor in node.input}
    kept = [init for init in graph.initializer if init.name not in replaced or init.name in used]
    new_graph = helper.make_graph(nodes, graph.name, graph.input, graph.output, kept + new_inits)
    model = helper.make_model(new_graph, opset_imports=source.opset_import, ir_version=source.ir_version)
    onnx.checker.check_model(model)
    return model
