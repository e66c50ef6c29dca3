"""What tracking costs the training loop: the same steps with tracking off, on, and with the server down.

Every case runs ``pipeline.train.step.TrainStep`` of the bundled ``fashion_mnist`` config
(seed CNN, batch 64, fp32, CPU) on one fixed batch for the same number of steps, in its own
process, and differs from ``off`` in one named thing:

* ``off``          no tracker, no system metrics.
* ``tracking``     a ``Tracker`` on a SQLite store logging step metrics every 10 steps, plus this
                   node's system-metrics sampler at 1 s (ten times the default rate).
* ``server-down``  the same, but the tracking URI is ``http://127.0.0.1:<port>`` with nothing
                   listening: every send fails and is retried while records pile up in the spool.

Timing starts after 10 warm-up steps and, with ``tracking``, after the tracker's first flush
(the in-process SQLite store's one-off start-up is not a per-step cost).

Cases are interleaved (off, tracking, server-down, off, …), ``--repeats`` times; the report gives
the median images/s of each case, its spread (min–max) and the ratios to ``off``, and the same for
the process's CPU seconds per step (all threads: what the tracking threads take from training, a
figure far less disturbed than wall time by other jobs on a shared machine).

    python -m benchmarks.tracking_bench [--repeats 5] [--steps 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import HostLoad, load_range, machine_info

CASES = ("off", "tracking", "server-down")
LOG_EVERY = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (the tracking threads' work shows here even when wall time is noisy)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _run_case(case: str, steps: int, workdir: Path) -> tuple[float, float]:
    """Images/s and CPU seconds per step of ``steps`` training steps under ``case`` (this process)."""
    import torch

    from pipeline.train.config import load_config
    from pipeline.train.models import build_model
    from pipeline.train.step import TrainStep, WarmupCosine, build_optimizer, setup_torch
    from pipeline.train.sysmetrics import NodeMonitor
    from pipeline.train.tracking import Tracker, spool_dir_for

    cfg = load_config("fashion_mnist", [])
    device = torch.device("cpu")
    setup_torch(cfg, device)
    model = build_model(cfg.model.name, 10, 1, 28, cfg.model.dropout, cfg.model.width)
    optimizer = build_optimizer(model, cfg.optim)
    step = TrainStep.from_config(model, optimizer, cfg, device, WarmupCosine(optimizer, cfg.optim, steps, steps))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.train.batch_size, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (cfg.train.batch_size,), generator=gen)
    tracker = monitor = None
    if case != "off":
        uri = f"sqlite:///{workdir}/mlruns.db" if case == "tracking" else f"http://127.0.0.1:{_free_port()}"
        key = str(workdir / f"job-{case}-{time.monotonic_ns()}")
        tracker = Tracker(uri, "tracking-bench", flush_timeout_s=0)
        tracker.start(key, "bench", cfg.to_dict())
        monitor = NodeMonitor(spool_dir_for(key), interval_s=1.0)
        if case == "tracking":
            # Steady state: the SQLite store's one-off start-up (schema check, in this process) is done
            # before the clock starts. A server that is down has none.
            tracker.queue.flush(120)
    for _ in range(10):  # warm-up
        step(x, y)
    t0, c0 = time.perf_counter(), _cpu_s()
    for i in range(1, steps + 1):
        loss = step(x, y)
        if tracker is not None and i % LOG_EVERY == 0:
            tracker.log_step(i, {"step_train_loss": loss.item(), "step_lr": step.lr})
    elapsed, cpu = time.perf_counter() - t0, _cpu_s() - c0
    if tracker is not None:
        monitor.stop(0)
        tracker.end("FINISHED")
    return steps * cfg.train.batch_size / elapsed, cpu / steps


def run(repeats: int, steps: int) -> dict:
    rates: dict[str, list[float]] = {c: [] for c in CASES}
    cpu: dict[str, list[float]] = {c: [] for c in CASES}
    host = HostLoad()  # what else the machine did during each run: load average and CPU steal
    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as tmp:
        for r in range(repeats):
            for case in CASES:
                with host.run(case):
                    out = subprocess.run([sys.executable, "-m", "benchmarks.tracking_bench", "--case", case,
                                          "--steps", str(steps), "--workdir", tmp], check=True, capture_output=True,
                                         text=True)
                rate, cpu_per_step = map(float, out.stdout.strip().splitlines()[-1].split())
                rates[case].append(rate)
                cpu[case].append(cpu_per_step)
                print(f"repeat {r + 1}/{repeats} {case}: {rate:.0f} img/s, {cpu_per_step * 1000:.1f} ms CPU/step",
                      file=sys.stderr)
    med = {c: statistics.median(v) for c, v in rates.items()}
    cpu_med = {c: statistics.median(v) for c, v in cpu.items()}
    return {"steps": steps, "repeats": repeats, "images_per_s": rates, "median": med,
            "ratio_to_off": {c: med[c] / med["off"] for c in CASES}, "cpu_s_per_step": cpu,
            "cpu_median": cpu_med, "cpu_ratio_to_off": {c: cpu_med[c] / cpu_med["off"] for c in CASES},
            "machine": machine_info(), "host": {c: host.case_params(c) for c in CASES}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracking_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(*_run_case(args.case, args.steps, args.workdir))
        return 0
    res = run(args.repeats, args.steps)
    for c in CASES:
        v = res["images_per_s"][c]
        w = res["cpu_s_per_step"][c]
        print(f"{c:12s} median {res['median'][c]:7.0f} img/s  (min {min(v):.0f}, max {max(v):.0f})  "
              f"× {res['ratio_to_off'][c]:.3f} of off;  CPU {res['cpu_median'][c] * 1000:.2f} ms/step "
              f"(min {min(w) * 1000:.2f}, max {max(w) * 1000:.2f})  × {res['cpu_ratio_to_off'][c]:.3f} of off")
    print(load_range([x for c in CASES for x in res["host"][c]["load_avg_1m"]],
                     [x for c in CASES for x in res["host"][c].get("cpu_steal", [])], "run"))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
