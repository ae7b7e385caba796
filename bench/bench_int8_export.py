"""Int8 export against float, side by side in each runtime: onnxruntime, torch.compile/inductor, eager torch.ao.

For each model (random weights: speed only), compressed as an 8-bit QAT checkpoint would be (weights per
channel, activations asymmetric per tensor, ranges from the offline sample photos), the export of
:mod:`deployment` is timed, then the CPU time per batch (``time.process_time``, best of ``--repeats`` after
two warm-up calls) of:

* ``onnxruntime``: the dense folded float ONNX model against the int8 QDQ model (``onnx-fp32`` / ``onnx-int8``);
* ``ORT quantize_static QOp``: the same float model against onnxruntime's own static quantization of it in the
  QOperator format (``QLinearConv`` nodes written directly; per-channel int8 weights, uint8 activations, its own
  calibration on the photos, not the checkpoint's integers): the alternative format, for speed only;
* ``inductor``: ``torch.compile`` with freezing of the folded float model against the PT2E int8 program
  (``pt2e-x86``);
* ``eager torch.ao`` (ResNet-18 only, the deprecated reference): torchvision's quantizable ResNet-18,
  ``fuse_model``, x86 qconfig, ``prepare``/``convert``, against the same float model in eager mode.

The ratio is float time / int8 time in the same runtime. First, the ceiling of those ratios on this CPU: one
GEMM shaped as a ResNet-18 3x3 convolution at 56 px (``M = 56 * 56``, ``K = 64 * 9``, ``N = 64``), float32
against the integer kernels each runtime uses (onnxruntime ``MatMulInteger`` with uint8 x int8 and uint8 x
uint8 operands; PyTorch's x86 quantized ``Linear``), and the CPU's int8 instruction sets (AVX2's ``vpmaddubsw``
only, or AVX-512 VNNI / AVX-VNNI / AMX). Run: ``python bench/bench_int8_export.py``
(``--models resnet18,mobilenet_v2,efficientnet_lite0``, ``--batches 1,16``, ``--threads 1``, ``--weight-bits 4``:
INT4 weights, which onnxruntime keeps in its u8s8 kernels; 8-bit weights go to u8u8, see
:mod:`deployment.onnx_qdq`).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployment.cpu_features import int8_instruction_sets
from deployment.integer_model import dense_folded_model, integer_layers, set_dequantized_weights
from deployment.onnx_qdq import export_float_onnx, inference_session, qdq_model, run_session
from deployment.pt2e_x86 import compiled_program, quantize_pt2e
from models.quantized import CompressionSpec, QuantSetup, calibrate_input_quantizers, compress_model
from models.registry import load_model
from quantization.fake_quant import QuantizerConfig
from quantization.granularity import Granularity
from quantization.quantizers import QuantScheme
from utils.images import sample_photo_batch


def cpu_seconds(run: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    """Best CPU time of ``repeats`` calls ``run(x)`` after two warm-up calls."""
    run(x)
    run(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run(x)
        best = min(best, time.process_time() - start)
    return best


GEMM_SHAPE = (56 * 56, 64 * 9, 64)  # (M, K, N)
def gemm_ceiling(repeats: int) -> dict[str, float]:
    """Float32 GEMM CPU time / integer GEMM CPU time at :data:`GEMM_SHAPE`, per runtime and operand types."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deployment.onnx_qdq import inference_session

    m, k, n = GEMM_SHAPE
    generator = np.random.default_rng(0)

    def session(op: str, a_type: int, b: np.ndarray, y_type: int):
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm",
                                  [helper.make_tensor_value_info("a", a_type, [m, k])],
                                  [helper.make_tensor_value_info("y", y_type, None)], [numpy_helper.from_array(b, "b")])  # fmt: skip
        return inference_session(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))

    a_float, a_uint8 = generator.standard_normal((m, k), dtype=np.float32), generator.integers(0, 256, (m, k), np.uint8)
    float_session = session("MatMul", TensorProto.FLOAT, generator.standard_normal((k, n), dtype=np.float32),
                            TensorProto.FLOAT)  # fmt: skip
    t_float = cpu_seconds(lambda a: float_session.run(None, {"a": a}), a_float, repeats)
    ratios = {}
    for label, b in (("u8s8", generator.integers(-128, 128, (k, n), np.int8)),
                     ("u8u8", generator.integers(0, 256, (k, n), np.uint8))):  # fmt: skip
        integer_session = session("MatMulInteger", TensorProto.UINT8, b, TensorProto.INT32)
        ratios[f"onnxruntime {label}"] = t_float / cpu_seconds(lambda a, s=integer_session: s.run(None, {"a": a}),
                                                               a_uint8, repeats)  # fmt: skip
    from torch.ao.nn.quantized import Linear as QuantizedLinear

    torch.backends.quantized.engine = "x86"
    x = torch.randn(m, k)
    linear, quantized = torch.nn.Linear(k, n), QuantizedLinear(k, n)
    quantized.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, k), 0.05, 0, torch.qint8), torch.zeros(n))
    x_quantized = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
    ratios["torch x86 u8s8"] = cpu_seconds(linear, x, repeats) / cpu_seconds(quantized, x_quantized, repeats)
    return ratios


