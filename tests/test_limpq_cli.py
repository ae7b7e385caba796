"""LIMPQ end to end on digits: `main.py train-indicators` (stage 1), `search-bit-policy` (stage 2) and the policy's
fine-tuning with `train-compressed --bit-policy --quant-setup LIMPQ` (stage 3).

The runs use a tiny CNN registered in a private copy of the model registry (``tiny_limpq``: a stem
conv kept in float, three searchable convs - the last one reading a signed input - and a classifier),
so that a joint step of six passes takes milliseconds; the preparation of real architectures is
tested in ``test_limpq_training.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from train_helpers import invoke_cli, private_registry, write_digits_dataset

from main import cli
from models.quantized import QuantSetup, compressed_layers, layer_bit_widths
from studies import bit_policy_plots
from studies.indicators import read_indicators
from training import run
from training.cli_options import indicator_config_from_options
from training.config import INDICATOR_RECIPE, OPTION_GROUPS
from training.data import eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")

BITS = (6, 5, 4, 3, 2)
COMMON = ["--image-size", "16", "--num-workers", "0", "--no-progress-bar", "--device", "cpu"]


class TinyLimpqNet(nn.Module):
    """stem (float) -> conv1 -> conv2 (no ReLU after its batch norm) -> conv3 (signed input) -> classifier."""

    def __init__(self, num_classes: int = 10, stem_kernel: int = 3) -> None:
        super().__init__()
        stem = nn.Conv2d(3, 16, stem_kernel, padding=1, bias=False)  # kernel 11: images of 8 px are too small
        self.stem = nn.Sequential(stem, nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        x = torch.relu(self.bn3(self.conv3(self.bn2(self.conv2(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class TinyMlp(nn.Module):
    """One conv (the first, never searched) and linear layers: nothing for LIMPQ to search."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.patches(x))


def _tiny_limpq(pretrained: bool) -> TinyLimpqNet:
    """'Pretrained' weights: a fixed seeded initialisation (whatever the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 if pretrained else 0)
        return TinyLimpqNet()


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    """The tiny models in a private copy of the registry; one torch thread already for the module's shared runs."""
    with private_registry({"tiny_limpq": _tiny_limpq, "tiny_mlp": lambda pretrained: TinyMlp(),
                           "tiny_limpq_11px": lambda pretrained: TinyLimpqNet(stem_kernel=11)}):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 training and 20 validation digits at 16 px."""
    return write_digits_dataset(tmp_path_factory.mktemp("digits"), per_class_train=4, per_class_val=2, image_size=16)


def _indicator_args(images_dir: Path, out: Path) -> list[str]:
    return ["train-indicators", "--architecture", "tiny_limpq", *COMMON, "--images-dir", str(images_dir),
            "--batch-size", "10", "--max-epochs", "2", "--deterministic", "--output-dir", str(out)]  # fmt: skip


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"{path} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def indicator_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two epochs of four steps (uninterrupted): the output folder and the command's output."""
    out = tmp_path_factory.mktemp("indicators")
    return out, invoke_cli(_indicator_args(digits, out))


