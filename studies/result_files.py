"""Names of the weight study's result files (shared by the study and the plots, without torch)."""

from __future__ import annotations

import os
from pathlib import Path


def _suffix(range_estimator: str, per_channel: bool) -> str:
    return f"{range_estimator}{'_per_channel' if per_channel else ''}"


def result_file_name(model_name: str, n_bits: int, range_estimator: str = "mse", per_channel: bool = False) -> str:
    """``<model>_<b>_bits_<estimator>[_per_channel].json``."""
    return f"{model_name}_{n_bits}_bits_{_suffix(range_estimator, per_channel)}.json"


def result_glob(range_estimator: str = "mse", per_channel: bool = False) -> str:
    """Glob pattern matching every model's and bit-width's file of one study setting."""
    return f"*_bits_{_suffix(range_estimator, per_channel)}.json"


def table_file_name(range_estimator: str = "mse", per_channel: bool = False) -> str:
    """The tidy CSV of every result file of one study setting: ``weights_sqnr_<estimator>[_per_channel].csv``."""
    return f"weights_sqnr_{_suffix(range_estimator, per_channel)}.csv"


SETTINGS = (("mse", False), ("mse", True), ("minmax", False), ("minmax", True))


def setting_options(range_estimator: str, per_channel: bool) -> str:
    """The command-line options that select one study setting, e.g. ``--range-estimator minmax --per-channel``."""
    options = [] if range_estimator == "mse" else [f"--range-estimator {range_estimator}"]
    return " ".join(options + (["--per-channel"] if per_channel else [])) or "no setting option"


def other_settings_hint(input_dir: str | os.PathLike, range_estimator: str = "mse", per_channel: bool = False) -> str:
    """Which options the result files of ``input_dir`` need when none match the chosen setting ('' if none do).

    E.g. ``it holds 7 file(s) of another setting: use --per-channel``.
    """
    found = []
    for estimator, channel in SETTINGS:
        if (estimator, channel) == (range_estimator, per_channel):
            continue
        count = sum(1 for _ in Path(input_dir).glob(result_glob(estimator, channel)))
        if count:
            found.append(f"{count} file(s) need {setting_options(estimator, channel)}")
    return f"it holds result files of another setting: {'; '.join(found)}" if found else ""
