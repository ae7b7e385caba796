"""``main.py train-compressed --prune-method block``: one-shot 1xN block masks, fixed while training, or raised on
Zhu & Gupta's schedule (``--prune-schedule zhu_gupta``), with QAT.

The runs use tiny CNNs registered in a private copy of the model registry, on 16 px digits: ``tiny_block``
(stem conv, conv 16->32, depthwise, 1x1 conv 32->34, grouped conv with 2 output channels per group, linear)
and ``tiny_residual`` (nothing in it can be rearranged: every channel space meets an addition or the output).
The expected masks are recomputed here with plain loops over the blocks.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from train_helpers import interrupt_at_call, invoke_cli, one_line_cli_error, private_registry, write_digits_dataset

from main import cli
from training import run
from training.config import TrainConfig

N, RATE = 4, 0.5
COMMON = ["--architecture", "tiny_block", "--no-pretrained", "--num-workers", "0", "--no-progress-bar",
          "--bn-est-batches", "2", "--seed", "3", "--image-size", "16"]  # fmt: skip
PRUNED = ("expand", "project")  # the first conv, the depthwise one, the narrow grouped one and the classifier are not


class TinyBlockNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 34, 1, bias=False)  # 34 = 8 * 4 + 2: a smaller last block
        self.bn3 = nn.BatchNorm2d(34)
        self.narrow = nn.Conv2d(34, 34, 1, groups=17, bias=False)  # 2 output channels per group < N
        self.bn4 = nn.BatchNorm2d(34)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(34, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.expand(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = torch.relu(self.bn3(self.project(x)))
        x = torch.relu(self.bn4(self.narrow(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyResidualNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.conv(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _seeded(cls: type[nn.Module]):
    def build(pretrained: bool) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return cls()

    return build


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    with private_registry({"tiny_block": _seeded(TinyBlockNet), "tiny_residual": _seeded(TinyResidualNet)}):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 training and 50 validation digits at 16 px."""
    return write_digits_dataset(tmp_path_factory.mktemp("digits"), per_class_train=20, per_class_val=5, image_size=16)


def _args(digits: Path, out: Path, *extra: str) -> list[str]:
    return ["train-compressed", *COMMON, "--images-dir", str(digits), "--batch-size", "10", "--max-epochs", "2",
            "--learning-rate", "0.05", "--learning-rate-schedule", "constant", "--save-checkpoint-dir", str(out),
            *extra]  # fmt: skip


def expected_pruned_blocks(weight: torch.Tensor, n: int, rate: float) -> set[tuple[int, int]]:
    """The ``floor(rate * blocks)`` blocks ``(first output channel, input channel)`` of lowest L1 norm, by plain loops."""
    c_out, c_in = weight.shape[:2]
    scores = {}
    for start in range(0, c_out, n):
        for j in range(c_in):
            scores[(start, j)] = float(sum(weight[c, j].abs().sum() for c in range(start, min(start + n, c_out))))
    count = math.floor(rate * len(scores))
    return set(sorted(scores, key=scores.get)[:count])


def pruned_blocks_of(mask: torch.Tensor, n: int) -> set[tuple[int, int]]:
    """The blocks a mask zeroes; asserts that it is a 1xN pattern (every block wholly kept or wholly pruned)."""
    c_out, c_in = mask.shape[:2]
    pruned = set()
    for start in range(0, c_out, n):
        for j in range(c_in):
            block = mask[start:min(start + n, c_out), j]
            assert bool(block.all()) or not bool(block.any()), (start, j)
            if not block.any():
                pruned.add((start, j))
    return pruned


