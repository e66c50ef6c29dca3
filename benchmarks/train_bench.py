"""Training throughput: `pipeline train` on Ray against a plain PyTorch loop, in the same run.

Cases (images/s of training steps, measured by the loop's own ``ThroughputMeter``
after a warm-up epoch; Ray start-up is not part of it):

* ``plain-loop``      baseline: one process, the same model, batch, loader and threads, no Ray.
* ``ray-1-worker``    ``pipeline.train.launch.fit`` with 1 worker. Goal: ≥ 0.95 × baseline (Ray's own gate: 0.85).
* ``synthetic``       the plain loop on one in-memory batch: the ceiling without any data loading.
* ``ray-2-workers``   2 workers (DDP over gloo), for scaling 1 → 2.
* ``data_wait_frac``  fraction of step time spent waiting for the loader, per case.
* ``gpu-*``           ResNet-50, bf16/fp16 autocast + channels_last, synthetic and DALI; CUDA only.

    python -m benchmarks.train_bench [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import FASHION_MNIST, Ratio, Result, machine_info, ratio

MODEL = "seed_cnn"
BATCH = 256


def _shards(workdir: Path, limit: int | None) -> Path:
    from pipeline.cli import main

    out = workdir / f"fm-{limit or 'all'}"
    if not (out / "index.json").exists():
        args = ["shard", str(FASHION_MNIST), str(out), "--no-progress"] + (["--limit", str(limit)] if limit else [])
        if main(args) != 0:
            raise RuntimeError(f"sharding {FASHION_MNIST} failed")
    return out


def _config(shards: Path, workdir: Path, workers: int, epochs: int):
    """The bundled ``fashion_mnist`` job at the benchmark's batch size, without MLflow."""
    from pipeline.train.config import load_config

    return load_config("fashion_mnist", [
        f"data.shards={shards}", f"run.name=bench-{workers}w-{int(time.time())}",
        f"run.storage_path={workdir / 'ray_results'}", f"train.epochs={epochs}", f"train.batch_size={BATCH}",
        f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1", f"run.checkpoints_to_keep={epochs}",
        "tracking.enabled=false", "train.log_every_steps=1000000",
    ])


