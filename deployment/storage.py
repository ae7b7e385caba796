"""Storage of integer weights: byte counts of dense, sparse and bit-packed encodings, and an npz file format.

The weights of a layer are the integers ``q`` of a symmetric ``b``-bit quantizer (``2 <= b <= 8``),
``-2^(b-1) <= q <= 2^(b-1) - 1``, with ``w = s q`` for the layer's scales ``s``; a pruned weight is
``q = 0`` (a symmetric grid maps 0 to 0). For a layer of ``n`` weights, ``z`` of them non-zero,
seen as a matrix of ``r`` rows (the first axis: the output channels of a convolution or linear
layer; ``r = 1`` for a scalar) by ``c = n / r`` columns, the bytes of each encoding are

* ``float32``: ``4 n`` - the float model, the reference (not an encoding of the integers);
* ``int8``: ``n`` - one byte per weight, dense;
* ``int8_bitmask``: ``ceil(n / 8) + z`` - one bit per position (set where ``q != 0``), then one
  byte per non-zero weight in row-major order;
* ``int8_csr``: ``(r + 1) u(z) + z u(c - 1) + z`` - compressed sparse rows: ``r + 1`` row pointers
  and ``z`` column indices, each in the narrowest unsigned integer type that holds its largest
  value (``u(m)`` = 1, 2, 4 or 8 bytes for ``m < 2^8, 2^16, 2^32`` or more), then ``z`` int8 values;
* ``packed``: ``ceil(n b / 8)`` - ``b`` bits per weight, dense (two INT4 weights in a byte);
* ``packed_bitmask``: ``ceil(n / 8) + ceil(z b / 8)`` - the bitmask, then ``b`` bits per non-zero weight.

Every count is per layer (the ``ceil`` too: a layer starts on a byte boundary) and summed over the
layers; it is exactly the size of the weight arrays that :func:`save_encoded` writes. Scales,
shapes, bit-widths and biases are not counted.

Bit packing is little-endian within a byte: the ``k``-th ``b``-bit field takes bits ``k b`` to
``k b + b - 1`` of the stream, bit ``j`` of the stream being bit ``j mod 8`` of byte ``floor(j / 8)``
(for ``b = 4`` the first weight is the low nibble of the first byte). A field holds the low ``b``
bits of the two's complement of ``q``.

File format (:func:`save_encoded`, :func:`load_encoded`): an ``.npz`` archive (``np.savez``, no
pickled objects) with ``names`` (the layer names), ``encoding``, ``n_bits`` (one per layer) and,
for the ``i``-th layer, ``shape.i``, ``scale.i`` (the scales as given) and its weight arrays
``weight.i.PART``: ``values`` (int8), ``bitmask``, ``packed``, ``row_ptr``, ``col_idx`` as the
encoding needs them.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from quantization.quantizers import QuantScheme, integer_range
from utils.io import write_bytes_atomic

logger = logging.getLogger(__name__)

ENCODINGS = ("float32", "int8", "int8_bitmask", "int8_csr", "packed", "packed_bitmask")
# The encodings of integer weights, in the order that breaks ties of size (simplest to decode first).
INTEGER_ENCODINGS = ("int8", "packed", "int8_bitmask", "packed_bitmask", "int8_csr")
MAX_BITS = 8
MIN_BITS = 2  # a symmetric quantizer needs two bits
WEIGHT_PREFIX = "weight."


def unsigned_dtype(max_value: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ``0..max_value``."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{max_value} does not fit a 64-bit unsigned integer")


def pack_bits(values: np.ndarray, n_bits: int) -> np.ndarray:
    """The low ``n_bits`` bits of each int8 in ``values``, packed little-endian in ``ceil(n n_bits / 8)`` bytes.

    Vectorised: every byte is spread to its 8 bits, the low ``n_bits`` of each kept, the stream packed again.
    """
    fields = np.unpackbits(values.reshape(-1).view(np.uint8)[:, None], axis=1, bitorder="little")[:, :n_bits]
    return np.packbits(fields.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, n_bits: int, count: int) -> np.ndarray:
    """The ``count`` signed ``n_bits``-bit integers of :func:`pack_bits`, sign-extended to int8."""
    fields = np.unpackbits(packed, count=count * n_bits, bitorder="little").reshape(count, n_bits)
    low_bits = np.packbits(fields, axis=1, bitorder="little")[:, 0]
    shift = 8 - n_bits
    return (low_bits << shift).view(np.int8) >> shift  # arithmetic shift: sign extension


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(r, c)``: a weight as a matrix of its first axis by the rest (a scalar as ``1 x 1``)."""
    rows = shape[0] if shape else 1
    numel = math.prod(shape)
    return rows, numel // rows if rows else 0


