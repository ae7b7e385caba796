"""LIMPQ's switchable batch norm, model preparation and joint indicator-training step.

The step runs through ``training.engine.train_one_epoch`` and is checked against the same passes
computed independently with ``torch.autograd.grad`` on a copy of the model (tiny CNN, float64,
scikit-learn's digits); the batch-norm conversion on torchvision models built without weights.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.quantized import CompressionSpec, QuantSetup, compress_model
from models.switchable_bn import SwitchableBatchNorm2d, switch_batch_norms
from quantization.fake_quant import QuantizerConfig
from quantization.multi_bit_lsq import (
    LIMPQ_BITS,
    MultiBitLSQ,
    multi_bit_lsq_factory,
    searchable_layers,
    set_layer_bits,
    set_uniform_bits,
)
from quantization.quantizers import QuantScheme
from training.data import Batch
from training.distributed import DistributedContext
from training.engine import StepInputs, StepOptions, TrainCallback, cross_entropy_loss, train_one_epoch
from training.limpq import (
    ClipGradientValues,
    JointIndicatorStep,
    NoSearchableLayersError,
    prepare_indicator_model,
    signed_input_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
LR = 0.1


# --------------------------------------------------------------------------- helpers
def tiny_cnn() -> nn.Sequential:
    """Three conv-BN-ReLU blocks and a classifier on 1x8x8 digits; the two inner convs are searchable."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    ).double()  # fmt: skip


def prepared_tiny_cnn(example: torch.Tensor) -> nn.Sequential:
    model = tiny_cnn()
    prepare_indicator_model(model, example)
    return model.double()  # the new step sizes too


def randomize_batch_norms(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def multi_bit_resnet18() -> nn.Module:
    """ResNet-18 (no weights, random batch-norm statistics) with multi-bit quantizers, first conv and classifier in float."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    randomize_batch_norms(model, 1)
    weight_quant = QuantizerConfig(n_bits=6, grad_scaling=True)
    act_quant = QuantizerConfig(n_bits=6, scheme=QuantScheme.UNSIGNED, grad_scaling=True)
    spec = CompressionSpec(weight_quant, act_quant, QuantSetup.FP_FIRST_LAST, quantizer_factory=multi_bit_lsq_factory())
    compress_model(model, spec)
    return model


def next_module_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The module registered right after each named one and its submodules (in these architectures, a conv's batch norm)."""
    order = [name for name, _ in model.named_modules()]
    return {name: next(other for other in order[order.index(name) + 1:] if not other.startswith(f"{name}."))
            for name in names}  # fmt: skip


def scaled_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Large enough for gradient elements beyond the clip limit."""
    return 50.0 * cross_entropy_loss(logits, targets, label_smoothing=0.1)


def reference_passes(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                     policy: dict[str, int]) -> tuple[list[torch.Tensor], list[float], torch.Tensor]:  # fmt: skip
    """Summed gradients of the |B| uniform passes and the mixed one, each by ``torch.autograd.grad``; losses; last uniform logits."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    losses = []

    def one_pass() -> torch.Tensor:
        logits = model(images)
        loss = scaled_loss(logits, targets)
        for acc, grad in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if grad is not None:
                acc += grad
        losses.append(loss.item())
        return logits.detach()

    model.train()
    for bits in LIMPQ_BITS:
        set_uniform_bits(model, bits)
        logits = one_pass()
    set_layer_bits(model, policy, policy)
    one_pass()
    return total, losses, logits


class GradientRecorder(TrainCallback):
    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.grads: list[torch.Tensor | None] = []

    def after_backward(self, step: int) -> None:
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]


