"""PSGD's position-based gradient scaling, checked against a NumPy reference written from the paper's formulas.

The reference finds the nearest target by brute force over the listed grid levels (not by
rounding), keeps its own moving averages of ``min(0, min w)`` and ``max(0, max w)`` and scales in
float64. Weights built on grid points (power-of-two steps: exact in floating point) must get
exactly zero gradients.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.cifar import resnet32_cifar
from quantization.position_scaling import (
    SymmetricRangeTracker,
    grid_step_size,
    nearest_grid_point,
    position_scaled_gradient,
    scaled_tensor_bits,
    weight_decay_groups,
)
from training.callbacks import PositionScaledGradientCallback
from training.data import Batch
from training.distributed import DistributedContext
from training.engine import StepOptions, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

LAMBDA = 150.0
MOMENTUM = 0.1


def tiny_model() -> nn.Sequential:
    """conv (no bias) - BN - ReLU - 1x1 conv (bias) - pool - linear (bias); weight layers '0', '3', '7'."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ReLU(), nn.Linear(6, 5)]  # fmt: skip
    return nn.Sequential(*layers).double()


def set_random_gradients(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    grads = {}
    for name, parameter in model.named_parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        grads[name] = parameter.grad.clone()
    return grads


class ReferencePSGD:
    """NumPy PSGD: moving averages of the zero-including extremes, brute-force nearest level, float64."""

    def __init__(self, bits: dict[str, int | None]) -> None:
        self.bits = bits
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def target(self, name: str, w: np.ndarray) -> np.ndarray:
        bits = self.bits[name]
        if bits is None:
            return np.zeros_like(w)
        low, high = min(0.0, w.min()), max(0.0, w.max())
        if name in self.low:
            low = MOMENTUM * low + (1 - MOMENTUM) * self.low[name]
            high = MOMENTUM * high + (1 - MOMENTUM) * self.high[name]
        self.low[name], self.high[name] = low, high
        level_max = 2 ** (bits - 1) - 1
        levels = max(abs(low), high) / level_max * np.arange(-level_max, level_max + 1)
        nearest = np.abs(w.reshape(-1, 1) - levels.reshape(1, -1)).argmin(axis=1)
        return levels[nearest].reshape(w.shape)

    def gradient(self, name: str, w: np.ndarray, g: np.ndarray, weight_decay: float = 0.0) -> np.ndarray:
        return LAMBDA * np.abs(w - self.target(name, w)) * (g + weight_decay * w)


# ------------------------------------------------------------------ which tensors


@pytest.mark.parametrize(
    ("n_bits", "expected"),
    [
        (2, {"0.weight": 8, "3.weight": 2, "7.weight": 8}),
        (3, {"0.weight": 8, "3.weight": 3, "7.weight": 8}),
        (4, {"0.weight": 4, "3.weight": 4, "7.weight": 4}),
        (8, {"0.weight": 8, "3.weight": 8, "7.weight": 8}),
        (None, {"0.weight": None, "3.weight": None, "7.weight": None}),
    ],
)
def test_selection_scales_conv_and_linear_weights_first_last_at_8_bits_below_4(n_bits, expected) -> None:
    assert scaled_tensor_bits(tiny_model(), n_bits) == expected


def test_selection_options_first_last_and_linear_biases() -> None:
    model = tiny_model()
    assert scaled_tensor_bits(model, 2, first_last=False) == {"3.weight": 2}
    # the official code also scales the linear layers' biases, at their layer's bit-width (conv biases never)
    assert scaled_tensor_bits(model, 2, linear_biases=True) == {"0.weight": 8, "3.weight": 2, "7.weight": 8,
                                                                "7.bias": 8}  # fmt: skip
    with pytest.raises(ValueError, match="at least 2 bits"):
        scaled_tensor_bits(model, 1)


def test_selection_on_resnet32_covers_every_conv_including_shortcuts() -> None:
    model = resnet32_cifar()
    bits = scaled_tensor_bits(model, 2)
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 5 * 2 + 2  # stem, 30 block convs, two 1x1 projection shortcuts
    assert list(bits) == [f"{name}.weight" for name in convs] + ["fc.weight"]
    assert bits["conv1.weight"] == bits["fc.weight"] == 8
    assert bits["layer2.0.downsample.0.weight"] == 2
    assert set(bits.values()) == {2, 8}


# ------------------------------------------------------------------ the scaled gradients


@pytest.mark.parametrize("n_bits", [2, 4, 8, None])
def test_callback_gradients_equal_the_reference_over_steps(n_bits: int | None) -> None:
    model = tiny_model()
    bits = scaled_tensor_bits(model, n_bits)
    callback = PositionScaledGradientCallback(model, bits, lambda_s=LAMBDA)
    reference = ReferencePSGD(bits)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):  # the weights move between steps: the moving averages matter
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        grads = set_random_gradients(model, generator)
        callback.after_backward(step)
        for name, parameter in model.named_parameters():
            if name in bits:
                expected = reference.gradient(name, parameter.detach().numpy(), grads[name].numpy())
                np.testing.assert_allclose(parameter.grad.numpy(), expected, rtol=1e-10, atol=1e-12, err_msg=name)
            else:  # biases and batch norm untouched
                assert torch.equal(parameter.grad, grads[name]), name


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_gradient_is_exactly_zero_on_grid_points(n_bits: int) -> None:
    generator = torch.Generator().manual_seed(2)
    model = tiny_model()
    bits = scaled_tensor_bits(model, n_bits)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in bits:
                level_max = 2 ** (bits[name] - 1) - 1
                levels = torch.randint(-level_max, level_max + 1, parameter.shape, generator=generator)
                levels.view(-1)[:2] = torch.tensor([-level_max, level_max])  # the range is exactly level_max steps
                parameter.copy_(levels.double() * 2.0**-5)
    grads = set_random_gradients(model, generator)
    PositionScaledGradientCallback(model, bits).after_backward(0)
    for name, parameter in model.named_parameters():
        if name in bits:
            assert torch.equal(parameter.grad, torch.zeros_like(parameter)), name
        else:
            assert torch.equal(parameter.grad, grads[name]), name


