"""LIMPQ's search end to end: indicator files, layer geometry, the ResNet-50 policy and `main.py search-bit-policy`."""
from __future__ import annotations

import collections
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from main import cli
from models import load_model
from models.bit_policy import parse_bit_policy, read_bit_policy
from models.geometry import layer_geometry
from studies import bit_policy_search
from studies.bit_policy_search import (
    BUNDLED_INDICATORS,
    BitPolicySearchError,
    SearchSettings,
    policy_document,
    search_problem,
    solve_search_problem,
    split_layers,
)
from studies.indicators import Indicators, IndicatorsError, read_indicators, write_indicators

PUBLISHED_PICKLE = Path("/work/shared/data/limpq/importance_indicators_resnet50.pkl")
# The policy LIMPQ published for ResNet-50 (its README): B = 6..2, W3A4 BitOPs, compression ratio 12.2.
PUBLISHED_WEIGHT_BITS = [6, 3, 4, 5, 4, 4, 5, 4, 4, 5, 4, 3, 4, 3, 3, 3, 4, 4, 3, 4, 4, 3, 4, 3, 2, 3, 2, 3, 2, 3, 3, 2,
                         2, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]  # fmt: skip
PUBLISHED_ACT_BITS = [6, 4, 6, 6, 6, 3, 4, 6, 3, 4, 5, 3, 5, 5, 6, 3, 4, 5, 3, 4, 5, 3, 4, 4, 4, 6, 5, 5, 4, 5, 5, 4, 6,
                      5, 3, 5, 6, 3, 5, 6, 3, 6, 4, 4, 6, 2, 6, 4, 6, 6, 4, 6]  # fmt: skip


# ---------------------------------------------------------------- indicator files

def small_indicators() -> Indicators:
    rng = np.random.default_rng(0)
    return Indicators(("a", "b.0"), (6, 4, 2), rng.random((2, 3)), rng.random((2, 3)))


def test_indicator_json_round_trip_in_the_official_layout(tmp_path: Path) -> None:
    indicators = small_indicators()
    write_indicators(tmp_path / "ind.json", indicators)
    data = json.loads((tmp_path / "ind.json").read_text())
    assert data["layer_name"] == ["a", "b.0"] and list(data["weight"]["a"]) == ["6", "4", "2"]
    assert data["act"]["b.0"]["2"] == indicators.act[1, 2]
    back = read_indicators(tmp_path / "ind.json")
    assert back.layers == indicators.layers and back.bits == indicators.bits
    np.testing.assert_array_equal(back.weight, indicators.weight)
    np.testing.assert_array_equal(back.act, indicators.act)


def test_pickle_with_module_prefix_and_bits_in_any_order(tmp_path: Path) -> None:
    data = {"weight": {"module.x": {"2": 0.5, "4": 0.25}}, "act": {"module.x": {"4": 0.1, "2": 0.2}},
            "layer_name": ["module.x"]}  # fmt: skip
    (tmp_path / "ind.pkl").write_bytes(pickle.dumps(data, protocol=4))
    indicators = read_indicators(tmp_path / "ind.pkl")
    assert indicators.layers == ("x",) and indicators.bits == (4, 2)
    np.testing.assert_array_equal(indicators.weight, [[0.25, 0.5]])
    np.testing.assert_array_equal(indicators.act, [[0.1, 0.2]])
    assert indicators.select_bits([2]).act.tolist() == [[0.2]]
    with pytest.raises(IndicatorsError, match="no values for 3 bits"):
        indicators.select_bits([3, 2])


