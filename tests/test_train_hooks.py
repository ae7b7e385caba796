"""The training loop's plug-ins: a loss function, step callbacks and a replaceable step, written here as methods would.

A PSGD-shaped callback (gradients scaled by their distance to a grid), a LIMPQ-shaped step
(one pass per bit-width, gradients accumulated, clipped by value, one optimizer step) and a
label-smoothing loss, each checked against the same update computed independently with
``torch.autograd.grad`` on a copy of the model. Tiny model, float64, the digits.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.data import Batch
from training.distributed import DistributedContext
from training.engine import StepInputs, StepOptions, StepOutput, TrainCallback, cross_entropy_loss, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.5
CPU = torch.device("cpu")


class RoundActivations(nn.Module):
    """Straight-through rounding to ``bits`` fractional bits (None: identity): a switchable bit-width."""

    def __init__(self) -> None:
        super().__init__()
        self.bits: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        scale = 2.0**self.bits
        return x + (torch.round(x * scale) / scale - x).detach()


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3), nn.ReLU(), RoundActivations(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)]
    return nn.Sequential(*layers).double()


def run_epoch(model: nn.Module, batches: list[Batch], scaler: torch.amp.GradScaler | None = None, **plugins) -> int:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    _, step = train_one_epoch(model, batches, [optimizer], [], scaler, 0, DistributedContext(), StepOptions(CPU), **plugins)
    return step


def manual_epoch(model: nn.Module, batches: list[Batch], gradients) -> None:
    """Plain SGD on ``model``: ``w <- w - lr * gradients(model, batch)`` per batch (a list, in parameter order)."""
    for batch in batches:
        grads = gradients(model, batch)
        with torch.no_grad():
            for weight, grad in zip(model.parameters(), grads):
                weight -= LR * grad


def cross_entropy_grads(model: nn.Module, batch: Batch, **loss_options) -> list[torch.Tensor]:
    loss = F.cross_entropy(model(batch.images), batch.targets, **loss_options)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, rtol=0, atol=1e-12), name


# ------------------------------------------------------------------ PSGD's shape: a gradient-scaling callback


class PositionScaledGradient(TrainCallback):
    """``g <- lam * |w - round(w / s) * s| * g`` for every conv and linear weight (not the biases)."""

    def __init__(self, model: nn.Module, lam: float, step_size: float) -> None:
        self.weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.lam, self.step_size = lam, step_size

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for w in self.weights:
            w.grad.mul_(self.lam * (w - torch.round(w / self.step_size) * self.step_size).abs())


def test_a_gradient_scaling_callback_scales_the_update(digit_batches: list[Batch]) -> None:
    lam, s = 150.0, 0.05
    model, reference = tiny_model(), tiny_model()

    def scaled(net: nn.Module, batch: Batch) -> list[torch.Tensor]:
        grads = cross_entropy_grads(net, batch)
        return [g * lam * (w - (w / s).round() * s).abs() if w.dim() > 1 else g
                for w, g in zip(net.parameters(), grads)]  # fmt: skip

    assert run_epoch(model, digit_batches, callbacks=[PositionScaledGradient(model, lam, s)]) == 3
    manual_epoch(reference, digit_batches, scaled)
    assert_same_parameters(model, reference)
    plain = tiny_model()
    run_epoch(plain, digit_batches)
    assert not torch.allclose(plain[0].weight, model[0].weight)  # the callback changed the update


# ------------------------------------------------------------------ LIMPQ's shape: several passes, clipping, one step

BITS = (2, 3, 4)


def multi_bit_step(inputs: StepInputs) -> StepOutput:
    """One forward/backward pass per bit-width, gradients accumulated; reports the mean loss and the last logits."""
    losses = []
    for bits in BITS:
        inputs.model[2].bits = bits
        logits, loss = inputs.forward()
        inputs.backward(loss)
        losses.append(loss.detach())
    inputs.model[2].bits = None
    return StepOutput(torch.stack(losses).mean(), logits)


class ClipByValue(TrainCallback):
    def __init__(self, model: nn.Module, limit: float) -> None:
        self.parameters, self.limit = list(model.parameters()), limit

    def after_backward(self, step: int) -> None:
        nn.utils.clip_grad_value_(self.parameters, self.limit)


class RecordGradients(TrainCallback):
    def __init__(self, model: nn.Module) -> None:
        self.parameters, self.seen = list(model.parameters()), []

    def after_backward(self, step: int) -> None:
        self.seen.append([p.grad.clone() for p in self.parameters])


def summed_pass_grads(net: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """The per-bit-width gradients, each from its own forward/backward pass, summed."""
    total = [torch.zeros_like(p) for p in net.parameters()]
    for bits in BITS:
        net[2].bits = bits
        total = [t + g for t, g in zip(total, cross_entropy_grads(net, batch))]
    net[2].bits = None
    return total


@pytest.mark.parametrize("amp_scale", [None, 2.0**12])
def test_a_multi_pass_step_accumulates_then_steps_once(digit_batches: list[Batch], amp_scale: float | None) -> None:
    """With a loss scaler, the clipping callback sees the unscaled gradients (the loop unscales them first)."""
    limit = 0.05
    model, reference = tiny_model(), tiny_model()
    recorder = RecordGradients(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=amp_scale) if amp_scale else None
    callbacks = [recorder, ClipByValue(model, limit)]
    assert run_epoch(model, digit_batches, scaler, callbacks=callbacks, step_fn=multi_bit_step) == 3

    expected = copy.deepcopy(reference)
    for batch, seen in zip(digit_batches, recorder.seen):
        for got, want in zip(seen, summed_pass_grads(expected, batch)):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)  # accumulated = sum of separate passes
        manual_epoch(expected, [batch], lambda net, b: [g.clamp(-limit, limit) for g in summed_pass_grads(net, b)])
    assert_same_parameters(model, expected)
    assert any((g.abs() > limit).any() for g in recorder.seen[0])  # the clipping mattered


# ------------------------------------------------------------------ the loss function and the hooks' order


def test_a_loss_function_replaces_cross_entropy(digit_batches: list[Batch]) -> None:
    model, reference = tiny_model(), tiny_model()
    run_epoch(model, digit_batches, loss_fn=lambda logits, targets: F.cross_entropy(logits, targets, label_smoothing=0.1))
    manual_epoch(reference, digit_batches, lambda net, batch: cross_entropy_grads(net, batch, label_smoothing=0.1))
    assert_same_parameters(model, reference)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_the_default_loss_smooths_labels_as_written(eps: float) -> None:
    """``-mean_i [(1 - eps) log p_i(y_i) + eps / K sum_k log p_i(k)]``, with the log-softmax written out."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64) * 3
    targets = torch.tensor([0, 3, 1, 1, 2, 0])
    log_p = logits - logits.exp().sum(dim=1, keepdim=True).log()
    expected = -((1 - eps) * log_p[torch.arange(6), targets] + eps / 4 * log_p.sum(dim=1)).mean()
    assert float(cross_entropy_loss(logits, targets, label_smoothing=eps)) == pytest.approx(float(expected), rel=1e-12)


class Log(TrainCallback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_batch_start(self, step: int) -> None:
        self.calls.append(("batch", step))

    def after_backward(self, step: int) -> None:
        self.calls.append(("backward", step))

    def after_optimizer_step(self, step: int) -> None:
        self.calls.append(("step", step))

    def on_epoch_end(self, step: int) -> None:
        self.calls.append(("epoch end", step))


def test_hooks_are_called_in_order_and_an_empty_batch_repeats_its_step(digit_batches: list[Batch]) -> None:
    empty = Batch(torch.empty(0), torch.empty(0, dtype=torch.long), 2)
    log = Log()
    assert run_epoch(tiny_model(), [digit_batches[0], empty, digit_batches[1]], callbacks=[log]) == 2
    assert log.calls == [("batch", 0), ("backward", 0), ("step", 0), ("batch", 1), ("batch", 1), ("backward", 1),
                         ("step", 1), ("epoch end", 2)]  # fmt: skip