@pytest.mark.slow
def test_block_pruning_with_qat_keeps_fixed_1x4_masks_of_the_lowest_blocks(digits: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        invoke_cli(_args(digits, out, "--prune-method", "block", "--block-size", str(N), "--s-f", str(RATE),
                         "--n-bits", "4"))  # fmt: skip
    assert any("not pruned" in r.message and "narrow" in r.message for r in caplog.records)
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    state = checkpoint["model"]
    initial = _seeded(TinyBlockNet)(False)  # the run's starting weights (--no-pretrained)
    summary = json.loads((out / "summary.json").read_text())
    for name in PRUNED:
        mask = state[f"{name}.weight_mask"]
        pruned = pruned_blocks_of(mask, N)
        weight = getattr(initial, name).weight.detach()
        assert pruned == expected_pruned_blocks(weight, N, RATE), name  # from the starting weights, kept to the end
        zeros = sum(min(N, weight.shape[0] - start) for start, _ in pruned) * weight[0, 0].numel()
        assert summary["layers"][name]["sparsity"] == pytest.approx(zeros / weight.numel()), name
        assert torch.all(state[f"{name}.weight"][~mask] == 0)
        assert not torch.allclose(state[f"{name}.weight"][mask], weight[mask])  # the kept weights were trained
    assert len(pruned_blocks_of(state["expand.weight_mask"], N)) == 64  # floor(0.5 * 8 rows * 16 inputs)
    assert len(pruned_blocks_of(state["project.weight_mask"], N)) == 144  # floor(0.5 * 9 rows * 32 inputs)
    for name in ("stem", "depthwise", "narrow", "fc"):
        assert bool(state[f"{name}.weight_mask"].all()) and summary["layers"][name]["sparsity"] == 0.0, name
    assert summary["layers"]["expand"]["weight_bits"] == 4  # quantization-aware training in the same run
    # evaluate: the checkpoint keeps its masks; without one, the starting weights are block-pruned once
    evaluate = ["evaluate", "--images-dir", str(digits), "--num-workers", "0", "--no-progress-bar",
                "--output-json"]  # fmt: skip
    invoke_cli([*evaluate, str(tmp_path / "eval.json"), "--checkpoint", str(out / "last.pt")])
    invoke_cli([*evaluate, str(tmp_path / "post.json"), *COMMON, "--prune-method", "block", "--s-f", str(RATE),
                "--no-weight-quant", "--no-reestimate-bn-stats"])  # fmt: skip
    for result in ("eval.json", "post.json"):
        layers = json.loads((tmp_path / result).read_text())["layers"]
        assert {name: layers[name]["sparsity"] for name in layers} == pytest.approx(
            {name: summary["layers"][name]["sparsity"] for name in layers}), result


def test_rearrange_permutes_the_float_network_before_the_masks(caplog: pytest.LogCaptureFixture) -> None:
    # rate 0: every mask keeps everything, so the built model is the rearranged network itself
    config = TrainConfig.from_options(architecture="tiny_block", pretrained=False, weight_quant=False, image_size=16,
                                      prune_method="block", s_f=0.0, rearrange=True)  # fmt: skip
    with caplog.at_level(logging.INFO):
        built = run.CompressionTraining(config, None).build_model(10, for_state_dict=False).eval()
    assert any("sorted the filters of" in r.message for r in caplog.records)
    original = _seeded(TinyBlockNet)(False).eval()

    def descending(weight: torch.Tensor) -> list[int]:
        norms = weight.detach().abs().sum(dim=(1, 2, 3))
        return sorted(range(len(norms)), key=lambda c: -float(norms[c]))

    # stem -> expand and expand -> depthwise -> project are permutable; project feeds the grouped conv: left alone
    stem_order, order = descending(original.stem.weight), descending(original.expand.weight)
    assert torch.equal(built.stem.weight.detach(), original.stem.weight.detach()[stem_order])
    assert torch.equal(built.expand.weight.detach(), original.expand.weight.detach()[order][:, stem_order])
    assert torch.equal(built.depthwise.weight.detach(), original.depthwise.weight.detach()[order])
    assert torch.equal(built.project.weight.detach(), original.project.weight.detach()[:, order])
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(built(images), original(images), atol=1e-5)


@pytest.mark.slow
def test_rearranged_block_run_trains(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "rearranged"
    invoke_cli(_args(digits, out, "--prune-method", "block", "--s-f", str(RATE), "--rearrange", "--no-weight-quant",
                     "--max-epochs", "1"))  # fmt: skip
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert len(pruned_blocks_of(state["expand.weight_mask"], N)) == 64
    assert len(pruned_blocks_of(state["project.weight_mask"], N)) == 144


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--prune-method", "block", "--block-size", "0"], "--block-size"),
        (["--prune-method", "block", "--s-f", "1.0"], "--s-f"),
        (["--block-size", "8"], "--block-size only acts with --prune-method block"),
        (["--prune-method", "block", "--block-size", "64"], "no layer to prune"),
        (["--prune-method", "block", "--rearrange", "--architecture", "tiny_residual"], "nothing to rearrange"),
    ],
)
def test_bad_block_options_are_one_line(digits: Path, tmp_path: Path, extra: list[str], expected: str) -> None:
    line = one_line_cli_error(_args(digits, tmp_path / "bad", "--no-weight-quant", *extra))
    assert expected in line


GRADUAL = ["--prune-method", "block", "--prune-schedule", "zhu_gupta", "--block-size", str(N), "--s-i", "0.1",
           "--s-f", str(RATE), "--prune-last-epoch", "1", "--delta-t", "5"]  # fmt: skip


