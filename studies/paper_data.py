"""The per-tensor weight SQNRs published with Kuzmin et al. (2023), and the artefacts of their arithmetic.

The paper's code wrote one flat JSON object per model and bit-width, ``<model>_<b>_bits_mse.json``,
keyed by module name, each value holding :data:`PAPER_FIELDS` (no wrapper, no settings, no shape).
Its ``sample_kurtosis`` is ``scipy.stats.kurtosis(w, fisher=True, bias=True)``, the biased
*excess* kurtosis ``m4 / m2^2 - 3`` (a Gaussian gives 0; values in ``(-2, 0)`` occur, which a
plain kurtosis ``m4 / m2^2 >= 1`` never takes), the same convention as the weight study here, so
it is read unchanged.

This module

* parses that flat format (:func:`parse_flat_result`), so the plots read the paper's folder as
  well as the study's own files;
* turns the folder into one compact table (:func:`read_paper_folder`, :func:`write_paper_table`,
  bundled as ``data/paper_weights_sqnr.csv.gz`` next to the paper's licence) and reads it back
  (:func:`read_paper_table`);
* flags the values that only the paper's float16 arithmetic (or its search grid) can explain
  (:data:`ARTEFACT_KINDS`, :func:`artefact_flags`, :func:`artefact_counts`).

The paper's code cast the weights to float16 and took ``mean(w^2)``, the pruning error
``mean((w - pruned)^2)`` and the kurtosis moments in float16; its MSE range search tried the
100 thresholds ``k (max|w| + 0.5) / 100``, ``k = 1..100``.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from studies.compression import pruning_sparsity
from utils.io import read_json, write_bytes_atomic

log = logging.getLogger(__name__)

PAPER_FIELDS = (
    "sample_kurtosis", "quant_sqnr", "quant_mse", "quant_sparsity",
    "pruning_sqnr", "pruning_mse", "pruning_sqnr_corrected", "pruning_mse_corrected",
)  # fmt: skip
PAPER_TABLE_COLUMNS = ("model", "n_bits", "layer", *PAPER_FIELDS)
PAPER_FILE_NAME = re.compile(r"^(?P<model>.+)_(?P<n_bits>\d+)_bits_mse\.json$")
PAPER_GLOB = "*_bits_mse.json"
# The paper's sample_kurtosis is already excess kurtosis (scipy's fisher=True): no shift on reading.
PAPER_KURTOSIS_IS_EXCESS = True

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE_DIR = REPO_ROOT.parent / "shared" / "data" / "paper_weights_sqnr"
BUNDLED_TABLE = REPO_ROOT / "data" / "paper_weights_sqnr.csv.gz"
BUNDLED_LICENSE = REPO_ROOT / "data" / "paper_weights_sqnr.LICENSE"

# float16 limits behind the artefacts.
FLOAT16_MAX = 65504.0
FLOAT16_SMALLEST_NORMAL = 2.0**-14
# x^4 rounds to 0 in float16 when it is below half the smallest subnormal (2^-25): |x| < 2^-6.25.
FOURTH_POWER_UNDERFLOW = 2.0**-6.25
# The paper's MSE search: thresholds k (max|w| + margin) / 100, k = 1..100.
SEARCH_MARGIN = 0.5
SEARCH_CANDIDATES = 100
COARSE_GRID_CANDIDATES = 5
# Pruned count round(s n) against quantization's zero count: allowance for tensors of >= 1000 values.
COUNT_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- the flat format


def is_flat_result(data: object) -> bool:
    """Whether parsed JSON looks like the paper's format: a non-empty mapping of layer name to mapping.

    The weight study's own files are mappings too, but hold ``"layers"`` and ``"complete"``
    entries whose values are not all mappings.
    """
    return isinstance(data, dict) and bool(data) and all(isinstance(value, dict) for value in data.values())


def flat_result_problem(data: Mapping[str, Mapping]) -> str | None:
    """Why a flat result cannot be used (the first layer lacking a field or holding a non-number), or None."""
    for layer, metrics in data.items():
        missing = [field for field in PAPER_FIELDS if field not in metrics]
        if missing:
            return f"layer '{layer}' lacks {', '.join(missing)}"
        bad = [
            field
            for field in PAPER_FIELDS
            if not isinstance(metrics[field], (int, float)) or isinstance(metrics[field], bool)
        ]
        if bad:
            return f"layer '{layer}' has a non-numeric {', '.join(bad)}"
    return None


def parse_flat_result(path: str | os.PathLike, data: object) -> dict:
    """The paper's flat result as the study's layout ``{"model", "n_bits", "layers"}``.

    The model and bit-width come from the file name ``<model>_<b>_bits_mse.json``.

    Raises:
        ValueError: one line saying why the file is not a usable flat result.
    """
    match = PAPER_FILE_NAME.match(Path(path).name)
    if match is None:
        raise ValueError("the name is not <model>_<b>_bits_mse.json")
    if not is_flat_result(data):
        raise ValueError("not a flat mapping of layer names to metrics")
    problem = flat_result_problem(data)
    if problem is not None:
        raise ValueError(problem)
    layers = {layer: {field: float(metrics[field]) for field in PAPER_FIELDS} for layer, metrics in data.items()}
    return {"model": match["model"], "n_bits": int(match["n_bits"]), "layers": layers}


# ----------------------------------------------------------------------------- the bundled table


def read_paper_folder(source_dir: str | os.PathLike) -> pd.DataFrame:
    """Every usable flat result in ``source_dir`` as one table (:data:`PAPER_TABLE_COLUMNS`).

    Rows are sorted by model and bit-width; layers keep the files' order. Unusable files are
    logged (one line each) and skipped.

    Raises:
        NotADirectoryError: ``source_dir`` is not a directory.
        ValueError: no usable file in it.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise NotADirectoryError(f"paper data directory '{source_dir}' does not exist or is not a directory")
    results = []
    for path in sorted(source_dir.glob(PAPER_GLOB)):
        try:
            results.append(parse_flat_result(path, read_json(path)))
        except ValueError as error:
            log.warning("skipping %s: %s", path, error)
    if not results:
        raise ValueError(f"no usable result files ({PAPER_GLOB}) in '{source_dir}'")
    results.sort(key=lambda result: (result["model"], result["n_bits"]))
    rows = [
        {"model": result["model"], "n_bits": result["n_bits"], "layer": layer, **metrics}
        for result in results
        for layer, metrics in result["layers"].items()
    ]
    return pd.DataFrame(rows, columns=list(PAPER_TABLE_COLUMNS))