def test_zero_target_gradient_is_exactly_zero_on_zero_weights_only() -> None:
    generator = torch.Generator().manual_seed(3)
    model = tiny_model()
    with torch.no_grad():
        model[3].weight.view(-1)[::3] = 0.0
    grads = set_random_gradients(model, generator)
    PositionScaledGradientCallback(model, scaled_tensor_bits(model, None)).after_backward(0)
    zero = model[3].weight == 0
    assert zero.sum() > 0
    assert torch.equal(model[3].weight.grad[zero], torch.zeros(int(zero.sum()), dtype=torch.float64))
    expected = LAMBDA * model[3].weight.detach().abs() * grads["3.weight"]
    assert torch.equal(model[3].weight.grad, expected)


def test_pure_functions_against_closed_forms() -> None:
    low, high = torch.tensor(-0.6), torch.tensor(0.3)
    assert grid_step_size(low, high, 3).item() == pytest.approx(0.6 / 3)
    assert grid_step_size(torch.tensor(0.0), torch.tensor(0.0), 4).item() > 0  # all-zero weights: no division by zero
    w = torch.tensor([-0.95, -0.61, -0.29, 0.0, 0.11, 0.55, 0.79])
    # levels -0.6 .. 0.6 in steps of 0.2; beyond the range the outermost level
    expected = torch.tensor([-0.6, -0.6, -0.2, 0.0, 0.2, 0.6, 0.6])
    torch.testing.assert_close(nearest_grid_point(w, torch.tensor(0.2), 3), expected)
    g = torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    scaled = position_scaled_gradient(g, w, expected, lambda_s=2.0, weight_decay=0.5)
    torch.testing.assert_close(scaled, 2.0 * (w - expected).abs() * (g + 0.5 * w))


# ------------------------------------------------------------------ weight decay


def test_scaled_weight_decay_matches_the_reference_and_keeps_grid_weights_fixed() -> None:
    model = tiny_model()
    bits = scaled_tensor_bits(model, 4)
    weight_decay, lr = 0.01, 0.1
    generator = torch.Generator().manual_seed(4)
    grads = set_random_gradients(model, generator)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(weight_decay_groups(model, bits, weight_decay), lr=lr)
    PositionScaledGradientCallback(model, bits, lambda_s=LAMBDA, weight_decay=weight_decay).after_backward(0)
    optimizer.step()
    reference = ReferencePSGD(bits)
    for name, parameter in model.named_parameters():
        w, g = before[name].numpy(), grads[name].numpy()
        if name in bits:  # decayed here, scaled, and not again by the optimizer
            expected = w - lr * reference.gradient(name, w, g, weight_decay)
        else:  # the optimizer's own (unscaled) decay
            expected = w - lr * (g + weight_decay * w)
        np.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=1e-12, atol=1e-14, err_msg=name)

    # on the grid the decayed gradient is zero too: the weights stay put (an unscaled decay would move them)
    on_grid = {name: before[name] for name in bits}
    with torch.no_grad():
        for name in bits:
            tracker = SymmetricRangeTracker()
            tracker.update(before[name])
            on_grid[name] = nearest_grid_point(before[name], tracker.step_size(bits[name]), bits[name])
            dict(model.named_parameters())[name].copy_(on_grid[name])
    set_random_gradients(model, generator)
    PositionScaledGradientCallback(model, bits, weight_decay=weight_decay).after_backward(0)
    optimizer.step()
    for name in bits:
        assert torch.equal(dict(model.named_parameters())[name].detach(), on_grid[name]), name