# --------------------------------------------------------------------------- switchable batch norm
@pytest.mark.slow
def test_switchable_batch_norm_on_resnet18() -> None:
    model = multi_bit_resnet18().eval()
    layers = list(searchable_layers(model))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mixed = {name: LIMPQ_BITS[i % 5] for i, name in enumerate(layers)}
    policies = [dict.fromkeys(layers, 6), dict.fromkeys(layers, 2), mixed]
    before = []
    with torch.no_grad():
        for policy in policies:
            set_layer_bits(model, policy, policy)
            before.append(model(images))
    switched = switch_batch_norms(model, layers, images)
    # every batch norm after a searchable conv, i.e. all but the first conv's
    assert switched == {bn: conv for conv, bn in next_module_names(model, layers).items()}
    assert len(switched) == 19 and isinstance(model.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        for policy, expected in zip(policies, before):
            set_layer_bits(model, policy, policy)
            assert torch.equal(model(images), expected)
    # the active copy follows the layer's weight quantizer
    set_layer_bits(model, {"layer2.0.conv2": 3}, {})
    assert model.layer2[0].bn2.active is model.layer2[0].bn2.copies["3"]
    # training at 4 bits moves the running statistics of the 4-bit copies only
    set_uniform_bits(model, 4)
    norms = [model.get_submodule(name) for name in switched]
    saved = [{bits: copy.deepcopy(bn.state_dict()) for bits, bn in norm.copies.items()} for norm in norms]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
    optimizer.step()
    for norm, state in zip(norms, saved):
        for bits, bn in norm.copies.items():
            unchanged = [torch.equal(value, state[bits][key]) for key, value in bn.state_dict().items()]
            assert not any(unchanged) if bits == "4" else all(unchanged), bits


def test_the_pair_search_leaves_the_quantizers_uninitialised_and_copies_follow_their_layer() -> None:
    model = tiny_cnn()
    compress_model(model, CompressionSpec(QuantizerConfig(n_bits=4), QuantizerConfig(n_bits=4, scheme="unsigned"),
                                          QuantSetup.ALL, quantizer_factory=multi_bit_lsq_factory((4, 2))))  # fmt: skip
    assert switch_batch_norms(model, ["0", "6"], torch.rand(2, 1, 8, 8, dtype=torch.float64)) == {"1": "0", "7": "6"}
    assert isinstance(model[4], nn.BatchNorm2d)  # the layer "3" was not asked for
    assert not any(q.initialized.any() for q in model.modules() if isinstance(q, MultiBitLSQ) and q.tensor == "activation")
    # the quantizer is referenced, not owned: no second copy of its state in the batch norm
    assert all(key.startswith("copies.") for key in model[1].state_dict())
    # a deep copy of the model links its batch norms to its own quantizers
    twin = copy.deepcopy(model)
    assert twin[1].bit_source is twin[0].weight_quantizer
    twin[0].weight_quantizer.set_bits(2)
    assert twin[1].active is twin[1].copies["2"] and model[1].active is model[1].copies["4"]
    with pytest.raises(TypeError, match="no multi-bit weight quantizer"):
        switch_batch_norms(tiny_cnn(), ["0"], torch.rand(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="already"):
        switch_batch_norms(model, ["3"], torch.rand(2, 1, 8, 8, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["resnet50", "mobilenet_v2"])
def test_batch_norms_are_found_in_torchvision_models(architecture: str) -> None:
    model = torchvision.models.get_model(architecture, weights=None, num_classes=10)
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    expected = {bn: conv for conv, bn in next_module_names(model, convs[1:]).items()}
    names = prepare_indicator_model(model, torch.rand(2, 3, 32, 32))
    assert names == convs[1:]
    assert {name for name, m in model.named_modules() if isinstance(m, SwitchableBatchNorm2d)} == set(expected)
    for bn, conv in expected.items():
        assert model.get_submodule(bn).bit_source is model.get_submodule(conv).weight_quantizer
    # signed input quantizers exactly where no ReLU precedes: ResNet-50 none; MobileNet-V2 the first conv of every
    # block whose input is the previous block's linear bottleneck (blocks 2..17, and the last 1x1 conv, features.18)
    signed = {name for name in names if model.get_submodule(name).input_quantizer.scheme is QuantScheme.SYMMETRIC}
    unsigned = {name for name in names if model.get_submodule(name).input_quantizer.scheme is QuantScheme.UNSIGNED}
    expected_signed = set() if architecture == "resnet50" else \
        {f"features.{block}.conv.0.0" for block in range(2, 18)} | {"features.18.0"}  # fmt: skip
    assert signed == expected_signed and unsigned == set(names) - expected_signed


# --------------------------------------------------------------------------- model preparation
@pytest.mark.slow
def test_prepare_indicator_model_on_resnet18() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    names = prepare_indicator_model(model, torch.rand(2, 3, 32, 32))
    assert names == convs[1:] and len(names) == 19
    assert model.conv1.weight_quantizer is None and model.conv1.input_quantizer is None
    assert model.fc.weight_quantizer is None and model.fc.input_quantizer is None
    assert type(model.bn1) is nn.BatchNorm2d
    for name in names:
        layer = model.get_submodule(name)
        assert (layer.weight_quantizer.scheme, layer.input_quantizer.scheme) == (QuantScheme.SYMMETRIC, QuantScheme.UNSIGNED)
        assert layer.weight_quantizer.n_bits == layer.input_quantizer.n_bits == 6
        assert layer.weight_quantizer.grad_scaling and layer.input_quantizer.grad_scaling
    bn_names = {name for name, m in model.named_modules() if isinstance(m, SwitchableBatchNorm2d)}
    assert bn_names == set(next_module_names(model, names).values())


def test_only_convolutions_are_searched_the_other_layers_stay_float() -> None:
    """The search space of search-bit-policy: every conv but the first; a linear layer inside the model stays float."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    example = torch.rand(2, 1, 8, 8)
    assert signed_input_layers(model, ["3", "6", "8"], example) == ["6"]  # the linear layer reads a batch norm's output
    assert prepare_indicator_model(model, example) == ["3"]
    assert isinstance(model[3].weight_quantizer, MultiBitLSQ) and isinstance(model[4], SwitchableBatchNorm2d)
    for index in (0, 6, 8):
        assert model[index].weight_quantizer is None and model[index].input_quantizer is None
    with pytest.raises(NoSearchableLayersError, match="no searchable layers"):
        prepare_indicator_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(10)), example)


def test_a_given_input_scheme_applies_to_every_layer_a_mapping_to_each(digit_batches: list[Batch]) -> None:
    example = digit_batches[0].images
    for act_scheme, expected in (("symmetric", ["symmetric"] * 2), ({"3": "unsigned", "6": "symmetric"},
                                                                    ["unsigned", "symmetric"])):  # fmt: skip
        model = tiny_cnn()
        prepare_indicator_model(model, example, act_scheme=act_scheme)
        assert [model[index].input_quantizer.scheme.value for index in (3, 6)] == expected


# --------------------------------------------------------------------------- the joint training step
@pytest.mark.parametrize("grad_scaling", [False, True], ids=["fp", "scaler"])
def test_engine_step_accumulates_all_passes_then_clips(digit_batches: list[Batch], grad_scaling: bool) -> None:
    batch = digit_batches[0]
    model = prepared_tiny_cnn(batch.images)
    reference = copy.deepcopy(model)
    step_fn = JointIndicatorStep(model, seed=3)
    before, after = GradientRecorder(model), GradientRecorder(model)
    clip = ClipGradientValues(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=grad_scaling)
    metrics, step = train_one_epoch(model, [batch], [optimizer], [], scaler, 0, DistributedContext(), StepOptions(CPU),
                                    callbacks=[before, clip, after], loss_fn=scaled_loss, step_fn=step_fn)  # fmt: skip
    assert step == 1
    expected, losses, _ = reference_passes(reference, batch.images, batch.targets, step_fn.last_policy)
    assert metrics.loss == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert all(g is not None for g in before.grads)
    for got, want in zip(before.grads, expected):  # the sum of the per-pass gradients, unscaled
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert max(g.abs().max().item() for g in expected) > 5.0  # the clip limit matters
    for clipped, want in zip(after.grads, expected):
        torch.testing.assert_close(clipped, want.clamp(-1.0, 1.0), rtol=1e-10, atol=1e-12)
    # SGD with the clipped gradient (from the reference's parameters: the first passes initialised the input step sizes)
    for initial, param, want in zip(reference.parameters(), model.parameters(), expected):
        torch.testing.assert_close(param.detach(), initial.detach() - LR * want.clamp(-1.0, 1.0), rtol=1e-10, atol=1e-12)
    # every step size of every candidate bit-width got a gradient, weights and inputs
    grads = dict(zip([name for name, _ in model.named_parameters()], before.grads))
    for name in searchable_layers(model):
        for quantizer in ("weight_quantizer", "input_quantizer"):
            assert (grads[f"{name}.{quantizer}.step_sizes"] != 0).all(), (name, quantizer)


def test_step_reports_the_mean_loss_and_the_last_uniform_logits(digit_batches: list[Batch]) -> None:
    batch = digit_batches[1]
    model = prepared_tiny_cnn(batch.images)
    reference = copy.deepcopy(model)
    step_fn = JointIndicatorStep(model, seed=11)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    output = step_fn(StepInputs(model, batch.images, batch.targets, scaled_loss, scaler, StepOptions(CPU), 0))
    _, losses, last_uniform_logits = reference_passes(reference, batch.images, batch.targets, step_fn.last_policy)
    assert output.loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    torch.testing.assert_close(output.logits, last_uniform_logits, rtol=1e-12, atol=1e-12)
    # the model is left at the drawn policy: the same bit-width for a layer's weight, input and batch norm
    for name, bits in step_fn.last_policy.items():
        layer = model.get_submodule(name)
        assert layer.weight_quantizer.n_bits == layer.input_quantizer.n_bits == bits
    assert model[4].active is model[4].copies[str(step_fn.last_policy["3"])]


def test_random_policies_are_uniform_seeded_and_resumable(digit_batches: list[Batch]) -> None:
    model = prepared_tiny_cnn(digit_batches[0].images)
    first, second = JointIndicatorStep(model, seed=5), JointIndicatorStep(model, seed=5)
    draws = [first.draw_policy() for _ in range(1000)]
    assert draws == [second.draw_policy() for _ in range(1000)]
    assert draws != [JointIndicatorStep(model, seed=6).draw_policy() for _ in range(1000)]
    assert all(list(policy) == ["3", "6"] for policy in draws)
    counts = {bits: sum(policy[name] == bits for policy in draws for name in policy) for bits in LIMPQ_BITS}
    assert all(abs(count - 400) < 80 for count in counts.values()), counts  # 2000 draws, 400 expected per bit-width
    # resumed from a checkpointed state (saved and read back as a checkpoint is), the same sequence continues
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    upcoming = [first.draw_policy() for _ in range(5)]
    resumed = JointIndicatorStep(model, seed=0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [resumed.draw_policy() for _ in range(5)] == upcoming


def test_clip_callback_clips_every_element() -> None:
    params = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.tensor([-3.0, -1.0, 0.5, 1.0, 7.0])
    params[1].grad = torch.tensor([[0.25, -0.75], [2.0, -2.0]])
    ClipGradientValues(params).after_backward(0)  # the third has no gradient: left alone
    torch.testing.assert_close(params[0].grad, torch.tensor([-1.0, -1.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(params[1].grad, torch.tensor([[0.25, -0.75], [1.0, -1.0]]))
    assert params[2].grad is None


def test_a_model_without_multi_bit_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no multi-bit"):
        JointIndicatorStep(tiny_cnn())
