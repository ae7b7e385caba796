"""`main.py train-compressed` and `main.py evaluate` on real images (scikit-learn's digits) on CPU.

ResNet-18 from random init at 16x16 pixels learns the digits well above chance (10%) in two
epochs, with 4-bit weights or with gradual pruning.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torchvision.datasets import ImageFolder
from train_helpers import invoke_cli, write_digits_dataset

from main import cli
from models.quantized import compressed_layers
from pruning.masks import num_pruned
from training import engine, run
from training.data import eval_transform

FAST = ["--architecture", "resnet18", "--no-pretrained", "--image-size", "16", "--num-workers", "0",
        "--no-progress-bar", "--bn-est-batches", "2", "--learning-rate", "0.05"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_dataset(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 training and 80 validation digits, plus one unreadable file in each split."""
    root = write_digits_dataset(tmp_path_factory.mktemp("small_digits"), per_class_train=24, per_class_val=8)
    (root / "train" / "3" / "broken.png").write_bytes(b"not an image")
    (root / "val" / "5" / "broken.png").write_bytes(b"not an image")
    return root


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain_evaluation(model: torch.nn.Module, images_dir: Path, image_size: int) -> tuple[float, float, float]:
    """Top-1, top-5 (percent) and mean loss with torchvision's ImageFolder, one image at a time."""
    dataset = ImageFolder(str(images_dir / "val"), transform=eval_transform(image_size),
                          is_valid_file=lambda p: not p.endswith("broken.png"))  # fmt: skip
    top1 = top5 = 0
    loss = 0.0
    model.eval()
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(dataset, batch_size=128):
            logits = model(images).double()
            for row, label in zip(logits, labels.tolist()):
                ranked = row.argsort(descending=True).tolist()
                top1 += ranked[0] == label
                top5 += label in ranked[:5]
                loss += float(-F.log_softmax(row, 0)[label])
    n = len(dataset)
    return 100 * top1 / n, 100 * top5 / n, loss / n


@pytest.mark.slow
def test_qat_learns_digits_with_weights_on_their_grid(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    invoke_cli(["train-compressed", *FAST, "--images-dir", str(digits), "--batch-size", "64", "--max-epochs", "2",
                "--n-bits", "4", "--quant-setup", "LSQ_paper", "--save-checkpoint-dir", str(out)])  # fmt: skip
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1]
    assert metrics["val_top1"].iloc[-1] > 40.0  # chance is 10%
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_top1"] == pytest.approx(metrics["val_top1"].iloc[-1])

    model, config = run.restore_model(out / "last.pt")
    assert config.quant.n_bits == 4
    checked = 0
    with torch.no_grad():
        for name, layer in compressed_layers(model).items():
            quantizer = layer.weight_quantizer
            integers = layer.effective_weight().double() / quantizer.step_size.double()
            assert torch.allclose(integers, integers.round(), atol=1e-3), name
            assert quantizer.q_min <= integers.round().min() and integers.round().max() <= quantizer.q_max
            assert len(integers.round().unique()) <= 2 ** quantizer.config.n_bits
            checked += 1
    assert checked == 21 and quantizer.config.n_bits == 8  # the last layer (fc) is at 8 bits

    # evaluate the checkpoint: same numbers as the training run's last evaluation and as a plain loop
    report = tmp_path / "eval.json"
    output = invoke_cli(["evaluate", "--images-dir", str(digits), "--checkpoint", str(out / "last.pt"), "--num-workers",
                         "0", "--batch-size", "50", "--no-progress-bar", "--output-json", str(report)])  # fmt: skip
    assert output.startswith("top-1 ")
    result = json.loads(report.read_text())
    assert result["top1"] == pytest.approx(metrics["val_top1"].iloc[-1], abs=1e-9)
    top1, top5, loss = _plain_evaluation(model, digits, 16)
    assert result["top1"] == pytest.approx(top1, abs=1e-9) and result["top5"] == pytest.approx(top5, abs=1e-9)
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["layers"]["layer1.0.conv1"]["weight_bits"] == 4 and result["layers"]["conv1"]["weight_bits"] == 8


