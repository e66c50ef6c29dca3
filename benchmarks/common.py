"""Shared measurement helpers for the benchmark suites.

Every suite measures a case next to its baseline and its limit in the same run
(machines are noisy; ratios measured together are what count), repeats each
measurement, and reports the median and spread. A suite returns a list of
``Result`` records; ``benchmarks.report`` turns them into JSON, Markdown and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Literal

Role = Literal["case", "baseline", "limit"]

# Real Fashion-MNIST idx files from Debian's dataset-fashion-mnist (`make data` installs it).
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclasses.dataclass
class Result:
    """One measured quantity: ``values`` holds one figure per repeat (higher is better unless ``unit`` says s)."""

    stage: str  # "shard" | "load" | "train"
    case: str  # e.g. "pass-through", "dali-cpu", "tar -cf"
    role: Role
    metric: str  # e.g. "images_per_s", "mb_per_s"
    unit: str  # e.g. "images/s", "MB/s"
    values: list[float]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # workers, batch size, ...

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """Half the min–max range relative to the median (0.05 = ±5 %)."""
        if len(self.values) < 2 or self.median == 0:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / self.median

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["median"] = self.median
        d["spread"] = self.spread
        return d


@dataclasses.dataclass
class Ratio:
    """A goal stated as a ratio of two results' medians, e.g. pass-through / tar ≥ 0.9."""

    name: str
    numerator: str  # case name
    denominator: str  # case name
    value: float
    goal: float | None = None  # minimum acceptable ratio, if the issue states one
    metric: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.value >= self.goal

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["met"] = self.met
        return d

    def line(self) -> str:
        """The ratio and its verdict, as the stage modules print it."""
        verdict = "" if self.goal is None else f"  (goal ≥ {self.goal:g}: {'met' if self.met else 'NOT met'})"
        return f"{self.name:<40} {self.value:.3f}{verdict}"


def repeat(fn: Callable[[], float], repeats: int, warmup: int = 1) -> list[float]:
    """Call ``fn`` ``warmup`` times (discarded), then ``repeats`` times; returns its figures."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call, with its return value."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ratio(results: list[Result], name: str, num: str, den: str, *, metric: str, goal: float | None = None) -> Ratio:
    """Ratio of medians of two cases of ``metric`` measured in the same run."""
    by_case = {(r.case, r.metric): r for r in results}
    try:
        a, b = by_case[(num, metric)], by_case[(den, metric)]
    except KeyError as exc:
        raise KeyError(f"no result for {exc.args[0]} among {sorted(by_case)}") from None
    return Ratio(name=name, numerator=num, denominator=den, value=a.median / b.median if b.median else float("nan"),
                 goal=goal, metric=metric)


STEAL_NOTE = 0.05  # more CPU time than this stolen during a case run: its figures are flagged


def _cpu_seconds() -> tuple[float, float] | None:
    """(steal, total) CPU seconds of the whole machine since boot, as psutil reads them (the training
    jobs' ``cpu_steal_percentage`` comes from the same counters); None where there is no steal counter."""
    import psutil

    times = psutil.cpu_times()
    if not hasattr(times, "steal"):  # Linux only
        return None
    return times.steal, sum(times[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)


class HostLoad:
    """What else the machine did during each case run: the 1-minute load average at its start and the
    share of the CPUs' time the hypervisor gave to other guests during it (``steal``).

    A virtual machine's load average does not see its neighbours on a shared host: a case can
    lose half its CPU with the load average at 1, and only the steal counter shows it.
    """

    def __init__(self) -> None:
        self.load: list[float] = []  # every case run, in the order run
        self.case_load: dict[str, list[float]] = {}  # per case, one per run
        self.steal: dict[str, list[float]] = {}  # per case, one share per run

    @contextlib.contextmanager
    def run(self, case: str) -> Iterator[None]:
        self.load.append(os.getloadavg()[0])
        self.case_load.setdefault(case, []).append(self.load[-1])
        before = _cpu_seconds()
        yield
        after = _cpu_seconds()
        if before and after and after[1] > before[1]:
            self.steal.setdefault(case, []).append(round((after[0] - before[0]) / (after[1] - before[1]), 3))

    def params(self, case: str) -> dict[str, Any]:
        """For a case's ``Result.params``: the run's load averages and this case's steal per run."""
        out: dict[str, Any] = {"load_avg_1m": [round(x, 2) for x in self.load]}
        if case in self.steal:
            out["cpu_steal"] = self.steal[case]
        return out

    def case_params(self, case: str) -> dict[str, Any]:
        """Like ``params``, but the load averages at the start of this case's own runs only."""
        return {**self.params(case), "load_avg_1m": [round(x, 2) for x in self.case_load.get(case, [])]}


def load_range(loads: list[float], steal: list[float], unit: str) -> str:
    """The host's side of a run, from ``HostLoad``'s per-run figures: the range of the 1-minute load average at
    the ``unit``s' starts and the most CPU steal of one ``unit``; "" when no load was recorded."""
    if not loads:
        return ""
    line = f"Load average (1 min) at the {unit}s' starts {min(loads):.2f}–{max(loads):.2f}"
    return line + (f", CPU steal at most {max(steal):.1%} of a {unit}" if steal else "")


def steal_note(results: list[dict[str, Any]]) -> str | None:
    """A line naming the cases (``Result.to_dict()`` records) that lost more than ``STEAL_NOTE`` of the
    machine's CPU time to other guests in one of their runs; None when none did or none was measured."""
    worst: dict[str, float] = {}
    for r in results:
        steal = r.get("params", {}).get("cpu_steal") or []
        if steal and max(steal) > STEAL_NOTE:
            worst[r["case"]] = max(worst.get(r["case"], 0.0), max(steal))
    if not worst:
        return None
    cases = ", ".join(f"{c} {v:.0%}" for c, v in sorted(worst.items(), key=lambda kv: -kv[1]))
    return (f"the hypervisor gave CPU time to other guests during some runs (steal, worst run: {cases}); "
            "ratios with those cases are unreliable: rerun on a quiet host")


def print_steal_note(results: list[Result]) -> None:
    """Print ``steal_note`` for a stage module's results, when there is one."""
    note = steal_note([r.to_dict() for r in results])
    if note:
        print(f"note: {note}")


def now_utc() -> str:
    """The report's start time, as ``pipeline bench`` records it."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": _cpu_model(),
    }
    try:
        import torch

        from pipeline.train.step import resolve_precision

        info["torch"] = torch.__version__
        info["cpu_auto_precision"] = resolve_precision("auto", "cpu")  # bf16 where the CPU has AMX
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    from pipeline.train.step import cpu_info

    return cpu_info("model name") or platform.processor()
