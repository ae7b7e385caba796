"""``main.py train-compressed`` with PSGD (--psgd-target), --init-checkpoint and the CIFAR datasets (--dataset).

The runs use a tiny CNN registered in a private copy of the model registry (``tiny_psgd``: conv, batch
norm, conv, linear) on 16 px digits and on a fake CIFAR-100 archive written in the real format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_cifar import random_images, write_cifar100
from torch import nn
from train_helpers import interrupt_at_call, invoke_cli, private_registry, write_digits_dataset

from main import cli
from quantization.position_scaling import scaled_tensor_bits
from training import run
from training.cifar import CIFAR_MEAN, CIFAR_STD
from training.config import TrainConfig

COMMON = ["--architecture", "tiny_psgd", "--no-pretrained", "--num-workers", "0", "--no-progress-bar",
          "--bn-est-batches", "2", "--no-weight-quant", "--seed", "3"]  # fmt: skip
BITS = 4


class TinyPsgdNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _tiny(pretrained: bool) -> TinyPsgdNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return TinyPsgdNet()


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    """The tiny model in a private copy of the registry; one torch thread for the module's runs."""
    with private_registry({"tiny_psgd": _tiny}):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 training and 20 validation digits at 16 px."""
    return write_digits_dataset(tmp_path_factory.mktemp("digits"), per_class_train=8, per_class_val=2, image_size=16)


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _digits_args(digits: Path, out: Path, epochs: int) -> list[str]:
    return ["train-compressed", *COMMON, "--images-dir", str(digits), "--image-size", "16", "--batch-size", "8",
            "--max-epochs", str(epochs), "--learning-rate", "0.05", "--learning-rate-schedule", "constant",
            "--save-checkpoint-dir", str(out)]  # fmt: skip


def grid_distance(weight: torch.Tensor, bits: int) -> float:
    """Mean ``|w - T(w)| / delta`` on the weight's own symmetric restricted grid (``delta = max|w| / (2^(b-1) - 1)``);
    0 on the grid, about 0.25 for weights spread evenly between grid points."""
    level_max = 2 ** (bits - 1) - 1
    delta = weight.abs().max() / level_max
    nearest = torch.clamp(torch.round(weight / delta), -level_max, level_max) * delta
    return float(((weight - nearest).abs() / delta).mean())


def mean_grid_distance(state: dict, names: dict[str, int | None]) -> float:
    return float(np.mean([grid_distance(state[name].float(), bits) for name, bits in names.items()]))


@pytest.mark.slow
def test_psgd_pulls_the_weights_to_the_grid_and_resumes(digits: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a plain float run, then two epochs from its weights: plain, and PSGD towards the 4-bit grid
    invoke_cli(_digits_args(digits, tmp_path / "start", 1))
    start = tmp_path / "start" / "last.pt"
    from_start = ["--init-checkpoint", str(start), "--momentum", "0", "--weight-decay", "0"]
    psgd = ["--psgd-target", "grid", "--psgd-bits", str(BITS), "--psgd-lambda", "150"]
    invoke_cli(_digits_args(digits, tmp_path / "plain", 2) + from_start)
    invoke_cli(_digits_args(digits, tmp_path / "psgd", 2) + from_start + psgd)
    initial, plain, pulled = (_checkpoint(path) for path in
                              (start, tmp_path / "plain" / "last.pt", tmp_path / "psgd" / "last.pt"))  # fmt: skip
    scaled = scaled_tensor_bits(TinyPsgdNet(), BITS)  # (4 bits: every layer on the 4-bit grid)
    assert set(scaled.values()) == {BITS} and set(pulled["method"]["psgd"]) == set(scaled)
    before = mean_grid_distance(initial["model"], scaled)
    after_plain, after_psgd = mean_grid_distance(plain["model"], scaled), mean_grid_distance(pulled["model"], scaled)
    assert 0.2 < before < 0.3 and 0.2 < after_plain < 0.3  # spread evenly, as from a random init
    assert after_psgd < 0.8 * min(before, after_plain)
    moved = [not torch.equal(initial["model"][name], pulled["model"][name]) for name in scaled]
    assert all(moved)  # trained, not frozen
    # the runs started from the plain run's weights, not from the (seeded) random init
    config = TrainConfig.from_options(architecture="tiny_psgd", pretrained=False, weight_quant=False, image_size=16,
                                      init_checkpoint=str(start))  # fmt: skip
    built = run.CompressionTraining(config, None).build_model(10, for_state_dict=False).state_dict()
    assert built.keys() == initial["model"].keys()
    assert all(torch.equal(built[name], initial["model"][name]) for name in built)
    assert not torch.equal(_tiny(False).conv1.weight, built["conv1.weight"])

    # interrupted in its second epoch and resumed: bitwise the same weights and grid ranges
    crash_in_second_epoch = interrupt_at_call(run.train_one_epoch, 2)

    args = _digits_args(digits, tmp_path / "part", 2) + from_start + psgd
    with monkeypatch.context() as patch:
        patch.setattr(run, "train_one_epoch", crash_in_second_epoch)
        CliRunner().invoke(cli, args)
    assert _checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    invoke_cli(args + ["--resume", str(tmp_path / "part" / "last.pt")])
    resumed = _checkpoint(tmp_path / "part" / "last.pt")
    for name, tensor in pulled["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for name, ranges in pulled["method"]["psgd"].items():
        assert ranges.keys() == {"low", "high"}
        assert all(torch.equal(ranges[key], resumed["method"]["psgd"][name][key]) for key in ranges), name


def test_scaled_weight_decay_leaves_the_scaled_tensors_undecayed_by_the_optimizer(digits: Path, tmp_path: Path) -> None:
    invoke_cli(_digits_args(digits, tmp_path / "run", 1) + ["--psgd-target", "zero", "--psgd-scale-weight-decay",
                                                          "--psgd-linear-biases", "--weight-decay", "0.01"])  # fmt: skip
    checkpoint = _checkpoint(tmp_path / "run" / "last.pt")
    groups = checkpoint["optimizers"]["model"]["param_groups"]
    parameters = [name for name, _ in TinyPsgdNet().named_parameters()]
    decay = {group["weight_decay"]: len(group["params"]) for group in groups}
    scaled = scaled_tensor_bits(TinyPsgdNet(), None, linear_biases=True)
    assert set(scaled) == {"conv1.weight", "conv2.weight", "fc.weight", "fc.bias"}
    assert decay == {0.0: len(scaled), 0.01: len(parameters) - len(scaled)}
    assert set(checkpoint["method"]["psgd"]) == set()  # the zero target keeps no grid ranges


def _cifar_args(data_dir: Path, out: Path) -> list[str]:
    return ["train-compressed", *COMMON, "--dataset", "cifar100", "--data-dir", str(data_dir), "--batch-size", "16",
            "--max-epochs", "1", "--psgd-target", "grid", "--psgd-bits", "2", "--save-checkpoint-dir", str(out)]  # fmt: skip


@pytest.mark.slow
def test_cifar100_run_validates_on_the_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = (random_images(32, 0), rng.integers(0, 100, 32).tolist())
    test = (random_images(8, 1), rng.integers(0, 100, 8).tolist())
    write_cifar100(tmp_path / "data", train, test, archive=True)
    output = invoke_cli(_cifar_args(tmp_path / "data", tmp_path / "run"))
    checkpoint = _checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["step"] == 2 and checkpoint["num_classes"] == 100  # 32 images, batches of 16; 100 classes
    assert checkpoint["options"]["data"]["image_size"] == 32  # CIFAR's size without --image-size
    bits = scaled_tensor_bits(TinyPsgdNet(num_classes=100), 2)
    assert bits == {"conv1.weight": 8, "conv2.weight": 2, "fc.weight": 8}  # first and last layer at 8 below 4 bits
    assert set(checkpoint["method"]["psgd"]) == set(bits)
    # the validation metrics are the test split's, normalised with CIFAR's mean and std
    model = TinyPsgdNet(num_classes=100)
    model.load_state_dict(checkpoint["model"])
    images = torch.from_numpy(test[0]).permute(0, 3, 1, 2).float() / 255.0
    images = (images - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(images), torch.tensor(test[1])).item()
    final = checkpoint["history"][-1]
    assert final["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert f"loss {loss:.4f}" in output
    # evaluate: the checkpoint on the test split, and its float weights through --init-checkpoint (post hoc)
    evaluate = ["evaluate", "--data-dir", str(tmp_path / "data"), "--num-workers", "0", "--no-progress-bar"]
    assert f"loss {loss:.4f}" in invoke_cli(evaluate + ["--checkpoint", str(tmp_path / "run")])
    post_hoc = evaluate + ["--dataset", "cifar100", "--architecture", "tiny_psgd", "--no-pretrained",
                           "--init-checkpoint", str(tmp_path / "run" / "last.pt"), "--no-reestimate-bn-stats"]  # fmt: skip
    assert f"loss {loss:.4f}" in invoke_cli(post_hoc + ["--no-weight-quant"])
    assert f"loss {loss:.4f}" not in invoke_cli(post_hoc + ["--n-bits", "2", "--quant-setup", "all"])
    pruned = invoke_cli(post_hoc + ["--no-weight-quant", "--prune-method", "zhu_gupta", "--s-f", "0.5"])
    assert "sparsity 0.5000" in pruned and f"loss {loss:.4f}" not in pruned  # one-shot magnitude pruning, every layer


def _assertone_line_cli_error(args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and message in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_bad_inputs_are_one_line_errors(digits: Path, tmp_path: Path) -> None:
    base = _digits_args(digits, tmp_path / "run", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cifar = ["train-compressed", *COMMON, "--dataset", "cifar100", "--save-checkpoint-dir", str(tmp_path / "c")]
    cases = [
        (base + ["--psgd-target", "grid", "--psgd-bits", "9"], 2, "'--psgd-bits': 9 is not in the range 2<=x<=8"),
        (base + ["--psgd-target", "grid", "--psgd-bits", "1"], 2, "'--psgd-bits'"),
        (base + ["--psgd-bits", "2", "--psgd-lambda", "10"], 1,
         "--psgd-bits, --psgd-lambda only act with --psgd-target grid|zero"),
        (base + ["--psgd-target", "middle"], 2, "'--psgd-target': 'middle' is not one of 'grid', 'zero'"),
        (base + ["--psgd-target", "grid", "--weight-quant"], 1, "PSGD trains the float weights"),
        (base + ["--psgd-target", "zero", "--act-quant"], 1, "add --no-weight-quant and leave --act-quant off"),
        (cifar + ["--data-dir", str(empty)], 1, (f"CIFAR data not found in {empty}: put the extracted folder "
                                                 "cifar-100-python/ or the archive cifar-100-python.tar.gz there")),
        (cifar, 1, "--dataset cifar100 needs --data-dir"),
        (cifar + ["--data-dir", str(empty), "--image-size", "16"], 1, "--image-size 16 is not 32"),
        (cifar + ["--data-dir", str(empty), "--augmentation", "crop"], 1,
         "--augmentation only acts with --dataset folder (cifar100: the recipe's reflect-pad, crop and flip)"),
        (base + ["--augmentation", "zoom"], 2, "'--augmentation': 'zoom' is not one of 'resized-crop-flip', 'crop'"),
        (base + ["--init-checkpoint", str(garbage)], 1, f"--init-checkpoint {garbage}: cannot read checkpoint"),
        (["train-compressed", *COMMON], 2, "Missing option '--images-dir'"),
    ]
    for args, code, message in cases:
        _assertone_line_cli_error(args, code, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()
