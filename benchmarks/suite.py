"""Run the per-stage benchmark suites and collect one report.

Each stage module (``shard_bench``, ``load_bench``, ``train_bench``) exposes
``run(quick=..., workdir=...) -> list[Result]`` and ``goals(results) -> list[Ratio]``;
this module runs the ones asked for, in one process, and hands everything to
``benchmarks.report``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import Ratio, Result, machine_info

STAGES = {
    "shard": "benchmarks.shard_bench",
    "load": "benchmarks.load_bench",
    "train": "benchmarks.train_bench",
    "gpu": "benchmarks.gpu_bench",  # without CUDA: builds its JPEG shards, prints one line, no figures
    "scale": "benchmarks.scale_bench",
    "resume": "benchmarks.resume_bench",  # step checkpoint cost, restart vs fresh start-up (Ray jobs)
}

# Run by name only, not by "all": the cost-growth series takes tens of minutes at its default sizes.
ON_DEMAND = {"scale", "resume"}  # resume: several Ray jobs


def run_suite(stages: list[str], *, quick: bool, workdir: Path, progress: Any = None) -> dict[str, Any]:
    """Run ``stages`` and return the report payload (results, goals, machine, timing).

    A stage that fails is recorded with its error and the suite goes on: one broken
    stage should not hide the figures of the others.
    """
    started = dt.datetime.now(dt.timezone.utc)
    results: list[Result] = []
    ratios: list[Ratio] = []
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for stage in stages:
        if progress is not None:
            progress.set_description(f"bench {stage}")
        module = importlib.import_module(STAGES[stage])
        t0 = time.perf_counter()
        try:
            stage_results = module.run(quick=quick, workdir=workdir / stage)
            results.extend(stage_results)
            ratios.extend(module.goals(stage_results))
        except Exception as exc:  # noqa: BLE001 - a failing stage is reported, the others still run
            errors[stage] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
        seconds[stage] = time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
    return {
        "format_version": 1,
        "started": started.isoformat(timespec="seconds"),
        "quick": quick,
        "stages": stages,
        "machine": machine_info(),
        "seconds": seconds,
        "results": [r.to_dict() for r in results],
        "goals": [g.to_dict() for g in ratios],
        "errors": errors,
    }