def compressed(name: str, photos: torch.Tensor, weight_bits: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(name, pretrained=False, download=False).eval()
    spec = CompressionSpec(weight_quant=QuantizerConfig(weight_bits, QuantScheme.SYMMETRIC, Granularity.per_channel(0)),
                           act_quant=QuantizerConfig(8, QuantScheme.ASYMMETRIC), quant_setup=QuantSetup.ALL)  # fmt: skip
    compress_model(model, spec)
    calibrate_input_quantizers(model, [photos])
    return model.eval()


def onnxruntime_qoperator(float_onnx, photos: torch.Tensor):
    """onnxruntime's ``quantize_static`` of ``float_onnx`` in the QOperator format, calibrated on ``photos``."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": photos.numpy()}])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save_model(float_onnx, source)
        quantize_static(source, target, Photos(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        return onnx.load_model(target)


def eager_torch_ao(photos: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(float, int8) torchvision quantizable ResNet-18 through the deprecated eager flow."""
    import torchvision
    from torch.ao import quantization as tq

    torch.manual_seed(0)
    float_model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    model = copy.deepcopy(float_model)
    model.fuse_model()
    model.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(model, inplace=True)
    model(photos)
    tq.convert(model, inplace=True)
    return float_model, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weight-bits", type=int, default=8, help="INT-b weights of every layer (b <= 8).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # the float model as the int8 program (deployment.pt2e_x86.compiled_program)
    ceiling = gemm_ceiling(10 * args.repeats)
    print(f"CPU int8 instruction sets: {', '.join(int8_instruction_sets()) or 'unknown'}; GEMM {GEMM_SHAPE} float32 time / "
          "integer time: " + ", ".join(f"{label} {ratio:.2f}x" for label, ratio in ceiling.items()), flush=True)  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    photos = sample_photo_batch(image_size=args.image_size)
    rows = []
    with torch.no_grad():
        for name in args.models.split(","):
            model = compressed(name, photos, args.weight_bits)
            start = time.perf_counter()
            folded, pairs = dense_folded_model(model, photos[:2])
            layers = integer_layers(model, folded, pairs)
            set_dequantized_weights(folded, layers)
            float_onnx = export_float_onnx(folded, photos[:2])
            int8_onnx = qdq_model(float_onnx, layers, [photos])
            onnx_seconds = time.perf_counter() - start
            start = time.perf_counter()
            program = quantize_pt2e(folded, layers, photos[:2], [photos])
            compiled_int8 = compiled_program(program)
            compiled_int8(photos[:1])
            pt2e_seconds = time.perf_counter() - start
            compiled_float = torch.compile(copy.deepcopy(folded))
            sessions = (inference_session(float_onnx, args.threads), inference_session(int8_onnx, args.threads))
            reference = model(photos)
            errors = {"onnxruntime": (run_session(sessions[1], photos) - reference).abs().max().item(),
                      "inductor": (compiled_int8(photos) - reference).abs().max().item()}  # fmt: skip
            exports = {"onnxruntime": onnx_seconds, "inductor": pt2e_seconds}
            qoperator = inference_session(onnxruntime_qoperator(float_onnx, photos), args.threads)
            runtimes = {
                "onnxruntime": (partial(run_session, sessions[0]), partial(run_session, sessions[1])),
                "ORT quantize_static QOp": (partial(run_session, sessions[0]), partial(run_session, qoperator)),
                "inductor": (compiled_float, compiled_int8),
            }
            if name == "resnet18":
                runtimes["eager torch.ao (deprecated)"] = eager_torch_ao(photos)
            for batch in batches:
                x = torch.randn(batch, 3, args.image_size, args.image_size)
                for runtime, (run_float, run_int8) in runtimes.items():
                    t_float, t_int8 = cpu_seconds(run_float, x, args.repeats), cpu_seconds(run_int8, x, args.repeats)
                    rows.append((name, runtime, batch, t_float, t_int8, exports.get(runtime), errors.get(runtime)))
                    print(f"{name:18s} {runtime:28s} batch {batch:3d}: float {1e3 * t_float:8.1f} ms  int8 "
                          f"{1e3 * t_int8:8.1f} ms  ratio {t_float / t_int8:5.2f}x", flush=True)  # fmt: skip
    print(f"\nCPU time per batch, {args.threads} thread(s), {args.image_size} px, INT{args.weight_bits} weights, "
          f"best of {args.repeats}")
    print(f"{'model':18s} {'runtime':28s} {'batch':>5s} {'float ms':>9s} {'int8 ms':>9s} {'ratio':>6s} "
          f"{'export s':>9s} {'max |int8 - fake-quant|':>24s}")  # fmt: skip
    for name, runtime, batch, t_float, t_int8, export_s, error in rows:
        export_text = f"{export_s:9.1f}" if export_s is not None else f"{'-':>9s}"
        error_text = f"{error:24.4f}" if error is not None else f"{'-':>24s}"
        print(f"{name:18s} {runtime:28s} {batch:5d} {1e3 * t_float:9.1f} {1e3 * t_int8:9.1f} "
              f"{t_float / t_int8:5.2f}x {export_text} {error_text}")  # fmt: skip


if __name__ == "__main__":
    main()
