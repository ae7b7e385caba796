"""Which CPUs saturate u8 x s8 pair sums, and which layers of an export that concerns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deployment import pt2e_x86
from deployment.cpu_features import (
    MAX_UNSATURATED_WEIGHT,
    cpu_flags,
    int8_instruction_sets,
    onednn_saturates,
    u8s8_saturates,
)
from deployment.integer_model import IntegerLayer

ZEN3 = frozenset({"sse4_2", "avx", "avx2", "fma"})
ZEN4 = ZEN3 | {"avx512f", "avx512_vnni"}


def test_cpu_flags_read_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_vnni sse2\nbugs\t\t: none\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni", "sse2"}
    assert cpu_flags(tmp_path / "absent") == frozenset()
    assert int8_instruction_sets(cpu_flags(cpuinfo)) == ["avx2", "avx512_vnni"]


def test_the_largest_unsaturated_weight() -> None:
    """A pair of u8 activations (<= 255) times weights of |q| <= 64 fits int16; 65 does not."""
    assert 2 * 255 * MAX_UNSATURATED_WEIGHT <= 2**15 - 1 < 2 * 255 * (MAX_UNSATURATED_WEIGHT + 1)


@pytest.mark.parametrize(
    ("flags", "max_isa", "u8s8", "onednn"),
    [
        (ZEN3, "", True, True),  # AVX2 without VNNI
        (ZEN4, "", False, False),
        (ZEN4, "avx2", False, True),  # oneDNN held below VNNI; onnxruntime is not
        (ZEN4, "AVX512_CORE", False, True),
        (ZEN4, "AVX512_CORE_VNNI", False, False),
        (ZEN3 | {"avx_vnni"}, "", False, False),
        (frozenset({"amx_int8", "avx2"}), "", False, False),
        (frozenset(), "AVX2", False, False),  # unknown flags (not Linux, or not x86)
        (frozenset({"neon", "asimd"}), "", False, False),
    ],
)
def test_which_kernels_saturate(flags: frozenset[str], max_isa: str, u8s8: bool, onednn: bool) -> None:
    assert u8s8_saturates(flags) is u8s8
    assert onednn_saturates(flags, max_isa) is onednn


def _layer(largest: int) -> IntegerLayer:
    int_weight = torch.tensor([[largest, -3], [1, 0]], dtype=torch.int8)
    return IntegerLayer(int_weight=int_weight, n_bits=8, scale=torch.ones(2, dtype=torch.float64),
                        bias=torch.zeros(2, dtype=torch.float64), input_quant=None)


def test_saturating_layers_are_those_beyond_64_where_onednn_saturates(monkeypatch: pytest.MonkeyPatch) -> None:
    layers = {"stem": _layer(-127), "block": _layer(MAX_UNSATURATED_WEIGHT), "head": _layer(65)}
    monkeypatch.setattr(pt2e_x86, "onednn_saturates", lambda: True)
    assert pt2e_x86.saturating_layers(layers) == ["stem", "head"]
    monkeypatch.setattr(pt2e_x86, "onednn_saturates", lambda: False)
    assert pt2e_x86.saturating_layers(layers) == []