def test_bad_indicator_files_are_one_line_errors(tmp_path: Path) -> None:
    good = {"weight": {"x": {"4": 0.1}}, "act": {"x": {"4": 0.2}}, "layer_name": ["x"]}
    cases = {
        "global.pkl": (pickle.dumps(collections.OrderedDict(good), protocol=4), "refusing the global collections"),
        "text.json": (b"not json", "not a readable JSON"),
        "keys.json": (json.dumps({"weight": {}}).encode(), 'expected an object with "weight"'),
        "missing.json": (json.dumps({**good, "layer_name": ["x", "y"]}).encode(), "one entry per layer"),
        "nan.json": (json.dumps({**good, "act": {"x": {"4": float("nan")}}}).encode(), "not a finite number"),
        "bits.json": (json.dumps({**good, "act": {"x": {"5": 0.2}}}).encode(), "has bit-widths"),
        "key.json": (json.dumps({**good, "act": {"x": {"four": 0.2}}}).encode(), "decimal strings"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(IndicatorsError, match=message) as caught:
            read_indicators(tmp_path / name)
        assert "\n" not in str(caught.value) and name in str(caught.value)
    with pytest.raises(IndicatorsError, match="cannot read indicators"):
        read_indicators(tmp_path / "absent.json")
    with pytest.raises(IndicatorsError, match="shape"):
        Indicators(("a",), (4, 2), np.ones((1, 3)), np.ones((1, 2)))
    with pytest.raises(IndicatorsError, match="each named once"):
        Indicators(("a", "a"), (4,), np.ones((2, 1)), np.ones((2, 1)))


@pytest.mark.skipif(not PUBLISHED_PICKLE.is_file(), reason="the published pickle is not at hand")
def test_bundled_json_holds_the_published_pickle() -> None:
    published, bundled = read_indicators(PUBLISHED_PICKLE), read_indicators(BUNDLED_INDICATORS)
    assert bundled.layers == published.layers and bundled.bits == published.bits == (6, 5, 4, 3, 2)
    np.testing.assert_array_equal(bundled.weight, published.weight)
    np.testing.assert_array_equal(bundled.act, published.act)
    assert (BUNDLED_INDICATORS.parent / "LICENSE").read_text().startswith("MIT License")


# ---------------------------------------------------------------- geometry

class Shapes(nn.Module):
    """Odd sizes, strides, dilation, groups, 'same' padding, a ConvTranspose, 1d convs and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 15 -> 8 (official 14/2 + 1 = 8: agrees)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)  # 8 -> 4 (official 7/2 + 1 = 4.5)
        self.dilated = nn.Conv2d(16, 16, (3, 1), padding="same", dilation=2, bias=False)  # 4x4 -> 4x4
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)  # 4 -> 8
        self.wide = nn.Conv1d(4, 6, 5, stride=3)  # length 64 -> floor(59/3) + 1 = 20 (official 59/3 + 1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.dilated(self.down(self.stem(x))))
        x = self.wide(x.flatten(2))
        return self.head(x.mean(2))


def test_geometry_floored_and_official_on_hand_computed_layers() -> None:
    geometry = layer_geometry(Shapes(), image_size=15)
    expected = {  # weight count, floored MACs, LIMPQ's MACs (true division, product truncated)
        "stem": (8 * 3 * 9, 8 * 3 * 9 * 8 * 8, 8 * 3 * 9 * 64),
        "down": (16 * 2 * 9, 16 * 2 * 9 * 4 * 4, 16 * 2 * 9 * int(4.5 * 4.5)),
        "dilated": (16 * 16 * 3, 16 * 16 * 3 * 16, 16 * 16 * 3 * 16),
        "up": (16 * 4 * 4, 16 * 4 * 4 * 16, 16 * 4 * 4 * 16),  # per input position
        "wide": (6 * 4 * 5, 6 * 4 * 5 * 20, 6 * 4 * 5 * int(59 / 3 + 1)),
        "head": (60, 60, 60),
    }
    assert list(geometry) == list(expected)
    for name, (count, macs, official) in expected.items():
        layer = geometry[name]
        assert (layer.weight_count, layer.macs, layer.official_macs) == (count, macs, official), name
    assert geometry["up"].kind == "ConvTranspose2d"


class DataDependent(nn.Module):
    """A forward that reads a value (no meta pass possible) and skips a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * 2 if float(x.abs().sum()) >= 0 else x


def test_geometry_of_a_data_dependent_model_leaves_it_unchanged() -> None:
    model = DataDependent().train()
    geometry = layer_geometry(model, image_size=10)  # 10 -> floor(7 / 2) + 1 = 4; official 7/2 + 1 = 4.5
    assert list(geometry) == ["conv"]  # the layer that does not run is left out
    assert (geometry["conv"].macs, geometry["conv"].official_macs) == (4 * 3 * 9 * 16, 4 * 3 * 9 * 20)
    assert model.training and model.conv.weight.device.type == "cpu" and not model.conv._forward_hooks


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return load_model("resnet50", pretrained=False)


@pytest.mark.slow
def test_resnet50_geometry(resnet50: nn.Module) -> None:
    geometry = layer_geometry(resnet50)
    assert round(sum(layer.macs for layer in geometry.values()) / 1e9, 3) == 4.089  # torchvision's _ops
    norms = sum(2 * module.num_features for module in resnet50.modules() if isinstance(module, nn.BatchNorm2d))
    total = sum(layer.weight_count for layer in geometry.values())
    assert total == 25_557_032 - norms - 1000  # torchvision's num_params less batch norms and the fc bias
    positions = {"conv1": (112 * 112, 12656), "layer1.0.conv2": (56 * 56, 56 * 56),
                 "layer2.0.conv2": (28 * 28, 812), "layer2.0.downsample.0": (28 * 28, 812),  # 28.5^2 = 812.25
                 "layer3.0.conv2": (14 * 14, 210), "layer4.0.conv2": (7 * 7, 56),  # 112.5^2, 14.5^2, 7.5^2
                 "layer4.2.conv3": (7 * 7, 7 * 7)}  # fmt: skip
    for name, (floored, official) in positions.items():
        layer = geometry[name]
        assert (layer.macs, layer.official_macs) == (layer.weight_count * floored, layer.weight_count * official)
    assert geometry["layer2.0.conv2"].official_macs == 128 * 128 * 9 * 812
    assert geometry["fc"].macs == geometry["fc"].official_macs == 2048 * 1000
    differing = sorted(name for name, layer in geometry.items() if layer.macs != layer.official_macs)
    assert differing == ["conv1"] + [f"layer{i}.0.{conv}" for i in (2, 3, 4) for conv in ("conv2", "downsample.0")]


# ---------------------------------------------------------------- the ResNet-50 search

@pytest.fixture(scope="module")
def published() -> Indicators:
    return read_indicators(BUNDLED_INDICATORS)


def solve(model: nn.Module, indicators: Indicators, **options) -> tuple:
    settings = SearchSettings(**options)
    problem = search_problem(model, indicators, settings)
    allocation = solve_search_problem(problem, settings)
    return problem, allocation, settings


@pytest.mark.slow
def test_published_policy_is_reproduced_with_the_official_geometry(resnet50: nn.Module, published: Indicators) -> None:
    searched, fixed = split_layers(resnet50)
    assert len(searched) == 52 and fixed == ["conv1", "fc"] and list(published.layers) == searched
    problem, allocation, settings = solve(resnet50, published, geometry="official")
    assert allocation.status == "optimal"
    assert list(allocation.weight_bits) == PUBLISHED_WEIGHT_BITS
    assert list(allocation.act_bits) == PUBLISHED_ACT_BITS
    document = policy_document(problem, allocation, settings)
    assert read_bit_policy_from(document).weight_bits == tuple(PUBLISHED_WEIGHT_BITS)
    assert document["compression_ratio"] >= 12.2 and document["bitops"] <= document["bitops_target"]
    assert document["fixed_layers"] == {"conv1": 8, "fc": 8}


def read_bit_policy_from(document: dict):
    return parse_bit_policy(json.loads(json.dumps(document)))


@pytest.mark.slow
def test_floored_geometry_changes_five_layers(resnet50: nn.Module, published: Indicators) -> None:
    """The spec's claim; and the published policy breaks the floored BitOPs budget (else it would be optimal)."""
    official = solve(resnet50, published, geometry="official")[1]
    problem, floored, _ = solve(resnet50, published, geometry="floored")
    changed = [name for name, *bits in zip(published.layers, official.weight_bits, official.act_bits,
                                           floored.weight_bits, floored.act_bits) if bits[:2] != bits[2:]]  # fmt: skip
    assert len(changed) == 5
    assert floored.objective > official.objective
    macs = np.array(problem.macs)
    published_bitops = int(np.sum(macs * np.array(PUBLISHED_WEIGHT_BITS) * np.array(PUBLISHED_ACT_BITS)))
    assert published_bitops > int(macs.sum()) * 3 * 4 >= floored.bitops


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:PULP_CBC_CMD is deprecated:DeprecationWarning")  # the CBC that PuLP bundles
def test_resnet50_optimum_matches_pulp_cbc(resnet50: nn.Module, published: Indicators) -> None:
    """The official formulation (25 binaries per layer, outliers at 1e8) solved by CBC: the same optimum."""
    pulp = pytest.importorskip("pulp")
    problem, ours, _ = solve(resnet50, published, geometry="floored")
    bits = published.bits
    weight, act = published.weight.copy(), published.act.copy()
    for scores in (weight, act):  # the official loop, on a copy
        outliers = [(layer, k + 1) for layer in range(len(scores)) for k in range(len(bits) - 1)
                    if scores[layer, k + 1] < scores[layer, k]]  # fmt: skip
        for layer, k in outliers:
            scores[layer, k] = 1e8
    ilp = pulp.LpProblem("limpq", pulp.LpMinimize)
    layers = range(len(problem.macs))
    x = {(l, i, j): ilp.add_variable(f"x_{l}_{i}_{j}", 0, 1, cat="Binary")
         for l in layers for i in range(5) for j in range(5)}  # fmt: skip
    ilp += pulp.lpSum((act[l, j] + 2.0 * weight[l, i]) * v for (l, i, j), v in x.items())
    for l in layers:
        ilp += pulp.lpSum(x[l, i, j] for i in range(5) for j in range(5)) == 1
    ilp += pulp.lpSum(problem.macs[l] * bits[i] * bits[j] * v for (l, i, j), v in x.items()) <= sum(problem.macs) * 12
    total = sum(problem.weight_counts) + problem.fixed_weight_count
    size = pulp.lpSum(problem.weight_counts[l] * bits[i] * v for (l, i, j), v in x.items())
    ilp += 8 * problem.fixed_weight_count + size <= 32 * total / 12.2
    ilp.solve(pulp.PULP_CBC_CMD(msg=0, gapRel=0, gapAbs=0))
    assert pulp.LpStatus[ilp.status] == "Optimal"
    assert ours.objective == pytest.approx(pulp.value(ilp.objective), rel=1e-12)


@pytest.mark.slow
def test_no_bitops_really_drops_the_constraint(resnet50: nn.Module, published: Indicators) -> None:
    with_bitops = solve(resnet50, published)[1]
    _, without, _ = solve(resnet50, published, bitops=False)
    assert without.bitops_target is None and without.objective < with_bitops.objective
    assert without.bitops > with_bitops.bitops_target  # the W3A4 budget no longer holds
    assert without.compression_ratio >= 12.2
    _, size_free, _ = solve(resnet50, published, compression_ratio=0.0)
    assert size_free.size_budget_bits is None and size_free.bitops <= size_free.bitops_target


@pytest.mark.slow
def test_infeasible_setting_is_an_error(resnet50: nn.Module, published: Indicators) -> None:
    problem, allocation, settings = solve(resnet50, published, wb=2, ab=4, compression_ratio=16.0)
    assert allocation.status == "infeasible"
    with pytest.raises(BitPolicySearchError, match="no bit policy meets BitOPs of W2A4 and compression ratio 16"):
        policy_document(problem, allocation, settings)


@pytest.mark.slow
def test_indicators_for_another_model_are_refused(published: Indicators) -> None:
    resnet18 = load_model("resnet18", pretrained=False)
    with pytest.raises(BitPolicySearchError, match="name 33 layers resnet18 does not have") as caught:
        search_problem(resnet18, published, SearchSettings(architecture="resnet18"))
    assert caught.value.option == "--indicators"
    searched, _ = split_layers(resnet18)
    partial = Indicators(tuple(searched[1:]), (4, 2), np.ones((len(searched) - 1, 2)), np.ones((len(searched) - 1, 2)))
    with pytest.raises(BitPolicySearchError, match="lack 1 of the 19 searched layers of resnet18: layer1.0.conv1"):
        search_problem(resnet18, partial, SearchSettings(architecture="resnet18"))
    with_fc = Indicators(("fc", *searched), (4, 2), np.ones((20, 2)), np.ones((20, 2)))
    with pytest.raises(BitPolicySearchError, match="kept at 8 bits outside the search .*: fc"):
        search_problem(resnet18, with_fc, SearchSettings(architecture="resnet18"))


# ---------------------------------------------------------------- the command

@pytest.mark.slow
def test_command_writes_a_bit_policy_file(tmp_path: Path) -> None:
    output = tmp_path / "out" / "policy.json"
    result = CliRunner().invoke(cli, ["search-bit-policy", "--bitops-geometry", "official", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("optimal: 52 layers, objective 4.61744") and str(output) in result.output
    policy = read_bit_policy(output)
    assert list(policy.weight_bits) == PUBLISHED_WEIGHT_BITS and list(policy.act_bits) == PUBLISHED_ACT_BITS
    document = json.loads(output.read_text())
    assert document["settings"]["geometry"] == "official" and document["settings"]["bits"] == [6, 5, 4, 3, 2]
    assert document["status"] == "optimal" and document["solve_seconds"] > 0 and document["solver"] == "dp"
    assert (output.parent / "policy.png").is_file() and (output.parent / "policy.pdf").is_file()

    # A second search drawn against the first; a policy of other layers is refused before anything is written.
    floored = tmp_path / "out" / "floored.json"
    result = CliRunner().invoke(cli, ["search-bit-policy", "--compare-with", str(output), "--output", str(floored)])
    assert result.exit_code == 0, result.output
    assert read_bit_policy(floored).layers == policy.layers and (floored.parent / "floored.png").is_file()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"layers": ["conv1"], "weight_bits": [4], "act_bits": [4]}))
    refused = tmp_path / "out" / "refused.json"
    result = CliRunner().invoke(cli, ["search-bit-policy", "--compare-with", str(other), "--output", str(refused)])
    assert result.exit_code == 2 and "'--compare-with'" in result.output and "policy of other layers" in result.output
    assert not refused.exists() and not (refused.parent / "refused.png").exists()

    # --no-figure: the same policy file, no figure beside it.
    bare = tmp_path / "bare" / "policy.json"
    result = CliRunner().invoke(cli, ["search-bit-policy", "--bitops-geometry", "official", "--no-figure",
                                      "--output", str(bare)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_bit_policy(bare) == policy and sorted(path.name for path in bare.parent.iterdir()) == ["policy.json"]


def test_command_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    output = tmp_path / "policy.json"
    with_global = tmp_path / "evil.pkl"
    with_global.write_bytes(pickle.dumps(collections.OrderedDict(), protocol=4))
    (tmp_path / "folder").mkdir()
    cases = [
        (["--no-bitops", "--compression-ratio", "0"], "'--compression-ratio': nothing to constrain"),
        (["--bits", "2,3,7"], "'--bits': the indicators have no values for 7 bits"),
        (["--bits", "1,2"], "1 is outside 2..8"),
        (["--indicators", str(tmp_path / "absent.json")], "'--indicators': cannot read indicators"),
        (["--indicators", str(with_global)], "refusing the global collections.OrderedDict"),
        (["--architecture", "fasterrcnn_resnet50_fpn"], "'--architecture': 'fasterrcnn_resnet50_fpn' is a detection"),
        (["--bitops-geometry", "exact"], "'--bitops-geometry'"),
        (["--no-figure", "--compare-with", str(with_global)], "'--compare-with': --compare-with draws into the figure"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["search-bit-policy", *args, "--output", str(output)])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    result = CliRunner().invoke(cli, ["search-bit-policy", "--output", str(tmp_path / "folder")])
    assert result.exit_code == 2 and "is a directory" in result.output
    assert not output.exists()


@pytest.mark.slow
def test_command_infeasible_setting_writes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "policy.json"
    args = ["search-bit-policy", "--wb", "2", "--ab", "4", "--compression-ratio", "16", "--output", str(output)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and not output.exists()
    assert result.output.startswith("Error: no bit policy meets") and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_command_data_free_indicators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--indicators weight-mse` hands the searched layers and bits to studies.data_free_indicators (stubbed here)."""
    from studies import data_free_indicators as module

    calls = []

    def fake(model, layers, bits, kind):
        calls.append((list(layers), tuple(bits), kind))
        ramp = np.outer(np.ones(len(layers)), np.arange(1.0, len(bits) + 1))  # falling with the bits: no outlier
        return Indicators(tuple(layers), tuple(bits), ramp, ramp)

    monkeypatch.setattr(module, "data_free_indicators", fake)
    monkeypatch.setattr(bit_policy_search, "_load_model", lambda name, pretrained: load_model(name, pretrained=False))
    output = tmp_path / "policy.json"
    result = CliRunner().invoke(cli, ["search-bit-policy", "--architecture", "resnet18", "--indicators", "weight-mse",
                                      "--bits", "2,4,6", "--output", str(output)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and calls[0][1:] == ((6, 4, 2), "weight-mse") and len(calls[0][0]) == 19
    assert read_bit_policy(output).layers == tuple(calls[0][0])


@pytest.mark.slow
def test_bundled_geometry_gives_the_policy_of_the_built_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's fast path (no model built) and the model's own geometry: the same policy file."""
    built = []
    real_load = bit_policy_search._load_model

    def load(name: str, pretrained: bool) -> nn.Module:
        built.append(name)
        return real_load(name, pretrained)

    monkeypatch.setattr(bit_policy_search, "_load_model", load)
    documents = []
    for bundled in (True, False):
        if not bundled:
            monkeypatch.setattr(bit_policy_search, "read_bundled_geometry", lambda architecture, image_size: None)
        for geometry in ("official", "floored"):
            output = tmp_path / f"{bundled}_{geometry}.json"
            settings = SearchSettings(geometry=geometry)
            bit_policy_search.run_bit_policy_search(settings, output, figure=False)
            document = json.loads(output.read_text())
            assert document.pop("solve_seconds") > 0
            documents.append(document)
    assert built == ["resnet50", "resnet50"]  # only without the bundled table
    assert documents[:2] == documents[2:] and documents[0]["weight_bits"] == PUBLISHED_WEIGHT_BITS