def _layer_sizes(shape: tuple[int, ...], nonzeros: int, n_bits: int) -> dict[str, int]:
    """Bytes of one layer in each encoding (the formulas of the module doc)."""
    numel = math.prod(shape)
    rows, cols = matrix_shape(shape)
    bitmask = math.ceil(numel / 8)
    csr_index = (rows + 1) * unsigned_dtype(nonzeros).itemsize + nonzeros * unsigned_dtype(max(cols - 1, 0)).itemsize
    return {
        "float32": 4 * numel,
        "int8": numel,
        "int8_bitmask": bitmask + nonzeros,
        "int8_csr": csr_index + nonzeros,
        "packed": math.ceil(numel * n_bits / 8),
        "packed_bitmask": bitmask + math.ceil(nonzeros * n_bits / 8),
    }


def _checked_int8(int_weights: Mapping[str, torch.Tensor], n_bits: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The weights as int8 numpy arrays, after checking bit-widths and ranges (ValueError, one line)."""
    if set(int_weights) != set(n_bits):
        missing = sorted(set(int_weights) ^ set(n_bits))
        raise ValueError(f"weights and bit-widths name different layers: {', '.join(missing)}")
    arrays = {}
    for name, weight in int_weights.items():
        bits = n_bits[name]
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"layer '{name}': bit-width {bits!r} is not an integer in {MIN_BITS}..{MAX_BITS}")
        if weight.is_floating_point() or weight.is_complex() or weight.dtype == torch.bool:
            raise ValueError(f"layer '{name}': weights must be an integer tensor, got {weight.dtype}")
        q_min, q_max = integer_range(int(bits), QuantScheme.SYMMETRIC)
        if weight.numel() and (int(weight.min()) < q_min or int(weight.max()) > q_max):
            raise ValueError(f"layer '{name}': values in [{int(weight.min())}, {int(weight.max())}] are outside "
                             f"the {bits}-bit range [{q_min}, {q_max}]")  # fmt: skip
        arrays[name] = weight.detach().cpu().to(torch.int8).numpy()
    return arrays


def encoded_sizes(int_weights: Mapping[str, torch.Tensor], n_bits: Mapping[str, int]) -> dict[str, int]:
    """Bytes of the weights in each encoding of :data:`ENCODINGS`, summed over the layers (formulas: module doc).

    Raises:
        ValueError: a bit-width outside 2..8, non-integer weights or values outside their ``b``-bit range.
    """
    arrays = _checked_int8(int_weights, n_bits)
    totals = dict.fromkeys(ENCODINGS, 0)
    for name, values in arrays.items():
        for encoding, size in _layer_sizes(values.shape, int(np.count_nonzero(values)), int(n_bits[name])).items():
            totals[encoding] += size
    return totals


def smallest_encoding(sizes: Mapping[str, int]) -> str:
    """The integer encoding with the fewest bytes in ``sizes``; ties go to the first in :data:`INTEGER_ENCODINGS`."""
    unknown = sorted(set(sizes) - set(ENCODINGS))
    if unknown:
        raise ValueError(f"unknown encodings {', '.join(unknown)}; known: {', '.join(ENCODINGS)}")
    candidates = [encoding for encoding in INTEGER_ENCODINGS if encoding in sizes]
    if not candidates:
        raise ValueError(f"no integer encoding among the sizes; expected some of {', '.join(INTEGER_ENCODINGS)}")
    return min(candidates, key=lambda encoding: (sizes[encoding], INTEGER_ENCODINGS.index(encoding)))


def _check_encoding(encoding: str) -> None:
    if encoding not in INTEGER_ENCODINGS:
        hint = " (the float reference, not an encoding of integer weights)" if encoding == "float32" else ""
        raise ValueError(f"cannot store weights as '{encoding}'{hint}; choose one of {', '.join(INTEGER_ENCODINGS)}")


def encode_layer(values: np.ndarray, n_bits: int, encoding: str) -> dict[str, np.ndarray]:
    """The weight arrays (``{part: array}``) of one layer's int8 ``values`` in ``encoding``."""
    _check_encoding(encoding)
    flat = values.reshape(-1)
    if encoding == "int8":
        return {"values": flat}
    if encoding == "packed":
        return {"packed": pack_bits(flat, n_bits)}
    if encoding == "int8_csr":
        matrix = values.reshape(matrix_shape(values.shape))
        rows, cols = np.nonzero(matrix)
        row_ptr = np.concatenate([[0], np.cumsum(np.count_nonzero(matrix, axis=1))])
        return {"row_ptr": row_ptr.astype(unsigned_dtype(len(rows))),
                "col_idx": cols.astype(unsigned_dtype(max(matrix.shape[1] - 1, 0))),
                "values": matrix[rows, cols]}  # fmt: skip
    kept = flat != 0
    nonzeros = flat[kept]
    bitmask = np.packbits(kept, bitorder="little")
    if encoding == "int8_bitmask":
        return {"bitmask": bitmask, "values": nonzeros}
    return {"bitmask": bitmask, "packed": pack_bits(nonzeros, n_bits)}


def decode_layer(parts: Mapping[str, np.ndarray], shape: tuple[int, ...], n_bits: int, encoding: str) -> np.ndarray:
    """The int8 weights of shape ``shape`` that :func:`encode_layer` turned into ``parts``."""
    _check_encoding(encoding)
    numel = math.prod(shape)
    if encoding == "int8":
        return parts["values"].astype(np.int8).reshape(shape)
    if encoding == "packed":
        return unpack_bits(parts["packed"], n_bits, numel).reshape(shape)
    if encoding == "int8_csr":
        rows, cols = matrix_shape(shape)
        matrix = np.zeros((rows, cols), dtype=np.int8)
        row_of_value = np.repeat(np.arange(rows), np.diff(parts["row_ptr"].astype(np.int64)))
        matrix[row_of_value, parts["col_idx"].astype(np.int64)] = parts["values"]
        return matrix.reshape(shape)
    kept = np.unpackbits(parts["bitmask"], count=numel, bitorder="little").astype(bool)
    nonzeros = parts["values"] if encoding == "int8_bitmask" else unpack_bits(parts["packed"], n_bits, int(kept.sum()))
    flat = np.zeros(numel, dtype=np.int8)
    flat[kept] = nonzeros
    return flat.reshape(shape)


def save_encoded(
    path: str | os.PathLike,
    int_weights: Mapping[str, torch.Tensor],
    n_bits: Mapping[str, int],
    scales: Mapping[str, torch.Tensor],
    encoding: str,
) -> None:
    """Write the weights in ``encoding`` with their shapes, bit-widths and scales to the npz file ``path`` (atomically).

    ``path`` is used as given (no ``.npz`` is appended). The weight arrays take exactly
    ``encoded_sizes(int_weights, n_bits)[encoding]`` bytes.

    Raises:
        ValueError: an unknown encoding (or ``float32``), layers missing from ``n_bits`` or
            ``scales``, or weights that :func:`encoded_sizes` rejects.
    """
    _check_encoding(encoding)
    arrays = _checked_int8(int_weights, n_bits)
    if set(scales) != set(arrays):
        raise ValueError(f"weights and scales name different layers: {', '.join(sorted(set(scales) ^ set(arrays)))}")
    names = list(arrays)
    contents: dict[str, np.ndarray] = {
        "names": np.array(names, dtype=str),
        "encoding": np.array(encoding),
        "n_bits": np.array([n_bits[name] for name in names], dtype=np.uint8),
    }
    for index, name in enumerate(names):
        contents[f"shape.{index}"] = np.array(arrays[name].shape, dtype=np.int64)
        contents[f"scale.{index}"] = scales[name].detach().cpu().numpy()
        for part, array in encode_layer(arrays[name], int(n_bits[name]), encoding).items():
            contents[f"{WEIGHT_PREFIX}{index}.{part}"] = array
    write_bytes_atomic(path, lambda handle: np.savez(handle, **contents))
    weight_bytes = sum(array.nbytes for key, array in contents.items() if key.startswith(WEIGHT_PREFIX))
    logger.info("wrote %s: %d layers, %s, %d bytes of weights", path, len(names), encoding, weight_bytes)


def load_encoded(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, torch.Tensor]]:
    """``(int_weights, n_bits, scales)`` of a file of :func:`save_encoded`; the weights as int8 tensors.

    Raises:
        ValueError: the file is not one that :func:`save_encoded` writes.
    """
    with np.load(path, allow_pickle=False) as archive:
        files = {key: archive[key] for key in archive.files}
    if not {"names", "encoding", "n_bits"} <= set(files):
        raise ValueError(f"'{path}' is not an encoded-weights file (no names, encoding and n_bits arrays)")
    encoding = str(files["encoding"])
    int_weights, n_bits, scales = {}, {}, {}
    for index, (name, bits) in enumerate(zip(files["names"].tolist(), files["n_bits"].tolist())):
        prefix = f"{WEIGHT_PREFIX}{index}."
        parts = {key[len(prefix):]: array for key, array in files.items() if key.startswith(prefix)}
        shape = tuple(int(size) for size in files[f"shape.{index}"])
        int_weights[name] = torch.from_numpy(decode_layer(parts, shape, int(bits), encoding))
        n_bits[name] = int(bits)
        scales[name] = torch.from_numpy(files[f"scale.{index}"])
    return int_weights, n_bits, scales
