"""Names of the weight study's result files (shared by the study and the plots, without torch).

A study setting is the quantizer's range estimator, per-tensor or per-channel quantization, and
the pruning structure it is compared with: ``unstructured`` (single weights) or ``1xN:<N>``
(blocks of ``N`` consecutive output channels x one input channel x the whole kernel,
:func:`pruning.block_masks.one_by_n_mask`). Unstructured files keep their historical names;
a 1xN setting adds ``_1x<N>`` to the end of the name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

UNSTRUCTURED = "unstructured"
_ONE_BY_N = re.compile(r"1xn:(\S*)", re.IGNORECASE)


def parse_pruning_structure(text: str) -> str:
    """The canonical pruning structure, ``unstructured`` or ``1xN:<N>`` (N >= 1); ValueError (one line) otherwise."""
    value = str(text).strip()
    if value.lower() == UNSTRUCTURED:
        return UNSTRUCTURED
    match = _ONE_BY_N.fullmatch(value)
    usage = "use 'unstructured' or '1xN:<N>' with a whole number N >= 1, e.g. 1xN:4"
    if match is None:
        raise ValueError(f"'{text}' is not a pruning structure: {usage}")
    if not match.group(1).isdigit() or int(match.group(1)) < 1:
        raise ValueError(f"'{text}': the block size N must be a whole number >= 1: {usage}")
    return f"1xN:{int(match.group(1))}"


def structure_block_size(structure: str) -> int | None:
    """``N`` of a ``1xN:<N>`` structure; None for ``unstructured``."""
    structure = parse_pruning_structure(structure)
    return None if structure == UNSTRUCTURED else int(structure.split(":")[1])


class PruningStructureType(click.ParamType):
    """``unstructured`` or ``1xN:<N>`` (the pruning that quantization is compared with), canonicalised."""

    name = "structure"

    def convert(self, value, param, ctx) -> str:
        try:
            return parse_pruning_structure(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def _suffix(range_estimator: str, per_channel: bool, structure: str = UNSTRUCTURED) -> str:
    block_size = structure_block_size(structure)
    blocks = "" if block_size is None else f"_1x{block_size}"
    return f"{range_estimator}{'_per_channel' if per_channel else ''}{blocks}"


def result_file_name(
    model_name: str, n_bits: int, range_estimator: str = "mse", per_channel: bool = False, structure: str = UNSTRUCTURED
) -> str:
    """``<model>_<b>_bits_<estimator>[_per_channel][_1x<N>].json``."""
    return f"{model_name}_{n_bits}_bits_{_suffix(range_estimator, per_channel, structure)}.json"


def result_glob(range_estimator: str = "mse", per_channel: bool = False, structure: str = UNSTRUCTURED) -> str:
    """Glob pattern matching every model's and bit-width's file of one study setting."""
    return f"*_bits_{_suffix(range_estimator, per_channel, structure)}.json"


def table_file_name(range_estimator: str = "mse", per_channel: bool = False, structure: str = UNSTRUCTURED) -> str:
    """The tidy CSV of every result file of one study setting: ``weights_sqnr_<estimator>[_per_channel][_1x<N>].csv``."""
    return f"weights_sqnr_{_suffix(range_estimator, per_channel, structure)}.csv"


# The setting a result file name ends with (see result_file_name).
_SETTING_SUFFIX = re.compile(r"_bits_(mse|minmax)(_per_channel)?(?:_1x(\d+))?\.json$")


def setting_options(range_estimator: str, per_channel: bool, structure: str = UNSTRUCTURED) -> str:
    """The command-line options that select one study setting, e.g. ``--range-estimator minmax --per-channel``."""
    options = [] if range_estimator == "mse" else [f"--range-estimator {range_estimator}"]
    options += ["--per-channel"] if per_channel else []
    options += [] if structure == UNSTRUCTURED else [f"--pruning-structure {structure}"]
    return " ".join(options) or "no setting option"


def other_settings_hint(
    input_dir: str | os.PathLike, range_estimator: str = "mse", per_channel: bool = False, structure: str = UNSTRUCTURED
) -> str:
    """Which options the result files of ``input_dir`` need when none match the chosen setting ('' if none do).

    E.g. ``it holds 7 file(s) of another setting: use --per-channel``.
    """
    counts: dict[tuple[str, bool, str], int] = {}
    for path in sorted(Path(input_dir).glob("*_bits_*.json")):
        match = _SETTING_SUFFIX.search(path.name)
        if match is None:
            continue
        estimator, channel, block_size = match.group(1), match.group(2) is not None, match.group(3)
        setting = (estimator, channel, UNSTRUCTURED if block_size is None else f"1xN:{int(block_size)}")
        counts[setting] = counts.get(setting, 0) + 1
    chosen = (range_estimator, per_channel, parse_pruning_structure(structure))
    order = sorted(counts, key=lambda s: (s[0] != "mse", s[1], structure_block_size(s[2]) or 0))
    found = [f"{counts[setting]} file(s) need {setting_options(*setting)}" for setting in order if setting != chosen]
    return f"it holds result files of another setting: {'; '.join(found)}" if found else ""
