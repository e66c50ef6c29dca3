"""Long-run benchmark: what a step checkpoint costs, and how fast a stopped job is back at work.

Each repeat runs one job twice as ``python -m pipeline.train`` (separate processes,
each starting its own Ray): a fresh start, stopped with SIGTERM shortly after its
first step checkpoint (which makes it write its stop checkpoint), then the same
command again, which resumes where it stopped and trains to the end of the job. Cases
alternate (fresh, restart, fresh, restart, ...), so drift hits both alike.

* ``first_step_s``: from starting the process to rank 0's first step line
  (driver, Ray, workers, data, model, checkpoint restore for the restart). Goal:
  restart <= fresh start + 10 %.
* ``checkpoint_s``: wall time of one mid-epoch checkpoint on the step path (every
  rank's files written and reported to Ray Train, which copies them to storage),
  as the worker loop measures it (``checkpoint_s`` epoch metric), in the jobs
  above (seed CNN: the fixed cost of a checkpoint, Ray's report included).
* ``resnet50_write_s``: what the size adds for the ImageNet model, measured in
  this process: ResNet-50 weights and SGD momentum (~205 MB) saved as the loop
  saves them (``save_checkpoint``) and copied into a storage directory, as Ray
  Train's upload to a local or NFS storage path does.
* Goal: at the default interval (``run.checkpoint_every_minutes: 30``) checkpoints
  take <= 2 % of training time: ``1800 / (1800 + checkpoint_s + resnet50_write_s)``
  >= 0.98.

Run: ``python -m benchmarks.resume_bench [--repeats 3]`` or ``pipeline bench resume``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import FASHION_MNIST, HostLoad, Ratio, Result

DEFAULT_INTERVAL_S = 30 * 60  # run.checkpoint_every_minutes' default
STEP_LINE = re.compile(r"epoch (\d+)/\d+ step (\d+)/\d+")
STEPS, EVERY, EPOCHS = 40, 3, 3  # steps per (capped) epoch; a step checkpoint every 3


def _shards(workdir: Path) -> Path:
    from pipeline.cli import main

    out = workdir / "fm"
    if not (out / "index.json").is_file():
        if main(["shard", str(FASHION_MNIST), str(out), "--limit", "1024", "--no-progress"]) != 0:
            raise RuntimeError(f"sharding {FASHION_MNIST} failed")
    return out


def _command(shards: Path, workdir: Path, name: str) -> list[str]:
    sets = [f"data.shards={shards}", f"run.name={name}", f"run.storage_path={workdir / 'ray_results'}",
            f"tracking.tracking_uri=sqlite:///{workdir}/mlruns.db", "tracking.experiment=resume-bench",
            "tracking.log_model=false", "train.batch_size=16", f"train.epochs={EPOCHS}",
            f"train.max_steps_per_epoch={STEPS}", "train.log_every_steps=1", f"run.checkpoint_every_steps={EVERY}",
            "run.checkpoint_every_minutes=null", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
            "optim.lr=0.01", "optim.warmup_epochs=0"]
    return [sys.executable, "-m", "pipeline.train", "--config", "fashion_mnist",
            *[a for s in sets for a in ("--set", s)]]


def _job(cmd: list[str], stop_after_step: int | None) -> tuple[float, int]:
    """Run ``cmd``; returns (seconds to the first step line, exit code). SIGTERM once a step line
    with a step >= ``stop_after_step`` appears."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    first = None
    try:
        for line in proc.stdout:
            m = STEP_LINE.search(line)
            if not m:
                continue
            if first is None:
                first = time.perf_counter() - t0
            if stop_after_step is not None and int(m.group(2)) >= stop_after_step:
                proc.send_signal(signal.SIGTERM)
                stop_after_step = None
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if first is None:
        raise RuntimeError(f"no step line from {' '.join(cmd[:4])} … (exit {proc.returncode})")
    return first, code


