"""bench/bench_deployed_compression.py: the compressed models it deploys, and its bad input."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from train_helpers import private_registry

from deployment.integer_model import dense_folded_model, integer_layers
from models.quantized import compressed_layers
from utils.images import sample_photo_batch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_deployed_compression.py"
_spec = importlib.util.spec_from_file_location("bench_deployed_compression", BENCH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def _tiny(pretrained: bool = False) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                             nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))  # fmt: skip


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return sample_photo_batch(image_size=16)


@pytest.mark.parametrize("deployment", bench.DEPLOYMENTS, ids=lambda deployment: deployment.name)
def test_deployments_prune_the_smallest_quarter_per_layer_and_quantize_as_the_paper(deployment, photos) -> None:
    with private_registry({"tiny_deployed": _tiny}):
        model = bench.compressed_model("tiny_deployed", deployment, photos)
    originals = {name: layer.weight for name, layer in _tiny().named_modules() if isinstance(layer, (nn.Conv2d, nn.Linear))}
    layers = compressed_layers(model)
    for name, layer in layers.items():
        weight, original = layer.masked_weight().detach(), originals[name]
        pruned = weight == 0
        assert int(pruned.sum()) == (math.floor(deployment.sparsity * weight.numel() + 0.5) if deployment.sparsity else 0)
        if deployment.sparsity:  # the kept weights are the largest magnitudes, unchanged
            assert original.abs()[~pruned].min() >= original.abs()[pruned].max()
            assert torch.equal(weight[~pruned], original[~pruned])
        assert (layer.weight_quantizer is None) == (not deployment.is_integer)
        assert (layer.input_quantizer is None) == (not deployment.is_integer)
    if deployment.is_integer:  # LSQ_paper: the first and last layer at 8 bits, the body at the deployment's bits
        folded, pairs = dense_folded_model(model, photos[:2])
        bits = [layer.n_bits for layer in integer_layers(model, folded, pairs).values()]
        assert bits == [8, deployment.weight_bits, 8]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--models", "no_such_model"], "unknown models no_such_model"),
    (["--batch-sizes", "1,0"], "batch sizes must be >= 1"),
    (["--batch-sizes", "1,x"], "is not a comma-separated list of integers"),
    (["--models", "resnet18", "--pretrained", "mobilenet_v2"], "mobilenet_v2 not in --models"),
])  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, arguments: list[str], message: str) -> None:
    csv = tmp_path / "out.csv"
    result = CliRunner().invoke(bench.main, [*arguments, "--output-csv", str(csv), "--figure", str(tmp_path / "f.png")])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_under_a_file_is_refused_before_work(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(bench.main, ["--output-csv", str(tmp_path / "file" / "out.csv"),
                                             "--figure", str(tmp_path / "f.png")])  # fmt: skip
    assert result.exit_code == 2
    assert "Invalid value for --output-csv" in result.output and "is a file, not a folder" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]
