"""``main.py export`` and :mod:`deployment`: a train-compressed checkpoint as an int8 model (ONNX QDQ, PT2E) or ONNX float.

Unit tests build a small compressed CNN in memory (batch norms with negative scales, a residual addition, a
reused ReLU, pruning masks, per-channel 4-bit and 8-bit weights) and recompute the integers element by
element. The CLI tests train ``tiny_export`` on 16 px digits for one epoch and export it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from train_helpers import invoke_cli, one_line_cli_error, private_registry, write_digits_dataset

from deployment import export as export_module
from deployment.cpu_features import MAX_UNSATURATED_WEIGHT, cpu_flags, onednn_saturates, u8s8_saturates
from deployment.integer_model import IntegerLayer, dense_folded_model, integer_layers, set_dequantized_weights
from deployment.onnx_qdq import INT32_MAX, fit_bias_in_int32, int32_bias
from deployment.pt2e_x86 import load_program
from deployment.storage import load_encoded
from models.quantized import CompressionSpec, QuantSetup, calibrate_input_quantizers, compress_model, compressed_layers
from quantization.fake_quant import QuantizerConfig
from quantization.granularity import Granularity
from quantization.quantizers import QuantScheme
from training.run import restore_model


class TinyExportNet(nn.Module):
    """Stem conv-BN-ReLU, a residual block calling one ReLU module twice (as torchvision's ResNets), a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(y)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _seeded_tiny(pretrained: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return TinyExportNet()


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    with private_registry({"tiny_export": _seeded_tiny}):
        yield


def _compressed(act_quant: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A compressed TinyExportNet: 4-bit per-channel body, 8-bit first/last (LSQ_paper), masks, random BN stats."""
    torch.manual_seed(0)
    model = TinyExportNet().eval()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.weight.copy_(torch.randn(8))  # some negative scales: folding flips the integers' signs
            bn.bias.copy_(torch.randn(8) * 0.1)
            bn.running_mean.copy_(torch.randn(8) * 0.1)
            bn.running_var.copy_(torch.rand(8) + 0.5)
    spec = CompressionSpec(weight_quant=QuantizerConfig(4, QuantScheme.SYMMETRIC, Granularity.per_channel(0)),
                           act_quant=QuantizerConfig(8, QuantScheme.ASYMMETRIC) if act_quant else None,
                           quant_setup=QuantSetup.LSQ_PAPER, prune=True)  # fmt: skip
    compress_model(model, spec)
    images = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        for layer in compressed_layers(model).values():
            layer.weight_mask.copy_(torch.rand(layer.weight.shape) > 0.5)
    if act_quant:
        calibrate_input_quantizers(model, [images])
    return model.eval(), images


def test_int8_weights_are_the_fake_quantizers_integers_with_folded_scales() -> None:
    model, images = _compressed(act_quant=False)
    folded, pairs = dense_folded_model(model, images[:2])
    assert sorted(pairs) == [("conv1", "bn1"), ("conv2", "bn2"), ("stem", "bn0")]
    layers = integer_layers(model, folded, pairs)
    bn_of = dict(pairs)
    for name, layer in compressed_layers(model).items():
        quantizer = layer.weight_quantizer
        weight, mask = layer.weight.detach().double(), layer.weight_mask
        step = quantizer.step_size.detach().double()
        integer = layers[name].int_weight
        assert integer.dtype == torch.int8
        half = 2 ** (quantizer.n_bits - 1)
        for c in range(weight.shape[0]):  # element by element: clamp(round(w * m / s), -2^(b-1), 2^(b-1) - 1)
            sign, factor = 1.0, 1.0
            if name in bn_of:
                bn = model.get_submodule(bn_of[name])
                factor = float(bn.weight[c].detach()) / float(torch.sqrt(bn.running_var[c].double() + bn.eps))
                sign = 1.0 if factor > 0 else -1.0
            for index, value in enumerate((weight[c] * mask[c]).flatten().tolist()):
                expected = sign * min(max(round(value / float(step[c])), -half), half - 1)
                assert int(integer[c].flatten()[index]) == expected, (name, c, index)
            assert float(layers[name].scale[c]) == pytest.approx(float(step[c]) * abs(factor), rel=1e-12)
        assert bool((integer[~mask] == 0).all()), name  # every pruned weight stays zero
    # the dense folded model computes what the fake-quantized one does
    with torch.no_grad():
        assert torch.allclose(folded(images), model(images), atol=1e-4)
        set_dequantized_weights(folded, layers)
        assert torch.allclose(folded(images), model(images), atol=1e-4)


def test_storage_bits_widen_only_when_a_flipped_sign_leaves_the_grid() -> None:
    assert export_module.storage_bits(torch.tensor([-8, 7], dtype=torch.int8), 4) == 4
    assert export_module.storage_bits(torch.tensor([-7, 8], dtype=torch.int8), 4) == 5  # -(-8)
    assert export_module.storage_bits(torch.tensor([0, 0], dtype=torch.int8), 1) == 2


@pytest.mark.slow
def test_onnx_qdq_runs_int8_kernels_and_matches_the_fake_quantized_model(tmp_path: Path) -> None:
    from deployment.onnx_qdq import export_float_onnx, inference_session, qdq_model, run_session, serialized

    model, images = _compressed()
    folded, pairs = dense_folded_model(model, images[:2])
    layers = integer_layers(model, folded, pairs)
    set_dequantized_weights(folded, layers)
    float_model = export_float_onnx(folded, images[:2])
    with torch.no_grad():
        reference, float_logits = model(images), folded(images)
    assert torch.allclose(run_session(inference_session(float_model), images), float_logits, atol=1e-4)
    qdq = qdq_model(float_model, layers, [images])
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in qdq.graph.initializer}
    for name, layer in layers.items():  # the stored integers (uint8 + 128 where 8-bit weights would saturate)
        stored = weights[f"{name}.weight.int"].astype(np.int32) - weights[f"{name}.weight.zero_point"].astype(np.int32)[
            (slice(None),) + (None,) * (layer.int_weight.dim() - 1)]  # fmt: skip
        stored = stored if stored.shape == tuple(layer.int_weight.shape) else stored.T
        np.testing.assert_array_equal(stored, layer.int_weight.numpy().astype(np.int32))
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(serialized(qdq), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert fused.count("QLinearConv") == 3 and "QLinearAdd" in fused  # the int8 kernels run
    literal = onnxruntime.SessionOptions()
    literal.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = torch.from_numpy(onnxruntime.InferenceSession(serialized(qdq), literal, providers=["CPUExecutionProvider"])
                               .run(None, {"x": images.numpy()})[0])  # fmt: skip
    int8 = run_session(inference_session(qdq), images)
    assert torch.allclose(int8, unfused, atol=1e-3)  # the fused kernels compute the QDQ graph's semantics
    # extra 8-bit quantizers (conv outputs, the addition): an error of a few output steps, top-1 unchanged here
    assert (int8 - reference).abs().max() < 0.05 * reference.abs().max()
    assert torch.equal(int8.argmax(1), reference.argmax(1))


def _tiny_float_onnx() -> tuple[onnx.ModelProto, dict[str, IntegerLayer], torch.Tensor]:
    from deployment.onnx_qdq import export_float_onnx

    model, images = _compressed()
    folded, pairs = dense_folded_model(model, images[:2])
    layers = integer_layers(model, folded, pairs)
    set_dequantized_weights(folded, layers)
    return export_float_onnx(folded, images[:2]), layers, images


def _tiny_qdq() -> tuple[onnx.ModelProto, dict[str, IntegerLayer], torch.Tensor]:
    from deployment.onnx_qdq import qdq_model

    float_model, layers, images = _tiny_float_onnx()
    return qdq_model(float_model, layers, [images]), layers, images


@pytest.mark.slow
def test_the_cut_simulation_reproduces_the_literal_graph_and_the_kernels_stay_within_one_step(tmp_path: Path) -> None:
    from deployment import kernel_check as kc
    from deployment.onnx_qdq import inference_session, serialized

    qdq, layers, images = _tiny_qdq()
    probed = kc.probed_model(qdq)
    tensors = [output.name for output in probed.graph.output][1:]
    assert len(tensors) == 6  # x, three layer outputs, the addition's inputs/outputs, the classifier's input
    literal = inference_session(probed, optimize=False).run(None, {"x": images.numpy()})
    values = dict(zip(tensors, literal[1:]))
    cut = inference_session(kc.cut_simulation(qdq), optimize=False)
    simulated = cut.run(["logits", *(tensor + kc.SIMULATED_SUFFIX for tensor in tensors)], {"x": images.numpy(), **values})
    for tensor, value in zip(tensors, simulated[1:]):  # fed its own integers, the cut graph computes the same
        np.testing.assert_array_equal(value, values[tensor])
    np.testing.assert_array_equal(simulated[0], literal[0])
    options = onnxruntime.SessionOptions()  # the probes keep the fusions: the check runs the integer kernels
    options.optimized_model_filepath = str(tmp_path / "probed.onnx")
    onnxruntime.InferenceSession(serialized(probed), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(tmp_path / "probed.onnx").graph.node]
    assert fused.count("QLinearConv") == 3 and "QLinearAdd" in fused
    # the logit bound gamma_(K+8) sum_i |x_i w_ji| + |b_j|, recomputed from the classifier's integers
    fc, fc_input = layers["fc"], torch.from_numpy(values[tensors[-1]].astype(np.float64))
    scale, zero_point = (onnx.numpy_helper.to_array(init) for init in qdq.graph.initializer
                         if init.name in (f"{tensors[-1][:-4]}.scale", f"{tensors[-1][:-4]}.zero_point"))  # fmt: skip
    x = float(scale) * (fc_input - float(zero_point))
    terms = x.abs() @ fc.dequantized_weight().double().abs().T
    bias = torch.round(fc.bias / (float(scale) * fc.scale)) * (float(scale) * fc.scale)  # the int32 bias
    expected = kc.gamma(8 + 8) * (terms + bias.abs())
    np.testing.assert_allclose(kc.logit_bound(qdq, values), expected.numpy(), rtol=1e-5)
    result = kc.check_kernels(qdq, [images, torch.randn(5, 3, 12, 12)])
    assert result.images == 21 and result.quantized_tensors == 6 and result.passed
    assert result.max_integer_difference <= 1 and result.share_off_by_one < 0.01


@pytest.mark.slow
def test_the_kernel_check_fails_a_kernel_that_does_not_compute_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployment import kernel_check

    qdq, _layers, images = _tiny_qdq()
    faithful = kernel_check.probed_model

    def off_by_three(model: onnx.ModelProto) -> onnx.ModelProto:  # kernels using another zero point for relu_1
        probed = faithful(model)
        for init in probed.graph.initializer:
            if init.name == "relu_1.q.zero_point":
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 3, init.name))
        return probed

    monkeypatch.setattr(kernel_check, "probed_model", off_by_three)
    result = kernel_check.check_kernels(qdq, [images])
    assert result.max_integer_difference >= 3 and not result.passed  # (it also shifts what conv2 reads)


@pytest.mark.slow
@pytest.mark.skipif(not u8s8_saturates(), reason="u8s8 pair sums saturate only on x86 CPUs with AVX2 and without VNNI")
def test_the_kernel_check_catches_saturating_u8s8_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """8-bit weights (+-127) kept as int8: onnxruntime's AVX2 u8s8 kernels add u8 * s8 pairs in int16, saturating."""
    from deployment import onnx_qdq
    from deployment.kernel_check import check_kernels

    float_model, layers, images = _tiny_float_onnx()
    assert int(layers["stem"].int_weight.abs().max()) == 127
    monkeypatch.setattr(onnx_qdq, "MAX_UNSATURATED_WEIGHT", 127)
    result = check_kernels(onnx_qdq.qdq_model(float_model, layers, [images]), [3 * images])
    assert result.max_integer_difference > 1 and not result.passed
    monkeypatch.setattr(onnx_qdq, "MAX_UNSATURATED_WEIGHT", 64)  # the export's choice: uint8 weights, u8u8 kernels
    assert check_kernels(onnx_qdq.qdq_model(float_model, layers, [images]), [3 * images]).passed


@pytest.mark.slow
def test_real_efficientnet_lite0_int8_kernels_stay_within_the_rounding_bound() -> None:
    """The bundled ImageNet weights: batch-norm channels with gamma near 0 (a bias at the edge of int32)."""
    from deployment.kernel_check import check_kernels
    from deployment.onnx_qdq import export_float_onnx, qdq_model
    from models.registry import load_model
    from utils.images import sample_photo_batch

    photos = sample_photo_batch(image_size=160)
    model = load_model("efficientnet_lite0", pretrained=True, download=False).eval()
    compress_model(model, CompressionSpec(weight_quant=QuantizerConfig(8, QuantScheme.SYMMETRIC, Granularity.per_channel(0)),
                                          act_quant=QuantizerConfig(8, QuantScheme.ASYMMETRIC), quant_setup=QuantSetup.ALL))  # fmt: skip
    calibrate_input_quantizers(model, [photos])
    with torch.no_grad():
        folded, pairs = dense_folded_model(model.eval(), photos[:2])
        layers = integer_layers(model, folded, pairs)
        set_dequantized_weights(folded, layers)
        qdq = qdq_model(export_float_onnx(folded, photos[:2]), layers, [photos])
        result = check_kernels(qdq, [photos])
    assert result.passed and result.max_integer_difference <= 1  # a wrapped-around int32 sum: up to 75 steps


# --------------------------------------------------------------------------- the command

TRAIN = ["train-compressed", "--architecture", "tiny_export", "--no-pretrained", "--image-size", "16",
         "--num-workers", "0", "--no-progress-bar", "--bn-est-batches", "2", "--learning-rate", "0.05",
         "--batch-size", "32", "--max-epochs", "1", "--seed", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("digits"), per_class_train=12, per_class_val=4, image_size=16)


@pytest.fixture(scope="module")
def qat_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-bit per-channel QAT with 8-bit activations and 50% magnitude pruning, one epoch."""
    out = tmp_path_factory.mktemp("qat")
    invoke_cli([*TRAIN, "--images-dir", str(digits), "--act-quant", "--n-bits", "4", "--per-channel",
                "--prune-method", "zhu_gupta", "--s-f", "0.5", "--prune-last-epoch", "0", "--save-checkpoint-dir",
                str(out)])  # fmt: skip
    return out / "last.pt"


def _export_args(checkpoint: Path, fmt: str, output: Path, *extra: str) -> list[str]:
    return ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--output", str(output), *extra]


@pytest.mark.slow
def test_export_onnx_int8_keeps_the_zeros_and_agrees_with_the_checkpoint(qat_run: Path, digits: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    output = tmp_path / "model.onnx"
    printed = invoke_cli(_export_args(qat_run, "onnx-int8", output, "--images-dir", str(digits), "--pack"))
    report = json.loads((tmp_path / "model.onnx.json").read_text())
    assert report["saturating_layers"] == []  # uint8 weights where they would saturate
    check = report["check"]
    assert check["images"] == 40 and check["top1_agreement"] >= 90.0
    kernels = report["kernel_check"]  # the int8 kernels against the float simulation of the same quantization
    assert (f"kernels vs simulation: up to {kernels['max_integer_difference']} step, logits at "
            f"{kernels['max_logit_difference_to_bound']:.2g} of their rounding bound") in printed  # fmt: skip
    assert kernels["images"] == 40 and kernels["max_integer_difference"] <= 1
    assert kernels["max_logit_difference_to_bound"] <= 1.0
    assert abs(check["top1_exported"] - check["top1_reference"]) <= 5.0
    state = torch.load(qat_run, map_location="cpu", weights_only=True)["model"]
    int_weights, n_bits, _scales = load_encoded(tmp_path / "model.onnx.weights.npz")
    for name, weight in int_weights.items():  # every pruned zero kept, per layer
        mask = state[f"{name}.weight_mask"]
        assert bool((weight[~mask] == 0).all()), name
        assert report["layers"][name]["sparsity"] == pytest.approx(float((weight == 0).sum()) / weight.numel())
        assert report["layers"][name]["sparsity"] >= float((~mask).sum()) / mask.numel()
    assert n_bits["conv1"] in (4, 5) and n_bits["stem"] == 8
    sizes = report["weight_bytes"]
    numel = sum(weight.numel() for weight in int_weights.values())
    assert sizes["float32"] == 4 * numel and sizes["int8"] == numel
    assert report["smallest_encoding"] == min(sizes, key=lambda key: sizes[key] if key != "float32" else np.inf)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 10)  # dynamic batch


@pytest.mark.slow
def test_export_pt2e_and_onnx_fp32(qat_run: Path, digits: Path, tmp_path: Path) -> None:
    printed = invoke_cli(_export_args(qat_run, "pt2e-x86", tmp_path / "model.pt2", "--images-dir", str(digits)))
    report = json.loads((tmp_path / "model.pt2.json").read_text())
    assert f"inductor vs simulation: top-1 agreement {report['kernel_check']['top1_agreement']:.1f}%" in printed
    assert report["check"]["top1_agreement"] >= 90.0
    assert report["kernel_check"]["images"] == 40 and report["kernel_check"]["top1_agreement"] >= 90.0
    program = load_program(tmp_path / "model.pt2")
    int8_weights = [value for value in program.constants.values() if value.dtype == torch.int8] + [
        value for value in program.state_dict.values() if value.dtype == torch.int8]  # fmt: skip
    assert len(int8_weights) == 4  # stem, conv1, conv2, fc as int8 constants, and no float weights
    assert sum(value.numel() for value in program.state_dict.values() if value.is_floating_point()) < 200
    model, _ = restore_model(qat_run)
    folded, pairs = dense_folded_model(model, torch.zeros(2, 3, 16, 16))
    layers = integer_layers(model, folded, pairs)
    for name, layer in layers.items():  # exactly the checkpoint's integers
        assert any(value.shape == layer.int_weight.shape and torch.equal(value, layer.int_weight)
                   for value in int8_weights), name  # fmt: skip
    beyond = [name for name, layer in layers.items() if int(layer.int_weight.abs().max()) > MAX_UNSATURATED_WEIGHT]
    assert beyond and report["saturating_layers"] == (beyond if onednn_saturates() else [])
    assert ("may saturate on this CPU" in printed) is onednn_saturates()
    invoke_cli(_export_args(qat_run, "onnx-fp32", tmp_path / "float.onnx"))  # no data needed: no check
    report = json.loads((tmp_path / "float.onnx.json").read_text())
    assert report["check"] is None and report["folded_batch_norms"] == 3
    ops = {node.op_type for node in onnx.load(tmp_path / "float.onnx").graph.node}
    assert "BatchNormalization" not in ops and "Mul" not in ops  # folded, masks multiplied in


@pytest.mark.slow
def test_bad_inputs_fail_in_one_line_and_write_nothing(qat_run: Path, digits: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    output = tmp_path / "model.onnx"
    line = one_line_cli_error(_export_args(qat_run, "onnx-int8", output))
    assert "needs --images-dir" in line and "8 bits" in line
    float_run = tmp_path / "float"
    invoke_cli([*TRAIN, "--images-dir", str(digits), "--no-weight-quant", "--save-checkpoint-dir", str(float_run)])
    assert "has no weight quantization" in one_line_cli_error(_export_args(float_run / "last.pt", "onnx-int8", output))
    ptq = tmp_path / "ptq" / "model.onnx"  # with calibration data the float run is quantized post training
    invoke_cli(_export_args(float_run / "last.pt", "onnx-int8", ptq, "--images-dir", str(digits)))
    report = json.loads((tmp_path / "ptq" / "model.onnx.json").read_text())
    assert {layer["weight_bits"] for layer in report["layers"].values()} == {8}
    assert report["check"]["top1_agreement"] >= 90.0
    wide = torch.load(qat_run, map_location="cpu", weights_only=True)
    wide["options"]["quant"]["n_bits"] = 16  # the same tensors, read as a 16-bit run
    torch.save(wide, tmp_path / "wide.pt")
    line = one_line_cli_error(_export_args(tmp_path / "wide.pt", "onnx-int8", output, "--images-dir", str(digits)))
    assert "16-bit weights do not fit in int8" in line
    monkeypatch.setattr(export_module, "installed", lambda package: package != "torchao")
    line = one_line_cli_error(_export_args(qat_run, "pt2e-x86", output, "--images-dir", str(digits)))
    assert "needs torchao, which is not installed" in line
    (tmp_path / "a_file").write_text("")
    line = one_line_cli_error(_export_args(qat_run, "onnx-fp32", tmp_path / "a_file" / "model.onnx"))
    assert "'--output'" in line and "is a file" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "float", "ptq", "wide.pt"]  # nothing more
    assert sorted(path.name for path in (tmp_path / "ptq").iterdir()) == ["model.onnx", "model.onnx.json"]


@pytest.mark.slow
def test_onnx_fp32_of_a_rearranged_block_pruned_run_is_the_masked_folded_model(digits: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "blocks"
    invoke_cli([*TRAIN, "--images-dir", str(digits), "--no-weight-quant", "--prune-method", "block", "--block-size", "4",
                "--s-f", "0.5", "--rearrange", "--save-checkpoint-dir", str(run_dir)])  # fmt: skip
    output = tmp_path / "float.onnx"
    invoke_cli(_export_args(run_dir / "last.pt", "onnx-fp32", output, "--images-dir", str(digits)))
    report = json.loads((tmp_path / "float.onnx.json").read_text())
    assert report["check"]["top1_agreement"] == 100.0 and report["check"]["max_logit_error"] < 1e-4
    model, _ = restore_model(run_dir / "last.pt")
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(output).graph.initializer}
    for name in ("conv1", "conv2"):  # the block-pruned zeros, in the rearranged (permuted) layout
        mask = model.get_submodule(name).weight_mask.numpy()
        assert not mask.all() and (weights[f"{name}.weight"][~mask] == 0).all(), name


def test_a_bias_too_large_for_int32_raises_only_its_channel_weight_scale() -> None:
    """A channel with a tiny folded scale (batch norm gamma near 0, as in EfficientNet-Lite0) and a large bias."""
    int_weight = torch.tensor([[[[3]], [[-7]]], [[[5]], [[-2]]], [[[127]], [[-90]]]], dtype=torch.int8)
    scale = torch.tensor([0.02, 1e-12, 0.5], dtype=torch.float64)
    bias = torch.tensor([0.3, 0.8, -1.0], dtype=torch.float64)
    layer = IntegerLayer(int_weight, 8, scale, bias, None)
    input_scale = 0.05
    assert 0.8 / (input_scale * 1e-12) > INT32_MAX  # int32_bias would refuse the layer as it is
    fitted = fit_bias_in_int32("conv", layer, input_scale)
    values, bias_scale = int32_bias("conv", fitted, input_scale)  # now fits
    room = 255 * int_weight.abs().to(torch.int64).sum((1, 2, 3)).numpy()  # the largest accumulation, channel by channel
    assert (np.abs(values.astype(np.int64)) + room).max() <= INT32_MAX
    np.testing.assert_allclose(values * bias_scale, bias.numpy(), atol=bias_scale.max() / 2 + 1e-15)
    assert torch.equal(fitted.int_weight[[0, 2]], int_weight[[0, 2]]) and torch.equal(fitted.scale[[0, 2]], scale[[0, 2]])
    new_scale = float(fitted.scale[1])
    assert new_scale == pytest.approx(0.8 / (input_scale * (INT32_MAX - 255 * (5 + 2))), rel=1e-8)
    old = int_weight[1].double() * 1e-12
    assert float((fitted.int_weight[1].double() * new_scale - old).abs().max()) <= new_scale / 2
    assert fit_bias_in_int32("conv", fitted, input_scale) is fitted  # nothing left to change


@pytest.mark.slow
@pytest.mark.skipif("avx2" not in cpu_flags(), reason="oneDNN's x86 int8 kernels: an x86 CPU with AVX2")
def test_onednn_without_vnni_saturates_8_bit_weights_of_lite0() -> None:
    """The README's finding, rerun: oneDNN held at AVX2 (or a CPU without VNNI) sums u8 x s8 pairs in int16, so
    Lite0's inductor int8 program with 8-bit weights leaves its simulation by logits; with VNNI it stays close."""
    import os
    import re
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "check_pt2e_kernels.py"

    def gap(max_isa: str | None) -> tuple[bool, float]:
        env = {key: value for key, value in os.environ.items() if key != "ONEDNN_MAX_CPU_ISA"}
        if max_isa is not None:
            env["ONEDNN_MAX_CPU_ISA"] = max_isa
        printed = subprocess.run([sys.executable, str(script), "--weight-bits", "8"], env=env, capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
        saturates = "saturates u8 x s8 pairs here: yes" in printed
        return saturates, float(re.search(r"max \|logit difference\| ([0-9.]+)", printed).group(1))

    saturates, held = gap("AVX2")
    assert saturates and held > 2.0
    if not u8s8_saturates():
        saturates, free = gap(None)
        assert not saturates and free < 1.0
