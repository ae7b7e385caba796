"""PSGD toward the INT-b grid against PSGD toward zero at the matched sparsity ``1 - b/16`` (the paper's question asked of PSGD).

From one float checkpoint (a plain ``train-compressed --no-weight-quant`` run), with the same budget
(epochs, batch, learning rate and its schedule, weight decay, seed), five float runs continue training:

* ``plain``: plain SGD (the baseline);
* ``grid<b>`` for every ``b`` of ``--bits``: PSGD toward the restricted symmetric ``b``-bit grid
  (:mod:`quantization.position_scaling`; the first and last layer at 8 bits below 4 bits; no weight decay
  at 2 bits, as the official recipe);
* ``zero``: PSGD toward zero (one run serves every ``b``: its target does not depend on ``b``).

Each is then compressed post hoc without training (:func:`training.run.evaluate_run`, batch norm not
re-estimated unless asked; its estimation batches depend on ``batch_size``): the grid runs, ``plain`` and the float
start quantized to W-b with one quantizer for all (per tensor, symmetric, the current min-max range: step
``max|w| / (2^(b-1) - 1)``, the grid PSGD trained toward, from the current rather than its moving range, plus
the level ``-2^(b-1)``; the first and last layer at 8 bits below 4 bits), the zero run, ``plain`` and the start
magnitude-pruned to ``1 - b/16`` in every layer. The grid runs are also scored on PSGD's own tracked grid
(``--weight-quant-method psgd_grid``: its moving range and restricted levels; ``tracked_grid_top1``). Per layer,
the weight SQNR of the same min-max compression comes from the weight study
(:func:`studies.weight_sqnr.study_model`, min-max range): ``quant_sqnr`` at ``b`` bits for the quantized arms,
``pruning_sqnr`` at ``1 - b/16`` for the pruned ones (every layer at ``b``, the first and last included); for the
quantized arms also how close the weights sit to that grid
(:func:`quantization.position_scaling.grid_distance`: 0 on it, about 0.25 spread evenly).

Outputs in ``--output-dir``: ``runs/<run>/`` (each run's checkpoints and metrics), ``comparison.csv``
(one row per arm and bit-width: top-1 of the run's float weights, post-hoc top-1, the grid runs' top-1 on
their tracked grid, mean and minimum layer SQNR, mean grid distance of the quantized arms), ``layers.csv``
(per layer SQNR and grid distance), ``comparison.json`` (both, with the settings) and ``comparison.md`` (the table).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from models.layers import weight_layers
from models.quantized import QuantSetup
from quantization.position_scaling import FIRST_LAST_BELOW_BITS, Target, grid_distance
from studies.compression import pruning_sparsity
from studies.weight_sqnr import study_model
from training.builders import build_float_model, load_float_weights
from training.checkpoint import LAST, load_checkpoint
from training.config import PSGD_GRID_METHOD, DataConfig, TrainConfig
from training.run import evaluate_run, train
from utils.io import atomic_open, check_output_path, write_csv, write_json

logger = logging.getLogger(__name__)

POSTHOC_WEIGHT_METHOD = "current_minmax"  # the post-hoc quantizer of every arm (one grid rule for all)
SQNR_RANGE = "minmax"  # the weight study's range estimator matching the post-hoc quantizer (current_minmax)
PLAIN, ZERO, START = "plain", "zero", "start"
NO_DECAY_BITS = 2  # the official recipe trains PSGD without weight decay at 2 bits


class ComparisonError(ValueError):
    """Settings the comparison cannot run with (one-line message)."""


@dataclass(frozen=True)
class ComparisonSettings:
    """The data, the float start, the shared training budget and the bit-widths of the comparison."""

    float_checkpoint: str
    output_dir: str
    architecture: str = "resnet32_cifar"
    dataset: str = "folder"
    images_dir: str = ""
    data_dir: str | None = None
    image_size: int = 32
    augmentation: str = DataConfig.augmentation  # --dataset folder's training transforms (training/data.py)
    bits: tuple[int, ...] = (2, 3, 4)
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 0.01
    learning_rate_schedule: str = "constant"
    weight_decay: float = 1e-4
    psgd_lambda: float = 150.0
    num_workers: int = 0
    seed: int = 0
    device: str = "cpu"
    progress_bar: bool = True
    reestimate_bn_stats: bool = False  # before each post-hoc evaluation (the paper does not)

    def base_config(self) -> TrainConfig:
        """The options every run and evaluation shares: the data, the float model and its start."""
        return TrainConfig.from_options(
            architecture=self.architecture, pretrained=False, dataset=self.dataset, images_dir=self.images_dir,
            data_dir=self.data_dir, image_size=self.image_size, augmentation=self.augmentation, batch_size=self.batch_size,
            num_workers=self.num_workers, seed=self.seed, device=self.device, progress_bar=self.progress_bar,
            weight_quant=False, reestimate_bn_stats=False,
        )  # fmt: skip


def run_names(bits: tuple[int, ...]) -> list[str]:
    """``plain``, ``zero`` and ``grid<b>`` for each bit-width."""
    return [PLAIN, ZERO, *(f"grid{b}" for b in bits)]


def training_config(settings: ComparisonSettings, run: str) -> TrainConfig:
    """The float training of ``run`` (:func:`run_names`) from the float checkpoint, with the shared budget."""
    psgd: dict[str, Any] = {}
    weight_decay = settings.weight_decay
    if run == ZERO:
        psgd = {"psgd_target": Target.ZERO.value, "psgd_lambda": settings.psgd_lambda}
    elif run != PLAIN:
        bits = int(run.removeprefix("grid"))
        psgd = {"psgd_target": Target.GRID.value, "psgd_bits": bits, "psgd_lambda": settings.psgd_lambda}
        weight_decay = 0.0 if bits == NO_DECAY_BITS else weight_decay
    return settings.base_config().with_options(
        init_checkpoint=settings.float_checkpoint, max_epochs=settings.epochs, optimizer="SGD", momentum=0.9,
        learning_rate=settings.learning_rate, learning_rate_schedule=settings.learning_rate_schedule,
        weight_decay=weight_decay, save_checkpoint_dir=str(Path(settings.output_dir) / "runs" / run), **psgd,
    )  # fmt: skip


def evaluation_config(settings: ComparisonSettings, weights: str, n_bits: int | None = None,
                      sparsity: float | None = None, tracked_grid: bool = False) -> TrainConfig:  # fmt: skip
    """Post-hoc compression of the float ``weights``: W-``n_bits`` (first/last at 8 below 4 bits; the current min-max
    grid, or with ``tracked_grid`` the grid PSGD tracked), magnitude pruning to ``sparsity`` in every layer, or
    neither (the float weights)."""
    config = settings.base_config().with_options(init_checkpoint=weights, reestimate_bn_stats=settings.reestimate_bn_stats)
    if n_bits is not None:
        setup = QuantSetup.LSQ_PAPER if n_bits < FIRST_LAST_BELOW_BITS else QuantSetup.ALL
        method = PSGD_GRID_METHOD if tracked_grid else POSTHOC_WEIGHT_METHOD
        config = config.with_options(weight_quant=True, n_bits=n_bits, weight_quant_method=method,
                                     quant_setup=setup.value)  # fmt: skip
    if sparsity is not None:
        config = config.with_options(prune_method="zhu_gupta", s_f=sparsity)
    return config


def float_weights(settings: ComparisonSettings, weights: str) -> nn.Module:
    """The float model holding the weights of the checkpoint ``weights``."""
    config = settings.base_config()
    model = build_float_model(config, pretrained=False, for_state_dict=True,
                              num_classes=load_checkpoint(Path(weights)).get("num_classes"))  # fmt: skip
    load_float_weights(model, weights, config)
    return model


def _top1(settings: ComparisonSettings, weights: str, **compression: Any) -> float:
    top1 = evaluate_run(evaluation_config(settings, weights, **compression), None)["top1"]
    logger.info("%s, %s: top-1 %.2f%%", weights, ", ".join(f"{k} {v:g}" for k, v in compression.items()) or "float",
                top1)  # fmt: skip
    return top1


def compare_runs(settings: ComparisonSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the runs, compress them post hoc; ``(summary, layers)`` frames (see the module doc)."""
    checkpoints = {START: settings.float_checkpoint}
    for run in run_names(settings.bits):
        logger.info("comparison run %s", run)
        train(training_config(settings, run))
        checkpoints[run] = str(Path(settings.output_dir) / "runs" / run / LAST)
    float_top1 = {run: _top1(settings, path) for run, path in checkpoints.items()}
    models = {run: float_weights(settings, path) for run, path in checkpoints.items()}
    sqnr = {run: study_model(model, settings.bits, SQNR_RANGE, progress=False) for run, model in models.items()}
    rows, layer_rows = [], []
    for n_bits in settings.bits:
        sparsity = pruning_sparsity(n_bits)
        arms = [("psgd_grid", f"grid{n_bits}", "quant"), ("plain_quant", PLAIN, "quant"), ("start_quant", START, "quant"),
                ("psgd_zero", ZERO, "pruning"), ("plain_prune", PLAIN, "pruning"), ("start_prune", START, "pruning")]
        for arm, run, kind in arms:
            compression = {"n_bits": n_bits} if kind == "quant" else {"sparsity": sparsity}
            tracked = _top1(settings, checkpoints[run], n_bits=n_bits, tracked_grid=True) if arm == "psgd_grid" else None
            layers = {name: metrics[f"{kind}_sqnr"] for name, metrics in sqnr[run][n_bits].items()}
            values = pd.Series(layers, dtype=float)
            distances = pd.Series({name: grid_distance(module.weight, n_bits) if kind == "quant" else None
                                   for name, module in weight_layers(models[run])}, dtype=float)  # fmt: skip
            rows.append({"bits": n_bits, "arm": arm, "run": run,
                         "compression": f"W{n_bits}" if kind == "quant" else f"sparsity {sparsity:.4g}",
                         "float_top1": float_top1[run], "posthoc_top1": _top1(settings, checkpoints[run], **compression),
                         "tracked_grid_top1": tracked,
                         "mean_sqnr_db": float(values.mean()), "min_sqnr_db": float(values.min()),
                         "mean_grid_distance": float(distances.mean())})  # fmt: skip
            layer_rows += [{"bits": n_bits, "arm": arm, "layer": name, "sqnr_db": value,
                            "grid_distance": distances[name]} for name, value in layers.items()]  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(layer_rows)


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a markdown table (top-1 in %, SQNR in dB; the tracked-grid top-1 of the grid runs, the grid
    distance of the quantized arms only)."""
    header = ("| b | arm | compression | float top-1 | post-hoc top-1 | tracked grid top-1 | mean SQNR (dB) "
              "| min SQNR (dB) | grid distance |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row.bits} | {row.arm} | {row.compression} | {row.float_top1:.2f} | {row.posthoc_top1:.2f} | "
              f"{'-' if pd.isna(row.tracked_grid_top1) else f'{row.tracked_grid_top1:.2f}'} | "
              f"{row.mean_sqnr_db:.2f} | {row.min_sqnr_db:.2f} | "
              f"{'-' if pd.isna(row.mean_grid_distance) else f'{row.mean_grid_distance:.3f}'} |"
              for row in summary.itertuples()]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_comparison(settings: ComparisonSettings) -> pd.DataFrame:
    """Check the inputs and outputs, run :func:`compare_runs`, write the four files; returns the summary."""
    if not settings.bits or any(not 2 <= b <= 8 for b in settings.bits):
        raise ComparisonError(f"the bit-widths must be in 2..8, got {','.join(map(str, settings.bits)) or 'none'}")
    try:
        settings.base_config().validate()
    except ValueError as error:
        raise ComparisonError(str(error)) from None
    out_dir = Path(settings.output_dir)
    check_output_path(out_dir, "dir")
    float_weights(settings, settings.float_checkpoint)  # a float checkpoint of the architecture, before any work
    summary, layers = compare_runs(settings)
    write_csv(out_dir / "comparison.csv", summary)
    write_csv(out_dir / "layers.csv", layers)
    write_json(out_dir / "comparison.json", {"settings": dataclasses.asdict(settings),
                                             "summary": summary.to_dict(orient="records"),
                                             "layers": layers.to_dict(orient="records")})  # fmt: skip
    with atomic_open(out_dir / "comparison.md") as handle:
        handle.write(markdown_table(summary))
    logger.info("wrote %s, %s, %s and %s", *(out_dir / name for name in ("comparison.csv", "layers.csv",
                                                                          "comparison.json", "comparison.md")))
    return summary