# --------------------------------------------------------------------------- stage 1: train-indicators
@pytest.mark.slow
def test_indicators_file_is_the_learned_step_sizes(indicator_run: tuple[Path, str]) -> None:
    out, output = indicator_run
    data = _strict_json(out / "indicators.json")
    convs = [name for name, module in TinyLimpqNet().named_modules() if isinstance(module, nn.Conv2d)]
    assert data["layer_name"] == convs[1:] == ["conv1", "conv2", "conv3"]  # every conv but the first, in module order
    state = _checkpoint(out / "last.pt")
    for kind, quantizer in (("weight", "weight_quantizer"), ("act", "input_quantizer")):
        assert list(data[kind]) == data["layer_name"]
        for layer in data["layer_name"]:
            row = data[kind][layer]
            assert list(row) == [str(b) for b in BITS]
            values = np.array(list(row.values()))
            assert np.isfinite(values).all() and (values > 0).all()
            # the file holds exactly the checkpoint's step sizes
            step_sizes = state["model"][f"{layer}.{quantizer}.step_sizes"].double().numpy()
            np.testing.assert_array_equal(values, step_sizes)
            assert state["model"][f"{layer}.{quantizer}.initialized"].all()
    # the weight step sizes started at LIMPQ's init of the pretrained weight, max|mu +- 3 sigma| / 2^(b-1), and moved
    pretrained = _tiny_limpq(pretrained=True)
    for layer in data["layer_name"]:
        weight = pretrained.get_submodule(layer).weight.detach().double()
        mu, sigma = weight.mean().item(), weight.std().item()
        initial = np.array([max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 2 ** (b - 1) for b in BITS])
        learned = np.array(list(data["weight"][layer].values()))
        np.testing.assert_allclose(learned, initial, rtol=0.2)
        assert (learned != initial.astype(np.float32)).all()
    assert state["step"] == 8
    # the stem's and the classifier's weights are not quantized, conv3 reads a signed input
    assert not any(key.startswith(("stem.0.weight_quantizer", "stem.0.input_quantizer", "fc.weight_quantizer",
                                   "fc.input_quantizer")) for key in state["model"])  # fmt: skip
    assert state["method"]["input_schemes"] == {"conv1": "unsigned", "conv2": "unsigned", "conv3": "symmetric"}
    assert read_indicators(out / "indicators.json").layers == ("conv1", "conv2", "conv3")
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
        assert (out / f"indicators{suffix}").read_bytes().startswith(magic)
    assert Image.open(out / "indicators.png").size[0] > 100
    summary = _strict_json(out / "summary.json")
    assert summary["indicators"] == str(out / "indicators.json") and summary["epochs"] == 2
    assert f"-> {out / 'indicators.json'}" in output and "val top-1 at 6 bits" in output


