"""Encodings of integer weights: exact round trips, byte counts against independent counts, pruned zeros kept."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse
import torch

from deployment.storage import (
    ENCODINGS,
    INTEGER_ENCODINGS,
    WEIGHT_PREFIX,
    encoded_sizes,
    load_encoded,
    pack_bits,
    save_encoded,
    smallest_encoding,
    unpack_bits,
)
from pruning.masks import magnitude_mask_by_selection

BIT_WIDTHS = range(2, 9)


def brute_force_pack(values: list[int], n_bits: int) -> bytes:
    """Bit by bit: field ``k`` holds bits ``k b .. k b + b - 1`` of the stream, little-endian within each byte."""
    stream = [(value >> bit) & 1 for value in values for bit in range(n_bits)]  # >> of a negative: two's complement
    return bytes(sum(stream[i + j] << j for j in range(8) if i + j < len(stream)) for i in range(0, len(stream), 8))


def random_layers(n_bits: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Odd shapes, half zeros, both ends of the range, an all-zero layer and a layer without zeros."""
    generator = torch.Generator().manual_seed(seed)
    q_min, q_max = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    layers = {}
    for name, shape in {"conv.weight": (5, 3, 3, 3), "fc": (7, 13), "vector": (11,)}.items():
        values = torch.randint(q_min, q_max + 1, shape, generator=generator)
        values[torch.rand(shape, generator=generator) < 0.5] = 0
        values.view(-1)[:2] = torch.tensor([q_min, q_max])
        layers[name] = values.to(torch.int8)
    layers["all_zero"] = torch.zeros(3, 5, dtype=torch.int8)
    signs = 1 - 2 * torch.randint(0, 2, (4, 9), generator=generator)
    no_zeros = torch.randint(1, q_max + 1, (4, 9), generator=generator) * signs
    no_zeros[0, :2] = torch.tensor([q_min, q_max])
    layers["no_zeros"] = no_zeros.to(torch.int32)  # any integer dtype is accepted
    return layers


def scales_of(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.rand(values.shape[0] if values.dim() > 1 else 1) + 0.1 for name, values in layers.items()}


@pytest.mark.parametrize("n_bits", BIT_WIDTHS)
@pytest.mark.parametrize("count", [0, 1, 7, 13, 64])
def test_pack_bits_matches_brute_force_and_round_trips(n_bits: int, count: int) -> None:
    values = np.random.default_rng(count).integers(-(2 ** (n_bits - 1)), 2 ** (n_bits - 1), count).astype(np.int8)
    packed = pack_bits(values, n_bits)
    assert packed.dtype == np.uint8 and packed.nbytes == math.ceil(count * n_bits / 8)
    assert packed.tobytes() == brute_force_pack(values.tolist(), n_bits)
    np.testing.assert_array_equal(unpack_bits(packed, n_bits, count), values)


def test_two_int4_values_share_a_byte_low_nibble_first() -> None:
    assert pack_bits(np.array([1, -1, -8, 7, 3], dtype=np.int8), 4).tolist() == [0xF1, 0x78, 0x03]


@pytest.mark.parametrize("n_bits", BIT_WIDTHS)
@pytest.mark.parametrize("encoding", INTEGER_ENCODINGS)
def test_round_trip_is_exact_and_weight_arrays_have_the_computed_size(tmp_path, encoding: str, n_bits: int) -> None:
    layers = random_layers(n_bits, seed=n_bits)
    bits = dict.fromkeys(layers, n_bits)
    scales = scales_of(layers)
    path = tmp_path / "weights.npz"
    save_encoded(path, layers, bits, scales, encoding)
    loaded, loaded_bits, loaded_scales = load_encoded(path)
    assert list(loaded) == list(layers) and loaded_bits == bits
    for name, values in layers.items():
        assert loaded[name].dtype == torch.int8 and loaded[name].shape == values.shape
        assert torch.equal(loaded[name].long(), values.long()), name
        assert torch.equal(loaded_scales[name], scales[name]), name
    with np.load(path, allow_pickle=False) as archive:
        weight_bytes = sum(archive[key].nbytes for key in archive.files if key.startswith(WEIGHT_PREFIX))
    assert weight_bytes == encoded_sizes(layers, bits)[encoding]


def independent_sizes(layers: dict[str, torch.Tensor], n_bits: int) -> dict[str, int]:
    """Byte counts from a Python count of the non-zeros and scipy's CSR arrays (index widths by brute force)."""

    def width(max_value: int) -> int:
        return next(size for size in (1, 2, 4, 8) if max_value < 256**size)

    totals = dict.fromkeys(ENCODINGS, 0)
    for values in layers.values():
        flat = values.reshape(-1).tolist()
        numel, nonzeros = len(flat), sum(1 for value in flat if value != 0)
        matrix = scipy.sparse.csr_array(values.reshape(values.shape[0], -1).numpy())
        mask_bytes = (numel + 7) // 8
        totals["float32"] += 4 * numel
        totals["int8"] += numel
        totals["int8_bitmask"] += mask_bytes + nonzeros
        totals["int8_csr"] += (len(matrix.indptr) * width(int(matrix.indptr.max())) + len(matrix.indices)
                               * width(matrix.shape[1] - 1) + matrix.nnz)  # fmt: skip
        totals["packed"] += (numel * n_bits + 7) // 8
        totals["packed_bitmask"] += mask_bytes + (nonzeros * n_bits + 7) // 8
    return totals


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
def test_sizes_match_an_independent_count(n_bits: int) -> None:
    layers = random_layers(n_bits, seed=10 + n_bits)
    layers["wide"] = torch.ones(2, 300, dtype=torch.int8)  # 16-bit column indices (300 columns) and row pointers (600)
    assert encoded_sizes(layers, dict.fromkeys(layers, n_bits)) == independent_sizes(layers, n_bits)