def test_weight_decay_groups_split_the_parameters() -> None:
    model = tiny_model()
    groups = weight_decay_groups(model, ["0.weight", "7.weight"], 5e-4)
    assert [group["weight_decay"] for group in groups] == [0.0, 5e-4]
    assert [p is model[0].weight or p is model[7].weight for p in groups[0]["params"]] == [True, True]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    with pytest.raises(KeyError, match="nonexistent"):
        weight_decay_groups(model, ["nonexistent"], 5e-4)


# ------------------------------------------------------------------ range tracker state


def test_range_tracker_state_round_trips_through_a_safe_checkpoint() -> None:
    model = tiny_model()
    bits = scaled_tensor_bits(model, 4)
    generator = torch.Generator().manual_seed(5)
    first = PositionScaledGradientCallback(model, bits)
    for step in range(2):
        set_random_gradients(model, generator)
        first.after_backward(step)
        with torch.no_grad():
            model[3].weight.mul_(1.5)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = PositionScaledGradientCallback(model, bits)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    grads = set_random_gradients(model, generator)
    first.after_backward(2)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.grad = grads[name].clone()
    resumed.after_backward(2)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.grad, expected[name]), name
    fresh = PositionScaledGradientCallback(model, bits)  # without the state: the range restarts, grads differ
    for name, parameter in model.named_parameters():
        parameter.grad = grads[name].clone()
    fresh.after_backward(0)
    assert not torch.equal(model[3].weight.grad, expected["3.weight"])
    with pytest.raises(KeyError):
        resumed.load_state_dict({})


# ------------------------------------------------------------------ in the training loop


def test_in_the_loop_with_a_grad_scaler_overflowed_steps_are_still_skipped() -> None:
    """Under a loss scale the callback sees unscaled gradients; an overflowing scale skips the step as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    batch = Batch(torch.rand(16, 1, 8, 8), torch.arange(16) % 10, 0)
    bits = scaled_tensor_bits(model, 4)

    def one_step(scale: float) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        callback = PositionScaledGradientCallback(net, bits)
        train_one_epoch(net, [batch], [optimizer], [], scaler, 0, DistributedContext(), StepOptions(torch.device("cpu")),
                        callbacks=[callback])  # fmt: skip
        assert callback.state_dict()["0.weight"]  # the range was tracked on this step
        return {name: p.detach().clone() for name, p in net.named_parameters()}

    # the reference update: autograd gradients, scaled by the NumPy reference, plain SGD
    grads = torch.autograd.grad(F.cross_entropy(model(batch.images), batch.targets), list(model.parameters()))
    reference = ReferencePSGD(bits)
    expected = {}
    for (name, p), g in zip(model.named_parameters(), grads):
        w, g = p.detach().double().numpy(), g.double().numpy()
        expected[name] = w - 0.1 * (reference.gradient(name, w, g) if name in bits else g)
    for name, value in one_step(2.0**10).items():
        np.testing.assert_allclose(value.double().numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    overflowed = one_step(float("inf"))  # every scaled gradient overflows: found_inf, the step is skipped
    for name, p in model.named_parameters():
        assert torch.equal(overflowed[name], p.detach()), name


# ------------------------------------------------------------------ distributed data parallel


def _ddp_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).double()


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    return torch.rand(16, 1, 8, 8, generator=generator, dtype=torch.float64), torch.arange(16) % 10


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One gloo process: DDP forward/backward on its half of the batch, then the callback; saves the gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _ddp_model()
        wrapped = DistributedDataParallel(model)
        callback = PositionScaledGradientCallback(wrapped, scaled_tensor_bits(model, 2))
        images, targets = _ddp_batch()
        share = slice(rank * 8, rank * 8 + 8)
        F.cross_entropy(wrapped(images[share]), targets[share]).backward()
        callback.after_backward(0)
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save({"grads": grads, "ranges": callback.state_dict()}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_the_callback_scales_the_averaged_gradients(tmp_path) -> None:
    """Two gloo processes with half the batch each give the single-process PSGD gradients of the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = _ddp_model()
    bits = scaled_tensor_bits(model, 2)
    images, targets = _ddp_batch()
    grads = torch.autograd.grad(F.cross_entropy(model(images), targets), list(model.parameters()))
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert saved["ranges"].keys() == bits.keys()
        for (name, p), g in zip(model.named_parameters(), grads):
            w, g = p.detach().numpy(), g.numpy()
            expected = ReferencePSGD(bits).gradient(name, w, g) if name in bits else g  # first step: fresh ranges
            np.testing.assert_allclose(saved["grads"][name].numpy(), expected, rtol=1e-10, atol=1e-13, err_msg=name)
