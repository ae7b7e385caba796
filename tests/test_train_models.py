"""Compressed model wrappers of the four paper architectures: BN folding, weight grids, BN re-estimation, one step."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from train_helpers import write_digits_dataset

from models import load_model
from models.heads import classifier_head, replace_classifier_head
from models.quantized import (
    COMPRESSED_TYPES,
    CompressionSpec,
    QuantSetup,
    bfloat16_gradient_unsafe,
    calibrate_input_quantizers,
    compress_model,
    compressed_layers,
    find_conv_bn_pairs,
    layer_bit_widths,
    reestimate_bn_stats,
)
from pruning.masks import num_pruned
from quantization.fake_quant import QuantizerConfig, RangeEstimator
from quantization.granularity import Granularity
from quantization.quantizers import QuantScheme
from training.builders import build_compressed_model
from training.config import TrainConfig
from training.run import restore_model, train
from utils.images import sample_photo_batch

ARCHITECTURES = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0")


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_batch_norms(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator))
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(shape, generator=generator))
            module.bias.data.copy_(torch.randn(shape, generator=generator))


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.slow
def test_folding_batch_norm_keeps_the_function(name: str) -> None:
    model = load_model(name, pretrained=False)
    _randomise_batch_norms(model)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        reference = model(x).double()
    compress_model(model, CompressionSpec(fold_bn=True), x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # every BN follows a conv
    with torch.no_grad():
        folded = model(x).double()
    error = (folded - reference).norm() / reference.norm()
    assert error < 1e-5, (name, error.item())
    assert n_bn > 15


def test_conv_bn_pairs_of_resnet18() -> None:
    pairs = dict(find_conv_bn_pairs(load_model("resnet18", pretrained=False), torch.zeros(1, 3, 32, 32)))
    assert pairs["conv1"] == "bn1" and pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert pairs["layer4.1.conv2"] == "layer4.1.bn2" and len(pairs) == 20


@pytest.mark.parametrize("per_channel", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("scheme", [QuantScheme.SYMMETRIC, QuantScheme.ASYMMETRIC])
@pytest.mark.slow
def test_quantized_weights_lie_on_their_grid(per_channel: bool, scheme: QuantScheme) -> None:
    model = load_model("mobilenet_v2", pretrained=False)
    config = QuantizerConfig(n_bits=3, scheme=scheme, granularity=Granularity.per_channel() if per_channel else Granularity(),
                             range_estimator=RangeEstimator.MSE)
    layers = compress_model(model, CompressionSpec(weight_quant=config, quant_setup=QuantSetup.LSQ_PAPER))
    bits = layer_bit_widths(list(layers), 3, QuantSetup.LSQ_PAPER)
    assert bits["features.0.0"] == bits["classifier.1"] == 8 and bits["features.1.conv.0.0"] == 3
    with torch.no_grad():
        for name, layer in layers.items():
            quantizer = layer.weight_quantizer
            step = quantizer.step_size.reshape(-1, *[1] * (layer.weight.dim() - 1)) if per_channel else quantizer.step_size
            zero = quantizer.zero_point.reshape(step.shape) if per_channel else quantizer.zero_point
            integers = layer.effective_weight() / step + zero
            assert torch.allclose(integers, integers.round(), atol=1e-3), name
            assert integers.min() >= quantizer.q_min - 1e-3 and integers.max() <= quantizer.q_max + 1e-3
            rows = integers.round().reshape(integers.shape[0], -1) if per_channel else integers.round().reshape(1, -1)
            assert max(len(row.unique()) for row in rows) <= 2 ** bits[name]


def test_bn_reestimation_is_the_average_of_batch_statistics() -> None:
    model = load_model("resnet18", pretrained=False)
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * (1 + i) for i in range(3)]
    seen: list[torch.Tensor] = []
    handle = model.bn1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double()))
    momentum = model.bn1.momentum
    assert reestimate_bn_stats(model.eval(), batches) == 3
    handle.remove()
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen])
    assert torch.allclose(model.bn1.running_mean.double(), means.mean(0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(model.bn1.running_var.double(), variances.mean(0), rtol=1e-4, atol=1e-5)
    assert not model.training and model.bn1.momentum == momentum


def test_activation_calibration_resets_running_ranges() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    act = QuantizerConfig(n_bits=8, scheme=QuantScheme.ASYMMETRIC, range_estimator=RangeEstimator.RUNNING_MINMAX)
    layers = compress_model(model, CompressionSpec(act_quant=act, quant_setup=QuantSetup.ALL))
    model(torch.zeros(1, 3, 8, 8))  # a stray forward pass before calibration must not count
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 4 - 1
    assert calibrate_input_quantizers(model, [x]) == 1
    first = layers["0"].input_quantizer
    lo, hi = float(x.min()), float(x.max())
    assert first.step_size.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert first.zero_point.item() == round(-lo / ((hi - lo) / 255))
    assert not first.estimating


def _bfloat16_gradients(conv: nn.Module, x: torch.Tensor, heap_fill: float) -> tuple[torch.Tensor, ...]:
    """Output and gradients of ``conv(x)`` under CPU bfloat16 autocast, after filling freed heap memory with ``heap_fill``."""
    scratch = [torch.full((1 << 18,), heap_fill, dtype=torch.bfloat16) for _ in range(8)]
    del scratch
    conv.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().sum().backward()
    return y, conv.weight.grad, x.grad


@pytest.mark.parametrize("float_conv, size", [
    (nn.Conv2d(16, 32, 3, stride=2, padding=1), (1, 1)),  # ResNet-18's layer4.0.conv1 at 16x16 images
    (nn.Conv2d(16, 32, 3, stride=(1, 3), padding=(0, 1)), (3, 2)),
    (nn.Conv1d(16, 16, 5, stride=2, padding=2), (1,)),
    (nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1), (1, 1)),
])  # fmt: skip
def test_convolutions_smaller_than_their_kernel_leave_cpu_bfloat16_autocast(float_conv: nn.Module, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    conv = COMPRESSED_TYPES[type(float_conv)].from_float(float_conv, QuantizerConfig(n_bits=4), None, prune=True)
    x, larger = torch.randn(2, 16, *size), torch.randn(2, 16, *(7 for _ in size))
    assert not bfloat16_gradient_unsafe(x, conv.kernel_size, conv.dilation)  # not under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bfloat16_gradient_unsafe(x, conv.kernel_size, conv.dilation)
        assert not bfloat16_gradient_unsafe(larger, conv.kernel_size, conv.dilation)
    y, weight_grad, input_grad = _bfloat16_gradients(conv, x, float("nan"))
    assert y.dtype == torch.float32
    conv.zero_grad(set_to_none=True)
    x32 = x.detach().requires_grad_()
    conv(x32).square().sum().backward()  # no autocast: float32 throughout
    assert torch.equal(weight_grad, conv.weight.grad) and torch.equal(input_grad, x32.grad)
    assert _bfloat16_gradients(conv, larger, 0.0)[0].dtype == torch.bfloat16


def test_bfloat16_convolution_gradients_are_reproducible_where_not_flagged() -> None:
    """The rule of ``bfloat16_gradient_unsafe`` covers every small 2-d shape of this grid.

    Gradients computed after the freed heap was filled with NaN and with zeros are equal and
    finite wherever the rule lets bfloat16 run (uninitialised reads differ between the two).
    """
    torch.manual_seed(0)
    checked = 0
    for height, width, kernel, stride, groups in itertools.product((1, 2, 3, 5), (1, 2, 3, 5), (1, 3, 5), (1, 2), (1, 16)):
        for padding in range(kernel // 2 + 1):
            if min(height, width) + 2 * padding < kernel:
                continue  # no output
            conv = nn.Conv2d(16, 16 if groups > 1 else 32, kernel, stride=stride, padding=padding, groups=groups)
            x = torch.randn(2, 16, height, width)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if bfloat16_gradient_unsafe(x, conv.kernel_size, conv.dilation):
                    continue
            runs = [_bfloat16_gradients(conv, x, fill) for fill in (float("nan"), 0.0)]
            for first, second in zip(*runs):
                assert torch.isfinite(first).all() and torch.equal(first, second), (height, width, kernel, stride, padding, groups)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("per_channel, estimator", [(True, RangeEstimator.CURRENT_MINMAX), (False, RangeEstimator.MSE)])
@pytest.mark.slow
def test_efficientnet_lite0_at_8_bits_agrees_with_float(per_channel: bool, estimator: RangeEstimator) -> None:
    """Per-channel INT8 (deployment style) keeps every top-1; per-tensor MSE keeps those with a clear margin.

    (The float model's top-1 for the astronaut has 3% probability, 0.8 points above the runner-up.)
    """
    model = load_model("efficientnet_lite0")
    photos = sample_photo_batch()
    with torch.no_grad():
        float_probs = model(photos).softmax(1)
    spec = CompressionSpec(weight_quant=QuantizerConfig(n_bits=8, granularity=Granularity.per_channel() if per_channel else Granularity(), range_estimator=estimator),
                           quant_setup=QuantSetup.ALL)  # fmt: skip
    compress_model(model, spec)
    assert all(layer.weight_quantizer is not None for layer in compressed_layers(model).values())
    with torch.no_grad():
        quant_probs = model(photos).softmax(1)
    top2 = float_probs.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 0.05 if not per_channel else torch.ones(len(photos), dtype=torch.bool)
    assert clear.sum() >= 4
    assert torch.equal(float_probs.argmax(1)[clear], quant_probs.argmax(1)[clear])
    assert float_probs.argmax(1)[1].item() == 967  # coffee -> espresso: a real pretrained model
    assert 0 < (quant_probs - float_probs).abs().max() < 0.25


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("tiny_digits"), per_class_train=1, per_class_val=1)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.slow
def test_each_paper_architecture_trains_a_step(name: str, tiny_digits: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_options(
        architecture=f"{name}_quantized", images_dir=str(tiny_digits), pretrained=False, image_size=16, batch_size=8,
        num_workers=0, max_epochs=1, weight_quant_method="current_minmax", act_quant=True, prune_method="zhu_gupta",
        s_f=0.5, delta_t=1, bn_est_batches=1, progress_bar=False, save_checkpoint_dir=str(tmp_path),
    )  # fmt: skip
    summary = train(config)
    assert summary["steps"] == 1 and summary["final"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    layers = summary["layers"]
    first, last = next(iter(layers.values())), list(layers.values())[-1]
    assert first["weight_bits"] == last["weight_bits"] == 8 and first["act_bits"] == 8
    assert {layer["weight_bits"] for layer in list(layers.values())[1:-1]} == {4}
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "metrics.csv").is_file()


@pytest.mark.slow
def test_less_common_options_run(tiny_digits: Path, tmp_path: Path) -> None:
    """Adam, multistep LR, per-channel asymmetric weights, MSE 6-bit activations, FP logits, AMP, global pruning."""
    config = TrainConfig.from_options(
        architecture="resnet18", images_dir=str(tiny_digits), pretrained=False, image_size=16, batch_size=4,
        num_workers=1, max_epochs=2, optimizer="Adam", learning_rate=1e-4, learning_rate_schedule="multistep:1",
        sep_quant_optimizer=False, per_channel=True, qmethod="asymmetric_uniform", grad_scaling=True, fold_bn=True,
        act_quant=True, act_quant_method="mse", n_bits_act=6, quant_setup="FP_logits", amp=True, channels_last=True,
        prune_method="zhu_gupta", prune_scope="global", s_i=0.2, s_f=0.4, delta_t=1, deterministic=True,
        progress_bar=False, save_checkpoint_dir=str(tmp_path),
    )  # fmt: skip
    summary = train(config)
    assert summary["steps"] == 4 and summary["final"]["lr"] == pytest.approx(1e-5)
    layers = summary["layers"]
    assert layers["fc"]["weight_bits"] is None and layers["fc"]["act_bits"] is None  # FP_logits
    assert layers["conv1"]["weight_bits"] == 4 and layers["conv1"]["act_bits"] == 6
    assert not torch.are_deterministic_algorithms_enabled()  # the global flag is restored after the run

    # global pruning on its cubic schedule: 2 steps per epoch, updates at steps 0..3 (the run's last step)
    model, _ = restore_model(tmp_path / "last.pt")
    compressed = compressed_layers(model)
    total = sum(layer.weight.numel() for layer in compressed.values())
    pruned = sum(int((~layer.weight_mask).sum()) for layer in compressed.values())
    assert pruned == num_pruned(total, 0.4)
    after_first_epoch = 0.4 + (0.2 - 0.4) * (1 - 1 / 3) ** 3  # s(t=1) with t0=0, n=3, delta_t=1
    history = torch.load(tmp_path / "last.pt", weights_only=False)["history"]
    assert history[0]["sparsity"] == pytest.approx(num_pruned(total, after_first_epoch) / total, abs=1e-9)
    assert history[1]["sparsity"] == pytest.approx(pruned / total, abs=1e-9)
    # multistep:1: x0.1 from step 2 for both groups (weights 1e-4, step sizes --quant-learning-rate 1e-5)
    groups = torch.load(tmp_path / "last.pt", weights_only=False)["optimizers"]["model"]["param_groups"]
    assert [group["initial_lr"] for group in groups] == [1e-4, 1e-5]
    assert [group["lr"] for group in groups] == pytest.approx([1e-5, 1e-6])
    assert [row["lr"] for row in history] == pytest.approx([1e-5, 1e-5])
    assert not any(isinstance(module, nn.BatchNorm2d) for module in model.modules())  # folded
    assert compressed["fc"].weight_quantizer is None and compressed["fc"].input_quantizer is None
    for name, layer in compressed.items():
        if name == "fc":
            continue
        weights, inputs = layer.weight_quantizer, layer.input_quantizer
        assert weights.step_size.numel() == weights.zero_point.numel() == layer.weight.shape[0], name  # per channel
        assert inputs.step_size.numel() == 1 and torch.isfinite(inputs.step_size).all() and (inputs.step_size > 0).all()
        assert (weights.step_size > 0).all()
        for quantizer in (weights, inputs):  # asymmetric: integer zero points on the grid
            zero = quantizer.zero_point
            assert torch.equal(zero, zero.round()) and quantizer.q_min <= zero.min() and zero.max() <= quantizer.q_max


@pytest.mark.slow
def test_model_dir_weights_are_used(tiny_digits: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from main import cli

    state = load_model("resnet18", pretrained=False).state_dict()
    state["fc.bias"][3] = 1e4  # every image is classified as a 3
    torch.save(state, tmp_path / "resnet18-f37072fd.pth")
    args = ["evaluate", "--images-dir", str(tiny_digits), "--architecture", "resnet18", "--image-size", "16",
            "--num-workers", "0", "--no-progress-bar", "--no-weight-quant", "--no-reestimate-bn-stats"]  # fmt: skip
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, args + ["--model-dir", str(tmp_path), "--output-json", str(report)])
    assert result.exit_code == 0, result.output
    n_val = len(list((tiny_digits / "val").rglob("*.png")))
    n_three = len(list((tiny_digits / "val" / "3").glob("*.png")))
    assert json.loads(report.read_text())["top1"] == pytest.approx(100 * n_three / n_val)
    missing = CliRunner().invoke(cli, args + ["--model-dir", str(tmp_path / "digits_dir_missing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(cli, args + ["--model-dir", str(tmp_path / "empty")])
    assert empty.exit_code == 1 and "has no resnet18-f37072fd.pth" in empty.output


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v2", "classifier.1"),
                                        ("efficientnet_lite0", "_fc"), ("squeezenet1_0", "classifier.1")])  # fmt: skip
@pytest.mark.slow
def test_classifier_head_is_found_and_replaced(name: str, head: str) -> None:
    model = load_model(name, pretrained=False)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    found, layer, outputs = classifier_head(model, 64)
    assert (found, outputs) == (head, 1000)
    inputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    with torch.no_grad():
        logits = model.eval()(x)
    handle.remove()
    if isinstance(layer, nn.Linear):  # the logits are this layer's output, computed independently
        assert torch.allclose(logits, inputs[0] @ layer.weight.T + layer.bias, atol=1e-5)
    assert replace_classifier_head(model, 1000, 64) is None  # ImageNet's 1000 classes: the head is kept
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())

    assert replace_classifier_head(model, 7, 64) == (head, 1000)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    after = model.state_dict()
    changed = {key for key, value in before.items()
               if after[key].shape != value.shape or not torch.equal(after[key], value)}  # fmt: skip
    assert changed == {f"{head}.weight", f"{head}.bias"}  # nothing but the head is touched


@pytest.mark.slow
def test_a_run_keeps_the_pretrained_head_for_1000_classes_only() -> None:
    config = TrainConfig.from_options(architecture="efficientnet_lite0", image_size=32, weight_quant=False, seed=3)
    pretrained = load_model("efficientnet_lite0").state_dict()
    imagenet = build_compressed_model(config, num_classes=1000).state_dict()
    assert torch.equal(imagenet["_fc.weight"], pretrained["_fc.weight"])
    ten = build_compressed_model(config, num_classes=10).state_dict()
    again = build_compressed_model(config, num_classes=10).state_dict()
    assert ten["_fc.weight"].shape == (10, 1280) and torch.equal(ten["_fc.weight"], again["_fc.weight"])  # seeded
    assert torch.equal(ten["_conv_head.weight"], pretrained["_conv_head.weight"])  # the backbone stays pretrained