@pytest.mark.slow
def test_the_recipe_defaults_one_sgd_and_a_cosine_to_1e5(indicator_run: tuple[Path, str]) -> None:
    out, _ = indicator_run
    state = _checkpoint(out / "last.pt")
    assert list(state["optimizers"]) == ["model"]  # weights and step sizes in one SGD
    groups = state["optimizers"]["model"]["param_groups"]
    assert [(g["momentum"], g["weight_decay"], g["initial_lr"]) for g in groups] == [(0.9, 2.5e-5, 0.01)] * 2
    step_size_keys = [key for key in state["model"] if key.endswith("step_sizes")]
    assert len(groups[1]["params"]) == len(step_size_keys) == 6
    # per-step cosine from 0.01 to 1e-5 over the 8 steps of the run, read after 4 and 8 steps
    lrs = pd.read_csv(out / "metrics.csv")["lr"].to_numpy()
    expected = [1e-5 + (0.01 - 1e-5) * (1 + math.cos(math.pi * t / 8)) / 2 for t in (4, 8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    options = state["options"]
    assert options["optim"]["label_smoothing"] == 0.1 and options["indicators"]["bits"] == BITS
    assert not options["bn"]["reestimate_bn_stats"]


@pytest.mark.slow
def test_validation_runs_at_the_largest_bit_width(indicator_run: tuple[Path, str], digits: Path) -> None:
    """The logged validation metrics are those of the model with every searchable layer at 6 bits (recomputed here)."""
    out, _ = indicator_run
    config = indicator_config_from_options(architecture="tiny_limpq", image_size=16, device="cpu")
    method = run.training_method(config)
    method.load_state_dict(_checkpoint(out / "last.pt")["method"])
    model = method.build_model(10, for_state_dict=True)
    model.load_state_dict(_checkpoint(out / "last.pt")["model"])
    model.eval()
    for layer in ("conv1", "conv2", "conv3"):  # set here, independently of the run's code
        for quantizer in (model.get_submodule(layer).weight_quantizer, model.get_submodule(layer).input_quantizer):
            quantizer.set_bits(6)
    images, labels = _val_images(digits)
    with torch.no_grad():
        logits = model(images).double()
    metrics = pd.read_csv(out / "metrics.csv").iloc[-1]
    assert metrics["val_top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).double().mean().item(), abs=1e-9)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-5)


def _val_images(images_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(images_dir / "val"), transform=eval_transform(16))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.slow
def test_resumed_run_gives_bitwise_the_same_indicators(indicator_run: tuple[Path, str], digits: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    full, _ = indicator_run
    calls = []
    evaluate = run.evaluate

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(bit_policy_plots, "write_indicators_figure", lambda *args: [])  # (seconds each, not compared)
    with monkeypatch.context() as patch:
        patch.setattr(run, "evaluate", crash_in_second_epoch)
        interrupted = CliRunner().invoke(cli, _indicator_args(digits, part))
    assert interrupted.exit_code != 0 and _checkpoint(part / "last.pt")["epoch"] == 1
    after_first_epoch = (part / "indicators.json").read_bytes()
    invoke_cli(_indicator_args(digits, part) + ["--resume", str(part)])
    assert (part / "indicators.json").read_bytes() == (full / "indicators.json").read_bytes() != after_first_epoch
    a, b = _checkpoint(full / "last.pt"), _checkpoint(part / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["method"]["step"]["generator"], b["method"]["step"]["generator"])
    assert pd.read_csv(full / "metrics.csv").drop(columns="epoch_seconds").equals(
        pd.read_csv(part / "metrics.csv").drop(columns="epoch_seconds"))  # fmt: skip


# --------------------------------------------------------------------------- stages 2 and 3
@pytest.mark.slow
def test_the_indicators_feed_the_search_and_the_policy_fine_tunes(indicator_run: tuple[Path, str], digits: Path,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    out, _ = indicator_run
    policy_file = tmp_path / "policy.json"
    invoke_cli(["search-bit-policy", "--architecture", "tiny_limpq", "--indicators", str(out / "indicators.json"),
                "--image-size", "16", "--wb", "3", "--ab", "4", "--compression-ratio", "0", "--output", str(policy_file)])  # fmt: skip
    policy = json.loads(policy_file.read_text())
    assert policy["layers"] == ["conv1", "conv2", "conv3"]
    fine_tuned = tmp_path / "fine_tuned"
    invoke_cli(["train-compressed", "--architecture", "tiny_limpq", *COMMON, "--images-dir", str(digits), "--batch-size",
                "10", "--max-epochs", "1", "--act-quant", "--quant-setup", "LIMPQ", "--bit-policy", str(policy_file),
                "--grad-scaling", "--label-smoothing", "0.1", "--bn-est-batches", "2", "--save-checkpoint-dir",
                str(fine_tuned)])  # fmt: skip
    model, _ = run.restore_model(fine_tuned / "last.pt")
    layers = compressed_layers(model)
    expected = {"stem.0": (8, None), "fc": (8, 8)}  # LIMPQ: first conv W8 on the float image, classifier W8A8
    expected |= {name: (w, a) for name, w, a in zip(policy["layers"], policy["weight_bits"], policy["act_bits"])}
    assert list(layers) == ["stem.0", "conv1", "conv2", "conv3", "fc"]
    quantized_inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: quantized_inputs.__setitem__(
        name, module.quantize_input(args[0]).detach())) for name, layer in layers.items()]  # fmt: skip
    with torch.no_grad():
        model(_val_images(digits)[0])
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        weight_bits, act_bits = expected[name]
        weight = layer.effective_weight().detach()
        assert weight.numel() > 2**weight_bits  # a float tensor would have more distinct values
        assert layer.weight_quantizer.n_bits == weight_bits and len(torch.unique(weight)) <= 2**weight_bits, name
        if act_bits is None:
            assert layer.input_quantizer is None
            assert len(torch.unique(quantized_inputs[name])) > 2**8  # the image, unquantized
        else:
            assert layer.input_quantizer.n_bits == act_bits, name
            assert quantized_inputs[name].numel() > 2**act_bits
            assert len(torch.unique(quantized_inputs[name])) <= 2**act_bits, name


def test_limpq_quant_setup() -> None:
    names = ["first", "middle", "last"]
    assert layer_bit_widths(names, 3, QuantSetup.LIMPQ) == {"first": 8, "middle": 3, "last": 8}
    assert layer_bit_widths(names, 4, QuantSetup.LIMPQ, inputs=True) == {"first": None, "middle": 4, "last": 8}
    assert layer_bit_widths(names, 4, QuantSetup.LSQ_PAPER, inputs=True) == {"first": 8, "middle": 4, "last": 8}


# --------------------------------------------------------------------------- options and bad input
def test_the_options_are_the_config_and_default_to_the_recipe() -> None:
    command = cli.commands["train-indicators"]
    assert {param.name for param in command.params} < set(OPTION_GROUPS)
    parsed = command.make_context("train-indicators", ["--images-dir", "images"]).params  # the defaults, converted
    config = indicator_config_from_options(**parsed)
    recipe = INDICATOR_RECIPE.options()
    cli_side = {"images_dir", "num_workers", "device"}
    assert {name: config.options()[name] for name in parsed if name not in cli_side} == \
        {name: recipe[name] for name in parsed if name not in cli_side}  # fmt: skip
    assert (config.optim.sep_quant_optimizer, config.optim.quant_learning_rate, config.optim.quant_weight_decay) == \
        (False, config.optim.learning_rate, config.optim.weight_decay)  # fmt: skip
    assert config.indicators.bits == BITS and config.command == "train-indicators"


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "6,1"], "Invalid value for '--bits': 1 is outside 2..8"),
    (["--bits", "9"], "Invalid value for '--bits': 9 is outside 2..8"),
    (["--bits", "4,3,4"], "Invalid value for '--bits': 4 given more than once: each value once"),
    (["--bits", "2-4,3"], "Invalid value for '--bits': 3 given more than once"),
    (["--bits", "6-2"], "Invalid value for '--bits': the range '6-2' must be ascending: use 2-6"),
    (["--architecture", "tiny_mlp"], ("Invalid value for '--architecture': tiny_mlp has no searchable layers: "
                                      "LIMPQ searches every convolution but the first, and it has no other convolution")),
    (["--architecture", "fcn_resnet50"], ("Invalid value for '--architecture': --architecture 'fcn_resnet50' is a "
                                          "segmentation model, not a classifier")),
    (["--output-dir", str(Path(__file__))], f"Invalid value for '--output-dir': Directory '{Path(__file__)}' is a file"),
])  # fmt: skip
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    """Refused before any data is read (--images-dir does not even exist) and before any output is written."""
    assertone_line_cli_error(["train-indicators", "--architecture", "tiny_limpq", *COMMON, "--images-dir",
                              str(tmp_path / "images"), "--output-dir", str(tmp_path / "out"), *args], message, tmp_path)


