#!/usr/bin/env python
"""Time the weight study against the paper's method, in the same process.

Reference (the paper's method): per tensor and bit-width, 100 candidate thresholds
``T_i = i/100 * max|w|``, each evaluated by a full quantize-dequantize of the tensor, then
magnitude pruning by ``topk`` for the plain and the corrected sparsity. Ours:
:func:`studies.weight_sqnr.study_model` (sorted values, prefix sums, binned grid errors).

Prints the seconds of each (wall and CPU time of the process, each the least of the repeats; the
CPU time is the fairer measure on a shared machine, with ``--threads 1`` that of one thread),
their ratio, seconds per million parameters, and the worst difference ``ours - reference`` in
quantization SQNR over all tensors and bit-widths. It must not be negative beyond float32 noise
(1e-4 dB): the reference sums in float32 as the paper did, ours in float64.

    python bench/bench_weight_sqnr.py --models efficientnet_lite0 --device cpu
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.layers import weight_layers
from models.registry import load_model
from studies.weight_sqnr import study_model
from utils.cli import DeviceType, IntListType, NameListType, default_device

T = TypeVar("T")


def reference_quant_sqnr(weight: torch.Tensor, n_bits: int, n_candidates: int = 100) -> float:
    """The paper's search: the best of ``n_candidates`` thresholds, each fully evaluated."""
    q_max, q_min = 2 ** (n_bits - 1) - 1, -(2 ** (n_bits - 1))
    max_abs = weight.abs().max()
    best_mse = math.inf
    for i in range(1, n_candidates + 1):
        step_size = max_abs * i / n_candidates / q_max
        x_hat = torch.clamp(torch.round(weight / step_size), q_min, q_max) * step_size
        best_mse = min(best_mse, float(((weight - x_hat) ** 2).mean()))
    return 10 * math.log10(float((weight**2).mean()) / best_mse)


def reference_pruning_sqnr(weight: torch.Tensor, keep_ratio: float) -> float:
    """Magnitude pruning with ``topk``, as the paper's code does."""
    flat = weight.reshape(-1)
    k = max(1, round(keep_ratio * flat.numel()))
    kept = torch.zeros_like(flat).scatter_(0, flat.abs().topk(k).indices, 1.0)
    return 10 * math.log10(float((flat**2).mean()) / float(((flat * (1 - kept)) ** 2).mean()))


def reference_study(
    model: torch.nn.Module, bits: list[int], device: torch.device, n_candidates: int
) -> dict[int, dict[str, float]]:
    """``{b: {layer: quant SQNR}}`` by the paper's method (pruning computed as well, for the timing)."""
    out: dict[int, dict[str, float]] = {b: {} for b in bits}
    for name, module in weight_layers(model):
        weight = module.weight.detach().to(device, torch.float32)
        for n_bits in bits:
            out[n_bits][name] = reference_quant_sqnr(weight, n_bits, n_candidates)
            reference_pruning_sqnr(weight, n_bits / 16)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run: Callable[[], T], repeats: int, device: torch.device) -> tuple[float, float, T]:
    """Fastest of ``repeats`` runs in wall seconds and in CPU seconds of the process (each the
    least over the runs), and the last result: robust to a noisy shared machine (CPU time does not
    count the time other processes take the cores away)."""
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return min(seconds), min(cpu_seconds), result


@click.command()
@click.option("--models", type=NameListType(), default="efficientnet_lite0", show_default=True)
@click.option("--bits", type=IntListType(2, 16), default="2-8", show_default=True)
@click.option("--device", type=DeviceType(), default=default_device(), show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Timed runs of each; the fastest counts.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: torch's choice).")
@click.option("--reference-candidates", type=click.IntRange(1), default=100, show_default=True,
              help="Thresholds the reference tries (the paper: 100; ~1000 matches our search's accuracy).")
def main(
    models: list[str], bits: list[int], device: torch.device, repeats: int, threads: int | None, reference_candidates: int
) -> None:
    torch.manual_seed(0)
    if threads is not None:
        torch.set_num_threads(threads)
    for model_name in models:
        model = load_model(model_name)
        n_params = sum(m.weight.numel() for _, m in weight_layers(model)) / 1e6
        study_model(model, bits[:1], device=device, progress=False)  # warm-up
        ours_seconds, ours_cpu, ours = best_time(
            lambda model=model: study_model(model, bits, device=device, progress=False), repeats, device
        )
        reference_seconds, reference_cpu, reference = best_time(
            lambda model=model: reference_study(model, bits, device, reference_candidates), repeats, device
        )
        gains = [ours[b][name]["quant_sqnr"] - reference[b][name] for b in bits for name in reference[b]]
        worst, mean = min(gains), sum(gains) / len(gains)
        click.echo(
            f"{model_name}: {n_params:.2f}M weights, bits {bits[0]}-{bits[-1]}, device {device}\n"
            f"  ours      {ours_seconds:8.3f} s wall, {ours_cpu:8.3f} s CPU  ({ours_seconds / n_params:.3f} s per M weights)\n"
            f"  reference {reference_seconds:8.3f} s wall, {reference_cpu:8.3f} s CPU  "
            f"({reference_seconds / n_params:.3f} s per M weights, {reference_candidates} candidates)\n"
            f"  speed-up  {reference_seconds / ours_seconds:8.1f}x wall, {reference_cpu / ours_cpu:8.1f}x CPU\n"
            f"  quant SQNR gain over reference (dB): min {worst:+.4f} ({'ok' if worst >= -1e-4 else 'WORSE'}), "
            f"mean {mean:+.4f}"
        )


if __name__ == "__main__":
    main()