def _epoch_figures(workdir: Path, name: str) -> tuple[float, float, int]:
    """(mean seconds per mid-epoch checkpoint, step time, checkpoints) of the job's finished epoch."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlruns.db")
    exp = client.get_experiment_by_name("resume-bench")
    run, = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    m = run.data.metrics
    return m["checkpoint_s"], m["step_time_s"], int(m["checkpoints"])


def _resnet50_write(workdir: Path) -> float:
    """Seconds to save ResNet-50 weights + SGD momentum as a checkpoint and copy it into storage."""
    import shutil

    import torch

    from pipeline.train.checkpoint import save_checkpoint
    from pipeline.train.models import build_model

    model = build_model("resnet50", 1000, 3, 224)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    local, storage = workdir / "ckpt-local", workdir / "ckpt-storage"
    shutil.rmtree(local, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    t0 = time.perf_counter()
    save_checkpoint(local, {"model": model.state_dict(), "optimizer": opt.state_dict()}, {"model": "resnet50"})
    shutil.copytree(local, storage)
    os.sync()  # the copy is on disk, as a persisted checkpoint must be
    seconds = time.perf_counter() - t0
    _resnet50_write.mb = sum(f.stat().st_size for f in storage.iterdir()) / 1e6
    return seconds


def run(*, quick: bool = False, workdir: Path | None = None, repeats: int | None = None) -> list[Result]:
    """Fresh start and restart, alternated; checkpoint cost from the restarted jobs' epochs."""
    repeats = repeats or (1 if quick else 3)
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="resume_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shards = _shards(workdir)
    fresh, restart, ckpt, step, write = [], [], [], [], []
    stamp = int(time.time())
    host = HostLoad()  # what else the machine did during each job: load average and CPU steal
    for i in range(repeats):
        cmd = _command(shards, workdir, f"bench-{stamp}-{i}")
        with host.run("fresh start"):
            t, code = _job(cmd, stop_after_step=EVERY + 1)
        if code == 0:
            raise RuntimeError("the fresh job ended before SIGTERM reached it")
        fresh.append(t)
        with host.run("restart from step checkpoint"):
            t, code = _job(cmd, stop_after_step=None)
        if code != 0:
            raise RuntimeError(f"the restarted job exited {code}")
        restart.append(t)
        c, s, n = _epoch_figures(workdir, f"bench-{stamp}-{i}")
        if n:
            ckpt.append(c)
        step.append(s)
        write.append(_resnet50_write(workdir))
    params = {"model": "seed_cnn", "batch_size": 16, "workers": 1, "checkpoint_every_steps": EVERY,
              "steps_per_epoch": STEPS, "epochs": EPOCHS, "storage": "local disk"}
    fixed = statistics.median(ckpt) if ckpt else float("nan")
    restarted = {**params, **host.case_params("restart from step checkpoint")}  # the jobs that gave these too
    return [
        Result("resume", "fresh start", "baseline", "first_step_s", "s", fresh,
               {**params, **host.case_params("fresh start")}),
        Result("resume", "restart from step checkpoint", "case", "first_step_s", "s", restart, restarted),
        Result("resume", "step checkpoint", "case", "checkpoint_s", "s", ckpt, restarted),
        Result("resume", "training step", "baseline", "step_time_s", "s", step, restarted),
        Result("resume", "ResNet-50 state write + copy", "case", "resnet50_write_s", "s", write,
               {"state_mb": round(getattr(_resnet50_write, "mb", 0.0)), "storage": "local disk"}),
        Result("resume", f"training share, checkpoint every {DEFAULT_INTERVAL_S // 60} min", "case",
               "train_share", "fraction", [DEFAULT_INTERVAL_S / (DEFAULT_INTERVAL_S + fixed + w) for w in write],
               params),
    ]


def goals(results: list[Result]) -> list[Ratio]:
    by = {r.case: r for r in results}
    fresh, restart = by["fresh start"].median, by["restart from step checkpoint"].median
    share = by[f"training share, checkpoint every {DEFAULT_INTERVAL_S // 60} min"]
    return [
        Ratio("fresh start / restart (first step)", "fresh start", "restart from step checkpoint",
              fresh / restart if restart else float("nan"), goal=1 / 1.1, metric="first_step_s"),
        Ratio("training share with 30-min step checkpoints", share.case, "", share.median, goal=0.98,
              metric="train_share"),
    ]


def _print(results: list[Result], ratios: list[Ratio]) -> None:
    for r in results:
        print(f"{r.case:48s} {r.metric:13s} median {r.median:9.4f} {r.unit:8s} ±{r.spread:.0%}  "
              f"values {', '.join(f'{v:.4f}' for v in r.values)}")
    for g in ratios:
        print(g.line())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--workdir", type=Path, default=None, help="where shards, checkpoints and MLflow go")
    parser.add_argument("--repeats", type=int, default=None, help="fresh/restart pairs (default 3, quick 1)")
    args = parser.parse_args()
    res = run(quick=args.quick, workdir=args.workdir, repeats=args.repeats)
    _print(res, goals(res))
