"""``export``: a train-compressed checkpoint as a real int8 model (ONNX QDQ, PT2E) or the folded float model."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), required=True,
              help="A train-compressed checkpoint (file, or folder with last.pt): QAT at <= 8 bits, or float.")
@click.option("--format", "export_format", type=click.Choice(["onnx-int8", "pt2e-x86", "onnx-fp32"]), required=True,
              help="onnx-int8: int8 QDQ ONNX for onnxruntime; pt2e-x86: torchao PT2E int8 program (.pt2) for "
                   "torch.compile/inductor; onnx-fp32: the dense folded float model as ONNX.")  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The model file; its report goes to OUTPUT.json.")
@click.option("--images-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="train/ and val/ class folders: train calibrates the 8-bit activations, val checks the export.")
@click.option("--calibration-batches", type=click.IntRange(1), default=4, show_default=True,
              help="Training batches (of --batch-size) that calibrate the activations.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--pack", is_flag=True, help="Also write the int8 weights in their smallest encoding to OUTPUT.weights.npz.")
def export(checkpoint: Path, export_format: str, output: Path, images_dir: Path | None, calibration_batches: int,
           batch_size: int, pack: bool) -> None:  # fmt: skip
    """A train-compressed checkpoint as a real int8 model (or the dense folded float model), checked on --images-dir."""
    from deployment.export import ExportError, ExportFormat, ExportSettings, export_checkpoint
    from utils.io import OutputPathError

    settings = ExportSettings(checkpoint, ExportFormat(export_format), output, images_dir, calibration_batches,
                              batch_size, pack)  # fmt: skip
    try:
        report = export_checkpoint(settings)
    except OutputPathError as error:
        raise click.BadParameter(str(error), param_hint="'--output'") from None
    except ExportError as error:
        raise click.ClickException(str(error)) from None
    check = report["check"]
    checked = (f"; top-1 {check['top1_exported']:.2f}% (fake-quantized {check['top1_reference']:.2f}%, agreement "
               f"{check['top1_agreement']:.1f}%), max logit error {check['max_logit_error']:.3g}"
               if check is not None else "")  # fmt: skip
    kernels = report["kernel_check"]
    if kernels is None:
        kernel_line = ""
    elif "max_integer_difference" in kernels:  # onnx-int8: the cut simulation, with its bound
        kernel_line = (f"; kernels vs simulation: up to {kernels['max_integer_difference']} step, logits at "
                       f"{kernels['max_logit_difference_to_bound']:.2g} of their rounding bound")  # fmt: skip
    else:  # pt2e-x86: end to end, no bound
        kernel_line = (f"; inductor vs simulation: top-1 agreement {kernels['top1_agreement']:.1f}%, max logit "
                       f"difference {kernels['max_logit_error']:.3g}")  # fmt: skip
    if report["saturating_layers"]:
        kernel_line += f" ({len(report['saturating_layers'])} layers may saturate on this CPU, see the warning)"
    sizes = report["weight_bytes"]
    click.echo(f"{export_format} -> {output} ({report['output_bytes']} bytes, {report['export_seconds']:.1f} s){checked}"
               f"{kernel_line}; weights: float32 {sizes['float32']} B, int8 {sizes['int8']} B, smallest "
               f"{report['smallest_encoding']} {sizes[report['smallest_encoding']]} B")  # fmt: skip
