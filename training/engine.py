"""Plain training and evaluation loops: top-1/top-5, AMP, channels-last; plug-ins for the loss, step and callbacks.

The training loop takes a loss function, a step function (the forward/backward passes of one
batch; the default does one) and :class:`TrainCallback` hooks (before a batch, after backward,
after the optimizer step, at epoch end): gradual pruning, gradient scaling or clipping and
multi-pass steps plug in there without editing the loop.

Metrics are accumulated as float64 sums (loss sum, correct counts, sample count) and summed
over the processes of a distributed run, so they equal those of a single-process run.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.distributed import DistributedContext, all_reduce_sum

logger = logging.getLogger(__name__)

TOP_K = (1, 5)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"the loss is {loss} at training step {step}")
        self.step = step


@dataclass(frozen=True)
class Metrics:
    loss: float
    top1: float  # percent
    top5: float  # percent
    count: int
    skipped: int

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> Metrics:
        """From ``[loss sum, top-1 correct, top-5 correct, count, skipped]``."""
        loss, top1, top5, count, skipped = sums.tolist()
        n = max(count, 1.0)
        return cls(loss / n, 100.0 * top1 / n, 100.0 * top5 / n, int(count), int(skipped))


@dataclass(frozen=True)
class StepOptions:
    device: torch.device
    amp: bool = False
    channels_last: bool = False
    progress_bar: bool = False

    def autocast(self):
        if not self.amp:
            return nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def correct_counts(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = TOP_K) -> list[torch.Tensor]:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k``."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def _batch_sums(loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, skipped: int) -> torch.Tensor:
    top1, top5 = correct_counts(logits, targets)
    values = [loss_sum.detach().double(), top1.double(), top5.double()]
    return torch.stack(values + [torch.tensor(float(len(targets)), dtype=torch.float64, device=logits.device),
                                 torch.tensor(float(skipped), dtype=torch.float64, device=logits.device)])  # fmt: skip


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """``model.train()``; with ``freeze_bn`` the batch norms stay in eval mode (running statistics, no updates)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The default training loss: mean cross-entropy against ``(1 - eps) onehot(y) + eps / K`` (label smoothing eps)."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class TrainCallback:
    """Hooks of :func:`train_one_epoch`, called in the order of its ``callbacks``; each is a no-op here.

    ``step`` is the global index of the training step at hand (the step reached, at epoch end).
    A callback that overrides :meth:`after_backward` gets unscaled gradients under AMP: the loop
    calls ``GradScaler.unscale_`` on every optimizer first (which ``GradScaler.step`` would do
    anyway, so the update is the same); on steps whose gradients overflowed they hold inf/NaN and
    the optimizer step is skipped by the scaler.
    """

    def on_batch_start(self, step: int) -> None:
        """Before each batch, also an empty one (all its images unreadable), which repeats ``step``."""

    def after_backward(self, step: int) -> None:
        """After the backward pass(es), before the optimizer steps: read, scale or clip the gradients here."""

    def after_optimizer_step(self, step: int) -> None:
        """After every optimizer has stepped (and the scaler updated), before the schedulers step."""

    def on_epoch_end(self, step: int) -> None:
        """After the epoch's last step, before its metrics are reduced over the processes."""


def _overrides(callback: TrainCallback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(TrainCallback, hook)


@dataclass(frozen=True)
class StepInputs:
    """One batch with what a step function needs to run forward/backward passes on it."""

    model: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    loss_fn: LossFunction
    scaler: torch.amp.GradScaler
    options: StepOptions
    step: int

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, loss)`` of one forward pass (under autocast with AMP; the loss of half-precision logits in float32)."""
        with self.options.autocast():
            logits = self.model(self.images)
        full = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return logits, self.loss_fn(full, self.targets)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (scaled by the AMP scaler) into the parameters' ``.grad``."""
        self.scaler.scale(loss).backward()


