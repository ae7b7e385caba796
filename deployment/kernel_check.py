"""The int8 ONNX model's integer kernels against a float simulation of exactly the same quantization.

The int8 QDQ graph (:mod:`deployment.onnx_qdq`) quantizes tensors with ``QuantizeLinear``,
``q = clamp(round(v / s) + z)`` (round half to even), of a float value ``v`` computed from dequantized inputs
``x_i = s_in (q_i - z_in)`` and weights ``w_i = s_w q_w,i``. onnxruntime with graph optimizations fuses
``DQ -> op -> Q`` into integer kernels (``QLinearConv``, ``QLinearAdd``, ``QGemm``, uint8 ``MaxPool``); with
optimizations off it runs the same graph literally, one float32 operator at a time: the simulation. Given the
same integer inputs both compute the same real ``v = sum_i x_i w_i + b`` and differ only by float32 rounding
(``u = 2^-24``, ``gamma_n = n u / (1 - n u)``, ``T = sum_i |x_i w_i| + |b|``, ``K`` terms per output):

* simulation: dequantizing ``x_i`` and ``w_i`` (two roundings) and a float32 sum of ``K`` products in any
  order: ``|error| <= gamma_(K+2) T``;
* integer kernel: the int32 accumulation (bias included) is exact, then at most four float32 roundings
  (the multiplier ``s_in s_w / s_out``, the accumulator's conversion, the product, the bias or output scale):
  ``|error| <= gamma_4 T``.

So ``|v_kernel - v_simulated| <= gamma_(K+8) T`` (``gamma_(K+2) + gamma_4 <= gamma_(K+8)``). For a quantized
tensor this is ``eps = gamma_(K+8) T / s_out`` output steps (``K <= 4608`` in the paper's models, so
``gamma_(K+8) < 3e-4`` and ``eps < 1/2`` unless ``T`` exceeds about 1700 output steps): the two integers
are equal except where ``v / s_out`` lies within ``eps`` of a rounding tie, where they differ by exactly 1.
For the float logits of the last ``Gemm`` the bound is ``gamma_(K+8) T_j`` per logit, computed from the
kernel's own input integers.

:func:`check_kernels` cuts the graph at every quantized tensor: the simulation reads the integer model's
quantized tensors as its inputs (a rounding difference does not propagate) and its ``QuantizeLinear``
outputs and logits are compared with the integer model's. Any integer difference above
:data:`MAX_INTEGER_DIFFERENCE` or logit difference above its bound is a kernel that does not compute the
graph (saturating ``u8s8`` pair sums, a zero point or bias the kernel reads differently) and fails the export.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from deployment.integer_model import ExportError
from deployment.onnx_qdq import INPUT_NAME, OUTPUT_NAME, inference_session

logger = logging.getLogger(__name__)

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
KERNEL_ROUNDINGS = 8  # the "+ 8" of gamma_(K+8): two dequantizations in the simulation, four in the kernel, margin 2
MAX_INTEGER_DIFFERENCE = 1
SIMULATED_SUFFIX = ".simulated"


@dataclass(frozen=True)
class KernelCheck:
    """The integer model against the cut simulation, over all checked images and quantized tensors."""

    images: int
    quantized_tensors: int  # per image
    max_integer_difference: int  # in output steps
    share_off_by_one: float  # of all quantized values
    max_logit_difference: float
    max_logit_difference_to_bound: float  # max_j |logit_kernel - logit_simulated|_j / (gamma_(K+8) T_j)

    @property
    def passed(self) -> bool:
        return self.max_integer_difference <= MAX_INTEGER_DIFFERENCE and self.max_logit_difference_to_bound <= 1.0


def gamma(terms: int) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` float32 roundings."""
    return terms * FLOAT32_UNIT_ROUNDOFF / (1 - terms * FLOAT32_UNIT_ROUNDOFF)


def quantized_tensors(model: onnx.ModelProto) -> list[str]:
    """The outputs of the graph's ``QuantizeLinear`` nodes (the integer tensors the kernels write)."""
    return [node.output[0] for node in model.graph.node if node.op_type == "QuantizeLinear"]


