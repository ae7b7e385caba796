"""Per-layer bit policies, the quantizer factory and every weight-layer type in the compressed layers."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from train_helpers import write_digits_dataset

from models.bit_policy import BitPolicy, BitPolicyError, apply_bit_policy, check_policy_layers, parse_bit_policy
from models.layers import WEIGHT_LAYERS
from models.quantized import (
    COMPRESSED_TYPES,
    CompressionSpec,
    QuantSetup,
    compress_model,
    compressed_layers,
    layer_report,
)
from quantization.fake_quant import QuantizerConfig
from quantization.granularity import Granularity

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(**changes) -> dict:
    data = {"layers": ["a", "b", "c"], "weight_bits": [8, 4, None], "act_bits": [None, 3, 2], "status": "optimal",
            "objective": 1.5}  # fmt: skip
    return {**data, **changes}


def test_parse_keeps_nulls_and_ignores_extra_keys() -> None:
    policy = parse_bit_policy(_policy())
    assert policy == BitPolicy(("a", "b", "c"), (8, 4, None), (None, 3, 2))


@pytest.mark.parametrize("changes, message", [
    ({"layers": []}, "non-empty list"),
    ({"layers": ["a", "a", "c"]}, "more than once: a"),
    ({"weight_bits": [8, 4]}, "2 entries for 3 layers"),
    ({"act_bits": [None, 9, 2]}, "9 is not a bit-width in 2..8"),
    ({"act_bits": [None, 1, 2]}, "1 is not a bit-width"),
    ({"weight_bits": [8, 4.0, None]}, "4.0 is not a bit-width"),
    ({"weight_bits": [True, 4, None]}, "True is not a bit-width"),
    ({"act_bits": None}, '"act_bits" must be a list'),
])  # fmt: skip
def test_parse_refuses_bad_policies(changes: dict, message: str) -> None:
    with pytest.raises(BitPolicyError, match=message):
        parse_bit_policy(_policy(**changes))
    with pytest.raises(BitPolicyError, match="JSON object"):
        parse_bit_policy([1, 2])


def test_layers_are_checked_and_omitted_layers_keep_their_defaults() -> None:
    policy = parse_bit_policy(_policy())
    check_policy_layers(policy, ["a", "b", "c", "d"])
    with pytest.raises(BitPolicyError, match="1 layers the model does not have: c"):
        check_policy_layers(policy, ["a", "b", "d"])
    with pytest.raises(BitPolicyError, match=r"not compressed: c \(MyLinear\)"):
        check_policy_layers(policy, ["a", "b"], {"c": "MyLinear"})
    with pytest.raises(BitPolicyError, match="add --act-quant"):
        check_policy_layers(policy, ["a", "b", "c"], act_quant=False)
    with pytest.raises(BitPolicyError, match="--no-weight-quant"):
        check_policy_layers(policy, ["a", "b", "c"], weight_quant=False)
    weights, acts = apply_bit_policy(policy, {"a": 4, "b": 4, "c": 4, "d": 4}, {"a": 8, "b": 8, "c": 8, "d": 8})
    assert weights == {"a": 8, "b": 4, "c": None, "d": 4} and acts == {"a": None, "b": 3, "c": 2, "d": 8}


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def test_compress_model_applies_a_policy() -> None:
    model = _tiny_model()
    spec = CompressionSpec(QuantizerConfig(n_bits=4), QuantizerConfig(n_bits=6), QuantSetup.LSQ_PAPER,
                           bit_policy=BitPolicy(("2",), (3,), (None,)))  # fmt: skip
    compress_model(model, spec)
    report = layer_report(model)
    assert {name: (r["weight_bits"], r["act_bits"]) for name, r in report.items()} == {
        "0": (8, 8), "2": (3, None), "4": (8, 8)}  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    model.eval()(x)
    assert len(torch.unique(model[2].effective_weight())) <= 2**3


class HalfStepQuantizer(nn.Module):
    """A tiny custom fake quantizer: rounds to a fixed grid of 0.5, one learnable scale."""

    def __init__(self, config: QuantizerConfig, shape: Sequence[int] | None) -> None:
        super().__init__()
        self.config, self.shape, self.calls = config, shape, 0
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def n_bits(self) -> int:
        return self.config.n_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.round(x * 2) / 2 * self.scale

    def estimate_range(self, x: torch.Tensor) -> None:
        pass

    def start_estimating(self) -> None:
        pass

    def freeze_range(self) -> None:
        pass


def test_a_custom_quantizer_class_plugs_in_through_the_factory() -> None:
    from training.builders import step_size_parameters

    model = _tiny_model()
    spec = CompressionSpec(QuantizerConfig(n_bits=5), QuantizerConfig(n_bits=7), QuantSetup.ALL,
                           quantizer_factory=HalfStepQuantizer)  # fmt: skip
    layers = compress_model(model, spec)
    assert all(isinstance(layer.weight_quantizer, HalfStepQuantizer) for layer in layers.values())
    assert layers["0"].weight_quantizer.shape == (4, 3, 3, 3) and layers["0"].input_quantizer.shape is None
    model(torch.randn(1, 3, 8, 8))
    assert layers["4"].input_quantizer.calls == 1
    assert torch.equal(layers["0"].effective_weight(), torch.round(layers["0"].weight * 2) / 2)
    assert len(step_size_parameters(model)) == 6  # the custom quantizers' learnable parameters
    assert layer_report(model)["2"]["weight_bits"] == 5


def _float_layer(kind: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    if kind is nn.Linear:
        return nn.Linear(6, 5), torch.randn(2, 6)
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
            nn.ConvTranspose3d: 3}[kind]  # fmt: skip
    layer = kind(4, 6, 3, stride=2, padding=1, groups=2)
    return layer, torch.randn(2, 4, *[5] * dims)


@pytest.mark.parametrize("kind", WEIGHT_LAYERS, ids=lambda k: k.__name__)
def test_every_weight_layer_type_of_the_weight_study_is_compressed(kind: type[nn.Module]) -> None:
    assert set(COMPRESSED_TYPES) == set(WEIGHT_LAYERS)
    layer, x = _float_layer(kind)
    with torch.no_grad():
        reference = layer(x)
    model = nn.Sequential(layer)
    compress_model(model, CompressionSpec())  # no quantization: the same function
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    model = nn.Sequential(_float_layer(kind)[0])
    spec = CompressionSpec(QuantizerConfig(n_bits=3, granularity=Granularity.per_channel()), QuantizerConfig(n_bits=4),
                           QuantSetup.ALL)  # fmt: skip
    compressed = compress_model(model, spec)["0"]
    axis = 1 if "Transpose" in kind.__name__ else 0
    assert compressed.weight_quantizer.step_size.shape == (compressed.weight.shape[axis],)
    weight = compressed.effective_weight().detach()
    for channel in weight.unbind(axis):  # per output channel: at most 2^3 levels each
        assert len(torch.unique(channel)) <= 8
    assert model(x).shape == reference.shape


def test_subclasses_stay_float_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(3, 3), MyLinear(3, 2))
    with caplog.at_level(logging.WARNING):
        compress_model(model, CompressionSpec(QuantizerConfig(n_bits=4)))
    assert list(compressed_layers(model)) == ["0"]
    assert "1 (MyLinear)" in caplog.text
    with pytest.raises(BitPolicyError, match=r"not compressed: 1 \(MyLinear\)"):
        compress_model(nn.Sequential(nn.Linear(3, 3), MyLinear(3, 2)),
                       CompressionSpec(QuantizerConfig(n_bits=4), bit_policy=BitPolicy(("1",), (4,), (None,))))  # fmt: skip


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("policy_digits"), per_class_train=1, per_class_val=1)


def _cli_args(digits: Path) -> list[str]:
    return ["--images-dir", str(digits), "--architecture", "resnet18", "--no-pretrained", "--image-size", "16",
            "--batch-size", "8", "--num-workers", "0", "--no-progress-bar", "--weight-quant-method", "current_minmax",
            "--act-quant", "--bn-est-batches", "1", "--deterministic"]  # fmt: skip


@pytest.mark.slow
def test_train_and_evaluate_with_a_policy(digits: Path, tmp_path: Path) -> None:
    from main import cli

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"layers": ["conv1", "layer1.0.conv1", "fc"], "weight_bits": [8, 2, 8],
                                  "act_bits": [None, 3, 8], "status": "optimal"}))  # fmt: skip
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train-compressed", *_cli_args(digits), "--max-epochs", "1", "--bit-policy",
                                      str(policy), "--save-checkpoint-dir", str(run)])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = policy.read_text()
    policy.write_text(json.dumps({"layers": ["conv1"], "weight_bits": [3], "act_bits": [None]}))  # edited after training
    resumed = CliRunner().invoke(cli, ["train-compressed", *_cli_args(digits), "--max-epochs", "1", "--bit-policy",
                                       str(policy), "--save-checkpoint-dir", str(run), "--resume", str(run / "last.pt")])  # fmt: skip
    assert resumed.exit_code == 1 and "has changed since" in resumed.output
    policy.unlink()  # the checkpoint holds the bits it was trained with
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["evaluate", "--images-dir", str(digits), "--num-workers", "0", "--no-progress-bar",
                                      "--checkpoint", str(run / "last.pt"), "--output-json", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    layers = json.loads(report.read_text())["layers"]
    assert (layers["conv1"]["weight_bits"], layers["conv1"]["act_bits"]) == (8, None)
    assert (layers["layer1.0.conv1"]["weight_bits"], layers["layer1.0.conv1"]["act_bits"]) == (2, 3)
    assert (layers["layer1.0.conv2"]["weight_bits"], layers["layer1.0.conv2"]["act_bits"]) == (4, 8)  # omitted: default
    policy.write_text(saved)
    post = tmp_path / "post.json"
    result = CliRunner().invoke(cli, ["evaluate", *_cli_args(digits), "--bit-policy", str(policy), "--output-json",
                                      str(post)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(post.read_text())["layers"]["layer1.0.conv1"]["weight_bits"] == 2


@pytest.mark.parametrize("command", ["train-compressed", "evaluate"])
def test_bad_policy_files_are_one_line_usage_errors(command: str, digits: Path, tmp_path: Path) -> None:
    from main import cli

    out = tmp_path / "out"
    cases = {
        "unknown.json": ({"layers": ["conv1", "nope"], "weight_bits": [4, 4], "act_bits": [8, 8]}, "does not have: nope"),
        "bits.json": ({"layers": ["conv1"], "weight_bits": [9], "act_bits": [8]}, "not a bit-width in 2..8"),
        "lengths.json": ({"layers": ["conv1"], "weight_bits": [4, 4], "act_bits": [8]}, "2 entries for 1 layers"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
        extra = ["--save-checkpoint-dir", str(out)] if command == "train-compressed" else ["--output-json", str(out)]
        result = CliRunner().invoke(cli, [command, *_cli_args(digits), "--bit-policy", str(tmp_path / name), *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists()
    (tmp_path / "broken.json").write_text("{")
    result = CliRunner().invoke(cli, [command, *_cli_args(digits), "--bit-policy", str(tmp_path / "broken.json")])
    assert result.exit_code == 2 and "is not JSON" in result.output