@dataclass(frozen=True)
class StepOutput:
    """What a step reports to the epoch's metrics: its loss (checked to be finite) and the logits of the batch."""

    loss: torch.Tensor
    logits: torch.Tensor


StepFunction = Callable[[StepInputs], StepOutput]


def single_pass_step(inputs: StepInputs) -> StepOutput:
    """The default step: one forward pass, the loss, one (scaled) backward pass."""
    logits, loss = inputs.forward()
    inputs.backward(loss)
    return StepOutput(loss, logits)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    scaler: torch.amp.GradScaler,
    step: int,
    context: DistributedContext,
    options: StepOptions,
    callbacks: Sequence[TrainCallback] = (),
    loss_fn: LossFunction = cross_entropy_loss,
    step_fn: StepFunction = single_pass_step,
    freeze_bn: bool = False,
    description: str = "train",
) -> tuple[Metrics, int]:
    """One pass over ``loader``; returns the epoch's metrics and the global step reached.

    Per step ``t``: ``on_batch_start``; gradients zeroed; ``step_fn`` (forward/backward passes
    accumulating gradients); the loss checked to be finite; gradients unscaled if a callback
    reads them, ``after_backward``; every optimizer steps, the scaler updates;
    ``after_optimizer_step``; schedulers step. ``on_epoch_end`` after the last step.
    """
    set_train_mode(model, freeze_bn)
    unscale = any(_overrides(callback, "after_backward") for callback in callbacks)
    sums = torch.zeros(5, dtype=torch.float64, device=options.device)
    for batch in tqdm(loader, desc=description, disable=not options.progress_bar, leave=False):
        for callback in callbacks:
            callback.on_batch_start(step)
        if batch.targets.numel() == 0:
            sums[4] += batch.skipped
            continue
        images, targets = options.to_device(batch.images), batch.targets.to(options.device, non_blocking=True)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        output = step_fn(StepInputs(model, images, targets, loss_fn, scaler, options, step))
        _check_finite(output.loss, step, context)
        if unscale:
            for optimizer in optimizers:
                scaler.unscale_(optimizer)
        for callback in callbacks:
            callback.after_backward(step)
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        for callback in callbacks:
            callback.after_optimizer_step(step)
        for scheduler in schedulers:
            scheduler.step()
        step += 1
        sums += _batch_sums(output.loss * len(targets), output.logits.detach().float(), targets, batch.skipped)
    for callback in callbacks:
        callback.on_epoch_end(step)
    return Metrics.from_sums(all_reduce_sum(sums, context).cpu()), step


def _check_finite(loss: torch.Tensor, step: int, context: DistributedContext) -> None:
    """Raise :class:`NonFiniteLossError` on every process when the loss of any process is not finite."""
    bad = (~torch.isfinite(loss.detach())).double().reshape(1)
    if all_reduce_sum(bad, context).item() > 0:
        raise NonFiniteLossError(step, loss.item())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, context: DistributedContext, options: StepOptions) -> Metrics:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) of ``model`` on all of ``loader``'s samples."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=options.device)
    for batch in tqdm(loader, desc="evaluate", disable=not options.progress_bar, leave=False):
        if batch.targets.numel() == 0:
            sums[4] += batch.skipped
            continue
        targets = batch.targets.to(options.device, non_blocking=True)
        with options.autocast():
            logits = model(options.to_device(batch.images)).float()
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        sums += _batch_sums(loss_sum, logits, targets, batch.skipped)
    return Metrics.from_sums(all_reduce_sum(sums, context).cpu())


def image_batches(loader: DataLoader, num_batches: int, options: StepOptions) -> Iterator[torch.Tensor]:
    """The images of the first ``num_batches`` non-empty batches of ``loader``, on the device."""
    if num_batches < 1:
        return
    produced = 0
    for batch in loader:
        if batch.targets.numel():
            yield options.to_device(batch.images)
            produced += 1
            if produced == num_batches:
                return
