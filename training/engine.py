"""Plain training and evaluation loops: cross-entropy, top-1/top-5, AMP, channels-last, pruning masks.

Metrics are accumulated as float64 sums (loss sum, correct counts, sample count) and summed
over the processes of a distributed run, so they equal those of a single-process run.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pruning.schedule import GradualMagnitudePruner
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


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    scaler: torch.amp.GradScaler,
    pruner: GradualMagnitudePruner | None,
    step: int,
    context: DistributedContext,
    options: StepOptions,
    freeze_bn: bool = False,
    description: str = "train",
) -> tuple[Metrics, int]:
    """One pass over ``loader``; returns the epoch's metrics and the global step reached.

    Per step ``t``: masks updated if ``t`` is a pruning update step; forward/backward; every
    optimizer steps; pruned weights re-zeroed; schedulers step.
    """
    set_train_mode(model, freeze_bn)
    sums = torch.zeros(5, dtype=torch.float64, device=options.device)
    for batch in tqdm(loader, desc=description, disable=not options.progress_bar, leave=False):
        if pruner is not None:
            pruner.update(step)
        if batch.targets.numel() == 0:
            sums[4] += batch.skipped
            continue
        images, targets = options.to_device(batch.images), batch.targets.to(options.device, non_blocking=True)
        with options.autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)
        _check_finite(loss, step, context)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        if pruner is not None:
            pruner.apply_masks()
        for scheduler in schedulers:
            scheduler.step()
        step += 1
        sums += _batch_sums(loss * len(targets), logits.detach().float(), targets, batch.skipped)
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
