"""Tests of the small entry points: main.py (list-models, predict) and post_training list-layers."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from main import cli
from post_training_quant_acts_sqnr import cli as post_training_cli
from utils.images import load_sample_photo


def test_list_models_marks_weights_at_hand(torch_home: Path) -> None:
    result = CliRunner().invoke(cli, ["list-models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) > 100
    assert any(line.startswith("efficientnet_lite0") and line.endswith("weights at hand") for line in lines)
    assert any(line.startswith("resnet18 ") and line.endswith("needs download") for line in lines)
    assert any(line.startswith("mobilenet_v1 ") and line.endswith("no pretrained weights") for line in lines)
    available = CliRunner().invoke(cli, ["list-models", "--available"]).output.split()
    assert available[0] == "efficientnet_lite0" and "resnet18" not in available
    detection = CliRunner().invoke(cli, ["list-models", "--task", "detection"]).output.splitlines()
    assert len(detection) == 12 and all(" detection " in line for line in detection)


@pytest.mark.slow
def test_predict_sample_photos_and_a_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["predict", "--device", "cpu", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    by_photo = dict(line.split(": ", 1) for line in result.output.splitlines())
    assert by_photo["coffee"].startswith("967 espresso")
    assert all(f"{i} " in by_photo["chelsea"] for i in (285, 281, 282))

    image = tmp_path / "cup.png"
    load_sample_photo("coffee").save(image)
    single = CliRunner().invoke(cli, ["predict", "--device", "cpu", "--image", str(image), "--top-k", "1"])
    assert single.exit_code == 0, single.output
    assert single.output.startswith(f"{image}: 967 espresso (") and len(single.output.splitlines()) == 1


def test_predict_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    cases = [
        (["predict", "--image", str(not_an_image)], 1, "cannot read image"),
        (["predict", "--model-name", "fcn_resnet50"], 2, "is a segmentation model"),
        (["predict", "--model-name", "fasterrcnn_resnet50_fpn"], 2, "is a detection model, not a classification"),
        (["predict", "--model-name", "raft_small"], 2, "is a torchvision optical-flow model outside the zoo"),
        (["predict", "--model-name", "nope"], 2, "unknown model 'nope'"),
        (["predict", "--top-k", "0"], 2, "--top-k"),
    ]
    for args, code, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_list_layers() -> None:
    result = CliRunner().invoke(post_training_cli, ["list-layers"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 50
    assert lines[0].split() == ["_conv_stem", "Conv2d", "(32,", "3,", "3,", "3)"]
    assert lines[-1].split() == ["_fc", "Linear", "(1000,", "1280)"]
    unknown = CliRunner().invoke(post_training_cli, ["list-layers", "--model-name", "nope"])
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.output



def test_output_paths_are_checked_without_creating_anything(tmp_path: Path) -> None:
    import pytest

    from utils.io import OutputPathError, check_output_path

    a_file = tmp_path / "somefile.txt"
    a_file.write_text("x")
    assert check_output_path(tmp_path / "new" / "deeper" / "report.json") == tmp_path / "new" / "deeper" / "report.json"
    assert check_output_path(tmp_path / "runs" / "a", "dir") == tmp_path / "runs" / "a"
    assert check_output_path(a_file) == a_file and check_output_path(tmp_path, "dir") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt"]  # nothing created
    cases = [
        (a_file / "r.json", "file", f"cannot create '{a_file / 'r.json'}': '{a_file}' is a file, not a folder"),
        (a_file / "x" / "y", "dir", f"'{a_file}' is a file, not a folder"),
        (a_file, "dir", f"'{a_file}' is a file, not a folder"),
        (tmp_path, "file", f"'{tmp_path}' is a folder, not a file"),
    ]
    for path, kind, message in cases:
        with pytest.raises(OutputPathError) as error:
            check_output_path(path, kind)
        assert message in str(error.value)
