"""Names of the weight study's result files (shared by the study and the plots, without torch)."""
from __future__ import annotations


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
