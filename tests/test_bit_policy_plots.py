"""Tests for the bit-policy and indicator figures: files written, plotted data equal to the input, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from models.bit_policy import BitPolicy, read_bit_policy
from studies.bit_policy_plots import (
    bit_policy_figure,
    differing_layers,
    fix_layout,
    indicators_figure,
    write_bit_policy_figure,
    write_indicators_figure,
)
from studies.indicators import Indicators

LAYERS = ("conv_stem", "blocks.0.conv_dw", "blocks.0.conv_pw", "blocks.1.conv_dw", "fc")
LEARNED = BitPolicy(LAYERS, (None, 4, 3, 2, 8), (None, 6, 4, 3, 8))
DATA_FREE = BitPolicy(LAYERS, (None, 4, 5, 2, 8), (8, 6, 4, 2, 8))  # differs at layers 0 (act), 2 (weight), 3 (act)


def bars(ax: Axes) -> dict[str, BarContainer]:
    return {container.get_label(): container for container in ax.containers}


def heights(container: BarContainer) -> np.ndarray:
    return np.array([patch.get_height() for patch in container.patches])


def centres(container: BarContainer) -> np.ndarray:
    return np.array([patch.get_x() + patch.get_width() / 2 for patch in container.patches])


def as_heights(bits: tuple[int | None, ...]) -> np.ndarray:
    return np.array([np.nan if b is None else float(b) for b in bits])


def data_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.containers or ax.get_lines()]


def shaded_layers(ax: Axes) -> list[int]:
    """Layer indices covered by the shaded spans (axvspan rectangles, one per layer)."""
    spans = [patch for patch in ax.patches if patch not in {p for c in ax.containers for p in c.patches}]
    return sorted(round(span.get_x() + span.get_width() / 2) for span in spans)


def test_differing_layers() -> None:
    assert differing_layers(LEARNED, DATA_FREE) == [0, 2, 3]
    assert differing_layers(LEARNED, LEARNED) == []


@pytest.mark.slow
def test_single_policy_plots_its_bits(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(LEARNED.as_dict()))
    policy = read_bit_policy(path)
    fig = bit_policy_figure(policy, labels=("learned", ""))
    (ax,) = data_axes(fig)
    series = bars(ax)
    assert sorted(series) == ["activations", "weights"]
    np.testing.assert_array_equal(heights(series["weights"]), as_heights(policy.weight_bits))
    np.testing.assert_array_equal(heights(series["activations"]), as_heights(policy.act_bits))
    x = np.arange(len(LAYERS))
    assert np.all(centres(series["weights"]) < x) and np.all(centres(series["activations"]) > x)
    np.testing.assert_allclose(centres(series["activations"]) - centres(series["weights"]), 0.4)
    assert [label.get_text() for label in ax.get_xticklabels()] == list(LAYERS)
    float_markers = {line.get_label(): line.get_xdata() for line in ax.get_lines()}
    assert set(float_markers) == {"weights in float", "activations in float"}
    assert [round(x) for x in float_markers["weights in float"]] == [0]
    assert shaded_layers(ax) == [] and ax.get_title(loc="left") == "learned"


def test_two_policies_mark_the_differences() -> None:
    fig = bit_policy_figure(LEARNED, DATA_FREE, labels=("learned", "data-free"))
    top, bottom = data_axes(fig)
    for ax, policy, title in ((top, LEARNED, "learned"), (bottom, DATA_FREE, "data-free")):
        np.testing.assert_array_equal(heights(bars(ax)["weights"]), as_heights(policy.weight_bits))
        np.testing.assert_array_equal(heights(bars(ax)["activations"]), as_heights(policy.act_bits))
        assert shaded_layers(ax) == [0, 2, 3] and ax.get_title(loc="left") == title
    red = [label.get_text() for label in bottom.get_xticklabels() if label.get_color() == "tab:red"]
    assert red == [LAYERS[0], LAYERS[2], LAYERS[3]]
    assert "differs (3 of 5 layers)" in [text.get_text() for text in fig.legends[0].get_texts()]


def test_policies_of_different_layers_are_refused() -> None:
    shorter = BitPolicy(LAYERS[:4], LEARNED.weight_bits[:4], LEARNED.act_bits[:4])
    with pytest.raises(ValueError, match=r"^cannot compare bit policies of different lengths: 5 and 4 layers$"):
        bit_policy_figure(LEARNED, shorter)
    renamed = BitPolicy(("stem",) + LAYERS[1:], LEARNED.weight_bits, LEARNED.act_bits)
    with pytest.raises(ValueError, match=r"layer 0 is 'conv_stem' in one, 'stem' in the other"):
        write_bit_policy_figure(LEARNED, "unused", renamed)


def indicators() -> Indicators:
    rng = np.random.default_rng(0)
    weight = np.sort(rng.uniform(1e-4, 1.0, (len(LAYERS), 3)), axis=1)  # bits (6, 4, 2): falling with more bits
    act = np.sort(rng.uniform(1e-4, 1.0, (len(LAYERS), 3)), axis=1)
    return Indicators(layers=LAYERS, bits=(6, 4, 2), weight=weight, act=act)


def test_indicator_lines_equal_the_tables() -> None:
    table = indicators()
    fig = indicators_figure(table)
    top, bottom = data_axes(fig)
    for ax, values, title in ((top, table.weight, "weights"), (bottom, table.act, "activations")):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["6 bits", "4 bits", "2 bits"]
        for column, line in enumerate(lines):
            np.testing.assert_array_equal(line.get_xdata(), np.arange(len(LAYERS)))
            np.testing.assert_array_equal(line.get_ydata(), values[:, column])
        assert ax.get_yscale() == "log" and ax.get_title(loc="left") == title
    assert [label.get_text() for label in bottom.get_xticklabels()] == list(LAYERS)
    zeros = Indicators(layers=LAYERS, bits=(6, 4, 2), weight=np.zeros((5, 3)), act=table.act)
    assert data_axes(indicators_figure(zeros))[0].get_yscale() == "linear"  # log only for positive values


@pytest.mark.slow
def test_files_are_written(tmp_path: Path) -> None:
    paths = write_bit_policy_figure(LEARNED, tmp_path, DATA_FREE, ("learned", "data-free"))
    paths += write_indicators_figure(indicators(), tmp_path, stem="limpq_indicators")
    names = ["bit_policy.png", "bit_policy.pdf", "limpq_indicators.png", "limpq_indicators.pdf"]
    assert paths == [tmp_path / name for name in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary files left behind
    for path in paths:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")


@pytest.mark.slow
def test_fixed_layout_keeps_every_label_on_the_figure() -> None:
    """The layout run once (then off) leaves the axes where constrained layout put them, the names inside the figure."""
    fig = bit_policy_figure(LEARNED, DATA_FREE, ("learned", "data-free"))
    fixed = fix_layout(fig)
    assert fixed is fig and fig.get_layout_engine() is None
    positions = [ax.get_position().bounds for ax in fig.axes]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert [ax.get_position().bounds for ax in fig.axes] == positions  # drawing moves nothing any more
    bottom = data_axes(fig)[-1]
    assert bottom.get_position().y0 > 0.1  # room left below for the rotated layer names
    extents = [label.get_window_extent(renderer) for label in bottom.get_xticklabels()]
    assert all(box.y0 >= 0 and box.x0 >= 0 and box.x1 <= fig.bbox.width for box in extents)
