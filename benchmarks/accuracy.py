"""Accuracy reproduction on Fashion-MNIST: shards, then ``pipeline train`` on 2 Ray workers, against a target.

For each bundled config the suite measures, end to end on this machine:

* sharding ``/usr/share/datasets/fashion-mnist`` (idx files) with ``pipeline shard``; a complete shard
  directory from an earlier build is reused and its build is not timed (``--rebuild`` times a fresh one);
* ``pipeline train --config NAME`` in a fresh process (Ray start-up, workers, MLflow and model logging
  included), exactly as a user runs it;
* test accuracy: ``val_top1`` of the last epoch on the 10,000-image t10k split, read back from MLflow
  together with the per-epoch history.

Targets (accuracy, end-to-end seconds): ``fashion_mnist`` ≥ 0.92 within 300 s, ``fashion_mnist_resnet``
≥ 0.94 within 300 s, both on 2 CPU workers. Results go to stdout and to
``benchmarks/results/accuracy-<date>-<host>.json``.

    python -m benchmarks.accuracy [--config fashion_mnist|fashion_mnist_resnet|all] [--shards DIR] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import FASHION_MNIST as SOURCE
from benchmarks.common import machine_info

DEFAULT_SHARDS = Path("benchmarks/data/fashion_mnist")
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS: dict[str, dict[str, float]] = {
    "fashion_mnist": {"min_top1": 0.92, "max_total_s": 300.0},
    "fashion_mnist_resnet": {"min_top1": 0.94, "max_total_s": 300.0},
}


def shard(source: Path, out: Path, rebuild: bool) -> tuple[float | None, bool]:
    """Build the shards unless a complete set is there; returns (wall seconds or None when reused, reused)."""
    from pipeline.errors import UserError
    from pipeline.shard.manifest import read_manifest

    if rebuild and out.exists():
        shutil.rmtree(out)
    if (out / "index.json").exists():
        try:
            read_manifest(out)  # a manifest exists only after every shard was written (and checks the files)
            return None, True
        except UserError:
            pass
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "shard", str(source), str(out), "--no-progress"], check=True)
    return time.perf_counter() - t0, False


def train(config: str, shards: Path, storage: Path, overrides: list[str]) -> dict[str, Any]:
    """``pipeline train --config CONFIG`` in a fresh process; the job's figures, read back from MLflow."""
    from pipeline.train.config import load_config
    from pipeline.train.tracking import find_job_run, resolve_tracking_uri, ui_hint

    run_name = f"accuracy-{config}-{time.strftime('%Y%m%d-%H%M%S')}"
    sets = [f"data.shards={shards.resolve()}", f"run.name={run_name}", f"run.storage_path={storage.resolve()}",
            *overrides]
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    train_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")

    cfg = load_config(config, sets)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    run = find_job_run(tracking_uri, cfg.tracking.experiment, f"{storage.resolve()}/{run_name}")
    out: dict[str, Any] = {"config": config, "run_name": run_name, "command": cmd, "train_s": train_s,
                           "epochs": cfg.train.epochs, "tracking_uri": tracking_uri, "ui": ui_hint(tracking_uri),
                           "mlflow_run_id": run.info.run_id if run else None, "per_epoch": []}
    if run is None:
        return out
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    history: dict[int, dict[str, float]] = {}
    for key in ("val_top1", "val_loss", "train_loss", "epoch_time_s", "train_images_per_s"):
        for m in client.get_metric_history(run.info.run_id, key):
            history.setdefault(m.step, {})[key] = m.value
    out["per_epoch"] = [{"epoch": e, **history[e]} for e in sorted(history)]
    out["val_top1"] = out["per_epoch"][-1].get("val_top1") if out["per_epoch"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="all", choices=(*TARGETS, "all"))
    p.add_argument("--shards", type=Path, default=DEFAULT_SHARDS, help=f"shard directory (default: {DEFAULT_SHARDS})")
    p.add_argument("--source", type=Path, default=SOURCE, help=f"Fashion-MNIST idx files (default: {SOURCE})")
    p.add_argument("--rebuild", action="store_true", help="delete and rebuild the shards, so the build is timed")
    p.add_argument("--storage", type=Path, default=Path("ray_results"), help="run.storage_path for the jobs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override passed to pipeline train (repeatable)")
    args = p.parse_args(argv)
    configs = list(TARGETS) if args.config == "all" else [args.config]

    load_before = os.getloadavg()
    shard_s, reused = shard(args.source, args.shards, args.rebuild)
    print(f"[accuracy] shards {args.shards}: " + ("reused (build not timed; --rebuild to time it)" if reused
                                                  else f"built in {shard_s:.1f} s"), flush=True)
    results = []
    for config in configs:
        r = train(config, args.shards, args.storage, args.overrides)
        target = TARGETS[config]
        total = r["train_s"] + (shard_s or 0.0)
        top1 = r.get("val_top1")
        r.update(shard_s=shard_s, shards_reused=reused, total_s=total, target=target,
                 accuracy_met=top1 is not None and top1 >= target["min_top1"],
                 time_met=None if reused else total <= target["max_total_s"])
        r["met"] = r["accuracy_met"] and bool(r["time_met"])
        results.append(r)
        for e in r["per_epoch"]:
            print(f"[accuracy] {config} epoch {e['epoch']}: val_top1 {e.get('val_top1', float('nan')):.4f} "
                  f"({e.get('epoch_time_s', float('nan')):.1f} s, {e.get('train_images_per_s', float('nan')):.0f} img/s)")
        timing = (f"train {r['train_s']:.1f} s (shards reused, not timed)" if reused else
                  f"shard {shard_s:.1f} s + train {r['train_s']:.1f} s = {total:.1f} s")
        print(f"[accuracy] {config}: test top-1 {top1 if top1 is None else f'{top1:.4f}'} "
              f"(target ≥ {target['min_top1']}: {'met' if r['accuracy_met'] else 'NOT met'}); {timing} "
              f"(target ≤ {target['max_total_s']:.0f} s: "
              f"{'not judged' if r['time_met'] is None else 'met' if r['time_met'] else 'NOT met'})", flush=True)
        print(f"[accuracy] MLflow run {r['mlflow_run_id']} ({r['run_name']}); open it with: {r['ui']}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    path = RESULTS / f"accuracy-{time.strftime('%Y%m%d')}-{info['host']}.json"
    path.write_text(json.dumps({"suite": "accuracy", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "machine": info, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                                "shards": str(args.shards), "results": results}, indent=1) + "\n")
    print(f"[accuracy] wrote {path}")
    return 0 if all(r["met"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