def _plain_loop(shards: Path, workdir: Path, epochs: int, synthetic: bool) -> list[tuple[float, float]]:
    """(images/s, data-wait fraction) per epoch of a single-process loop: same model, batch, loss, optimizer."""
    import torch
    from torch import nn

    from pipeline.data import make_loader
    from pipeline.metrics import ThroughputMeter
    from pipeline.train.loop import augment, build_optimizer
    from pipeline.train.models import build_model

    cfg = _config(shards, workdir, 1, epochs)
    torch.set_num_threads(1)  # what one Ray worker with cpus_per_worker=1 uses
    torch.manual_seed(0)
    loader = make_loader(shards, "train", batch_size=BATCH)
    model = build_model(cfg.model.name, loader.num_classes, 1, 28, cfg.model.dropout)
    opt = build_optimizer(model, cfg.optim)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    fixed = next(iter(loader)) if synthetic else None
    steps = len(loader)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        meter = ThroughputMeter()
        meter.start()
        batches = (fixed for _ in range(steps)) if synthetic else loader
        for x, y in batches:
            meter.data_ready()
            loss = crit(model(augment(x, cfg.train.augment)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            meter.step_done(y.shape[0])
        loss.item()
        t = meter.total()
        out.append((t.images_per_s, t.data_wait_frac))
    return out


def _ray_run(shards: Path, workdir: Path, workers: int, epochs: int) -> list[tuple[float, float]]:
    """(images/s, data-wait fraction) per epoch of `pipeline train` with ``workers`` Ray workers."""
    from pipeline.train.checkpoint import load_meta
    from pipeline.train.launch import fit

    res = fit(_config(shards, workdir, workers, epochs))
    metas = [load_meta(p) for p in Path(res.storage_dir).glob("checkpoint_*") if p.is_dir()]
    metas.sort(key=lambda m: m["epoch"])
    return [(m["metrics"]["train_images_per_s"], m["metrics"]["data_wait_frac"]) for m in metas]


def _warm(per_epoch: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Epochs after the first, which pays warm-up (threads, allocator, DALI pipeline)."""
    return per_epoch[1:] or per_epoch


def _results(case: str, role: str, measured: list[tuple[float, float]], params: dict) -> list[Result]:
    return [
        Result("train", case, role, "images_per_s", "images/s", [v for v, _ in measured], params),
        Result("train", case, role, "data_wait_frac", "fraction", [w for _, w in measured], params),
    ]


def _gpu_section(quick: bool, shards: Path) -> list[Result]:
    """ResNet-50 images/s on CUDA: bf16 and fp16 autocast, channels_last, synthetic and DALI batches."""
    import torch

    if not torch.cuda.is_available():
        return []
    from torch import nn

    from pipeline.train.models import build_model

    results = []
    steps, batch = (20, 128) if quick else (100, 256)
    for precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        model = build_model("resnet50", 1000, 3, 224).cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        crit = nn.CrossEntropyLoss()
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device="cuda")

        def step(xb, yb):
            with torch.autocast("cuda", dtype=dtype):
                loss = crit(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        for _ in range(5):
            step(x, y)
        torch.cuda.synchronize()  # warm-up done; clocks start on an idle GPU
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        torch.cuda.synchronize()
        results.append(Result("train", f"gpu-resnet50-{precision}-synthetic", "case", "images_per_s", "images/s",
                              [steps * batch / (time.perf_counter() - t0)], {"batch": batch}))

        # The same step fed by the DALI GPU loader with the ImageNet preset (decode, random resized
        # crop to 224, flip, normalise on the GPU). The benchmark's shards are small Fashion-MNIST
        # images, so this measures the loader's GPU path and the step, not JPEG decoding of photos.
        from pipeline.data import make_loader
        from pipeline.metrics import ThroughputMeter

        loader = make_loader(shards, "train", batch_size=batch, backend="dali", device="gpu", preset="imagenet")
        meter = ThroughputMeter()
        n = 0
        torch.cuda.synchronize()
        meter.start()
        for xb, yb in loader:
            meter.data_ready()
            step(xb.to(memory_format=torch.channels_last), yb)
            meter.step_done(yb.shape[0])
            n += 1
            if n >= steps:
                break
        torch.cuda.synchronize()
        t = meter.total()
        results.append(Result("train", f"gpu-resnet50-{precision}-dali", "case", "images_per_s", "images/s",
                              [n * batch / t.total_s], {"batch": batch, "data_wait_frac": t.data_wait_frac}))
    return results


def run(*, quick: bool = False, workdir: Path | None = None) -> list[Result]:
    """Measure every case on a 16384-image subset, 4 epochs (the first is warm-up).

    ``quick`` checks the suite end to end in seconds: 1024 images, 2 epochs, and no Ray
    cases (Ray's start-up alone costs 15-30 s on a small machine; the Ray training path has
    its own tests). Its figures mean nothing.
    """
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="train-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        shards = _shards(workdir, 1024 if quick else 16384)
        epochs = 2 if quick else 4
        params = {"model": MODEL, "batch": BATCH, "threads_per_worker": 1, "epochs_measured": epochs - 1}
        # The baseline runs before and after the Ray cases and its epochs are pooled, so load from
        # other processes on a shared machine weighs on both sides alike.
        plain = _warm(_plain_loop(shards, workdir, epochs, synthetic=False))
        results = []
        if not quick:
            ray1 = _warm(_ray_run(shards, workdir, 1, epochs))
            plain += _warm(_plain_loop(shards, workdir, epochs, synthetic=False))
            results += _results("ray-1-worker", "case", ray1, {**params, "scaling": 1, "series": "ray train"})
        synthetic = _warm(_plain_loop(shards, workdir, epochs, synthetic=True))
        results += _results("plain-loop", "baseline", plain, params)
        results += _results("synthetic", "limit", synthetic, params)
        if not quick:
            ray2 = _warm(_ray_run(shards, workdir, 2, epochs))
            results += _results("ray-2-workers", "case", ray2, {**params, "workers": 2, "scaling": 2,
                                                                  "series": "ray train"})
        results += _gpu_section(quick, shards)
        return results
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def goals(results: list[Result]) -> list[Ratio]:
    """Ray overhead (goal ≥ 0.95), loader vs synthetic, and 1 → 2 worker scaling where measured."""
    cases = {r.case for r in results}
    out = [ratio(results, "real loader / synthetic batches", "plain-loop", "synthetic", metric="images_per_s")]
    if "ray-1-worker" in cases:
        out.insert(0, ratio(results, "ray 1 worker / plain loop", "ray-1-worker", "plain-loop",
                            metric="images_per_s", goal=0.95))
    if "ray-2-workers" in cases:
        out.append(ratio(results, "2 workers / 1 worker", "ray-2-workers", "ray-1-worker", metric="images_per_s"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 images, 2 epochs, no Ray cases: checks the script runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep shards and Ray results here")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, workdir=args.workdir)
    print(json.dumps(machine_info()))
    for r in results:
        print(f"{r.case:<24} {r.metric:<15} median {r.median:10.3f} {r.unit:<9} "
              f"±{r.spread:.0%}  n={len(r.values)}  {statistics.fmean(r.values):.3f} mean")
    for g in goals(results):
        verdict = "" if g.goal is None else ("  goal met" if g.met else f"  goal {g.goal} NOT met")
        print(f"{g.name:<34} {g.value:.3f}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
