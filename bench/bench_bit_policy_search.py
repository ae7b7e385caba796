#!/usr/bin/env python
"""Time LIMPQ's bit-width search (``main.py search-bit-policy``): the whole path, the ILP alone, and CBC.

Rows, each the best and the median of ``--repeats`` runs (wall-clock and CPU seconds of this
process; CBC runs as a child process, so its CPU column is only PuLP's model building):

* with ``--subprocess``, fresh interpreters (their CPU: user + system time of the child):
  ``main.py --help`` (the interpreter and main.py's top-level imports, nothing else),
  ``command (subprocess)`` (``python main.py search-bit-policy``, imports included) and
  ``command --no-figure`` (the same without the figure, so without matplotlib); then the wall
  time of one such command split into its stages, measured inside a fresh interpreter that runs
  the command's steps (:data:`SPLIT_SCRIPT`): interpreter start (the child's wall time less the
  rest), imports (``main.py`` and the command's modules), geometry (indicators read, the layer
  geometry from the bundled table), solve (ILP and policy file) and figure (matplotlib imported,
  PNG and PDF written); and the same with the geometry computed from the model (torch and
  torchvision imported, ResNet-50 built, one shape pass: what the command did before the table,
  and still does for a model or image size the table lacks);
* ``command path``: :func:`studies.bit_policy_search.run_bit_policy_search` in this process:
  indicators read, geometry (the bundled table), the solve, the policy and its figure written
  (matplotlib imported by the first run);
* ``geometry``: building the model and its geometry (:func:`models.geometry.layer_geometry`);
* ``solve (dp)``: :func:`quantization.bit_allocation.allocate_bits` as the command runs it (the
  bounded dynamic programme);
* ``solve (highs)``: the same ILP by HiGHS after the LP reduced-cost reduction (``solver="highs"``,
  the DP's fallback);
* ``solve (every choice)``: the same ILP given whole to HiGHS (``solver="highs-full"``);
* ``CBC (PuLP)``: the same ILP (every allowed choice) built with PuLP and solved by CBC, the
  official search's solver, when ``pulp`` is installed (an optional bench dependency pinned in
  ``bench/requirements.txt``, imported here only); model building included.

All solves must agree on the objective (checked). Defaults: the published ResNet-50 indicators,
B = 6..2, W3A4 BitOPs, compression ratio 12.2, alpha 2.

    python bench/bench_bit_policy_search.py --repeats 5 --geometry official --subprocess
"""
from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.geometry import layer_geometry
from models.registry import load_model
from quantization.bit_allocation import FIXED_LAYER_BITS, allocate_bits, forbidden_choices
from studies.bit_policy_search import (
    SearchProblem,
    SearchSettings,
    run_bit_policy_search,
    search_problem,
    solve_search_problem,
)
from studies.indicators import read_indicators