def write_paper_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the table as gzip-compressed CSV, atomically and byte-reproducibly (no time stamp, no name).

    Floats are written in Python's shortest round-trip form, so reading gives the JSON's values back
    exactly; +inf is written ``inf``.
    """
    text = frame[list(PAPER_TABLE_COLUMNS)].to_csv(index=False, lineterminator="\n")

    def write(handle) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=9, mtime=0) as archive:
            archive.write(text.encode())

    write_bytes_atomic(path, write)
    return Path(path)


def read_paper_table(path: str | os.PathLike = BUNDLED_TABLE) -> pd.DataFrame:
    """The bundled table (or any table :func:`write_paper_table` wrote).

    Raises:
        ValueError: one line when the file is missing, unreadable or lacks columns.
    """
    try:
        with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as handle:
            frame = pd.read_csv(handle, dtype={"model": str, "layer": str})
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"cannot read the paper's table '{path}': {error}") from None
    missing = [column for column in PAPER_TABLE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"the paper's table '{path}' lacks column(s) {', '.join(missing)}")
    frame = frame[list(PAPER_TABLE_COLUMNS)]
    for field in PAPER_FIELDS:
        frame[field] = pd.to_numeric(frame[field], errors="coerce").astype(float)
    frame["n_bits"] = frame["n_bits"].astype(np.int64)
    return frame


def bundle_paper_data(
    source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR,
    table_path: str | os.PathLike = BUNDLED_TABLE,
    license_path: str | os.PathLike = BUNDLED_LICENSE,
) -> tuple[pd.DataFrame, list[Path]]:
    """Regenerate the bundled table from the paper's folder and copy its LICENSE beside it.

    Raises:
        NotADirectoryError, ValueError: from :func:`read_paper_folder`.
        FileNotFoundError: the folder has no LICENSE file (the notice must travel with the data).
    """
    license_source = Path(source_dir) / "LICENSE"
    if not license_source.is_file():
        raise FileNotFoundError(f"no LICENSE file in '{source_dir}': the paper's notice must go with its data")
    frame = read_paper_folder(source_dir)
    paths = [write_paper_table(frame, table_path)]
    copy_file(license_source, license_path)
    paths.append(Path(license_path))
    return frame, paths


# ----------------------------------------------------------------------------- artefacts


@dataclass(frozen=True)
class ArtefactKind:
    """One class of values that exact arithmetic cannot produce (or cannot be told from such values)."""

    key: str
    header: str
    meaning: str


ARTEFACT_KINDS = (
    ArtefactKind(
        "kurtosis_minus_3", "kurtosis -3",
        "excess kurtosis < -2, below every distribution's minimum (m4 >= m2^2); all are exactly -3: "
        "float16 (w - mean)^4 underflows to 0 when every |w - mean| < 2^-6.25 = 0.013",
    ),
    ArtefactKind(
        "kurtosis_inf", "kurtosis inf",
        "excess kurtosis +inf: float16 (w - mean)^4 overflows (> 65504) once some |w - mean| >= 16",
    ),
    ArtefactKind(
        "coarse_grid", "coarse grid",
        f"the -3 kurtosis bounds max|w| <= 2^-6.25 + rms(w), so the +{SEARCH_MARGIN} range margin leaves "
        f"at most {COARSE_GRID_CANDIDATES} of the {SEARCH_CANDIDATES} thresholds k (max|w| + 0.5)/100 "
        "inside [0, max|w|]",
    ),
    ArtefactKind(
        "quant_sqnr_nonpositive", "quant. SQNR <= 0",
        "quantization SQNR <= 0 dB: rounding to a grid holding 0 never increases |w|, so the exact SQNR is >= 0",
    ),
    ArtefactKind(
        "pruning_inf_underflow", "pruning +inf (proven)",
        "pruning (or corrected) MSE 0 although quant_sparsity shows fewer zeros than were pruned: "
        "float16 squares of the pruned weights (|w| < 2^-12.5) underflow to 0",
    ),
    ArtefactKind(
        "pruning_inf_undecided", "pruning +inf (undecided)",
        "pruning MSE 0 where quant_sparsity >= the sparsity: exact zeros or float16 underflow, "
        "the data cannot tell",
    ),
    ArtefactKind(
        "pruning_mse_subnormal", "pruning MSE subnormal",
        "0 < pruning MSE < 2^-14: a float16 subnormal, known only to +-2^-25 (under 10 significant bits)",
    ),
)  # fmt: skip
ARTEFACT_KEYS = tuple(kind.key for kind in ARTEFACT_KINDS)


def signal_power(frame: pd.DataFrame) -> pd.Series:
    """``mean(w^2)`` recovered from the quantization columns: ``quant_mse 10^(quant_sqnr / 10)``."""
    return frame["quant_mse"] * np.power(10.0, frame["quant_sqnr"] / 10.0)


def candidates_below_max(max_abs_bound: pd.Series | np.ndarray) -> np.ndarray:
    """Upper bound on how many thresholds ``k (M + 0.5) / 100`` lie in ``[0, M]`` when ``M <= max_abs_bound``.

    ``k <= 100 M / (M + 0.5)``, increasing in ``M``, so the bound is ``floor(100 B / (B + 0.5))``.
    """
    bound = np.asarray(max_abs_bound, dtype=float)
    return np.floor(SEARCH_CANDIDATES * bound / (bound + SEARCH_MARGIN))


def artefact_flags(table: pd.DataFrame) -> pd.DataFrame:
    """One boolean column per :data:`ARTEFACT_KINDS` key, one row per row of the paper's table.

    With ``s = 1 - b/16`` the pruning sparsity and ``q`` the quantization sparsity (the share of
    weights quantized to 0, at least the share of exact zeros), pruning removes nonzero weights
    whenever ``q < s`` (corrected: ``q < 1 - (1 - q) b/16``), so its exact MSE is positive.
    """
    kurtosis = table["sample_kurtosis"]
    sparsity = pruning_sparsity(table["n_bits"])
    quant_sparsity = table["quant_sparsity"]
    corrected_sparsity = 1.0 - (1.0 - quant_sparsity) * table["n_bits"] / 16.0
    kurtosis_minus_3 = kurtosis < -2.0
    max_abs_bound = FOURTH_POWER_UNDERFLOW + np.sqrt(signal_power(table).clip(lower=0.0))
    zero_mse = table["pruning_mse"].eq(0.0)
    pruned_nonzero = quant_sparsity + COUNT_TOLERANCE < sparsity
    corrected_pruned_nonzero = quant_sparsity + COUNT_TOLERANCE < corrected_sparsity
    proven = (zero_mse & pruned_nonzero) | (table["pruning_mse_corrected"].eq(0.0) & corrected_pruned_nonzero)
    flags = {
        "kurtosis_minus_3": kurtosis_minus_3,
        "kurtosis_inf": kurtosis.eq(math.inf),
        "coarse_grid": kurtosis_minus_3 & (candidates_below_max(max_abs_bound) <= COARSE_GRID_CANDIDATES),
        "quant_sqnr_nonpositive": table["quant_sqnr"] <= 0.0,
        "pruning_inf_underflow": proven,
        "pruning_inf_undecided": zero_mse & ~proven,
        "pruning_mse_subnormal": (table["pruning_mse"] > 0.0) & (table["pruning_mse"] < FLOAT16_SMALLEST_NORMAL),
    }
    return pd.DataFrame({key: flags[key].to_numpy(dtype=bool) for key in ARTEFACT_KEYS}, index=table.index)


def artefact_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Rows per model (and a final ``total`` row): ``tensors``, ``rows`` and the count of each artefact kind.

    A row is one tensor at one bit-width; ``tensors`` counts distinct layers.
    """
    flags = artefact_flags(table).assign(model=table["model"].to_numpy())
    counts = flags.groupby("model", sort=True)[list(ARTEFACT_KEYS)].sum().astype(np.int64)
    counts.insert(0, "rows", table.groupby("model", sort=True).size())
    counts.insert(0, "tensors", table.groupby("model", sort=True)["layer"].nunique())
    counts.loc["total"] = counts.sum()
    counts.index.name = "model"
    return counts