@pytest.mark.slow
def test_gradual_pruning_learns_digits_at_exact_sparsity(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "prune"
    s_f = 0.6
    invoke_cli(["train-compressed", *FAST, "--images-dir", str(digits), "--batch-size", "64", "--max-epochs", "2",
                "--no-weight-quant", "--prune-method", "zhu_gupta", "--s-f", str(s_f), "--prune-last-epoch", "0",
                "--delta-t", "4", "--save-checkpoint-dir", str(out)])  # fmt: skip
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["val_top1"].iloc[-1] > 40.0
    state = _checkpoint(out / "last.pt")["model"]
    masks = {key[: -len(".weight_mask")]: value for key, value in state.items() if key.endswith("weight_mask")}
    assert len(masks) == 21
    for name, mask in masks.items():
        weight = state[f"{name}.weight"]
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int((~mask).sum()) == num_pruned(weight.numel(), s_f), name
        assert (weight[~mask] == 0).all() and int((weight == 0).sum()) == num_pruned(weight.numel(), s_f)
    assert metrics["sparsity"].iloc[-1] == pytest.approx(
        sum(num_pruned(m.numel(), s_f) for m in masks.values()) / sum(m.numel() for m in masks.values()), abs=1e-12)


@pytest.mark.slow
def test_global_pruning_with_quantization(small_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "both"
    invoke_cli(["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--max-epochs", "1",
                "--prune-method", "zhu_gupta", "--prune-scope", "global", "--s-f", "0.7", "--delta-t", "2",
                "--n-bits", "3", "--per-channel", "--save-checkpoint-dir", str(out)])  # fmt: skip
    model, _ = run.restore_model(out / "last.pt")
    layers = compressed_layers(model)
    total = sum(layer.weight.numel() for layer in layers.values())
    assert sum(int((~layer.weight_mask).sum()) for layer in layers.values()) == num_pruned(total, 0.7)
    sparsities = [float((~layer.weight_mask).float().mean()) for layer in layers.values()]
    assert max(sparsities) - min(sparsities) > 0.1  # one global threshold, not the same share per layer
    with torch.no_grad():
        for layer in layers.values():
            q = layer.weight_quantizer
            integers = layer.effective_weight() / q.step_size.reshape(-1, *[1] * (layer.weight.dim() - 1))
            assert torch.allclose(integers, integers.round(), atol=1e-3)
            assert (integers[~layer.weight_mask] == 0).all()  # pruned weights quantize to exactly zero
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["skipped_images"].iloc[0] in (1, 2)  # the broken validation file (and maybe the training one)


def _resume_args(images_dir: Path, out: Path) -> list[str]:
    return ["train-compressed", *FAST, "--images-dir", str(images_dir), "--batch-size", "32", "--max-epochs", "2",
            "--deterministic", "--act-quant", "--weight-quant-method", "current_minmax", "--prune-method", "zhu_gupta", "--s-f", "0.5", "--prune-last-epoch", "1",
            "--delta-t", "3", "--save-checkpoint-dir", str(out)]  # fmt: skip


@pytest.mark.slow
def test_resume_is_bitwise_identical(small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invoke_cli(_resume_args(small_digits, tmp_path / "full"))

    calls = []
    evaluate = run.evaluate

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(run, "evaluate", crash_in_second_epoch)
        interrupted = CliRunner().invoke(cli, _resume_args(small_digits, tmp_path / "part"))
    assert interrupted.exit_code != 0 and _checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    invoke_cli(_resume_args(small_digits, tmp_path / "part") + ["--resume", str(tmp_path / "part" / "last.pt")])

    full, resumed = _checkpoint(tmp_path / "full" / "last.pt"), _checkpoint(tmp_path / "part" / "last.pt")
    assert full["model"].keys() == resumed["model"].keys()
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for name in full["optimizers"]:
        for index, param_state in full["optimizers"][name]["state"].items():
            for key, value in param_state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizers"][name]["state"][index][key]))
    columns = ["train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "sparsity"]
    a, b = pd.read_csv(tmp_path / "full" / "metrics.csv"), pd.read_csv(tmp_path / "part" / "metrics.csv")
    assert len(a) == len(b) == 2 and a[columns].equals(b[columns])
    assert full["step"] == resumed["step"] == 14


@pytest.mark.slow
def test_resume_with_other_options_says_which(small_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--max-epochs", "2",
            "--save-checkpoint-dir", str(out), "--no-reestimate-bn-stats"]  # fmt: skip
    invoke_cli(args[:-1] + ["--no-reestimate-bn-stats", "--max-epochs", "1"])
    result = CliRunner().invoke(cli, args + ["--n-bits", "3", "--resume", str(out / "last.pt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--n-bits: 4 (checkpoint) vs 3 (now)" in result.output and "--max-epochs: 1 (checkpoint) vs 2" in result.output
    assert len(result.output.strip().splitlines()) == 1


OPTIONS_ADDED_SINCE_THE_FLAT_LAYOUT = ("warmup_epochs", "label_smoothing")


def _old_flat_options(nested: dict) -> dict:
    """The options as train-compressed wrote them before the nested config: one flat dict, without the options added since."""
    flat = {name: value for group in nested.values() for name, value in group.items()}
    return {name: value for name, value in flat.items() if name not in OPTIONS_ADDED_SINCE_THE_FLAT_LAYOUT}


@pytest.mark.slow
def test_checkpoints_of_earlier_versions_resume_and_evaluate(small_digits: Path, tmp_path: Path) -> None:
    """An option missing from the checkpoint counts with its default; one no version knows is named. A checkpoint
    of the flat layout (before the nested config) resumes bitwise like today's nested one."""
    out = tmp_path / "run"
    args = ["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--deterministic",
            "--no-reestimate-bn-stats"]  # fmt: skip
    invoke_cli(args + ["--max-epochs", "1", "--save-checkpoint-dir", str(out)])
    checkpoint = _checkpoint(out / "last.pt")
    assert set(checkpoint["options"]) == {"model", "data", "optim", "quant", "bn", "pruning", "psgd", "indicators",
                                           "runtime"}
    checkpoint["options"]["optim"]["max_epochs"] = 2  # as if interrupted after the first of two epochs
    del checkpoint["options"]["optim"]["quant_weight_decay"]  # as if written before the option existed (default 0.0)
    old = dict(checkpoint, options=_old_flat_options(checkpoint["options"]))
    assert "n_bits" in old["options"] and "label_smoothing" not in old["options"]
    files = {"nested": out / "nested.pt", "flat": out / "flat.pt"}
    torch.save(checkpoint, files["nested"])
    torch.save(old, files["flat"])
    resume = args + ["--max-epochs", "2"]
    for layout, path in files.items():
        invoke_cli(resume + ["--save-checkpoint-dir", str(tmp_path / layout), "--resume", str(path)])
    nested, flat = _checkpoint(tmp_path / "nested" / "last.pt"), _checkpoint(tmp_path / "flat" / "last.pt")
    assert nested["epoch"] == flat["epoch"] == 2 and flat["model"].keys() == nested["model"].keys()
    for key, value in nested["model"].items():
        assert torch.equal(value, flat["model"][key]), key
    assert flat["options"]["optim"]["label_smoothing"] == 0.0  # written back nested, with every option

    restored = {layout: run.restore_model(path)[1] for layout, path in files.items()}  # evaluation reads both
    assert restored["flat"] == restored["nested"] and restored["flat"].optim.warmup_epochs == 0

    for layout, path in files.items():
        for option, message in [("--quant-weight-decay", "--quant-weight-decay: 0.0 (checkpoint) vs 0.1 (now)"),
                                ("--label-smoothing", "--label-smoothing: 0.0 (checkpoint) vs 0.1 (now)")]:  # fmt: skip
            changed = CliRunner().invoke(cli, resume + [option, "0.1", "--resume", str(path)])
            assert changed.exit_code == 1 and message in changed.output, (layout, changed.output)
    checkpoint["options"]["optim"]["dropout_rate"] = 0.5
    old["options"]["dropout_rate"] = 0.5
    for layout, saved in {"nested": checkpoint, "flat": old}.items():
        torch.save(saved, out / "other.pt")
        unknown = CliRunner().invoke(cli, resume + ["--resume", str(out / "other.pt")])
        assert unknown.exit_code == 1 and "Traceback" not in unknown.output, (layout, unknown.output)
        assert "unknown options dropout_rate (written by another train-compressed)" in unknown.output, layout
        assert len(unknown.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_channel_scope_warmup_and_label_smoothing(small_digits: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every output channel ends at --s-f exactly; the learning rate warms up for one epoch; only the training loss
    is smoothed."""
    out, s_f, lr = tmp_path / "channel", 0.6, 0.05
    loss_functions = []
    train_one_epoch = run.train_one_epoch

    def recording(*args, **kwargs):
        loss_functions.append(kwargs["loss_fn"])
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(run, "train_one_epoch", recording)
    invoke_cli(["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--max-epochs", "2",
                "--no-weight-quant", "--prune-method", "zhu_gupta", "--prune-scope", "channel", "--s-f", str(s_f),
                "--prune-last-epoch", "0", "--delta-t", "2", "--warmup-epochs", "1", "--label-smoothing", "0.1",
                "--save-checkpoint-dir", str(out)])  # fmt: skip
    model, config = run.restore_model(out / "last.pt")
    assert config.pruning.prune_scope == "channel" and config.optim.label_smoothing == 0.1
    layers = compressed_layers(model)
    assert len(layers) == 21
    for name, layer in layers.items():
        channels = layer.weight.shape[0]
        expected = [num_pruned(layer.weight[0].numel(), s_f)] * channels
        assert (~layer.weight_mask).reshape(channels, -1).sum(dim=1).tolist() == expected, name
        assert (layer.weight == 0).reshape(channels, -1).sum(dim=1).tolist() == expected, name

    # 7 steps per epoch: the warm-up ends at lr, then cosine over the remaining 7 steps down to 0.01 lr
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["lr"]) == pytest.approx([lr, 0.01 * lr], rel=1e-12)
    logits, targets = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 9])
    assert len(loss_functions) == 2
    for loss_fn in loss_functions:
        assert torch.equal(loss_fn(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))
    _, _, plain_loss = _plain_evaluation(model, small_digits, 16)
    assert metrics["val_loss"].iloc[-1] == pytest.approx(plain_loss, rel=1e-4)  # evaluated without smoothing


def test_every_option_has_one_place_in_the_config() -> None:
    """The flags of train-compressed are the config's options (same names, same defaults); flat and nested agree."""
    from training.cli_options import config_from_options
    from training.config import OPTION_GROUPS, TrainConfig, differing_options, saved_config

    command = cli.commands["train-compressed"]
    evaluate_only = {"act_range"}  # post-hoc activation ranges
    assert {param.name for param in command.params} == {name for name, group in OPTION_GROUPS.items()
                                                         if group != "indicators"} - evaluate_only  # fmt: skip
    evaluate_options = {param.name for param in cli.commands["evaluate"].params} - {"checkpoint", "output_json"}
    assert evaluate_only < evaluate_options < set(OPTION_GROUPS)
    defaults = {param.name: param.default for param in command.params}
    config = config_from_options(**defaults)
    expected = {name: value for name, value in TrainConfig().options().items()
                if OPTION_GROUPS[name] != "indicators" and name not in evaluate_only}  # fmt: skip
    for name in ("images_dir", "num_workers", "device", "optimizer", "quant_optimizer"):  # CLI-side defaults
        del defaults[name], expected[name]
    assert {name: value for name, value in config.options().items() if name in expected} == expected
    assert {name: value for name, value in defaults.items() if name in expected} == expected

    config = TrainConfig.from_options(n_bits=3, s_f=0.5, label_smoothing=0.2, device="cuda:1")
    assert (config.quant.n_bits, config.pruning.s_f, config.optim.label_smoothing, config.runtime.device) == \
        (3, 0.5, 0.2, "cuda:1")  # fmt: skip
    assert config.model == TrainConfig().model and config.with_options(n_bits=3) == config
    assert saved_config(config.as_dict()) == config == saved_config(config.options())  # nested and flat layouts
    assert list(config.options()) == list(OPTION_GROUPS)
    old = _old_flat_options(TrainConfig().as_dict())
    assert differing_options(old, TrainConfig.from_options(label_smoothing=0.1, n_bits=8, device="cuda")) == [
        "--label-smoothing: 0.0 (checkpoint) vs 0.1 (now)", "--n-bits: 4 (checkpoint) vs 8 (now)"]  # fmt: skip
    with pytest.raises(ValueError, match="^unknown options dropout_rate, nbits$"):
        TrainConfig().with_options(nbits=3, dropout_rate=0.1)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_digits: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "run"
    args = ["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--max-epochs", "2",
            "--save-checkpoint-dir", str(out)]  # fmt: skip
    calls = []
    evaluate = run.evaluate

    def crash_in_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(run, "evaluate", crash_in_second_epoch)
        CliRunner().invoke(cli, args)
    good = (out / "last.pt").read_bytes()

    cross_entropy = F.cross_entropy
    with monkeypatch.context() as patch:  # the loss turns NaN three steps into the resumed epoch
        steps = []
        patch.setattr(engine.F, "cross_entropy",
                      lambda *a, **k: cross_entropy(*a, **k) * (math.nan if steps.append(1) or len(steps) > 3 else 1))
        result = CliRunner().invoke(cli, args + ["--resume", str(out / "last.pt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the loss is nan at training step 10" in result.output
    assert f"the last good checkpoint is {out / 'last.pt'}" in result.output
    assert (out / "last.pt").read_bytes() == good


@pytest.mark.slow
def test_evaluate_post_training_starting_point(small_digits: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    output = invoke_cli(["evaluate", "--images-dir", str(small_digits), "--architecture", "mobilenet_v2",
                         "--no-pretrained", "--image-size", "16", "--num-workers", "0", "--no-progress-bar",
                         "--batch-size", "16", "--bn-est-batches", "2", "--n-bits", "5", "--quant-setup", "all",
                         "--prune-method", "zhu_gupta", "--s-f", "0.3", "--output-json", str(report)])  # fmt: skip
    assert "(80 images)" in output
    result = json.loads(report.read_text())
    assert result["images"] == 80 and result["skipped_images"] == 1
    assert set(result) >= {"top1", "top5", "loss", "layers", "sparsity"}
    assert 0 <= result["top1"] <= result["top5"] <= 100 and result["loss"] > 0
    for name, layer in result["layers"].items():
        assert layer["weight_bits"] == 5 and layer["act_bits"] is None
        assert layer["sparsity"] == num_pruned(layer["numel"], 0.3) / layer["numel"], name


def test_bad_inputs_are_one_line_errors(small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default --save-checkpoint-dir is relative: runs/train_compressed
    no_val = tmp_path / "no_val"
    (no_val / "train" / "a").mkdir(parents=True)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {}, "options": argparse.Namespace(n_bits=4), "epoch": 1}, pickled)
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / "resnet18-f37072fd.pth").write_bytes(b"garbage")
    a_file = tmp_path / "somefile.txt"
    a_file.write_text("not a folder")
    base = ["train-compressed", *FAST, "--images-dir", str(small_digits), "--save-checkpoint-dir", str(tmp_path / "o"),
            "--batch-size", "32"]  # fmt: skip
    pruning = base + ["--prune-method", "zhu_gupta", "--max-epochs", "2"]
    evaluate = ["evaluate", "--images-dir", str(small_digits), "--no-progress-bar", "--num-workers", "0"]
    cases = [
        (["train-compressed", "--images-dir", str(no_val)], 1, "has no val/ folder"),
        (["train-compressed", "--images-dir", str(tmp_path / "nowhere")], 1, "is not a folder"),
        (["train-compressed"], 2, "Missing option '--images-dir'"),
        (base + ["--s-f", "1.0"], 2, "--s-f"),
        (base + ["--s-f", "-0.1"], 2, "--s-f"),
        (base + ["--learning-rate-schedule", "cosine:fast"], 2, "eta_min 'fast' is not a number"),
        (base + ["--learning-rate-schedule", "step:3"], 2, "--learning-rate-schedule"),
        (base + ["--quant-learning-rate-schedule", "multistep:5:2"], 2, "increasing epochs"),
        (base + ["--architecture", "resnet19"], 2, "unknown --architecture 'resnet19'"),
        (base + ["--prune-method", "zhu_gupta", "--s-i", "0.5", "--s-f", "0.2"], 1, "--s-i 0.5"),
        (base + ["--batch-size", "1000"], 1, "too few for one batch"),
        (evaluate + ["--checkpoint", str(garbage)], 1, f"cannot read checkpoint {garbage}: not a torch file"),
        (evaluate + ["--checkpoint", str(pickled)], 1, "holds pickled Python objects (argparse.Namespace)"),
        (base + ["--pretrained", "--model-dir", str(weights_dir)], 1, "cannot read pretrained weights"),
        (pruning + ["--prune-last-epoch", "15"], 2, "'--prune-last-epoch': epoch 15 is not in a run of --max-epochs 2"),
        (pruning + ["--prune-epoch-start", "2"], 2, "(epochs count from 0: at most 1)"),
    ]
    output_cases = [
        (base + ["--save-checkpoint-dir", str(a_file)], 2, "somefile.txt' is a file"),
        (base + ["--tb-logging-dir", str(a_file / "tb")], 2, "'--tb-logging-dir': cannot create"),
        (evaluate + ["--output-json", str(a_file / "report.json")], 2, "somefile.txt' is a file, not a folder"),
        (evaluate + ["--output-json", str(tmp_path)], 2, "is a directory"),  # click's own check
        (evaluate + ["--output-json", str(a_file / "a" / "b.json")], 2, "'--output-json': cannot create"),
    ]
    if not run.tensorboard_available():
        cases.append((base + ["--tb-logging-dir", str(tmp_path / "tb")], 1, "needs the tensorboard package"))
    for args, code, message in cases:
        _assertone_line_cli_error(args, code, message)
    with monkeypatch.context() as patch:  # output paths are checked before any work
        patch.setattr(run, "evaluate_run", lambda *a, **k: pytest.fail("evaluated despite a bad --output-json"))
        patch.setattr(run, "train", lambda *a, **k: pytest.fail("trained despite a bad output folder"))
        for args, code, message in output_cases:
            _assertone_line_cli_error(args, code, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()  # bad inputs create no folder


def _assertone_line_cli_error(args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, (args, result.output)
    assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert "weights_only" not in result.output  # never an advice to load unsafely
    assert len(result.output.strip().splitlines()) == 1 or code == 2, result.output


def _scripted_top1(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """Make the validation top-1 of successive epochs ``values`` (the other metrics stay real)."""
    real = run.evaluate
    scripted = iter(values)
    monkeypatch.setattr(run, "evaluate", lambda *a, **k: dataclasses.replace(real(*a, **k), top1=next(scripted)))


@pytest.mark.slow
def test_best_checkpoint_is_at_the_final_sparsity(small_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Epoch 0 scores higher but is still at the ramp's sparsity: best.pt is epoch 1, at --s-f exactly."""
    out = tmp_path / "prune"
    s_f = 0.6
    _scripted_top1(monkeypatch, [90.0, 50.0])
    with caplog.at_level(logging.INFO):
        output = invoke_cli(["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32",
                             "--max-epochs", "2", "--no-weight-quant", "--prune-method", "zhu_gupta", "--s-f", str(s_f),
                             "--prune-last-epoch", "1", "--delta-t", "2", "--save-checkpoint-dir", str(out)])  # fmt: skip
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["val_top1"]) == [90.0, 50.0] and metrics["sparsity"].iloc[0] < s_f - 0.05
    best, last = _checkpoint(out / "best.pt"), _checkpoint(out / "last.pt")
    assert best["epoch"] == 2 and best["best_epoch"] == 1 and best["best_top1"] == 50.0
    for key, value in last["model"].items():
        assert torch.equal(value, best["model"][key]), key
    masks = {key[: -len(".weight_mask")]: value for key, value in best["model"].items() if key.endswith("weight_mask")}
    for name, mask in masks.items():
        assert int((~mask).sum()) == num_pruned(mask.numel(), s_f), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["best_val_top1"] == 50.0
    assert summary["best_checkpoint"] == str(out / "best.pt")
    assert "(best.pt: top-1 50.00% at epoch 1)" in output

    # what the run told the user: header, new head, unreadable images, where the outputs went
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("train-compressed: resnet18 (random init)") and
               "10 classes, 241 training and 81 validation images" in m for m in messages), messages  # fmt: skip
    assert any(m.startswith("compression: float weights, float activations, zhu_gupta pruning (layer) from sparsity 0 "
                            "in epoch 0 to 0.6 at the end of epoch 1") for m in messages), messages  # fmt: skip
    assert any(f"checkpoints and metrics in {out}" in m for m in messages)
    assert any("replaced the 1000-way classifier head 'fc' by a new 10-way one" in m for m in messages)
    assert best["model"]["fc.weight"].shape == (10, 512) and best["num_classes"] == 10
    skipped = [r for r in caplog.records if r.levelno == logging.WARNING and "unreadable images" in r.getMessage()]
    assert len(skipped) == 1 and "broken.png" in skipped[0].getMessage()  # warned once, with the paths
    assert skipped[0].getMessage().startswith(f"{int(metrics['skipped_images'].iloc[0])} unreadable images")
    assert any(f"wrote last {out / 'last.pt'}, best {out / 'best.pt'} (epoch 1, val top-1 50.00%), "
               f"{out / 'metrics.csv'} and {out / 'summary.json'}" in m for m in messages), messages  # fmt: skip


@pytest.mark.slow
def test_best_checkpoint_without_pruning_is_any_epoch(small_digits: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "qat"
    _scripted_top1(monkeypatch, [90.0, 50.0])
    output = invoke_cli(["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32",
                         "--max-epochs", "2", "--n-bits", "4", "--save-checkpoint-dir", str(out)])  # fmt: skip
    assert _checkpoint(out / "best.pt")["epoch"] == 1 and "(best.pt: top-1 90.00% at epoch 0)" in output


@pytest.mark.slow
def test_default_prune_last_epoch_of_a_short_run_is_moved_with_a_warning(
    small_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        invoke_cli(["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--max-epochs",
                    "1", "--no-weight-quant", "--prune-method", "zhu_gupta", "--s-f", "0.5", "--delta-t", "2",
                    "--no-reestimate-bn-stats", "--save-checkpoint-dir", str(out)])  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ("--prune-last-epoch 15 is beyond this run's last epoch (--max-epochs 1): pruning reaches --s-f 0.5 at "
            "the end of epoch 0 instead") in warnings  # fmt: skip
    assert _checkpoint(out / "best.pt")["epoch"] == 1  # the one epoch ends at --s-f


@pytest.mark.slow
def test_evaluate_a_checkpoint_refuses_other_model_options(small_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    invoke_cli(["train-compressed", *FAST, "--images-dir", str(small_digits), "--batch-size", "32", "--max-epochs", "1",
                "--n-bits", "4", "--no-reestimate-bn-stats", "--save-checkpoint-dir", str(out)])  # fmt: skip
    evaluate = ["evaluate", "--images-dir", str(small_digits), "--checkpoint", str(out), "--num-workers", "0",
                "--no-progress-bar"]  # fmt: skip
    conflicting = ["--n-bits", "3", "--architecture", "mobilenet_v2", "--batch-size", "8"]
    refused = CliRunner().invoke(cli, evaluate + conflicting)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"--checkpoint {out} fixes every model and compression option" in refused.output
    assert "drop --architecture mobilenet_v2 (checkpoint: resnet18); --n-bits 3 (checkpoint: 4)" in refused.output
    assert "only --images-dir, --batch-size," in refused.output
    # the checkpoint's own values, the paper's alias of the architecture and the evaluation options are fine
    same = invoke_cli(evaluate + ["--n-bits", "4", "--architecture", "resnet18_quantized", "--batch-size", "8"])
    assert same.startswith("top-1 ") and "(80 images)" in same


def test_optimizer_choices_and_defaults_agree() -> None:
    result = CliRunner().invoke(cli, ["train-compressed", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--optimizer [sgd|adam] [default: sgd]" in text and "--quant-optimizer [sgd|adam] [default: adam]" in text
    assert "best.pt: the best validation top-1 among the epochs at the final sparsity" in text