def test_sizes_of_a_hand_counted_layer() -> None:
    values = torch.zeros(16, 9, dtype=torch.int8)
    values[:, :4] = 3  # 64 non-zeros of 144
    sizes = encoded_sizes({"layer": values}, {"layer": 4})
    assert sizes == {"float32": 576, "int8": 144, "int8_bitmask": 18 + 64, "int8_csr": 17 + 64 + 64,
                     "packed": 72, "packed_bitmask": 18 + 32}  # fmt: skip
    assert smallest_encoding(sizes) == "packed_bitmask"


@pytest.mark.parametrize("encoding", INTEGER_ENCODINGS)
def test_every_pruned_zero_is_kept_per_layer(tmp_path, encoding: str) -> None:
    generator = torch.Generator().manual_seed(3)
    weights = {"conv": torch.randn(8, 4, 3, 3, generator=generator), "fc": torch.randn(10, 32, generator=generator)}
    layers, masks = {}, {}
    for name, weight in weights.items():
        masks[name] = magnitude_mask_by_selection(weight, 0.75)
        masked = weight * masks[name]
        step = masked.abs().amax() / 7  # symmetric INT4: 0 maps to 0
        layers[name] = torch.clamp(torch.round(masked / step), -8, 7).to(torch.int8)
    path = tmp_path / "pruned.npz"
    save_encoded(path, layers, dict.fromkeys(layers, 4), scales_of(layers), encoding)
    loaded, _, _ = load_encoded(path)
    for name, mask in masks.items():
        assert not loaded[name][~mask].any(), f"{name}: a pruned weight is not zero"
        assert int((loaded[name] == 0).sum()) >= int((~mask).sum()) == round(0.75 * mask.numel())
        assert torch.equal(loaded[name], layers[name])


def test_smallest_encoding_breaks_ties_by_order_and_never_picks_float32() -> None:
    assert smallest_encoding({"float32": 0, "int8": 10, "packed": 10, "int8_bitmask": 10}) == "int8"
    assert smallest_encoding({"int8_csr": 5, "packed_bitmask": 5, "float32": 1}) == "packed_bitmask"


def check_one_line_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "layers, bits, match",
    [
        ({"a": torch.tensor([0, 8], dtype=torch.int8)}, {"a": 4},
         r"layer 'a': values in \[0, 8\] are outside the 4-bit range \[-8, 7\]"),
        ({"a": torch.tensor([-9, 0])}, {"a": 4}, r"outside the 4-bit range"),
        ({"a": torch.tensor([0, 1])}, {"a": 9}, r"bit-width 9 is not an integer in 2..8"),
        ({"a": torch.tensor([0, 1])}, {"a": 1}, r"bit-width 1 is not an integer in 2..8"),
        ({"a": torch.tensor([0.0, 1.0])}, {"a": 8}, r"must be an integer tensor"),
        ({"a": torch.tensor([0, 1])}, {"b": 8}, r"name different layers: a, b"),
    ],
)
def test_bad_weights_raise_one_line_and_write_nothing(tmp_path, layers, bits, match: str) -> None:
    path = tmp_path / "out.npz"
    check_one_line_value_error(lambda: encoded_sizes(layers, bits), match)
    scales = dict.fromkeys(layers, torch.ones(1))
    check_one_line_value_error(lambda: save_encoded(path, layers, bits, scales, "int8"), match)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_bad_encodings_and_files_raise_one_line(tmp_path) -> None:
    layers, bits, scales = {"a": torch.tensor([0, 1])}, {"a": 2}, {"a": torch.ones(1)}
    path = tmp_path / "out.npz"
    check_one_line_value_error(lambda: save_encoded(path, layers, bits, scales, "int4"), r"cannot store .* as 'int4'")
    check_one_line_value_error(lambda: save_encoded(path, layers, bits, scales, "float32"), r"float reference")
    check_one_line_value_error(lambda: save_encoded(path, layers, bits, {"b": torch.ones(1)}, "int8"), r"and scales")
    check_one_line_value_error(lambda: smallest_encoding({"int4": 1}), r"unknown encodings int4")
    check_one_line_value_error(lambda: smallest_encoding({"float32": 1}), r"no integer encoding")
    assert not path.exists()
    np.savez(path, other=np.zeros(3))
    check_one_line_value_error(lambda: load_encoded(path), r"is not an encoded-weights file")