def probed_model(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """``qdq`` with every quantized tensor also a graph output (the fusions keep them: they are kernel outputs)."""
    probed = onnx.ModelProto()
    probed.CopyFrom(qdq)
    probed.graph.output.extend(helper.make_empty_tensor_value_info(tensor) for tensor in quantized_tensors(qdq))
    return probed


def cut_simulation(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """``qdq`` cut at every quantized tensor ``t``: ``t`` is a graph input, its ``QuantizeLinear`` writes ``t.simulated``."""
    cut = onnx.ModelProto()
    cut.CopyFrom(qdq)
    dtypes = {init.name: init.data_type for init in cut.graph.initializer}
    for node in cut.graph.node:
        if node.op_type == "QuantizeLinear":
            tensor, dtype = node.output[0], dtypes[node.input[2]]
            node.output[0] = tensor + SIMULATED_SUFFIX
            cut.graph.input.append(helper.make_tensor_value_info(tensor, dtype, None))
            cut.graph.output.append(helper.make_tensor_value_info(tensor + SIMULATED_SUFFIX, dtype, None))
    return cut


def _dequantized(node: onnx.NodeProto, initializers: dict[str, np.ndarray], values: dict[str, np.ndarray]
                 ) -> np.ndarray:  # fmt: skip
    """The float64 output of a ``DequantizeLinear`` node (per-axis scales along its ``axis``)."""
    integers = values[node.input[0]] if node.input[0] in values else initializers[node.input[0]]
    scale, zero_point = initializers[node.input[1]].astype(np.float64), initializers[node.input[2]].astype(np.float64)
    if scale.size > 1:
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        shape = [1] * integers.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return scale * (integers.astype(np.float64) - zero_point)


def logit_bound(qdq: onnx.ModelProto, values: dict[str, np.ndarray]) -> np.ndarray:
    """``gamma_(K+8) T`` per image and logit for the graph's last ``Gemm`` (inputs from the kernel's ``values``)."""
    producers = {output: node for node in qdq.graph.node for output in node.output}
    last = producers[OUTPUT_NAME]
    if last.op_type != "Gemm" or len(last.input) < 3:
        raise ExportError(f"the logits come from a {last.op_type} node: the kernel check needs a final Gemm with bias")
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    x, weight, bias = (_dequantized(producers[tensor], initializers, values) for tensor in last.input[:3])
    transposed = any(attribute.name == "transB" and attribute.i for attribute in last.attribute)
    weight = weight.T if transposed else weight
    terms = np.abs(x) @ np.abs(weight) + np.abs(bias)
    return gamma(weight.shape[0] + KERNEL_ROUNDINGS) * terms


@torch.no_grad()
def check_kernels(qdq: onnx.ModelProto, batches: Iterable[torch.Tensor]) -> KernelCheck:
    """Run the integer model and its cut simulation on ``batches`` and compare them (see the module doc)."""
    tensors = quantized_tensors(qdq)
    kernels = inference_session(probed_model(qdq))
    simulation = inference_session(cut_simulation(qdq), optimize=False)
    simulated_names = [tensor + SIMULATED_SUFFIX for tensor in tensors]
    images = values_count = off_by_one = max_difference = 0
    max_logit_difference = max_ratio = 0.0
    for batch in batches:
        outputs = kernels.run([OUTPUT_NAME, *tensors], {INPUT_NAME: batch.numpy()})
        values = dict(zip(tensors, outputs[1:]))
        simulated = simulation.run([OUTPUT_NAME, *simulated_names], {INPUT_NAME: batch.numpy(), **values})
        for tensor, value in zip(tensors, simulated[1:]):
            difference = np.abs(values[tensor].astype(np.int32) - value.astype(np.int32))
            max_difference = max(max_difference, int(difference.max(initial=0)))
            off_by_one += int((difference == 1).sum())
            values_count += difference.size
        logit_difference = np.abs(outputs[0].astype(np.float64) - simulated[0].astype(np.float64))
        bound = logit_bound(qdq, values)
        max_logit_difference = max(max_logit_difference, float(logit_difference.max(initial=0.0)))
        ratio = np.divide(logit_difference, bound, out=np.where(logit_difference > 0, np.inf, 0.0), where=bound > 0)
        max_ratio = max(max_ratio, float(ratio.max(initial=0.0)))
        images += batch.shape[0]
    if images == 0:
        raise ExportError("no readable validation images to check the int8 kernels on")
    result = KernelCheck(images, len(tensors), max_difference, off_by_one / max(values_count, 1), max_logit_difference,
                         max_ratio)  # fmt: skip
    logger.info("int8 kernels against the simulation: %s", asdict(result))
    return result