@pytest.mark.slow
def test_too_small_images_are_one_line(digits: Path, tmp_path: Path) -> None:
    assertone_line_cli_error(["train-indicators", "--architecture", "tiny_limpq_11px", *COMMON, "--image-size", "8",
                              "--images-dir", str(digits), "--output-dir", str(tmp_path / "out"), "--batch-size", "8"],
                             "Error: tiny_limpq_11px does not run on 8x8 images (--image-size): ", tmp_path)  # fmt: skip


def assertone_line_cli_error(args: list[str], message: str, tmp_path: Path) -> None:
    """Exit code 2 for a usage error, 1 for another error (message "Error: ..."); one error line; nothing written."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == (1 if message.startswith("Error:") else 2), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_checkpoints_of_the_other_command_are_refused(indicator_run: tuple[Path, str], digits: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
    out, _ = indicator_run
    resumed = CliRunner().invoke(cli, ["train-compressed", "--architecture", "tiny_limpq", *COMMON, "--images-dir",
                                       str(digits), "--resume", str(out / "last.pt"), "--save-checkpoint-dir",
                                       str(tmp_path / "qat")])  # fmt: skip
    assert resumed.exit_code == 1
    assert resumed.output.strip().splitlines() == [
        f"Error: cannot resume from {out / 'last.pt'}: it was written by train-indicators, not train-compressed"]
    evaluated = CliRunner().invoke(cli, ["evaluate", "--images-dir", str(digits), "--checkpoint", str(out / "last.pt"),
                                         "--num-workers", "0", "--no-progress-bar"])  # fmt: skip
    assert evaluated.exit_code == 1
    assert evaluated.output.strip().splitlines() == [
        (f"Error: {out / 'last.pt'} was written by train-indicators: its result is indicators.json next to it "
         "(evaluate scores train-compressed checkpoints)")]  # fmt: skip