def timed(function: Callable[[], object], repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of each of ``repeats`` calls, and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, result


def timed_subprocess(command: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of each of ``repeats`` runs of ``command`` in a child process."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        walls.append(time.perf_counter() - wall)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return walls, cpus


SPLIT_SCRIPT = """
import json, sys, time
from pathlib import Path
marks = [time.perf_counter()]
import main, commands.search
from studies.bit_policy_search import SearchSettings, geometry_problem, policy_document, solve_search_problem
from studies.indicators import read_indicators
from studies.search_geometry import model_search_geometry, read_bundled_geometry
from utils.io import write_json
marks.append(time.perf_counter())
output, source = Path(sys.argv[1]), sys.argv[2]
settings = SearchSettings(geometry=sys.argv[3])
indicators = read_indicators(settings.indicators).select_bits(settings.bits)
if source == "bundled":
    geometry = read_bundled_geometry(settings.architecture, settings.image_size)
else:
    from models import load_model
    geometry = model_search_geometry(load_model(settings.architecture, pretrained=False), settings.architecture,
                                     settings.image_size)
marks.append(time.perf_counter())
problem = geometry_problem(geometry, indicators, settings)
document = policy_document(problem, solve_search_problem(problem, settings), settings)
write_json(output, document)
marks.append(time.perf_counter())
from models.bit_policy import parse_bit_policy
from studies.bit_policy_plots import write_bit_policy_figure
write_bit_policy_figure(parse_bit_policy(document), output.parent, stem=output.stem)
marks.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(marks, marks[1:])]))
"""
SPLIT_STAGES = ("imports", "geometry", "solve", "figure")


def timed_split(output: Path, source: str, geometry: str, repeats: int) -> list[list[float]]:
    """Per run of :data:`SPLIT_SCRIPT` in a fresh interpreter: [interpreter start, *SPLIT_STAGES] wall seconds."""
    runs = []
    for _ in range(repeats):
        wall = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, str(output), source, geometry], cwd=ROOT,
                                check=True, capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - wall
        stages = json.loads(result.stdout.strip().splitlines()[-1])
        runs.append([wall - sum(stages), *stages])
    return runs


def split_rows(runs: list[list[float]]) -> list[str]:
    """One row per stage (and the total): best and median wall milliseconds."""
    columns = [*zip(*runs), [sum(run) for run in runs]]
    names = ["interpreter start", *SPLIT_STAGES, "total"]
    return [f"  {name:22s} {min(values) * 1e3:9.1f} {statistics.median(values) * 1e3:9.1f}"
            for name, values in zip(names, columns)]  # fmt: skip


def cbc_objective(problem: SearchProblem, settings: SearchSettings) -> float:
    """The ILP with every allowed choice, built with PuLP and solved by CBC (no gap)."""
    import pulp

    indicators = problem.indicators
    bits = indicators.bits
    allowed_w = ~forbidden_choices(indicators.weight, bits)
    allowed_a = ~forbidden_choices(indicators.act, bits)
    ilp = pulp.LpProblem("limpq", pulp.LpMinimize)
    x = {(l, i, j): ilp.add_variable(f"x_{l}_{i}_{j}", 0, 1, cat="Binary")
         for l in range(len(problem.macs))
         for i in np.flatnonzero(allowed_w[l]) for j in np.flatnonzero(allowed_a[l])}  # fmt: skip
    ilp += pulp.lpSum((indicators.act[l, j] + settings.alpha * indicators.weight[l, i]) * v
                      for (l, i, j), v in x.items())  # fmt: skip
    for layer in range(len(problem.macs)):
        ilp += pulp.lpSum(v for (l, _, _), v in x.items() if l == layer) == 1
    if settings.bitops:
        ilp += (pulp.lpSum(problem.macs[l] * bits[i] * bits[j] * v for (l, i, j), v in x.items())
                <= sum(problem.macs) * settings.wb * settings.ab)  # fmt: skip
    if settings.compression_ratio > 0:
        total = sum(problem.weight_counts) + problem.fixed_weight_count
        ilp += (FIXED_LAYER_BITS * problem.fixed_weight_count
                + pulp.lpSum(problem.weight_counts[l] * bits[i] * v for (l, i, j), v in x.items())
                <= 32 * total / settings.compression_ratio)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)  # PuLP's bundled CBC
        ilp.solve(pulp.PULP_CBC_CMD(msg=0, gapRel=0, gapAbs=0))
    if pulp.LpStatus[ilp.status] != "Optimal":
        raise RuntimeError(f"CBC: {pulp.LpStatus[ilp.status]}")
    return float(pulp.value(ilp.objective))


def row(name: str, walls: list[float], cpus: list[float] | None = None) -> str:
    cpu = f"{min(cpus) * 1e3:9.1f} {statistics.median(cpus) * 1e3:9.1f}" if cpus else f"{'-':>9} {'-':>9}"
    return f"{name:24s} {min(walls) * 1e3:9.1f} {statistics.median(walls) * 1e3:9.1f} {cpu}"


@click.command()
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--geometry", type=click.Choice(["floored", "official"]), default="floored", show_default=True)
@click.option("--subprocess/--no-subprocess", "run_subprocess", default=False, show_default=True,
              help="Also time the command in fresh interpreters (imports included).")
