#!/usr/bin/env python
"""EfficientNet-Lite0 (bundled ImageNet weights) through ``pt2e-x86``: inductor's int8 program against its simulation.

The model is compressed as a QAT checkpoint would be (``--weight-bits`` per output channel, 8-bit asymmetric
activations, ranges from the offline sample photos), folded and converted by :func:`deployment.pt2e_x86.quantize_pt2e`;
then the program compiled by inductor with freezing (oneDNN's int8 kernels) and the same program run eagerly
(quantize/dequantize around float operators) classify the photos. Prints the CPU's int8 instruction sets,
whether oneDNN saturates u8 x s8 pair sums here (:mod:`deployment.cpu_features`), how many layers have weights
beyond +-64, and the largest logit difference between the two programs. oneDNN can be held below VNNI on a CPU
that has it, to see what a CPU without VNNI computes:

    python bench/check_pt2e_kernels.py --weight-bits 8
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/check_pt2e_kernels.py --weight-bits 8
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployment.cpu_features import MAX_UNSATURATED_WEIGHT, int8_instruction_sets, onednn_saturates
from deployment.integer_model import dense_folded_model, integer_layers, set_dequantized_weights
from deployment.pt2e_x86 import compiled_program, layers_beyond_unsaturated, quantize_pt2e
from models.quantized import CompressionSpec, QuantSetup, calibrate_input_quantizers, compress_model
from models.registry import load_model
from quantization.fake_quant import QuantizerConfig
from quantization.granularity import Granularity
from quantization.quantizers import QuantScheme
from utils.images import sample_photo_batch


@click.command()
@click.option("--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True)
@click.option("--image-size", type=click.IntRange(32), default=160, show_default=True)
@torch.no_grad()
def main(weight_bits: int, image_size: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    photos = sample_photo_batch(image_size=image_size)
    model = load_model("efficientnet_lite0", pretrained=True, download=False).eval()
    weight_quant = QuantizerConfig(weight_bits, QuantScheme.SYMMETRIC, Granularity.per_channel(0))
    compress_model(model, CompressionSpec(weight_quant=weight_quant, act_quant=QuantizerConfig(8, QuantScheme.ASYMMETRIC),
                                          quant_setup=QuantSetup.ALL))  # fmt: skip
    calibrate_input_quantizers(model, [photos])
    folded, pairs = dense_folded_model(model.eval(), photos[:2])
    layers = integer_layers(model, folded, pairs)
    set_dequantized_weights(folded, layers)
    program = quantize_pt2e(folded, layers, photos[:2], [photos])
    compiled = compiled_program(program)(photos)
    simulated = program.module()(photos)
    beyond = len(layers_beyond_unsaturated(layers))
    click.echo(
        f"CPU int8 instruction sets: {', '.join(int8_instruction_sets()) or 'unknown'}; oneDNN saturates u8 x s8 "
        f"pairs here: {'yes' if onednn_saturates() else 'no'}\n"
        f"EfficientNet-Lite0, W{weight_bits} per channel, A8, {len(photos)} photos at {image_size} px: "
        f"{beyond} of {len(layers)} layers have weights beyond +-{MAX_UNSATURATED_WEIGHT}\n"
        f"inductor int8 vs its simulation: max |logit difference| {float((compiled - simulated).abs().max()):.4f} "
        f"(max |logit| {float(simulated.abs().max()):.2f}), top-1 agreement "
        f"{int((compiled.argmax(1) == simulated.argmax(1)).sum())}/{len(photos)}"
    )


if __name__ == "__main__":
    main()