def artefact_markdown(counts: pd.DataFrame, only_flagged: bool = False) -> str:
    """The counts as a markdown table; ``only_flagged`` keeps the models with some artefact besides subnormals."""
    if only_flagged:
        keys = [key for key in ARTEFACT_KEYS if key != "pruning_mse_subnormal"]
        keep = (counts[keys].sum(axis=1) > 0) | (counts.index == "total")
        counts = counts[keep]
    headers = ["model", "tensors", "rows", *(kind.header for kind in ARTEFACT_KINDS)]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "|".join("---:" for _ in headers[1:]) + "|"]
    for model, row in counts.iterrows():
        lines.append("| " + " | ".join([str(model), *(str(int(value)) for value in row)]) + " |")
    return "\n".join(lines) + "\n"


def artefact_legend() -> str:
    """One line per artefact kind: its header and what it means."""
    return "\n".join(f"* {kind.header}: {kind.meaning}" for kind in ARTEFACT_KINDS) + "\n"


def float16_signatures(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """How many rows carry float16 fingerprints: ``{what: (rows with it, rows checked)}``.

    * the pruning MSEs are exactly float16 numbers;
    * the signal power ``mean(w^2)`` behind every SQNR is a float16 number (to 1e-9 relative).
    """
    pruning_mse = table["pruning_mse"].to_numpy(dtype=float)
    is_half = pruning_mse.astype(np.float16).astype(float) == pruning_mse
    power = signal_power(table).to_numpy(dtype=float)
    finite = np.isfinite(power) & (power > 0)
    with np.errstate(over="ignore"):
        rounded = power[finite].astype(np.float16).astype(float)
    power_half = np.abs(rounded / power[finite] - 1.0) < 1e-9
    return {
        "pruning MSE is a float16 number": (int(is_half.sum()), len(pruning_mse)),
        "signal power mean(w^2) is a float16 number": (int(power_half.sum()), int(finite.sum())),
    }


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file byte for byte, atomically."""
    with open(source, "rb") as handle:
        write_bytes_atomic(target, lambda out: shutil.copyfileobj(handle, out))