@pytest.mark.slow
def test_gradual_block_pruning_with_qat_and_rearrange_ends_at_exactly_floor_p_blocks(
    digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "gradual"
    with caplog.at_level(logging.INFO):
        invoke_cli(_args(digits, out, *GRADUAL, "--n-bits", "4", "--rearrange", "--max-epochs", "4", "--optimizer", "adam",
                         "--learning-rate", "0.01"))  # fmt: skip
    assert any("sorted the filters of" in r.message for r in caplog.records)
    assert any("1xn pattern, --block-size 4" in r.message for r in caplog.records)  # the block rule, not magnitude
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
    summary = json.loads((out / "summary.json").read_text())
    for name in PRUNED:  # floor(0.5 * blocks) whole 1x4 blocks, their weights zero
        mask, weight = state[f"{name}.weight_mask"], state[f"{name}.weight"]
        blocks = math.ceil(weight.shape[0] / N) * weight.shape[1]
        pruned = pruned_blocks_of(mask, N)
        assert len(pruned) == math.floor(RATE * blocks), name
        zeros = sum(min(N, weight.shape[0] - start) for start, _ in pruned) * weight[0, 0].numel()
        assert summary["layers"][name]["sparsity"] == pytest.approx(zeros / weight.numel()), name
        assert torch.all(weight[~mask] == 0), name
    for name in ("stem", "depthwise", "narrow", "fc"):  # the layers the one-shot path skips
        assert bool(state[f"{name}.weight_mask"].all()), name
    assert summary["layers"]["expand"]["weight_bits"] == 4
    sparsity = [row["sparsity"] for row in csv.DictReader((out / "metrics.csv").open())]
    assert float(sparsity[0]) < float(sparsity[1]) == float(sparsity[3])  # the ramp ends in epoch 1
    assert summary["best_epoch"] >= 1 and summary["best_val_top1"] > 30.0  # best.pt at s_f only; chance: 10 %
    # evaluate keeps the checkpoint's masks
    evaluate = ["evaluate", "--images-dir", str(digits), "--num-workers", "0", "--no-progress-bar", "--checkpoint",
                str(out / "last.pt"), "--output-json", str(tmp_path / "eval.json")]  # fmt: skip
    invoke_cli(evaluate)
    layers = json.loads((tmp_path / "eval.json").read_text())["layers"]
    assert {name: layers[name]["sparsity"] for name in layers} == pytest.approx(
        {name: summary["layers"][name]["sparsity"] for name in layers})


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "pattern"), [("one-shot", "random"), ("zhu_gupta", "1xn"), ("zhu_gupta", "random")])
def test_interrupted_block_run_resumes_bitwise(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               schedule: str, pattern: str) -> None:  # fmt: skip
    """Interrupted in its second epoch (a gradual schedule is still rising there) and resumed: the same tensors."""
    start = GRADUAL if schedule == "zhu_gupta" else ["--prune-method", "block", "--s-f", str(RATE)]
    extra = [*start, "--block-pattern", pattern, "--deterministic", "--no-weight-quant", "--max-epochs", "2"]
    invoke_cli(_args(digits, tmp_path / "full", *extra))
    crash_in_second_epoch = interrupt_at_call(run.train_one_epoch, 2)

    with monkeypatch.context() as patch:
        patch.setattr(run, "train_one_epoch", crash_in_second_epoch)
        CliRunner().invoke(cli, _args(digits, tmp_path / "part", *extra))
    invoke_cli(_args(digits, tmp_path / "part", *extra, "--resume", str(tmp_path / "part" / "last.pt")))
    full, resumed = (torch.load(tmp_path / run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
                     for run_dir in ("full", "part"))  # fmt: skip
    assert all(torch.equal(full[name], resumed[name]) for name in full)  # the masks come back from the checkpoint
    for name in PRUNED:  # still exactly floor(p * blocks) whole blocks
        weight = full[f"{name}.weight"]
        blocks = math.ceil(weight.shape[0] / N) * weight.shape[1]
        assert len(pruned_blocks_of(full[f"{name}.weight_mask"], N)) == math.floor(RATE * blocks), name


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--prune-schedule", "zhu_gupta"], "--prune-schedule only acts with --prune-method block"),
        (["--prune-method", "zhu_gupta", "--prune-schedule", "zhu_gupta"], "--prune-schedule only acts"),
        ([*GRADUAL, "--s-i", "0.6"], "--s-i 0.6 must be in"),
        (["--prune-method", "block", "--delta-t", "7"], "--delta-t only acts with a pruning schedule"),
        ([*GRADUAL, "--prune-scope", "global"], "--prune-scope only acts with --prune-method zhu_gupta"),
        ([*GRADUAL, "--block-size", "64"], "no layer to prune"),
        ([*GRADUAL, "--rearrange", "--architecture", "tiny_residual"], "nothing to rearrange"),
    ],
)
def test_bad_gradual_block_options_are_one_line(digits: Path, tmp_path: Path, extra: list[str], expected: str) -> None:
    line = one_line_cli_error(_args(digits, tmp_path / "bad", "--no-weight-quant", *extra))
    assert expected in line
