"""The bounds commands give the same result files on a quiet and on a loaded machine (issue 10, part 3).

The exact solvers' default limits count work (branch-and-bound nodes), not seconds, so no decision
in a run depends on the clock. The result files still *record* measured times, and only those are
left out of the comparison: in the JSON every ``seconds`` entry (per layer, and per stage in each
scope and chunk summary), in the CSV the ``seconds`` column. The npz holds no times; it is compared
array by array, one file per layer as the index lists them (their zip members carry their write time,
so their bytes differ).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import post_training_quant_acts_sqnr as cli_module
from pruning import sparse_ls
from quantization import qp_exact
from studies.problem_sets import config_record
from studies.prune_bounds import PruneBoundsConfig
from studies.quant_bounds import QuantBoundsConfig

TIMING_KEY = "seconds"  # the only measured quantity in the JSON (any depth) and the CSV (a column)
COMMON = ["--num-samples", "2", "--device", "cpu", "--save-problems", "--no-progress"]
CASES = {
    # default limits: every problem is proven optimal within them
    "prune_default": (
        ["prune-bounds-data-opt", "--layer-name", "_conv_stem", "--num-output-channels", "4"],
        "prune_bounds_efficientnet_lite0_sparsity0.75_opt32",
    ),
    "quant_default": (
        ["quant-bounds-data-opt", "--layer-name", "_conv_stem", "--num-output-channels", "2", "--exact"],
        "quant_bounds_efficientnet_lite0_4bits_opt32_mse_exact",
    ),
    # a work limit that stops every search (the batched pruning search shares its rounds between problems):
    # where the searches stop must not depend on the load either
    "prune_stopped": (
        ["prune-bounds-data-opt", "--layer-name", "_conv_stem", "--num-output-channels", "4", "--node-limit", "100"],
        "prune_bounds_efficientnet_lite0_sparsity0.75_opt32",
    ),
}


def _without_timings(value: Any) -> Any:
    """``value`` (parsed JSON) with every ``seconds`` entry removed, at any depth."""
    if isinstance(value, dict):
        return {key: _without_timings(item) for key, item in value.items() if key != TIMING_KEY}
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


def _csv_without_timings(path: Path) -> list[list[str]]:
    """The CSV's cells as written (so floats compare digit by digit), without the ``seconds`` column."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    keep = [index for index, column in enumerate(rows[0]) if column != TIMING_KEY]
    assert len(keep) == len(rows[0]) - 1, "the CSV lost its timing column: update TIMING_KEY"
    return [[row[index] for index in keep] for row in rows]


def _file(stem: Path, extension: str) -> Path:
    """``<stem>.<extension>`` (run names hold dots, e.g. ``sparsity0.75``: no ``with_suffix``)."""
    return stem.parent / f"{stem.name}.{extension}"


def _run(args: list[str], output_dir: Path) -> None:
    result = CliRunner().invoke(cli_module.cli, [*args, *COMMON, "--output-dir", str(output_dir)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_results_do_not_depend_on_machine_load(case: str, tmp_path: Path) -> None:
    args, name = CASES[case]
    _run(args, tmp_path / "quiet")
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        _run(args, tmp_path / "loaded")
    finally:
        load.kill()
        load.wait()

    quiet, loaded = (tmp_path / run / name for run in ("quiet", "loaded"))
    record = json.loads(_file(quiet, "json").read_text())
    assert record["config"]["time_limit"] is None
    chunk = record["layers"][0]["scopes"]["chunk"]
    statuses = chunk.get("exact_status", chunk["status"])
    assert set(statuses) == ({"node_limit"} if case.endswith("stopped") else {"optimal"})
    assert _without_timings(record) == _without_timings(json.loads(_file(loaded, "json").read_text()))
    assert _csv_without_timings(_file(quiet, "csv")) == _csv_without_timings(_file(loaded, "csv"))
    problems = [stem.parent / f"{stem.name}_problems" for stem in (quiet, loaded)]
    index = json.loads((problems[0] / "index.json").read_text())
    assert index == json.loads((problems[1] / "index.json").read_text()) and index["layers"]
    for entry in index["layers"]:
        with np.load(problems[0] / entry["file"]) as first, np.load(problems[1] / entry["file"]) as second:
            assert sorted(first.files) == sorted(second.files)
            for key in first.files:
                assert first[key].dtype == second[key].dtype, key
                np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_default_limits_are_the_solvers_and_are_recorded() -> None:
    assert cli_module.QUANT_NODE_LIMIT == qp_exact.DEFAULT_NODE_LIMIT  # the numbers the CLI's help shows
    assert cli_module.PRUNE_NODE_LIMIT == sparse_ls.DEFAULT_NODE_LIMIT
    quant = config_record(QuantBoundsConfig(exact=True))
    assert (quant["node_limit"], quant["time_limit"]) == (qp_exact.DEFAULT_NODE_LIMIT, None)
    prune = config_record(PruneBoundsConfig(node_limit=7, time_limit=2.5))
    assert (prune["node_limit"], prune["time_limit"]) == (7, 2.5)
    with pytest.raises(ValueError, match="node_limit"):
        QuantBoundsConfig(node_limit=0)
    with pytest.raises(ValueError, match="time_limit"):
        PruneBoundsConfig(time_limit=0.0)


def test_limit_options_are_checked(tmp_path: Path) -> None:
    runner = CliRunner()
    for command in ("quant-bounds-data-opt", "prune-bounds-data-opt", "compare-bounds"):
        help_text = runner.invoke(cli_module.cli, [command, "--help"]).output
        assert "--node-limit" in help_text and "deterministic" in help_text and "machine load" in help_text
        bad = runner.invoke(cli_module.cli, [command, "--node-limit", "0", "--output-dir", str(tmp_path)])
        assert bad.exit_code == 2 and "'--node-limit': 0 is not in the range x>=1" in bad.output
        bad = runner.invoke(cli_module.cli, [command, "--time-limit", "0", "--output-dir", str(tmp_path)])
        assert bad.exit_code == 2 and "'--time-limit'" in bad.output
    inexact = runner.invoke(cli_module.cli, ["quant-bounds-data-opt", "--node-limit", "5", "--output-dir", str(tmp_path)])
    assert inexact.exit_code == 2 and "give --exact" in inexact.output