def main(repeats: int, geometry: str, run_subprocess: bool) -> None:
    settings = SearchSettings(geometry=geometry)
    indicators = read_indicators(settings.indicators)
    rows, split = [], {}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "policy.json"
        if run_subprocess:
            command = [sys.executable, str(ROOT / "main.py"), "search-bit-policy", "--bitops-geometry", geometry,
                       "--output", str(output)]  # fmt: skip
            rows.append(row("main.py --help", *timed_subprocess([sys.executable, str(ROOT / "main.py"), "--help"],
                                                                 repeats)))  # fmt: skip
            rows.append(row("command (subprocess)", *timed_subprocess(command, repeats)))
            rows.append(row("command --no-figure", *timed_subprocess([*command, "--no-figure"], repeats)))
            split = {source: timed_split(output, source, geometry, repeats) for source in ("bundled", "model")}
        walls, cpus, document = timed(lambda: run_bit_policy_search(settings, output), repeats)
        rows.append(row("command path", walls, cpus))
    walls, cpus, model = timed(lambda: (m := load_model("resnet50", pretrained=False), layer_geometry(m))[0], repeats)
    rows.append(row("geometry", walls, cpus))
    problem = search_problem(model, indicators, settings)
    dp_walls, dp_cpus, dp = timed(lambda: solve_search_problem(problem, settings), repeats)
    rows.append(row(f"solve ({dp.solver})", dp_walls, dp_cpus))

    def highs(solver: str) -> object:
        return allocate_bits(
            indicators.weight, indicators.act, indicators.bits, np.array(problem.macs),
            np.array(problem.weight_counts), alpha=settings.alpha, bitops_bits=(settings.wb, settings.ab),
            compression_ratio=settings.compression_ratio, fixed_weight_count=problem.fixed_weight_count,
            solver=solver)  # fmt: skip

    reduced_walls, reduced_cpus, reduced = timed(lambda: highs("highs"), repeats)
    rows.append(row("solve (highs)", reduced_walls, reduced_cpus))
    full_walls, full_cpus, full = timed(lambda: highs("highs-full"), repeats)
    rows.append(row("solve (every choice)", full_walls, full_cpus))
    objectives = {"command": document["objective"], "dp": dp.objective, "highs": reduced.objective,
                  "every choice": full.objective}  # fmt: skip
    cbc_walls = None
    if importlib.util.find_spec("pulp") is not None:
        cbc_walls, cbc_cpus, objectives["CBC"] = timed(lambda: cbc_objective(problem, settings), repeats)
        rows.append(row("CBC (PuLP)", cbc_walls, cbc_cpus))
    else:
        rows.append("CBC (PuLP)               not installed")

    click.echo(f"ResNet-50, {geometry} geometry, B=6..2, W3A4, CR 12.2, alpha 2; {repeats} repeats; milliseconds")
    click.echo(f"{'':24s} {'wall best':>9} {'median':>9} {'cpu best':>9} {'median':>9}")
    click.echo("\n".join(rows))
    if split:
        for source, runs in split.items():
            click.echo(f"one command's wall time by stage, geometry from the {'bundled table' if source == 'bundled' else 'model'}"
                       f" (fresh interpreter; best, median ms):")  # fmt: skip
            click.echo("\n".join(split_rows(runs)))
        medians = {source: statistics.median(sum(run) for run in runs) for source, runs in split.items()}
        click.echo(f"split total: model geometry / bundled {medians['model'] / medians['bundled']:.2f}x wall")
    spread = max(objectives.values()) - min(objectives.values())
    click.echo(f"objectives: {', '.join(f'{k} {v:.12g}' for k, v in objectives.items())} (spread {spread:.2g})")
    if spread > 1e-9:
        raise click.ClickException("the solvers disagree")
    dp_cpu = statistics.median(dp_cpus)
    ratios = [f"highs / dp {statistics.median(reduced_cpus) / dp_cpu:.2f}x cpu",
              f"every choice / dp {statistics.median(full_cpus) / dp_cpu:.2f}x cpu"]  # fmt: skip
    if cbc_walls is not None:
        ratios.append(f"CBC / dp {statistics.median(cbc_walls) / statistics.median(dp_walls):.2f}x wall")
    click.echo("medians: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
